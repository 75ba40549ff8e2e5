"""Model delivery's transfer rate against the link's rate, on real systemd hosts.

Why: a node without the model fetches it from a node that has it over the control API (issue
11, item 3); the question is how close that comes to the link, and whether `delivery.max_mbit`
holds. Two systemd hosts (tests/systemd/hosts.py, the shipped unit, a llama.cpp RPC ring):
rank 0 reads the model but its `model_dir` is empty, rank 1 holds the file, so at ring start
the coordinator has rank 0 fetch it from rank 1. The file flows rank 1 -> rank 0, so the tbf
qdisc sits on the machine's side of rank 0's veth (tbf shapes egress; that side's egress is
what the bridge forwards to rank 0).

Per case (a link rate or none, a model file, a `delivery.max_mbit` or none, the control plane
in plain HTTP with the token or in mutual TLS), in one lab:
  tcp        a plain TCP stream rank 1 -> rank 0 over the same shaping: what the link gives
  seconds    the transfer fact's `seconds` (the agent's own clock: request to verified file)
  receive s  the receive loop alone (the agent's log line "model file received and verified")
  wall s     rank 0's agent started -> first answered chat (agent start, delivery, ring start)
Rank 1's copy is hashed before rank 0 starts (a source serves only a hashed copy; a worker
hashes on the first request, which would add its hash time and a 2 s retry to the first case).

Models: SmolLM2-135M Q4_1 (98 MB, the test model) and `big`, made here from it with the gguf
package (rpc_cache.make_wide: `--big-layers` blocks with 10240-wide F16 FFNs, random weights,
~530 MB at 14 layers), so that the fast links run for seconds, not a fraction of one.
The TLS cases use certificates made as an operator makes them (`llm-agent pki init`, `pki issue
rankN`, as in test_tls_systemd.py).

  scripts/bench.sh deliver [--runs 2] [--quick] [--no-big] [--no-tls] [--big-layers 14]
"""

import argparse
import json
import os
import re
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests/systemd"))

import hosts  # noqa: E402
import rpc_ring  # noqa: E402
from rpc_cache import make_wide  # noqa: E402
from test_ring_systemd import API_KEY, TOKEN, config_text  # noqa: E402

MODEL_DIR = f"{rpc_ring.STATE}/models"
TCP_PORT = 9099
TCP_BYTES = 100 << 20
PKI = "/etc/llm-cluster/pki"
CONFIG = "/etc/llm-cluster/cluster.toml"
# (model, tbf rate or None for the bare veth, delivery.max_mbit or None, mutual TLS)
CASES = [
    ("smollm2", None, None, False), ("smollm2", "1gbit", None, False),
    ("smollm2", "100mbit", None, False), ("smollm2", "100mbit", 50, False),
    ("smollm2", "100mbit", None, True),
    ("big", None, None, False), ("big", "1gbit", None, False), ("big", "1gbit", 300, False),
    ("big", "100mbit", None, False), ("big", None, None, True), ("big", "1gbit", None, True),
]
QUICK = [("smollm2", "100mbit", None, False), ("smollm2", "100mbit", 50, False)]


def mbit(rate):
    """'100mbit' -> 100.0, '1gbit' -> 1000.0 (tc's units, decimal)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(k|m|g)bit", rate)
    if not m:
        sys.exit(f"link rate {rate}: expected e.g. 100mbit or 1gbit")
    return float(m[1]) * {"k": 1e-3, "m": 1.0, "g": 1e3}[m[2]]


def burst(rate):
    """tbf's bucket: 2 ms at the rate, at least one 64 KiB GSO packet."""
    return f"{max(64 << 10, int(mbit(rate) * 1e6 / 8 * 0.002))}b"


def tx_bytes(h):
    return int(Path(f"/sys/class/net/{h.veth}/statistics/tx_bytes").read_text())


def tcp_mbit(src, dst, nbytes=TCP_BYTES):
    """A plain TCP stream src -> dst over the lab: Mbit/s the receiver saw (accept to EOF)."""
    recv = ("import socket,time\n"
            "s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
            f"s.bind(('0.0.0.0',{TCP_PORT}));s.listen(1);c,_=s.accept();t=time.monotonic()\n"
            "b=bytearray(1<<20);n=0\n"
            "while True:\n k=c.recv_into(b)\n if not k: break\n n+=k\n"
            "print(n,time.monotonic()-t)\n")
    send = ("import socket\n"
            f"s=socket.create_connection(('{dst.ip}',{TCP_PORT}));b=bytes(1<<20)\n"
            f"for _ in range({nbytes >> 20}): s.sendall(b)\n"
            "s.close()\n")
    out = {}
    t = threading.Thread(target=lambda: out.update(r=dst.run(["python3", "-c", recv],
                                                             timeout=300)))
    t.start()
    dst.wait_listening(TCP_PORT)
    src.run(["python3", "-c", send], timeout=300)
    t.join()
    n, s = out["r"].stdout.split()
    return int(n) * 8 / float(s) / 1e6


