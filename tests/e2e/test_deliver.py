"""Model delivery on real local rings: a node whose model directory lacks the GGUF (its own
`model_dir`, as on another machine) gets the file from a node that has it over the mutual-TLS
control API, and the ring serves with it: every answer equals a single-process server of the
same model. A corrupted copy is found by its sha256 and replaced; a node without room reports the
bytes missing and no ring starts; a transfer cut off by a killed agent resumes where it stopped.

llama.cpp RPC: rank 0 reads the model, so rank 0 is the node without it and a worker the source.
prima (with PRIMA_CPP_DIR): every rank reads it; ranks 1 and 2 get it from the head."""

import hashlib
import os
import signal
import subprocess
import time
from pathlib import Path

import openai
import pytest
import requests

from conftest import Cluster, ReferenceServer, _env_path, wait_until

PROMPT = [{"role": "user", "content": "Write one sentence about the sea."}]
DETERMINISTIC = dict(temperature=0, max_tokens=24, seed=42, extra_body={"cache_prompt": False})


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def answer(base, model):
    c = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
    return c.chat.completions.create(model=model.stem, messages=PROMPT,
                                     **DETERMINISTIC).choices[0].message.content


def events(cluster, kind):
    r = requests.get(f"{cluster.base}/api/v1/events", params={"follow": "false"}, timeout=5)
    assert r.status_code == 200, r.text
    return [e for e in r.json()["events"] if e["kind"] == kind]


def transfers_total(cluster, result):
    text = requests.get(f"{cluster.base}/metrics", timeout=5).text
    line = next(l for l in text.splitlines()
                if l.startswith(f'llm_cluster_model_transfers_total{{result="{result}"}}'))
    return float(line.split()[-1])


def partials(d):
    return sorted(p.name for p in Path(d).iterdir() if p.name.endswith(".partial"))


def reference_answer(binary, model, port, tmp):
    ref = ReferenceServer(binary, model, port, tmp, "deliver-ref")
    try:
        return answer(ref.base, model)
    finally:
        ref.stop()


def test_a_node_without_the_file_gets_it_from_a_node_that_has_it_and_serves(tmp_path):
    model = _env_path("SMOLLM2_GGUF")
    engine_dir = _env_path("LLAMA_CPP_DIR")
    empty = tmp_path / "rank0-models"
    empty.mkdir()
    cluster = Cluster("llama-rpc", engine_dir, model, 4300, tmp_path, extra=(
        "--node-model-dir", f"0={empty}", "--max-in-flight", "1"))
    with cluster.serving():
        delivered = empty / model.name
        assert delivered.exists(), "rank 0 serves, so its file must be in its model_dir"
        assert sha256(delivered) == sha256(model)
        assert partials(empty) == [], "no partial file is left once the copy is in place"
        told = events(cluster, "transfer")
        states = [e["state"] for e in told if e["rank"] == 0]
        assert states[:1] == ["running"] and states[-1] == "done", told
        done = [e for e in told if e["state"] == "done"][-1]
        assert done["total_bytes"] == model.stat().st_size and done["from_rank"] in (1, 2), done
        assert transfers_total(cluster, "done") >= 1
        view = cluster.status()
        fact = view["nodes"][0]["facts"]["model"]
        assert fact["transfer"]["state"] == "done" and fact["hash"]["state"] == "done", fact
        got = answer(cluster.base, model)
        print(f"delivered {done['total_bytes']} bytes in {done['seconds']:.2f} s "
              f"({done['bytes_per_s'] / 1e6:.1f} MB/s) over loopback")
    assert got == reference_answer(engine_dir / "llama-server", model, 28080 + 4300, tmp_path)


def test_a_corrupted_copy_is_detected_and_replaced(tmp_path):
    model = _env_path("SMOLLM2_GGUF")
    engine_dir = _env_path("LLAMA_CPP_DIR")
    models = tmp_path / "rank0-models"
    models.mkdir()
    bad = models / model.name
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the weights: same size, wrong content
    bad.write_bytes(bytes(data))
    good = sha256(model)
    cluster = Cluster("llama-rpc", engine_dir, model, 4350, tmp_path, extra=(
        "--node-model-dir", f"0={models}", "--model-sha256", good))
    with cluster.serving():
        assert sha256(bad) == good, "the wrong copy was replaced by a verified one"
        done = [e for e in events(cluster, "transfer") if e["state"] == "done"]
        assert done and done[-1]["rank"] == 0, done
        assert answer(cluster.base, model)


