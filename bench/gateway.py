"""The gateway's bench: figures, not pass/fail. Run through scripts/bench.sh gateway.

Starts `llm-agent up --local 3` (llama-rpc, release build) and measures, in one run:

speed   the same requests sent straight to rank 0's llama-server (direct), through the
        coordinator's API, and through Debian's nginx (proxy_buffering off, keep-alive to the
        engine) on loopback, interleaved round by round so all three share the machine's noise:
          - GET /v1/models, sequential (one kept-alive connection): p50, p99
          - GET /v1/models, 16 clients (wrk): p50, p99, requests/s
          - a 1-token chat completion, sequential and at 16 clients (wrk)
          - a streamed 32-token chat: time to the first chunk, gaps between chunks
        and prints what each proxy adds to direct and the coordinator/nginx ratios.
limits  what slow and huge requests get, and how fast: a head sent a byte a second, a body
        dripped, a Content-Length that lies, a 31 MiB prompt (declared and chunked), a prompt
        that fits the body limit but not the context (and whether rank 0's slots saw any of
        them); the coordinator's resident memory before, at the peak and after 40 clients each
        send 30 MiB of a 31 MiB body, and under 1,024 idle connections, with the time a chat
        completion takes meanwhile. The agent starts with a soft open-files limit of 1,024, as
        under systemd's default, to show it raises it.

Inputs: LLM_AGENT_BIN, SMOLLM2_GGUF, LLAMA_CPP_DIR. nginx and wrk are installed with apt-get
when missing (speed only). BENCH_ROUNDS (default 5) rounds of each measurement, BENCH_WRK_SECONDS (default 3) per wrk run.
"""

import http.client
import json
import os
import random
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

OFFSET = int(os.environ.get("BENCH_PORT_OFFSET", "1950"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
WRK_S = int(os.environ.get("BENCH_WRK_SECONDS", "3"))
CHAT1 = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "temperature": 0}
STREAM = {"messages": [{"role": "user", "content": "Tell me a story about the sea."}],
          "max_tokens": 32, "temperature": 0, "stream": True, "ignore_eos": True}


# --- the ring ---------------------------------------------------------------------------------

class Ring:
    def __init__(self, tmp, soft_nofile=None):
        self.api_port, self.engine_port = 18500 + OFFSET, 18080 + OFFSET
        cmd = [os.environ["LLM_AGENT_BIN"], "up", "--local", "3", "--engine", "llama-rpc",
               "--model", os.environ["SMOLLM2_GGUF"], "--engine-dir", os.environ["LLAMA_CPP_DIR"],
               "--listen", f"127.0.0.1:{self.api_port}", "--port-offset", str(OFFSET),
               "--ctx-size", "1024", "--threads", "1", "--state-dir", str(tmp / "state")]

        def limit():
            if soft_nofile:
                hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft_nofile, hard))
        self.log = tmp / "up.log"
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(self.log, "w"),
                                     start_new_session=True, preexec_fn=limit)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"llm-agent exited:\n{self.log.read_text()[-2000:]}")
            try:
                if get("127.0.0.1", self.api_port, "/readyz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.3)
        sys.exit("the ring did not serve within 180 s")

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)

    def rss_mb(self):
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def open_files_limit(self):
        for line in Path(f"/proc/{self.proc.pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                return int(line.split()[3])
        return None

    def slots_busy(self):
        status, body = get("127.0.0.1", self.engine_port, "/slots")
        return [s["id"] for s in json.loads(body) if s.get("is_processing")]

    def wait_idle(self, timeout=60):
        """Until rank 0 has no request in hand: a load run's clients are gone when wrk ends, but
        the engine finishes (or notices) their requests later, and a measurement started
        meanwhile would time that leftover work, not its own."""
        deadline = time.monotonic() + timeout
        while self.slots_busy() and time.monotonic() < deadline:
            time.sleep(0.05)


def get(host, port, path, timeout=10):
    c = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def post(host, port, path, body, timeout=60):
    c = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        c.request("POST", path, json.dumps(body), {"content-type": "application/json"})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def ms(x):
    return round(x * 1000, 3)


# --- speed ------------------------------------------------------------------------------------

def ensure_tools():
    missing = [p for p, b in (("nginx", "nginx"), ("wrk", "wrk")) if not shutil.which(b)
               and not Path(f"/usr/sbin/{b}").exists()]
    if missing:
        print(f"installing {' '.join(missing)} (apt-get)", file=sys.stderr)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *missing],
                       check=True, env=env, stdout=subprocess.DEVNULL)


