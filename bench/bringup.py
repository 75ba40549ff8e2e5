"""Bring-up overhead: `llm-agent up --local 3` to the first streamed token, against the same three
engine processes launched by hand, alternating in one run. Figures, not pass/fail.

The by-hand launch runs exactly the command lines the agents ran (read from /api/v1/cluster):
llama.cpp's rpc workers first, the head as soon as every worker's port listens, then the first
token straight from the head's server. The difference is what the agents and the coordinator
cost on the way to the first token (checks, hashing the model, planning, readiness probes).

Run through `scripts/bench.sh bringup` (release build, engines and model fetched). Prints a table
and one JSON line; BENCH_RUNS (default 5) pairs.
"""

import json
import os
import shlex
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import requests

from bench_local import first_token_time as first_token

RUNS = int(os.environ.get("BENCH_RUNS", "5"))
# BENCH_COLD=1: forget the model hashes the agents keep in the state dir before each `up`, so
# every start hashes the model (a first start) instead of reusing them (a restart).
COLD = os.environ.get("BENCH_COLD") == "1"
OFFSET = int(os.environ.get("BENCH_PORT_OFFSET", "700"))
API_PORT = 18800 + OFFSET


def listening(port):
    """Whether a TCP port listens here, from the kernel's table (a probe connection would be a
    client of the rpc server)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            f = row.split()
            if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False


def wait_gone(port, timeout=20):
    t = time.monotonic()
    while listening(port) and time.monotonic() - t < timeout:
        time.sleep(0.05)


def up_once(tmp):
    cmd = [os.environ["LLM_AGENT_BIN"], "up", "--local", "3", "--engine", "llama-rpc",
           "--model", os.environ["SMOLLM2_GGUF"], "--engine-dir", os.environ["LLAMA_CPP_DIR"],
           "--listen", f"127.0.0.1:{API_PORT}", "--port-offset", str(OFFSET), "--threads", "1",
           "--state-dir", str(tmp / "state")]
    if COLD:
        for f in (tmp / "state").glob("rank*.model-hashes.json"):
            f.unlink()
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(tmp / "up.log", "a"),
                            start_new_session=True)
    try:
        ttft = first_token(f"http://127.0.0.1:{API_PORT}", t0)
        nodes = requests.get(f"http://127.0.0.1:{API_PORT}/api/v1/cluster", timeout=5).json()["nodes"]
        commands = [n["status"]["command"] for n in nodes]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    return ttft, commands


def by_hand_once(commands, tmp):
    """Starts the workers, the head once they listen, and waits for its first token."""
    head, workers = shlex.split(commands[0]), [shlex.split(c) for c in commands[1:]]
    ports = [int(w[w.index("-p") + 1]) for w in workers]
    server_port = int(head[head.index("--port") + 1])
    log = open(tmp / "by-hand.log", "a")
    t0 = time.monotonic()
    procs = [subprocess.Popen(w, stdout=log, stderr=log, start_new_session=True) for w in workers]
    try:
        while not all(listening(p) for p in ports):
            if time.monotonic() - t0 > 60:
                raise RuntimeError("rpc workers not listening")
            time.sleep(0.005)
        procs.append(subprocess.Popen(head, stdout=log, stderr=log, start_new_session=True))
        return first_token(f"http://127.0.0.1:{server_port}", t0)
    finally:
        for p in procs:
            p.kill()
            p.wait()
        for port in ports + [server_port]:
            wait_gone(port)


def main():
    tmp = Path(tempfile.mkdtemp(prefix="llm-bench-bringup-"))
    up_once(tmp)  # warm the page cache and learn the command lines
    ups, hands = [], []
    commands = None
    for _ in range(RUNS):
        t, commands = up_once(tmp)
        ups.append(t)
        wait_gone(API_PORT)
        hands.append(by_hand_once(commands, tmp))
    up_med, hand_med = statistics.median(ups), statistics.median(hands)
    print(f"{'':24}{'median s':>10}{'min s':>8}{'max s':>8}")
    print(f"{'up --local 3':24}{up_med:10.3f}{min(ups):8.3f}{max(ups):8.3f}")
    print(f"{'same engines by hand':24}{hand_med:10.3f}{min(hands):8.3f}{max(hands):8.3f}")
    print(f"overhead {up_med - hand_med:+.3f} s, ratio {up_med / hand_med:.2f}x ({RUNS} pairs, "
          f"alternating; model hashes {'forgotten before each start' if COLD else 'kept from the first start'})")
    print(json.dumps({"runs": RUNS, "cold": COLD, "up_s": ups, "by_hand_s": hands, "up_median_s": up_med,
                      "by_hand_median_s": hand_med, "overhead_s": up_med - hand_med,
                      "ratio": up_med / hand_med, "commands": commands}))


if __name__ == "__main__":
    main()
