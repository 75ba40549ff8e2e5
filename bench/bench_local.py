"""Benchmark of a local 3-rank ring: figures, not pass/fail.

Reports, per engine:
  - seconds from launching `llm-agent up --local 3` to the first streamed token;
  - tok/s of a 128-token completion through the coordinator vs sent straight to rank 0's
    engine server in the same run (median of N alternating runs);
  - seconds from SIGKILL of a rank to the next successful completion (several kills).
Run through scripts/bench.sh, which sets LLM_AGENT_BIN, SMOLLM2_GGUF, LLAMA_CPP_DIR
(and PRIMA_CPP_DIR for prima.cpp).
"""

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

RUNS = int(os.environ.get("BENCH_RUNS", "5"))
KILLS = int(os.environ.get("BENCH_KILLS", "3"))


def first_token_time(base, t0, timeout=300):
    body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, "stream": True}
    while time.monotonic() - t0 < timeout:
        try:
            with requests.post(f"{base}/v1/chat/completions", json=body, stream=True, timeout=30) as r:
                if r.status_code == 200:
                    for line in r.iter_lines():
                        if line.startswith(b"data: ") and b'"content"' in line and b'"content":null' not in line:
                            return time.monotonic() - t0
        except requests.RequestException:
            pass
        time.sleep(0.05)
    raise RuntimeError("no token within the timeout")


def tok_per_s(url):
    body = {"prompt": "Once upon a time", "max_tokens": 128, "temperature": 0, "ignore_eos": True,
            "n_predict": 128, "cache_prompt": False}
    t = time.monotonic()
    r = requests.post(url, json=body, timeout=300)
    dt = time.monotonic() - t
    r.raise_for_status()
    j = r.json()
    n = j.get("usage", {}).get("completion_tokens") or j.get("tokens_predicted") or 0
    return n / dt, n


def serving_again(base, t0, timeout=120):
    while time.monotonic() - t0 < timeout:
        try:
            r = requests.post(f"{base}/v1/chat/completions", timeout=30,
                              json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
            if r.status_code == 200:
                return time.monotonic() - t0
        except requests.RequestException:
            pass
        time.sleep(0.05)
    raise RuntimeError("not serving again within the timeout")


def bench(engine, engine_dir, extra, offset):
    tmp = Path(tempfile.mkdtemp(prefix=f"llm-bench-{engine}-"))
    port = 18600 + offset
    base = f"http://127.0.0.1:{port}"
    cmd = [os.environ["LLM_AGENT_BIN"], "up", "--local", "3", "--engine", engine,
           "--model", os.environ["SMOLLM2_GGUF"], "--engine-dir", engine_dir,
           "--listen", f"127.0.0.1:{port}", "--port-offset", str(offset), "--threads", "1",
           "--state-dir", str(tmp / "state"), *extra]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(tmp / "up.log", "w"),
                            start_new_session=True)
    try:
        ttft = first_token_time(base, t0)
        direct_url = f"http://127.0.0.1:{18080 + offset}/v1/completions"
        via, direct = [], []
        for _ in range(RUNS):
            via.append(tok_per_s(f"{base}/v1/completions")[0])
            direct.append(tok_per_s(direct_url)[0])
        recoveries = []
        for i in range(KILLS):
            st = requests.get(f"{base}/api/v1/cluster", timeout=5).json()
            rank = 1 + i % 2
            t = time.monotonic()
            os.kill(st["nodes"][rank]["status"]["pid"], signal.SIGKILL)
            recoveries.append(serving_again(base, t))
            time.sleep(1)
        final = requests.get(f"{base}/api/v1/cluster", timeout=5).json()
        return {
            "engine": engine,
            "up_to_first_token_s": round(ttft, 2),
            "tok_s_via_coordinator_median": round(statistics.median(via), 1),
            "tok_s_direct_rank0_median": round(statistics.median(direct), 1),
            "overhead_pct": round(100 * (1 - statistics.median(via) / statistics.median(direct)), 1),
            "kill_to_serving_s": [round(x, 2) for x in recoveries],
            "generations": final["generation"],
        }
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def main():
    results = [bench("llama-rpc", os.environ["LLAMA_CPP_DIR"], [], 3000)]
    if os.environ.get("PRIMA_CPP_DIR"):
        results.append(bench("prima", os.environ["PRIMA_CPP_DIR"], ["--layer-windows", "10,10,10"], 4000))
    else:
        print("PRIMA_CPP_DIR not set: prima.cpp not benchmarked", file=sys.stderr)
    for r in results:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
