"""llama.cpp RPC ring restart with and without the rpc servers' tensor cache, over a shaped link.

Three real systemd hosts (tests/systemd/hosts.py, the shipped unit), rank 0 llama-server, ranks
1-2 ggml-rpc-server. The machine's side of the rpc hosts' veths gets a tbf qdisc (`--rate`,
100 Mbit by default: what llama-server sends them is rate-limited; netem does not exist on this
kernel). A restart is what a failure does: the head's engine unit is SIGKILLed and the
coordinator starts a new generation; the time is from the kill to the first answered chat.

Per model, in one lab and one run (so ratios are same-run):
  no-cache   model.rpc_cache = false: every restart sends every weight
  cold       cache on but emptied before the restart: sends everything and writes the entries
  warm       cache on and filled: tensors over 10 MiB come from the rpc hosts' disks
Bytes are the veths' TX counters (all traffic to the rpc hosts during the restart).

Models: SmolLM2-135M Q4_1 (the test model; only its 30 MB output matrix is over llama.cpp's
10 MiB cache threshold, every layer tensor is 0.55 MB and always sent) and `wide`, made here
from it with the gguf package: 2 layers with feed_forward_length 10240 in F16 (random FFN
weights, so its answers are nonsense but deterministic), every FFN tensor 11.8 MB, so nearly all
weights are cacheable, as in a real multi-GB model.

The restart backoff is constant (BACKOFF_MS) so that runs are alike. tbf's queue (`--latency`,
400 ms by default) delays every request that needs an answer behind the bytes queued before it:
the head's hash query per cacheable tensor waits that long on a cold cache.

  scripts/bench.sh rpc-cache [--rate 100mbit] [--latency 400ms] [--runs 3] [--models smollm2,wide]
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests/systemd"))

import os  # noqa: E402

import hosts  # noqa: E402
import rpc_ring  # noqa: E402


# A constant backoff before each restart: every restart here is a failure to the coordinator, and
# its doubling backoff (0.5 s up to 5 s in the test config) would slow the later runs.
BACKOFF_MS = 200


def make_wide(src: Path, dst: Path, n_ff=10240, layers=2):
    """SmolLM2's metadata and attention, `layers` blocks, FFNs of width n_ff (F16, random)."""
    import gguf
    import numpy as np

    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), arch="llama")
    override = {"llama.block_count": layers, "llama.feed_forward_length": n_ff}
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
        val = override.get(key, field.contents())
        w.add_key_value(key, val, vtype, sub_type=sub)
    rng = np.random.default_rng(0)
    n_embd = int(r.fields["llama.embedding_length"].contents())
    for t in r.tensors:
        name = t.name
        if name.startswith("blk."):
            if int(name.split(".")[1]) >= layers:
                continue
            kind = name.split(".")[2]
            if kind in ("ffn_gate", "ffn_up", "ffn_down"):
                shape = (n_embd, n_ff) if kind == "ffn_down" else (n_ff, n_embd)
                data = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)
                w.add_tensor(name, data)
                continue
        w.add_tensor(name, t.data, raw_shape=t.data.shape,
                     raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def shape(lab, rate, latency):
    for h in lab.hosts[1:]:
        h.shape_inbound(rate, latency=latency)


def clear_cache(lab):
    for h in lab.hosts[1:]:
        h.run(f"rm -rf {rpc_ring.cache_root(h.index)}/rpc {rpc_ring.STATE}/rpc-cache/*.index.json")


def restart(lab):
    before = rpc_ring.tx_bytes(lab)
    t0 = time.monotonic()
    killed = rpc_ring.restart_ring(lab)
    _, answer, _ = rpc_ring.wait_serving(lab, after_generation=killed, timeout=600)
    return time.monotonic() - t0, rpc_ring.tx_bytes(lab) - before, answer


def bench_model(model: Path, rate: str, latency: str, runs: int):
    llama = Path(os.environ["LLAMA_CPP_DIR"])
    agent = Path(os.environ["LLM_AGENT_BIN"])
    binds = [(agent, "/opt/llm-agent/llm-agent", True), (llama, "/opt/llama", True),
             (model.parent, "/opt/models", True)]
    res = {"model": model.name, "model_bytes": model.stat().st_size, "rate": rate,
           "tbf_latency": latency, "backoff_ms": BACKOFF_MS}
    with hosts.Lab(3, binds=binds) as lab:
        shape(lab, rate, latency)
        rows = {"no-cache": [], "cold": [], "warm": []}
        answers = set()
        # Without the cache.
        rpc_ring.install(lab, model, rpc_cache=False, backoff_ms=BACKOFF_MS)
        rpc_ring.start_agents(lab)
        rpc_ring.wait_serving(lab, timeout=600)
        for _ in range(runs):
            s, b, a = restart(lab)
            rows["no-cache"].append((s, b))
            answers.add(a)
        rpc_ring.stop_agents(lab)
        # With it: the first start fills it; then cold (emptied) and warm restarts alternate.
        rpc_ring.install(lab, model, rpc_cache=True, backoff_ms=BACKOFF_MS)
        clear_cache(lab)
        rpc_ring.start_agents(lab)
        rpc_ring.wait_serving(lab, timeout=600)
        for _ in range(runs):
            clear_cache(lab)
            s, b, a = restart(lab)
            rows["cold"].append((s, b))
            answers.add(a)
            s, b, a = restart(lab)
            rows["warm"].append((s, b))
            answers.add(a)
        res["cached_bytes"] = sum(sum(rpc_ring.cache_entries(h, h.index).values())
                                  for h in lab.hosts[1:])
        rpc_ring.stop_agents(lab)
    for k, v in rows.items():
        res[k] = {"restart_s": [round(s, 2) for s, _ in v],
                  "median_s": round(statistics.median(s for s, _ in v), 2),
                  "median_bytes": int(statistics.median(b for _, b in v))}
    res["ratio_warm_vs_no_cache"] = round(res["warm"]["median_s"] / res["no-cache"]["median_s"], 3)
    res["ratio_cold_vs_no_cache"] = round(res["cold"]["median_s"] / res["no-cache"]["median_s"], 3)
    res["same_answer_every_restart"] = len(answers) == 1
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", default="100mbit")
    ap.add_argument("--latency", default="400ms", help="tbf queue bound")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--models", default="smollm2,wide")
    args = ap.parse_args()
    if os.geteuid() != 0 or hosts.unavailable_reason():
        sys.exit(f"needs root and systemd-nspawn: {hosts.unavailable_reason()}")
    hosts.prepare()
    smol = Path(os.environ["SMOLLM2_GGUF"])
    with tempfile.TemporaryDirectory(prefix="rpc-cache-bench.") as tmp:
        for name in args.models.split(","):
            if name == "smollm2":
                model = smol
            elif name == "wide":
                model = Path(tmp) / "models" / "smollm2-wide-f16.gguf"
                model.parent.mkdir(exist_ok=True)
                make_wide(smol, model)
            else:
                sys.exit(f"unknown model {name}: smollm2 or wide")
            print(json.dumps(bench_model(model, args.rate, args.latency, args.runs)), flush=True)


if __name__ == "__main__":
    main()
