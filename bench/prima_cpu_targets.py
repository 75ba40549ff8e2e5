"""Decode speed of a local 3-rank prima.cpp ring per build of prima.cpp: figures, not pass/fail.
It measures builds made elsewhere (it builds nothing): one directory per build, each holding
llama-server, llama-cli and profile-tool (an upstream build tree or an installed package's
binaries), e.g. the PKGBUILD's CPU targets portable, x86-64-v3 and native.

    python bench/prima_cpu_targets.py portable=DIR v3=DIR native=DIR

For each build in turn, round after round (so that a machine busy with other work slows every
build alike): `llm-agent up --local 3 --engine prima` with explicit layer windows, then RUNS
128-token completions through the coordinator. Reports per build the median decode tok/s
(the engine's own `timings.predicted_per_second` where it reports them, else tokens over wall
time) and the ratio to the first build. Needs LLM_AGENT_BIN and a Q8_0 model in LLM_MODEL
(prima's profiler rejects SmolLM2's Q4_1: tests/e2e/q8.py makes a Q8_0 copy). Run it in a
network namespace of its own when other rings may use the default ports.
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

RUNS = int(os.environ.get("BENCH_RUNS", "4"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "2"))
TOKENS = 128


def wait_serving(base, timeout=600):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            r = requests.post(f"{base}/v1/completions", timeout=60,
                              json={"prompt": "Hi", "max_tokens": 2})
            if r.status_code == 200:
                return time.monotonic() - t0
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"not serving within {timeout} s")


def decode_tok_s(base):
    body = {"prompt": "Once upon a time", "max_tokens": TOKENS, "temperature": 0,
            "ignore_eos": True, "n_predict": TOKENS, "cache_prompt": False}
    t = time.monotonic()
    r = requests.post(f"{base}/v1/completions", json=body, timeout=600)
    dt = time.monotonic() - t
    r.raise_for_status()
    j = r.json()
    timed = (j.get("timings") or {}).get("predicted_per_second")
    n = (j.get("usage") or {}).get("completion_tokens") or j.get("tokens_predicted") or 0
    return timed or n / dt


def one_round(name, engine_dir, model):
    tmp = Path(tempfile.mkdtemp(prefix=f"llm-bench-prima-{name}-"))
    base = "http://127.0.0.1:18700"
    cmd = [os.environ["LLM_AGENT_BIN"], "up", "--local", "3", "--engine", "prima",
           "--model", str(model), "--engine-dir", str(engine_dir), "--listen", "127.0.0.1:18700",
           "--threads", "1", "--layer-windows", "10,10,10", "--state-dir", str(tmp / "state")]
    log = open(tmp / "up.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True)
    try:
        wait_serving(base)
        return [decode_tok_s(base) for _ in range(RUNS)]
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def main(argv):
    builds = [a.split("=", 1) for a in argv]
    if not builds or any(len(b) != 2 for b in builds):
        sys.exit(__doc__)
    model = Path(os.environ["LLM_MODEL"])
    samples = {name: [] for name, _ in builds}
    for rnd in range(ROUNDS):
        for name, d in builds:
            got = one_round(name, d, model)
            samples[name] += got
            print(f"round {rnd + 1} {name}: " + " ".join(f"{x:.1f}" for x in got),
                  file=sys.stderr, flush=True)
    first = statistics.median(samples[builds[0][0]])
    print(f"{'build':<12} {'decode tok/s (median)':>22} {'min':>7} {'max':>7} {'vs ' + builds[0][0]:>14}")
    for name, _ in builds:
        s = samples[name]
        m = statistics.median(s)
        print(f"{name:<12} {m:>22.1f} {min(s):>7.1f} {max(s):>7.1f} {m / first:>13.2f}x")
    print(json.dumps({"runs_per_build": len(samples[builds[0][0]]), "tokens": TOKENS,
                      "samples": {k: [round(x, 2) for x in v] for k, v in samples.items()}}))


if __name__ == "__main__":
    main(sys.argv[1:])