def test_a_node_without_room_says_how_many_bytes_are_missing_and_no_ring_starts(tmp_path, small_disk):
    model = _env_path("SMOLLM2_GGUF")
    cluster = Cluster("llama-rpc", _env_path("LLAMA_CPP_DIR"), model, 4400, tmp_path, extra=(
        "--node-model-dir", f"0={small_disk}"))
    try:
        def refused():
            v = cluster.status()
            return v["phase"] == "refused" and "not enough free space" in (v["reason"] or "")
        wait_until(refused, 60, "the ring to be refused for want of space")
        view = cluster.status()
        reason = view["reason"]
        assert "rank 0" in reason and str(small_disk) in reason, reason
        size = model.stat().st_size
        free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
        assert f"{size} bytes (" in reason and "needed" in reason, reason
        assert f"{size - free} bytes (" in reason and "missing" in reason, (reason, size, free)
        assert all(n["status"]["phase"] == "idle" for n in view["nodes"]), "no rank started"
        assert not (small_disk / model.name).exists()
        assert partials(small_disk) == [], "nothing was written before the space check"
        assert requests.get(f"{cluster.base}/readyz", timeout=2).status_code == 503
        models = requests.get(f"{cluster.base}/v1/models", timeout=5).json()["data"]
        assert models[0]["llm_cluster"]["state"] == "missing"
        assert models[0]["llm_cluster"]["missing_on"] == [0]
        print(reason)
    finally:
        cluster.stop()


def test_an_interrupted_transfer_resumes_where_it_stopped(tmp_path):
    model = _env_path("SMOLLM2_GGUF")
    engine_dir = _env_path("LLAMA_CPP_DIR")
    models = tmp_path / "rank0-models"
    models.mkdir()
    # 40 Mbit/s: the 98 MB file takes about 20 s, time enough to kill the agent halfway.
    extra = ("--node-model-dir", f"0={models}", "--transfer-max-mbit", "40",
             "--model-sha256", sha256(model))
    first = Cluster("llama-rpc", engine_dir, model, 4450, tmp_path, extra=extra)
    try:
        def some_bytes():
            return any(p.stat().st_size > 8 << 20 for p in models.glob(".*.partial"))
        wait_until(some_bytes, 60, "the transfer to be under way")
        view = first.status()
        t = view["nodes"][0]["facts"]["model"].get("transfer") or {}
        listing = requests.get(f"{first.base}/v1/models", timeout=5).json()["data"]
        assert listing[0]["llm_cluster"]["state"].startswith("transferring"), listing
        assert view["phase"] == "waiting_for_nodes" and "receiving model" in view["reason"], view
    finally:
        os.killpg(first.proc.pid, signal.SIGKILL)  # an agent that dies mid-transfer
        first.proc.wait()
    kept = sum(p.stat().st_size for p in models.glob(".*.partial"))
    assert 0 < kept < model.stat().st_size, kept
    second = Cluster("llama-rpc", engine_dir, model, 4450, tmp_path, extra=extra)
    # The killed cluster's engines are gone with its process group; wait for its ports to free.
    with second.serving(timeout=240):
        done = [e for e in events(second, "transfer") if e["state"] == "done"]
        assert done, events(second, "transfer")
        resumed = done[-1]["resumed_from"]
        assert resumed >= kept - (4 << 20) and resumed > 0, (resumed, kept)
        assert done[-1]["done_bytes"] == model.stat().st_size
        assert sha256(models / model.name) == sha256(model)
        assert answer(second.base, model)
        print(f"resumed at byte {resumed} of {model.stat().st_size} after a kill")


@pytest.mark.skipif(not os.environ.get("PRIMA_CPP_DIR"),
                    reason="PRIMA_CPP_DIR is not set: prima.cpp delivery test SKIPPED")
def test_prima_ranks_get_the_model_from_the_head_and_serve(tmp_path, smollm2_q8):
    engine_dir = _env_path("PRIMA_CPP_DIR")
    model = Path(smollm2_q8)
    dirs = [tmp_path / f"rank{r}-models" for r in (1, 2)]
    for d in dirs:
        d.mkdir()
    cluster = Cluster("prima", engine_dir, model, 4500, tmp_path, extra=(
        "--layer-windows", "10,10,10",
        "--node-model-dir", f"1={dirs[0]}", "--node-model-dir", f"2={dirs[1]}"))
    with cluster.serving(timeout=300):
        for d in dirs:
            assert sha256(d / model.name) == sha256(model)
        done = [e for e in events(cluster, "transfer") if e["state"] == "done"]
        assert sorted(e["rank"] for e in done) == [1, 2] and all(e["from_rank"] == 0 for e in done), done
        got = answer(cluster.base, model)
    server = next(p for p in (engine_dir / "prima-server", engine_dir / "llama-server") if p.exists())
    assert got == reference_answer(server, model, 28080 + 4500, tmp_path)