def start_nginx(tmp, listen_port, upstream_port):
    """nginx as a reverse proxy the way one would put it in front of llama-server."""
    conf = tmp / "nginx.conf"
    conf.write_text(f"""
worker_processes auto;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/nginx-body;
    proxy_temp_path {tmp}/nginx-proxy;
    fastcgi_temp_path {tmp}/nginx-fastcgi;
    uwsgi_temp_path {tmp}/nginx-uwsgi;
    scgi_temp_path {tmp}/nginx-scgi;
    upstream engine {{ server 127.0.0.1:{upstream_port}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{listen_port};
        location / {{
            proxy_pass http://engine;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 600s;
        }}
    }}
}}
""")
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    proc = subprocess.Popen([binary, "-c", str(conf), "-p", str(tmp)],
                            stdout=subprocess.DEVNULL, stderr=open(tmp / "nginx.out", "w"),
                            start_new_session=True)
    for _ in range(100):
        try:
            if get("127.0.0.1", listen_port, "/health")[0] == 200:
                return proc
        except OSError:
            time.sleep(0.1)
    sys.exit(f"nginx did not start: {(tmp / 'nginx.out').read_text()}")


def sequential(port, n, method, path, body=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    data = json.dumps(body) if body is not None else None
    headers = {"content-type": "application/json"} if body is not None else {}
    out = []
    for _ in range(n):
        t = time.perf_counter()
        c.request(method, path, data, headers)
        r = c.getresponse()
        r.read()
        out.append(time.perf_counter() - t)
        if r.status != 200:
            raise RuntimeError(f"{path} on port {port}: HTTP {r.status}")
    c.close()
    return out


UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def cpu_seconds(pids):
    """User and system CPU time of `pids` and their threads so far."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def wrk(tmp, port, path, seconds, body=None, pids=()):
    """16 clients on 2 threads: (p50 s, p99 s, requests/s, non-2xx, CPU µs per request of
    `pids`, the proxy in between: a figure that the machine's other load hardly moves)."""
    args = ["wrk", "-t2", "-c16", f"-d{seconds}s", "--latency", "--timeout", "30s"]
    if body is not None:
        script = tmp / "post.lua"
        script.write_text('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                          f"wrk.body = {json.dumps(json.dumps(body))}\n")
        args += ["-s", str(script)]
    cpu = cpu_seconds(pids)
    out = subprocess.run([*args, f"http://127.0.0.1:{port}{path}"], capture_output=True,
                         text=True, check=True).stdout
    cpu = cpu_seconds(pids) - cpu

    def latency(label):
        m = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        return float(m.group(1)) * UNITS[m.group(2)]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    return (latency("50"), latency("99"), rps, int(bad.group(1)) if bad else 0,
            cpu / max(requests, 1) * 1e6)


def stream_timings(port, n):
    """Per stream: seconds to the first content chunk, and the gaps between chunks."""
    firsts, gaps = [], []
    for _ in range(n):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        t = time.perf_counter()
        c.request("POST", "/v1/chat/completions", json.dumps(STREAM), {"content-type": "application/json"})
        r = c.getresponse()
        last = None
        while True:
            line = r.readline()
            if not line:
                break
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            now = time.perf_counter()
            if b'"content":"' not in line:
                continue
            if last is None:
                firsts.append(now - t)
            else:
                gaps.append(now - last)
            last = now
        c.close()
    return firsts, gaps


def speed(tmp, ring):
    ensure_tools()
    nginx_port = 18700 + OFFSET
    nginx = start_nginx(tmp, nginx_port, ring.engine_port)
    targets = {"direct": ring.engine_port, "coordinator": ring.api_port, "nginx": nginx_port}
    nginx_pids = [nginx.pid, *map(int, subprocess.run(["pgrep", "-P", str(nginx.pid)],
                                                      capture_output=True, text=True).stdout.split())]
    proxies = {"direct": [], "coordinator": [ring.proc.pid], "nginx": nginx_pids}
    r = {t: {"models_seq": [], "chat_seq": [], "first": [], "gap": [],
             "models_16": [], "chat_16": []} for t in targets}
    try:
        for t, port in targets.items():  # warm every path (connections, prompt cache)
            sequential(port, 50, "GET", "/v1/models")
            sequential(port, 5, "POST", "/v1/chat/completions", CHAT1)
        for rnd in range(ROUNDS):
            order = list(targets)
            random.shuffle(order)
            for t in order:
                port = targets[t]
                r[t]["models_seq"] += sequential(port, 1000, "GET", "/v1/models")
                r[t]["models_16"].append(wrk(tmp, port, "/v1/models", WRK_S, pids=proxies[t]))
                r[t]["chat_seq"] += sequential(port, 40, "POST", "/v1/chat/completions", CHAT1)
                r[t]["chat_16"].append(wrk(tmp, port, "/v1/chat/completions", WRK_S, CHAT1,
                                           pids=proxies[t]))
                ring.wait_idle()
                f, g = stream_timings(port, 4)
                r[t]["first"] += f
                r[t]["gap"] += g
            print(f"round {rnd + 1}/{ROUNDS} done", file=sys.stderr)
    finally:
        nginx.terminate()
        nginx.wait(10)

    def med(rows, i):
        return statistics.median(row[i] for row in rows)
    summary = {}
    for t in targets:
        x = r[t]
        summary[t] = {
            "models_seq_p50_ms": ms(pct(x["models_seq"], 50)),
            "models_seq_p99_ms": ms(pct(x["models_seq"], 99)),
            "models_16_p50_ms": ms(med(x["models_16"], 0)),
            "models_16_p99_ms": ms(med(x["models_16"], 1)),
            "models_16_rps": round(med(x["models_16"], 2)),
            "models_16_proxy_cpu_us_per_req": round(med(x["models_16"], 4), 1),
            "chat1_seq_p50_ms": ms(pct(x["chat_seq"], 50)),
            "chat1_seq_p99_ms": ms(pct(x["chat_seq"], 99)),
            "chat1_16_p50_ms": ms(med(x["chat_16"], 0)),
            "chat1_16_p99_ms": ms(med(x["chat_16"], 1)),
            "chat1_16_rps": round(med(x["chat_16"], 2), 1),
            "non_2xx": sum(row[3] for row in x["models_16"] + x["chat_16"]),
            "stream_ttft_p50_ms": ms(pct(x["first"], 50)),
            "stream_gap_p50_ms": ms(pct(x["gap"], 50)),
            "stream_gap_p99_ms": ms(pct(x["gap"], 99)),
        }
    d, c, n = summary["direct"], summary["coordinator"], summary["nginx"]

    def added(key):
        return {"coordinator": round(c[key] - d[key], 3), "nginx": round(n[key] - d[key], 3)}
    ratios = {
        "models_seq_p50_added_ms": added("models_seq_p50_ms"),
        "chat1_seq_p50_added_ms": added("chat1_seq_p50_ms"),
        "models_16_p99_coordinator_over_nginx": round(c["models_16_p99_ms"] / n["models_16_p99_ms"], 2),
        "models_16_rps_coordinator_over_nginx": round(c["models_16_rps"] / n["models_16_rps"], 2),
        "models_16_rps_coordinator_over_direct": round(c["models_16_rps"] / d["models_16_rps"], 2),
        "models_16_proxy_cpu_coordinator_over_nginx": round(
            c["models_16_proxy_cpu_us_per_req"] / n["models_16_proxy_cpu_us_per_req"], 2),
        "chat1_16_p99_coordinator_over_nginx": round(c["chat1_16_p99_ms"] / n["chat1_16_p99_ms"], 2),
        "chat1_16_rps_coordinator_over_nginx": round(c["chat1_16_rps"] / n["chat1_16_rps"], 2),
        "stream_ttft_p50_coordinator_over_direct": round(c["stream_ttft_p50_ms"] / d["stream_ttft_p50_ms"], 2),
        "stream_gap_p50_coordinator_over_direct": round(c["stream_gap_p50_ms"] / d["stream_gap_p50_ms"], 2),
    }
    print(json.dumps({"speed": summary}, indent=1))
    print(json.dumps({"ratios": ratios}, indent=1))


# --- limits -----------------------------------------------------------------------------------

def raw(port, head, body_parts=(), gap=0.0, timeout=120):
    """Sends `head` and then each of `body_parts` `gap` seconds apart (stopping once the server
    answers or closes), and returns (first line of the answer or what happened, seconds)."""
    s = socket.create_connection(("127.0.0.1", port))
    t = time.monotonic()
    out = b""
    try:
        s.sendall(head)
        for part in body_parts:
            if gap:
                time.sleep(gap)
                s.settimeout(0)
                try:
                    out += s.recv(65536)
                    break
                except BlockingIOError:
                    pass
                s.settimeout(None)
            s.sendall(part)
        s.settimeout(timeout)
        while True:
            b = s.recv(65536)
            if not b:
                break
            out += b
        answer = out.split(b"\r\n", 1)[0].decode(errors="replace") or "closed without an answer"
        code = re.search(rb'"code":\s*"([a-z_]+)"', out)
        if code:
            answer += f" ({code.group(1).decode()})"
    except (BrokenPipeError, ConnectionResetError) as e:
        answer = f"connection {type(e).__name__}"
    except socket.timeout:
        answer = f"no answer within {timeout} s"
    finally:
        s.close()
    return answer, round(time.monotonic() - t, 2)


def chat_head(length=None, chunked=False):
    h = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
         b"connection: close\r\n")
    if chunked:
        h += b"transfer-encoding: chunked\r\n"
    elif length is not None:
        h += b"content-length: %d\r\n" % length
    return h + b"\r\n"


def huge_prompt(n):
    return b'{"messages": [{"role": "user", "content": "' + b"lorem ipsum " * (n // 12) + b'"}]}'


class RssSampler:
    def __init__(self, ring):
        self.ring, self.peak, self.done = ring, 0.0, threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.done.is_set():
            self.peak = max(self.peak, self.ring.rss_mb())
            time.sleep(0.05)

    def stop(self):
        self.done.set()
        self.thread.join()
        return round(self.peak, 1)


def burst(ring, n, declared, send, chunked=False):
    """n clients at once, each sending `send` bytes of a body of `declared` bytes and then
    holding the connection; returns what they got and the memory figures."""
    before = ring.rss_mb()
    sampler = RssSampler(ring)
    answers, threads = [], []
    payload = b"x" * (1 << 20)

    def client():
        s = socket.create_connection(("127.0.0.1", ring.api_port))
        s.settimeout(60)
        try:
            s.sendall(chat_head(None if chunked else declared, chunked))
            sent = 0
            while sent < send:
                part = payload if not chunked else b"%x\r\n%s\r\n" % (len(payload), payload)
                s.sendall(part)
                sent += len(payload)
            out = s.recv(4096)
            answers.append(out.split(b"\r\n", 1)[0].decode(errors="replace"))
        except OSError as e:
            answers.append(type(e).__name__)
        finally:
            s.close()
    t = time.monotonic()
    for _ in range(n):
        th = threading.Thread(target=client)
        th.start()
        threads.append(th)
    for th in threads:
        th.join()
    elapsed = time.monotonic() - t
    time.sleep(2)
    peak = sampler.stop()
    after = ring.rss_mb()
    counts = {a: answers.count(a) for a in set(answers)}
    return {"clients": n, "answers": counts, "seconds": round(elapsed, 2),
            "rss_before_mb": round(before, 1), "rss_peak_mb": peak, "rss_after_2s_mb": round(after, 1)}


def idle_connections(ring, n):
    """n connections that send nothing after one request each (kept alive), from 16 loopback
    addresses so no address passes its share; a chat completion meanwhile."""
    before = ring.rss_mb()
    socks = []
    for i in range(n):
        s = socket.socket()
        s.bind((f"127.0.0.{2 + i % 16}", 0))
        s.connect(("127.0.0.1", ring.api_port))
        s.sendall(b"GET /healthz HTTP/1.1\r\nhost: bench\r\n\r\n")
        socks.append(s)
    for s in socks:
        s.settimeout(10)
        s.recv(4096)
    held = ring.rss_mb()
    t = time.monotonic()
    status, _ = post("127.0.0.1", ring.api_port, "/v1/chat/completions", CHAT1)
    chat_s = time.monotonic() - t
    t = time.monotonic()
    health, _ = get("127.0.0.1", ring.api_port, "/healthz")
    health_s = time.monotonic() - t
    fds = len(os.listdir(f"/proc/{ring.proc.pid}/fd"))
    for s in socks:
        s.close()
    time.sleep(2)
    return {"idle_connections": n, "agent_open_files": fds, "chat_status": status,
            "chat_ms": ms(chat_s), "healthz_status": health, "healthz_ms": ms(health_s),
            "rss_before_mb": round(before, 1), "rss_held_mb": round(held, 1),
            "rss_after_2s_mb": round(ring.rss_mb(), 1)}


def limits(ring):
    port = ring.api_port
    out = {"open_files_limit": ring.open_files_limit()}
    results = {}
    results["slow head (a header line a second)"] = raw(
        port, b"POST /v1/chat/completions HTTP/1.1\r\nhost: bench\r\n",
        [b"x-pad: a\r\n"] * 120, gap=1.0)
    body = json.dumps(CHAT1).encode()
    results["slow body (90 bytes, one a second)"] = raw(
        port, chat_head(90), [b" "] * 90, gap=1.0)
    results["lying content-length (1000 declared, 16 sent)"] = raw(port, chat_head(1000) + body[:16])
    big = huge_prompt(31 << 20)
    results["31 MiB prompt, content-length"] = raw(port, chat_head(len(big)), [big])
    chunks = [b"%x\r\n%s\r\n" % (1 << 20, big[i:i + (1 << 20)]) for i in range(0, 31 << 20, 1 << 20)]
    results["31 MiB prompt, chunked"] = raw(port, chat_head(chunked=True), chunks + [b"0\r\n\r\n"])
    mid = huge_prompt(600_000)
    results["600 kB prompt (fits the body limit, not the context)"] = raw(port, chat_head(len(mid)) + mid)
    results["malformed JSON"] = raw(port, chat_head(14) + b'{"messages": [')
    wrong = json.dumps({**CHAT1, "model": "gpt-5"}).encode()
    results["model gpt-5"] = raw(port, chat_head(len(wrong)) + wrong)
    too_many = json.dumps({**CHAT1, "max_tokens": 100000}).encode()
    results["max_tokens 100000"] = raw(port, chat_head(len(too_many)) + too_many)
    out["requests"] = {k: {"answer": a, "seconds": s} for k, (a, s) in results.items()}
    out["rank0_slots_busy_after"] = ring.slots_busy()
    out["burst_40x30MiB_of_31MiB"] = burst(ring, 40, 31 << 20, 30 << 20)
    out["burst_40x30MiB_chunked"] = burst(ring, 40, None, 30 << 20, chunked=True)
    out["idle_1024"] = idle_connections(ring, 1024)
    print(json.dumps({"limits": out}, indent=1))


def main():
    modes = sys.argv[1:] or ["speed", "limits"]
    # A stopped bench stops its ring too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated"))
    tmp = Path(tempfile.mkdtemp(prefix="llm-bench-gateway-"))
    ring = Ring(tmp, soft_nofile=1024)
    try:
        if "limits" in modes:
            limits(ring)
        if "speed" in modes:
            speed(tmp, ring)
    finally:
        ring.stop()


if __name__ == "__main__":
    main()
