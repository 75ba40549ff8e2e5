"""llama-server's slot settings on a real ring: figures, not pass/fail. Run through
scripts/bench.sh slots.

Why: with llama-server's defaults, four concurrent short chats through a llama.cpp RPC ring
took 0.7-1.2 s a round, several times what the same chats take with idle-slot caching off.
This bench measures each setting on `llm-agent up --local 3 --engine llama-rpc` (SmolLM2),
through the coordinator's API, so the llama-rpc adapter's defaults are chosen by numbers.

Each variant runs rank 0's llama-server with exactly the slot flags it names: a wrapper
llama-server in a scratch engine directory drops the adapter's own slot flags (`-np`,
`--[no-]kv-unified`, `--[no-]cache-idle-slots`) and appends the variant's; `shipped` runs the
adapter's command line unchanged. Per variant: BENCH_ROUNDS (default 10) warm rounds of
CLIENTS (4) chats sent at once, each with its own prompt (the same every round, as a chat
that goes on), for 16 and for 4 generated tokens; a round's time is until its last chat is
answered. Prints, per variant and pass, p50 and p90 of the round times; the passes run the
variants in opposite orders (BENCH_PASSES, default 2) so drift on a busy machine evens out.

Inputs: LLM_AGENT_BIN, SMOLLM2_GGUF, LLAMA_CPP_DIR.
"""

import http.client
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

OFFSET = int(os.environ.get("BENCH_PORT_OFFSET", "1960"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "10"))
PASSES = int(os.environ.get("BENCH_PASSES", "2"))
CLIENTS = 4
TOKENS = (16, 4)
# None: the adapter's command line as shipped; a list: exactly these slot flags.
VARIANTS = {
    "llama-server defaults": [],
    "--no-cache-idle-slots": ["-np", "4", "--kv-unified", "--no-cache-idle-slots"],
    "--cache-ram 0": ["-np", "4", "--kv-unified", "--cache-ram", "0"],
    "-np 4 --no-kv-unified": ["-np", "4", "--no-kv-unified"],
    "shipped": None,
}
PROMPTS = ["Tell me about the sea.", "What is a prime number?", "Name three colours.",
           "Why is the sky blue?"]

WRAPPER = """#!/usr/bin/env bash
# Written by bench/slots.py: the real llama-server with this variant's slot flags only.
args=(); skip=0
for a in "$@"; do
  if [ "$skip" = 1 ]; then skip=0; continue; fi
  case "$a" in
    -np) skip=1 ;;
    --kv-unified|--no-kv-unified|--cache-idle-slots|--no-cache-idle-slots) ;;
    *) args+=("$a") ;;
  esac
done
exec {real} "${{args[@]}}" {extra}
"""


def engine_dir(tmp, name, flags):
    real = Path(os.environ["LLAMA_CPP_DIR"])
    if flags is None:
        return real
    d = tmp / f"engine-{sum(1 for _ in tmp.glob('engine-*'))}"
    d.mkdir()
    (d / "ggml-rpc-server").symlink_to(real / "ggml-rpc-server")
    server = d / "llama-server"
    server.write_text(WRAPPER.format(real=shlex.quote(str(real / "llama-server")),
                                     extra=" ".join(shlex.quote(f) for f in flags)))
    server.chmod(0o755)
    return d


class Ring:
    def __init__(self, tmp, engine):
        self.api_port = 18500 + OFFSET
        state = tempfile.mkdtemp(dir=tmp)
        cmd = [os.environ["LLM_AGENT_BIN"], "up", "--local", "3", "--engine", "llama-rpc",
               "--model", os.environ["SMOLLM2_GGUF"], "--engine-dir", str(engine),
               "--listen", f"127.0.0.1:{self.api_port}", "--port-offset", str(OFFSET),
               "--ctx-size", "2048", "--threads", "1", "--state-dir", state]
        self.log = Path(state) / "up.log"
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(self.log, "w"),
                                     start_new_session=True)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"llm-agent exited:\n{self.log.read_text()[-3000:]}")
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.api_port, timeout=5)
                c.request("GET", "/readyz")
                if c.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.3)
        self.stop()
        sys.exit(f"the ring did not serve within 180 s:\n{self.log.read_text()[-3000:]}")

    def engine_command(self):
        """Rank 0's llama-server command line as it runs, found among this ring's processes
        (other rings may run on the machine)."""
        children = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(stat.parent.name))
        todo, found = [self.proc.pid], []
        while todo:
            pid = todo.pop()
            todo += children.get(pid, [])
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"--alias" in argv:
                found.append(" ".join(a.decode() for a in argv[1:] if a))
        return found[0] if found else "?"

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def chat(port, prompt, tokens, errors):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": tokens,
            "temperature": 0, "ignore_eos": True}
    try:
        c.request("POST", "/v1/chat/completions", json.dumps(body),
                  {"content-type": "application/json"})
        r = c.getresponse()
        r.read()
        if r.status != 200:
            errors.append(r.status)
    except OSError as e:
        errors.append(type(e).__name__)
    finally:
        c.close()


def round_time(port, tokens, errors):
    threads = [threading.Thread(target=chat, args=(port, p, tokens, errors)) for p in PROMPTS]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return time.perf_counter() - t


def measure(tmp, name, flags):
    ring = Ring(tmp, engine_dir(tmp, name, flags))
    try:
        out = {"engine": ring.engine_command()}
        errors = []
        for tokens in TOKENS:
            round_time(ring.api_port, tokens, errors)  # warm: prompts cached, slots assigned
            rounds = [round_time(ring.api_port, tokens, errors) for _ in range(ROUNDS)]
            rounds.sort()
            out[f"{tokens}_tokens_p50_ms"] = round(statistics.median(rounds) * 1000)
            out[f"{tokens}_tokens_p90_ms"] = round(rounds[int(0.9 * (len(rounds) - 1))] * 1000)
        out["errors"] = errors
        return out
    finally:
        ring.stop()


def main():
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated"))
    tmp = Path(tempfile.mkdtemp(prefix="llm-bench-slots-"))
    names = list(VARIANTS)
    results = {n: [] for n in names}
    for p in range(PASSES):
        for name in names if p % 2 == 0 else reversed(names):
            r = measure(tmp, name, VARIANTS[name])
            results[name].append(r)
            print(f"pass {p + 1} {name}: {json.dumps(r)}", file=sys.stderr, flush=True)
    summary = {}
    for name in names:
        rows = results[name]
        summary[name] = {
            "flags": "adapter as shipped" if VARIANTS[name] is None else " ".join(VARIANTS[name])
            or "(none)",
            "engine": rows[0]["engine"],
            **{f"{t}_tokens_p50_ms_per_pass": [r[f"{t}_tokens_p50_ms"] for r in rows]
               for t in TOKENS},
            **{f"{t}_tokens_p90_ms_per_pass": [r[f"{t}_tokens_p90_ms"] for r in rows]
               for t in TOKENS},
            "errors": sum(len(r["errors"]) for r in rows),
        }
    print(json.dumps({"clients": CLIENTS, "rounds": ROUNDS, "slots": summary}, indent=1))


if __name__ == "__main__":
    main()