def edit_config(max_mbit, tls):
    """What the test config (rpc_ring.install) lacks here: rank 0's model_dir, the cap, [tls]."""
    def edit(text):
        rank0 = "\n[[node]]\nrank = 0\n"
        assert rank0 in text, "the test config's node table changed"
        text = text.replace(rank0, f'{rank0}model_dir = "{MODEL_DIR}"\n')
        if max_mbit is not None:
            text += f"\n[delivery]\nmax_mbit = {max_mbit}\n"
        if tls:
            text += "\n[tls]\n"
        return text
    return edit


def make_pki(lab, agent, tmp):
    """The cluster CA and every rank's certificate and key, made here and put on each host."""
    conf = Path(tmp) / "cluster.toml"
    conf.write_text(config_text(lab, Path("/opt/models/x.gguf")) + "\n[tls]\n")
    pki = Path(tmp) / "pki"
    for args in (["init"], *[["issue", f"rank{h.index}"] for h in lab.hosts]):
        subprocess.run([str(agent), "pki", *args, "--config", str(conf), "--dir", str(pki)],
                       check=True, capture_output=True, text=True)
    for h in lab.hosts:
        h.write_file(f"{PKI}/ca.crt", (pki / "ca.crt").read_bytes())
        for ext, mode in (("crt", 0o644), ("key", 0o600)):
            h.write_file(f"{PKI}/rank{h.index}.{ext}",
                         (pki / f"rank{h.index}.{ext}").read_bytes(), mode=mode)
    # What rank 0 presents to rank 1: the client side of this bench's own requests.
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    ctx.load_cert_chain(str(pki / "rank0.crt"), str(pki / "rank0.key"))
    return ctx


def hash_source(h, model, tls_ctx=None, timeout=300):
    """Until rank 1 serves its copy: it hashes it on the first request (503 meanwhile)."""
    size = model.stat().st_size
    scheme = "https" if tls_ctx else "http"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            st, _, body = hosts.http("GET", f"{scheme}://{h.ip}:7700/v1/models/smollm2/file",
                                     headers={"Authorization": f"Bearer {TOKEN}",
                                              "Range": f"bytes={size - 1}-"}, context=tls_ctx)
            if st == 206:
                return
            if st != 503:
                raise AssertionError(f"rank 1 answered {st}: {body[:500]!r}")
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"rank 1 did not hash its copy within {timeout} s")


def transfer_event(lab):
    st, _, body = hosts.http("GET", f"{rpc_ring.base(lab)}/api/v1/events?follow=false",
                             headers={"Authorization": f"Bearer {API_KEY}"})
    assert st == 200, body
    done = [e for e in json.loads(body)["events"]
            if e["kind"] == "transfer" and e.get("rank") == 0 and e.get("state") == "done"]
    assert done, f"no transfer to rank 0 finished: {body[-2000:]!r}"
    return done[-1]


def receive_seconds(h):
    """The receive loop's seconds from the agent's journal (tracing fields are journal fields)."""
    out = h.run(["journalctl", "--no-pager", "-o", "json", "-u", "llm-agent@rank0.service"],
                check=False).stdout
    secs = None
    for line in out.splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if e.get("MESSAGE") == "model file received and verified" and "SECONDS" in e:
            secs = float(e["SECONDS"])
    return secs


def deliver_once(lab, model, rate, max_mbit, tls_ctx=None):
    h0, h1 = lab.hosts
    rpc_ring.stop_agents(lab)
    h0.run(f"rm -rf {MODEL_DIR}")
    if rate:
        h0.shape_inbound(rate, burst=burst(rate))
    else:
        h0.shape_inbound(None)
    link = tcp_mbit(h1, h0)
    rpc_ring.install(lab, model, rpc_cache=False)
    text = edit_config(max_mbit, tls_ctx is not None)(h0.read_file(CONFIG))
    for h in lab.hosts:
        h.write_file(CONFIG, text)
    h1.systemctl("enable", "--now", "llm-agent@rank1.service")
    hash_source(h1, model, tls_ctx)
    before = tx_bytes(h0)
    t0 = time.monotonic()
    h0.systemctl("enable", "--now", "llm-agent@rank0.service")
    _, answer, _ = rpc_ring.wait_serving(lab, timeout=900)
    wall = time.monotonic() - t0
    sent = tx_bytes(h0) - before
    ev = transfer_event(lab)
    fact = rpc_ring.status(lab)["nodes"][0]["facts"]["model"]["transfer"]
    got = h0.run(["stat", "-c", "%s", f"{MODEL_DIR}/{model.name}"]).stdout.strip()
    size = model.stat().st_size
    assert int(got) == size == ev["total_bytes"], (got, size, ev)
    assert ev["resumed_from"] == 0, ev
    recv = receive_seconds(h0)
    rate_mbit = size * 8 / ev["seconds"] / 1e6
    row = {
        "model": model.name, "file_bytes": size, "link": rate or "unshaped",
        "link_mbit": mbit(rate) if rate else None, "tcp_mbit": round(link, 1),
        "max_mbit": max_mbit, "control": "mtls" if tls_ctx else "http",
        "seconds": round(ev["seconds"], 3),
        "fact_seconds": round(fact["seconds"], 3),
        "receive_seconds": round(recv, 3) if recv is not None else None,
        "wall_s": round(wall, 2), "mbit_s": round(rate_mbit, 1),
        "receive_mbit_s": round(size * 8 / recv / 1e6, 1) if recv else None,
        "veth_tx_bytes": sent, "answered": bool(answer),
    }
    limit = max_mbit if max_mbit is not None else row["link_mbit"]
    row["ratio_to_limit"] = round(rate_mbit / limit, 3) if limit else None
    row["ratio_to_tcp"] = round(rate_mbit / link, 3)
    return row


