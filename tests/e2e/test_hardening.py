"""The gateway against bad input and load, on a real ring over real HTTP: slow heads and bodies
are cut by the timeouts, a body too large for the model's context is refused before rank 0's
engine sees it, malformed JSON and an unknown model get OpenAI's errors, /readyz does not show
internal addresses to a client without a key, 1,000 idle connections do not keep a request
from being served, and one address past its share of connections gets a 503.

The cluster runs with 2 s header and body timeouts and 64 connections per client address, and
starts with a soft open-files limit of 1,024 (systemd's default) to show the agent raises it.
Timings are printed as [figure] lines (figures, not pass/fail)."""

import json
import os
import re
import resource
import socket
import time

import openai
import pytest
import requests

from conftest import Cluster, _env_path, port_free

OFFSET = 1900
TIMEOUT_S = 2
PER_CLIENT = 64
CHAT = {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gateway")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # The agent inherits the low soft limit; this process gets its own back at once.
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
    try:
        cluster = Cluster("llama-rpc", _env_path("LLAMA_CPP_DIR"), _env_path("SMOLLM2_GGUF"), OFFSET, tmp,
                          ("--header-timeout", str(TIMEOUT_S), "--body-timeout", str(TIMEOUT_S),
                           "--max-connections-per-client", str(PER_CLIENT)))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    with cluster.serving():
        yield cluster
    for port in (cluster.api_port, cluster.engine_port):
        assert port_free(port), f"port {port} still open after the cluster stopped"


def chat_head(length=None, chunked=False):
    h = b"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
    if chunked:
        h += b"transfer-encoding: chunked\r\n"
    elif length is not None:
        h += b"content-length: %d\r\n" % length
    return h + b"\r\n"


def trickle(port, head, parts, gap):
    """Sends `head`, then `parts` one every `gap` seconds while the server listens. Returns the
    server's answer, how many parts went out before it answered or closed, and the seconds."""
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(0)
    t = time.monotonic()
    sent, answer = 0, b""
    try:
        s.sendall(head)
        for p in parts:
            time.sleep(gap)
            try:
                answer += s.recv(65536)  # the server answered or closed: stop sending
                break
            except BlockingIOError:
                pass
            s.sendall(p)
            sent += 1
        s.settimeout(30)
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            answer += chunk
    except (BrokenPipeError, ConnectionResetError):
        pass
    finally:
        s.close()
    return answer.decode(errors="replace"), sent, time.monotonic() - t


def test_the_agent_raised_its_open_files_limit(gw):
    limits = open(f"/proc/{gw.proc.pid}/limits").read()
    soft, hard = re.search(r"Max open files\s+(\d+)\s+(\d+)", limits).groups()
    assert soft == hard and int(soft) > 1024, limits


def test_slow_headers_are_cut_with_a_408(gw):
    lines = [b"x-pad: a\r\n"] * 40
    answer, sent, secs = trickle(gw.api_port, b"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\n", lines, 0.25)
    print(f"[figure] head sent a line every 0.25 s: {answer.splitlines()[0] if answer else 'closed'} after {secs:.2f} s")
    assert answer.startswith("HTTP/1.1 408"), answer
    assert "request_timeout" in answer
    assert sent < len(lines), "the whole slow head was read"


def test_nothing_sent_is_closed_without_a_word(gw):
    s = socket.create_connection(("127.0.0.1", gw.api_port))
    s.settimeout(30)
    t = time.monotonic()
    assert s.recv(100) == b""
    print(f"[figure] a silent connection closed after {time.monotonic() - t:.2f} s")
    s.close()


def test_a_dripped_body_and_a_lying_length_are_cut_with_a_408(gw):
    answer, sent, secs = trickle(gw.api_port, chat_head(90), [b" "] * 90, 0.25)
    print(f"[figure] 90-byte body dripped a byte every 0.25 s: 408 after {secs:.2f} s, {sent} bytes in")
    assert answer.startswith("HTTP/1.1 408") and "request_timeout" in answer, answer
    assert sent < 90
    body = json.dumps(CHAT).encode()
    answer, _, secs = trickle(gw.api_port, chat_head(len(body) + 1000) + body, [], 0)
    print(f"[figure] Content-Length 1000 bytes more than sent: 408 after {secs:.2f} s")
    assert answer.startswith("HTTP/1.1 408") and "request_timeout" in answer, answer


def engine_log_since(gw, offset):
    return gw.log_path.read_text(errors="replace")[offset:]


def assert_engine_saw_nothing(gw, log_offset):
    """Rank 0's engine logs every task it takes and every request it refuses; its slots are idle."""
    seen = engine_log_since(gw, log_offset)
    for line in seen.splitlines():
        assert "exceeds the available context" not in line and "got exception" not in line, line
        m = re.search(r"prompt eval time = .*/\s*(\d+) tokens", line)
        assert not m or int(m.group(1)) < 100, f"a long prompt reached the engine: {line}"
    slots = requests.get(f"http://127.0.0.1:{gw.engine_port}/slots", timeout=5).json()
    # The coordinator's idle probe may hold a slot for a moment: wait it out.
    deadline = time.monotonic() + 5
    while any(s["is_processing"] for s in slots) and time.monotonic() < deadline:
        time.sleep(0.1)
        slots = requests.get(f"http://127.0.0.1:{gw.engine_port}/slots", timeout=5).json()
    assert not any(s["is_processing"] for s in slots), slots


def test_bodies_that_cannot_fit_the_context_are_413_before_the_engine(gw):
    log_offset = len(gw.log_path.read_text(errors="replace"))
    url = f"{gw.base}/v1/chat/completions"
    prompt = b'{"messages": [{"role": "user", "content": "' + b"lorem ipsum " * ((31 << 20) // 12) + b'"}]}'
    t = time.monotonic()
    r = requests.post(url, data=prompt, headers={"content-type": "application/json"}, timeout=60)
    print(f"[figure] 31 MiB prompt with Content-Length: {r.status_code} after {time.monotonic() - t:.2f} s")
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "request_too_large"

    def chunks():
        for i in range(0, 4 << 20, 1 << 16):
            yield prompt[i:i + (1 << 16)]
    t = time.monotonic()
    r = requests.post(url, data=chunks(), headers={"content-type": "application/json"}, timeout=60)
    print(f"[figure] 4 MiB prompt, chunked: {r.status_code} after {time.monotonic() - t:.2f} s")
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text
    # Within the body limit (1 MiB at ctx 1024) but at least 4,700 tokens: it cannot fit.
    mid = {"messages": [{"role": "user", "content": "lorem ipsum " * 50_000}]}
    t = time.monotonic()
    r = requests.post(url, json=mid, timeout=60)
    print(f"[figure] 600 kB prompt: {r.status_code} after {time.monotonic() - t:.2f} s")
    assert r.status_code == 413, r.text
    err = r.json()["error"]
    assert (err["type"], err["code"]) == ("invalid_request_error", "context_length_exceeded"), err
    r = requests.post(url, json={**CHAT, "max_tokens": 1025}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens", r.text
    assert_engine_saw_nothing(gw, log_offset)


def test_malformed_json_and_an_unknown_model_get_openais_errors(gw):
    r = requests.post(f"{gw.base}/v1/chat/completions", data=b'{"messages": [',
                      headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_json"
    client = openai.OpenAI(base_url=f"{gw.base}/v1", api_key="unused", max_retries=0, timeout=60)
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-5", messages=CHAT["messages"], max_tokens=4)
    assert e.value.code == "model_not_found", e.value
    # The configured name, and no name at all, are served.
    name = gw.status()["model"]["name"]
    ok = client.chat.completions.create(model=name, messages=CHAT["messages"], max_tokens=4)
    assert ok.choices[0].message.content
    r = requests.post(f"{gw.base}/v1/chat/completions", json=CHAT, timeout=60)
    assert r.status_code == 200, r.text


def test_readyz_shows_no_internal_addresses_without_a_key(gw):
    r = requests.get(f"{gw.base}/readyz", timeout=5)
    assert r.status_code == 200
    assert set(r.json()) == {"ready", "phase", "generation"}, r.json()
    assert r.json()["ready"] is True
    assert not re.search(r"\d+\.\d+\.\d+\.\d+", r.text), r.text


def open_idle(port, n, sources):
    """n kept-alive connections, each after one answered request, spread over `sources`."""
    socks = []
    for i in range(n):
        s = socket.socket()
        s.bind((sources[i % len(sources)], 0))
        s.connect(("127.0.0.1", port))
        s.sendall(b"GET /healthz HTTP/1.1\r\nhost: t\r\n\r\n")
        socks.append(s)
    answers = []
    for s in socks:
        s.settimeout(30)
        answers.append(s.recv(4096))
    return socks, answers


def test_a_request_is_served_beside_1000_idle_connections(gw):
    # 16 source addresses: each stays within its share, so all 1,000 are held open.
    sources = [f"127.0.0.{i}" for i in range(2, 18)]
    t = time.monotonic()
    socks, answers = open_idle(gw.api_port, 1000, sources)
    try:
        print(f"[figure] 1,000 connections opened and answered in {time.monotonic() - t:.2f} s")
        assert all(a.startswith(b"HTTP/1.1 200") for a in answers), {a[:20] for a in answers}
        fds = len(os.listdir(f"/proc/{gw.proc.pid}/fd"))
        assert fds > 1000, f"the agent holds only {fds} descriptors: the connections are not open"
        t = time.monotonic()
        r = requests.post(f"{gw.base}/v1/chat/completions", json=CHAT, timeout=60)
        print(f"[figure] a chat completion beside 1,000 idle connections: {r.status_code} "
              f"in {time.monotonic() - t:.3f} s ({fds} descriptors open)")
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"]
    finally:
        for s in socks:
            s.close()


def test_an_address_past_its_share_gets_a_503_and_others_are_served(gw):
    socks, answers = open_idle(gw.api_port, PER_CLIENT, ["127.0.0.50"])
    try:
        assert all(a.startswith(b"HTTP/1.1 200") for a in answers)
        s = socket.socket()
        s.bind(("127.0.0.50", 0))
        s.connect(("127.0.0.1", gw.api_port))
        s.settimeout(30)
        s.sendall(b"GET /v1/models HTTP/1.1\r\nhost: t\r\n\r\n")
        answer = b""
        while chunk := s.recv(4096):
            answer += chunk
        s.close()
        text = answer.decode()
        assert text.startswith("HTTP/1.1 503"), text
        assert "retry-after: 1" in text.lower() and "too_many_connections" in text, text
        r = requests.get(f"{gw.base}/v1/models", timeout=10)
        assert r.status_code == 200, r.text
    finally:
        for s in socks:
            s.close()