def test_model_pull_fetches_the_file_on_the_command_line_and_the_ring_then_serves(tmp_path):
    model = _env_path("SMOLLM2_GGUF")
    engine_dir = _env_path("LLAMA_CPP_DIR")
    models = tmp_path / "rank0-models"
    models.mkdir()
    # Delivery off: the ring waits, refused, until a person brings the file.
    cluster = Cluster("llama-rpc", engine_dir, model, 4550, tmp_path, extra=(
        "--node-model-dir", f"0={models}", "--no-delivery", "--transfer-max-mbit", "200"))
    config = tmp_path / "state-llama-rpc" / "cluster.toml"
    agent = str(_env_path("LLM_AGENT_BIN"))
    try:
        def refused():
            v = cluster.status()
            return v["phase"] == "refused" and "[delivery] is off" in (v["reason"] or "")
        wait_until(refused, 60, "the ring to be refused for the missing file")
        unknown = subprocess.run([agent, "model", "pull", "nonesuch", "--config", str(config),
                                  "--node", "rank0"], capture_output=True, text=True, timeout=30)
        assert unknown.returncode == 2, unknown
        assert "no model named nonesuch" in unknown.stderr, unknown.stderr
        pulled = subprocess.run([agent, "model", "pull", model.stem, "--config", str(config),
                                 "--node", "rank0", "--from", "2"],
                                capture_output=True, text=True, timeout=120)
        assert pulled.returncode == 0, pulled
        assert "fetches model" in pulled.stdout and "sha256 verified" in pulled.stdout, pulled.stdout
        assert "receiving model" in pulled.stdout, "progress lines while it ran (not a terminal)"
        assert sha256(models / model.name) == sha256(model)
        cluster.wait_serving(60)
        assert answer(cluster.base, model)
        print(pulled.stdout)
    finally:
        cluster.stop()


def test_a_switch_waits_for_its_models_delivery_while_the_loaded_model_serves_on(tmp_path, smollm2_q8):
    import threading
    q4 = _env_path("SMOLLM2_GGUF")
    q8 = Path(smollm2_q8)
    engine_dir = _env_path("LLAMA_CPP_DIR")
    models = tmp_path / "rank0-models"
    models.mkdir()
    os.link(q4, models / q4.name) if os.stat(q4).st_dev == os.stat(models).st_dev \
        else (models / q4.name).write_bytes(q4.read_bytes())
    # Rank 0 has the Q4_1 model; the Q8_0 one is on a worker only, and comes at 40 Mbit/s.
    cluster = Cluster("llama-rpc", engine_dir, q4, 4650, tmp_path, extra=(
        "--also-model", str(q8), "--node-model-dir", f"0={models}", "--transfer-max-mbit", "40",
        "--min-residency", "0", "--queue-timeout", "120", "--max-in-flight", "1"))
    with cluster.serving():
        listing = {m["id"]: m["llm_cluster"]["state"]
                   for m in requests.get(f"{cluster.base}/v1/models", timeout=5).json()["data"]}
        assert listing[q4.stem] == "loaded", listing
        assert listing[q8.stem].startswith("transferring"), listing
        result = {}
        waiter = threading.Thread(target=lambda: result.update(q8=answer(cluster.base, q8)))
        waiter.start()
        time.sleep(1)
        assert answer(cluster.base, q4), "the loaded model serves while the other one arrives"
        still = {m["id"]: m["llm_cluster"]["state"]
                 for m in requests.get(f"{cluster.base}/v1/models", timeout=5).json()["data"]}
        assert still[q8.stem].startswith("transferring"), still
        waiter.join(timeout=150)
        assert result.get("q8"), "the request for the delivered model was answered"
        done = [e for e in events(cluster, "transfer") if e["state"] == "done" and e["model"] == q8.stem]
        switches = [e for e in events(cluster, "switch") if e.get("to") == q8.stem]
        assert done and switches, (done, switches)
        assert switches[0]["seq"] > done[0]["seq"], "the switch came after the file was in place"
        assert sha256(models / q8.name) == sha256(q8)


def test_a_node_lacking_two_models_receives_them_one_after_the_other(tmp_path, smollm2_q8):
    q4 = _env_path("SMOLLM2_GGUF")
    q8 = Path(smollm2_q8)
    models = tmp_path / "rank0-models"
    models.mkdir()
    cluster = Cluster("llama-rpc", _env_path("LLAMA_CPP_DIR"), q4, 4700, tmp_path, extra=(
        "--also-model", str(q8), "--node-model-dir", f"0={models}", "--transfer-max-mbit", "200"))
    seen = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                v = cluster.status()
            except requests.RequestException:
                time.sleep(0.1)
                continue
            ts = [t for t in (v["nodes"][0].get("transfers") or []) if t["state"] == "running"]
            seen.append(sorted(t["activity"] for t in ts))
            done = [t for t in (v["nodes"][0].get("transfers") or []) if t["state"] == "done"]
            if len(done) == 2:
                break
            time.sleep(0.1)
        receiving = [s for s in seen if sum(a.startswith("receiving") for a in s) > 1]
        assert not receiving, f"two files arrived at once: {receiving[:3]}"
        assert any(any(a.startswith("waiting for another") for a in s) for s in seen), seen[-5:]
        assert sha256(models / q4.name) == sha256(q4) and sha256(models / q8.name) == sha256(q8)
    finally:
        cluster.stop()