def summary(rows):
    """One line per case: medians over the runs."""
    head = (f"{'file':<20} {'control':>7} {'link':>8} {'cap':>5} {'tcp Mbit/s':>10} {'seconds':>8} "
            f"{'receive s':>9} {'wall s':>7} {'Mbit/s':>7} {'/ limit':>7} {'/ tcp':>6}  runs (s)")
    lines = [head]
    keys = []
    for r in rows:
        k = (r["model"], r["control"], r["link"], r["max_mbit"])
        if k not in keys:
            keys.append(k)
    for k in keys:
        rs = [r for r in rows if (r["model"], r["control"], r["link"], r["max_mbit"]) == k]

        def med(f):
            v = [r[f] for r in rs if r[f] is not None]
            return statistics.median(v) if v else float("nan")
        limit = f"{med('ratio_to_limit'):>7.3f}" if k[2] != "unshaped" else f"{'-':>7}"
        name = f"{rs[0]['file']} ({rs[0]['file_bytes'] / 1e6:.1f} MB)"
        cap = str(k[3]) if k[3] is not None else "-"
        lines.append(
            f"{name:<20} {k[1]:>7} {k[2]:>8} {cap:>5} {med('tcp_mbit'):>10.1f} {med('seconds'):>8.2f} "
            f"{med('receive_seconds'):>9.2f} {med('wall_s'):>7.2f} {med('mbit_s'):>7.1f} "
            f"{limit} {med('ratio_to_tcp'):>6.3f}  "
            + " ".join(f"{r['seconds']:.2f}" for r in rs))
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="SmolLM2 at 100 Mbit, with and "
                    "without a 50 Mbit cap, one run")
    ap.add_argument("--no-big", action="store_true", help="SmolLM2 only")
    ap.add_argument("--no-tls", action="store_true", help="no mutual-TLS cases")
    ap.add_argument("--big-layers", type=int, default=14)
    args = ap.parse_args()
    if os.geteuid() != 0 or hosts.unavailable_reason():
        sys.exit(f"needs root and systemd-nspawn: {hosts.unavailable_reason()}")
    hosts.prepare()
    cases = QUICK if args.quick else [c for c in CASES if not (args.no_big and c[0] == "big")
                                      and not (args.no_tls and c[3])]
    runs = 1 if args.quick else args.runs
    smol = Path(os.environ["SMOLLM2_GGUF"])
    llama = Path(os.environ["LLAMA_CPP_DIR"])
    agent = Path(os.environ["LLM_AGENT_BIN"])
    rows = []
    with tempfile.TemporaryDirectory(prefix="deliver-bench.") as tmp:
        models = Path(tmp) / "models"
        models.mkdir()
        files = {"smollm2": models / smol.name}
        try:
            os.link(smol, files["smollm2"])
        except OSError:
            files["smollm2"].write_bytes(smol.read_bytes())
        if any(c[0] == "big" for c in cases):
            files["big"] = models / f"smollm2-big{args.big_layers}-f16.gguf"
            make_wide(smol, files["big"], layers=args.big_layers)
        binds = [(agent, "/opt/llm-agent/llm-agent", True), (llama, "/opt/llama", True),
                 (models, "/opt/models", True)]
        load = [round(x, 2) for x in os.getloadavg()]
        with hosts.Lab(2, binds=binds) as lab:
            tls_ctx = make_pki(lab, agent, tmp) if any(c[3] for c in cases) else None
            for run in range(runs):
                for name, rate, cap, tls in cases:
                    row = deliver_once(lab, files[name], rate, cap, tls_ctx if tls else None)
                    row["file"], row["run"] = name, run
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            rpc_ring.stop_agents(lab)
    print(f"# load average at start {load}, at end {[round(x, 2) for x in os.getloadavg()]}")
    print(summary(rows))


if __name__ == "__main__":
    main()
