"""`llm-agent bench` on real engines: the matrix in its shortest form (llama.cpp RPC, 2 nodes,
one latency, a few tokens) through the coordinator and the delaying relays, and the plain bench
against an engine's own port. Shapes and signs only: timings are figures (bench/), never pass or
fail. Port offsets 2900 (the ring) and 2950 (the plain engine)."""

import json
import subprocess
import xml.etree.ElementTree as ET

from conftest import ReferenceServer, _env_path

OFFSET = 2900


def _bench(*args, timeout=600):
    cmd = [str(_env_path("LLM_AGENT_BIN")), "bench", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(cmd)} exited {r.returncode}:\n{r.stderr[-4000:]}"
    return r


def _positive(d, key):
    assert d[key] is not None and d[key] > 0, f"{key} = {d[key]!r} in {d}"


def test_matrix_short_runs_a_relayed_ring_and_writes_json_text_and_svg(tmp_path):
    out = tmp_path / "results"
    r = _bench(
        "--matrix", "--engines", "llama-rpc", "--nodes", "2", "--latency-ms", "5",
        "--model-file", str(_env_path("SMOLLM2_GGUF")), "--llama-dir", str(_env_path("LLAMA_CPP_DIR")),
        "--prompt-tokens", "16", "--max-tokens", "4", "--runs", "1", "--warmup", "0",
        "--port-offset", str(OFFSET), "--out", str(out), "--name", "ci", "--json",
    )
    m = json.loads(r.stdout)
    assert m == json.loads((out / "ci.json").read_text()), "stdout and the file agree"
    print(f"[figure] bench --matrix short: {(out / 'ci.txt').read_text()}")
    for key in ("cpu_model", "cores", "memory_gib", "kernel", "os", "load_at_start"):
        assert m["machine"][key], f"machine fact {key} missing: {m['machine']}"
    assert [(e["engine"], e["available"]) for e in m["engines"]] == [("llama-rpc", True)]
    assert "version" in m["engines"][0]["detail"], m["engines"][0]
    assert (m["prompt_tokens"], m["max_tokens"], m["runs"]) == (16, 4, 1)
    [cell] = m["cells"]
    assert (cell["engine"], cell["nodes"], cell["latency_ms"]) == ("llama-rpc", 2, 5)
    assert "error" not in cell, cell.get("error")
    for key in ("decode_tok_s", "ttft_s", "prefill_tok_s"):
        _positive(cell, key)
    # The ring's traffic really went through the relay: the head's link to its one worker
    # carried bytes both ways while the bench ran.
    [link] = cell["relay_links"]
    assert (link["from"], link["to"], link["kind"]) == (0, 1, "rpc"), link
    assert link["listen"] != link["target"], link
    assert link["bytes_forward"] > 0 and link["bytes_backward"] > 0, link
    assert cell["relay_bytes"] == link["bytes_forward"] + link["bytes_backward"]
    summary = cell["report"]["summary"]
    assert (summary["streams"], summary["failed"]) == (1, 0), summary
    [stream] = cell["report"]["streams"]
    assert stream["tokens_from"] == "usage" and stream["completion_tokens"] == 4, stream
    assert "decode tok/s" in (out / "ci.txt").read_text()
    svg = ET.parse(out / "ci.svg").getroot()
    assert svg.tag.endswith("svg") and svg.findall(".//{http://www.w3.org/2000/svg}polyline"), "a line per ring"


def test_bench_against_an_engine_directly_with_parallel_streams(tmp_path):
    engine = ReferenceServer(_env_path("LLAMA_CPP_DIR") / "llama-server", _env_path("SMOLLM2_GGUF"),
                             28080 + OFFSET + 50, tmp_path, "llama-server")
    try:
        r = _bench("--url", engine.base, "--prompt-tokens", "16", "--max-tokens", "4",
                   "--parallel", "2", "--runs", "2", "--warmup", "0", "--json")
        report = json.loads(r.stdout)
        human = _bench("--url", f"{engine.base}/v1", "--max-tokens", "3", "--runs", "1", "--warmup", "0",
                       "--openai-only")
    finally:
        engine.stop()
    assert report["url"] == f"{engine.base}/v1" and report["model"], report["url"]
    assert [s["run"] for s in report["streams"]] == [0, 0, 1, 1]
    for s in report["streams"]:
        assert "error" not in s, s
        for key in ("ttft_s", "prefill_tok_s", "decode_tok_s"):
            _positive(s, key)
        assert s["completion_tokens"] == 4 and s["prompt_tokens"] >= 16, s
    summary = report["summary"]
    assert (summary["streams"], summary["failed"]) == (4, 0)
    for key in ("ttft_s", "decode_tok_s", "aggregate_tok_s"):
        d = summary[key]
        assert d["n"] >= 2 and 0 < d["p50"] <= d["p95"], (key, d)
    assert "TTFT (ms)" in human.stdout and "decode (tok/s)" in human.stdout, human.stdout
