"""Model switch time on a local 3-rank llama.cpp RPC ring configured with two models (SmolLM2
Q4_1 and a Q8_0 copy made by tests/e2e/q8.py): requests alternate between them, each forcing a
switch. Figures, not pass/fail.

Per switch, from the coordinator's `switch` event: drain (requests for the old model finishing),
stop (every rank stopped), start (checks, ranks started, rank 0 healthy); and from the client:
the waiting request's time to its first streamed token, and what of it came after the ring was
ready again (first token = client wait - switch total, the request having started the switch).
Two cases alternate: an idle ring, and a ring with one long streaming request for the old model
in flight when the switch is asked for (the drain waits for it).

Run through `scripts/bench.sh switch` (release build). BENCH_RUNS (default 4) switches per case.
"""

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "e2e"))
from q8 import make_q8  # noqa: E402

RUNS = int(os.environ.get("BENCH_RUNS", "4"))
OFFSET = int(os.environ.get("BENCH_PORT_OFFSET", "800"))
API_PORT = 18800 + OFFSET
BASE = f"http://127.0.0.1:{API_PORT}"


def first_token(model, t0, max_tokens=4):
    body = {"model": model, "messages": [{"role": "user", "content": "Hello"}],
            "max_tokens": max_tokens, "stream": True, "temperature": 0}
    with requests.post(f"{BASE}/v1/chat/completions", json=body, stream=True, timeout=120) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith(b"data: ") and b'"content"' in line and b'"content":null' not in line:
                return time.monotonic() - t0
    raise RuntimeError("no token")


def long_request(model, started):
    body = {"model": model, "messages": [{"role": "user", "content": "Tell a long story."}],
            "max_tokens": 96, "stream": True, "temperature": 0, "ignore_eos": True}
    with requests.post(f"{BASE}/v1/chat/completions", json=body, stream=True, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith(b"data: "):
                started.set()


def switch_events():
    r = requests.get(f"{BASE}/api/v1/events", params={"follow": "false"}, timeout=5)
    return [e for e in r.json()["events"] if e["kind"] == "switch" and e.get("to")]


def main():
    q4 = Path(os.environ["SMOLLM2_GGUF"])
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        q8 = make_q8(q4, tmp / "smollm2-q8.gguf")
        names = [q4.stem, q8.stem]
        cmd = [os.environ["LLM_AGENT_BIN"], "up", "--local", "3", "--engine", "llama-rpc",
               "--model", str(q4), "--also-model", str(q8), "--engine-dir", os.environ["LLAMA_CPP_DIR"],
               "--listen", f"127.0.0.1:{API_PORT}", "--port-offset", str(OFFSET), "--threads", "1",
               "--min-residency", "0", "--switch-grace", "30", "--queue-timeout", "120",
               "--state-dir", str(tmp / "state")]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(tmp / "up.log", "w"),
                                start_new_session=True)
        try:
            t = time.monotonic()
            while time.monotonic() - t < 120:
                try:
                    if requests.get(f"{BASE}/readyz", timeout=2).status_code == 200:
                        break
                except requests.RequestException:
                    pass
                time.sleep(0.1)
            loaded = 0
            first_token(names[loaded], time.monotonic())
            rows = []
            for i in range(2 * RUNS):
                busy = i % 2 == 1
                if busy:
                    started = threading.Event()
                    th = threading.Thread(target=long_request, args=(names[loaded], started))
                    th.start()
                    started.wait(30)
                seen = len(switch_events())
                t0 = time.monotonic()
                wait = first_token(names[1 - loaded], t0)
                if busy:
                    th.join(120)
                loaded = 1 - loaded
                evs = switch_events()
                assert len(evs) == seen + 1, evs
                e = evs[-1]
                rows.append({"case": "busy" if busy else "idle", "from": e["from"], "to": e["to"],
                             "drain_ms": e["drain_ms"], "stop_ms": e["stop_ms"],
                             "start_ms": e["start_ms"], "total_ms": e["total_ms"],
                             "client_wait_ms": round(wait * 1000),
                             "first_token_ms": round(wait * 1000) - e["total_ms"]})
        finally:
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(60)
    keys = ["drain_ms", "stop_ms", "start_ms", "first_token_ms", "total_ms", "client_wait_ms"]
    print(f"{'case':6} " + " ".join(f"{k:>15}" for k in keys) + "   (medians)")
    summary = {}
    for case in ("idle", "busy"):
        rs = [r for r in rows if r["case"] == case]
        med = {k: statistics.median(r[k] for r in rs) for k in keys}
        summary[case] = med
        print(f"{case:6} " + " ".join(f"{med[k]:>15.0f}" for k in keys))
    print(json.dumps({"runs": RUNS, "summary": summary, "switches": rows}))


if __name__ == "__main__":
    main()
