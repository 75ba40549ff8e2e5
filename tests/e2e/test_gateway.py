"""The gateway on a real ring over real HTTP: API keys with limits (429 with OpenAI's headers,
recovery after the reset, the official client's RateLimitError), tokens counted from the engine,
usage per key, fair admission (one key flooding, another key's request served in turn), the
queue's bound and timeout (503 with Retry-After), a client that leaves the queue, and the keys
file reloaded on change and on SIGHUP (a bad file logged with file:line:col, the old keys kept).

Two local rings (llama-rpc; the gateway does not depend on the engine): `gw` admits one request
at a time with a long queue timeout, so ordering is all that is asserted; `tight` has a queue of
2 and a 2 s timeout, with rank 0's engine frozen (SIGSTOP) so that nothing finishes while the
queue is judged. Port offsets 1800 and 1830. Figures are printed as `[figure]` lines."""

import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import subprocess

import openai
import pytest
import requests

from conftest import Cluster, _env_path, wait_until

KEYS = {
    "limited": "sk-limited-0123456789abcdef",
    "tiny": "sk-tiny-0123456789abcdef",
    "tokens": "sk-tokens-0123456789abcdef",
    "flood": "sk-flood-0123456789abcdef",
    "single": "sk-single-0123456789abcdef",
    "restricted": "sk-restricted-0123456789abcdef",
    "admin": "sk-admin-0123456789abcdef",
}
LIMITS = {
    "limited": "requests_per_minute = 30",
    "tiny": "requests_per_minute = 1",
    "tokens": "tokens_per_minute = 100",
}
CHAT = {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 4, "temperature": 0}


def auth(name):
    return {"Authorization": f"Bearer {KEYS[name]}"}


def keys_toml(model, extra=""):
    out = []
    for name, key in KEYS.items():
        out.append(f'[[key]]\nname = "{name}"\nkey = "{key}"\n')
        if name in LIMITS:
            out.append(LIMITS[name] + "\n")
        if name == "restricted":
            out.append(f'models = ["{model}"]\n')
        out.append("\n")
    return "".join(out) + extra


def usage(base, headers=None):
    return requests.get(f"{base}/api/v1/usage", headers=headers or auth("admin"), timeout=5).json()


def engine_pid(base, headers=None):
    st = requests.get(f"{base}/api/v1/cluster", headers=headers or {}, timeout=5).json()
    return st["nodes"][0]["status"]["pid"]


def gateway_ring(tmp, offset, extra):
    return Cluster("llama-rpc", _env_path("LLAMA_CPP_DIR"), _env_path("SMOLLM2_GGUF"), offset, tmp, extra)


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gateway")
    model = Path(_env_path("SMOLLM2_GGUF")).stem
    keys = tmp / "keys.toml"
    keys.write_text(keys_toml(model))
    cluster = gateway_ring(tmp, 1800, ("--api-keys", str(keys), "--max-in-flight", "1",
                                       "--queue-size", "16", "--queue-timeout", "120"))
    cluster.keys, cluster.model = keys, model
    with cluster.serving():
        yield cluster


@pytest.fixture(scope="module")
def tight(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gateway-tight")
    with gateway_ring(tmp, 1830, ("--max-in-flight", "1", "--queue-size", "2", "--queue-timeout", "2")).serving() as cluster:
        yield cluster


def test_check_config_checks_the_api_keys_file_with_every_problems_place(tmp_path):
    keys = tmp_path / "keys.toml"
    keys.write_text('[[key]]\nname = "a"\nkey = "short"\nmax_concurrent = 0\nmodels = ["gpt-5"]\n')
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[cluster]\nname = "lab"\nengine = "llama-rpc"\n[model]\npath = "/m/smol.gguf"\n'
                   f'[api]\napi_keys_file = "{keys}"\n[[node]]\nrank = 0\naddress = "127.0.0.1"\n')
    r = subprocess.run([os.environ["LLM_AGENT_BIN"], "check-config", str(cfg)], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 2, (r.stdout, r.stderr)
    for want in (f"{keys}:3:7: key is 5 characters long", f"{keys}:4:18: max_concurrent must be at least 1",
                 f"{keys}:5:11: model `gpt-5` is not served here (this cluster serves `smol`)"):
        assert want in r.stderr, r.stderr
    assert "3 problem(s) found" in r.stderr, r.stderr
    keys.unlink()
    r = subprocess.run([os.environ["LLM_AGENT_BIN"], "check-config", str(cfg)], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0 and "API keys file" in r.stdout and "not on this machine" in r.stdout, r


def test_over_the_request_limit_is_a_429_with_openai_headers_and_recovers_after_the_reset(gw):
    served = 0
    while True:
        r = requests.get(f"{gw.base}/v1/models", headers=auth("limited"), timeout=10)
        if r.status_code != 200:
            break
        assert r.headers["x-ratelimit-limit-requests"] == "30", r.headers
        served += 1
        assert served <= 40, "never limited"
    assert r.status_code == 429, r.text
    err = r.json()["error"]
    assert err["code"] == "rate_limit_exceeded" and err["type"] == "requests", err
    assert "limited" in err["message"], err
    h = r.headers
    assert h["x-ratelimit-limit-requests"] == "30"
    assert h["x-ratelimit-remaining-requests"] == "0"
    assert h["x-ratelimit-reset-requests"].endswith("s"), h
    retry = int(h["retry-after"])
    assert retry >= 1 and int(h["retry-after-ms"]) >= 1, h
    # Another key is not affected.
    assert requests.get(f"{gw.base}/v1/models", headers=auth("admin"), timeout=10).status_code == 200
    time.sleep(retry)
    again = requests.get(f"{gw.base}/v1/models", headers=auth("limited"), timeout=10)
    assert again.status_code == 200, again.text
    u = usage(gw.base)["keys"]["limited"]
    assert u["rate_limited"] >= 1 and u["requests"] == served + 1, u
    print(f"\n[figure] requests_per_minute = 30: {served} served, then 429 (Retry-After {retry} s, "
          f"reset {h['x-ratelimit-reset-requests']}); served again after the wait")


def test_the_openai_client_raises_its_rate_limit_error(gw):
    client = openai.OpenAI(base_url=f"{gw.base}/v1", api_key=KEYS["tiny"], max_retries=0)
    first = client.chat.completions.create(model=gw.model, **CHAT)
    assert first.choices[0].message.content is not None
    with pytest.raises(openai.RateLimitError) as e:
        client.chat.completions.create(model=gw.model, **CHAT)
    assert e.value.response.headers["x-ratelimit-limit-requests"] == "1"
    assert e.value.code == "rate_limit_exceeded"


def test_tokens_from_the_engine_count_against_the_token_limit_and_in_usage(gw):
    body = {"messages": [{"role": "user", "content": "Tell me about the sea."}], "max_tokens": 40,
            "temperature": 0, "ignore_eos": True}
    reported, statuses, last = [], [], None
    for i in range(6):
        stream = i % 2 == 1  # streamed ones are counted from the engine's timings
        r = requests.post(f"{gw.base}/v1/chat/completions", headers=auth("tokens"),
                          json={**body, "stream": stream}, timeout=60, stream=stream)
        statuses.append(r.status_code)
        last = r
        if r.status_code != 200:
            break
        if stream:
            for line in r.iter_lines():
                if line.startswith(b"data: ") and b"timings" in line:
                    t = json.loads(line[6:])["timings"]
                    reported.append(t["cache_n"] + t["prompt_n"] + t["predicted_n"])
        else:
            u = r.json()["usage"]
            reported.append(u["prompt_tokens"] + u["completion_tokens"])
    assert last.status_code == 429, statuses
    assert last.json()["error"]["type"] == "tokens", last.text
    assert last.headers["x-ratelimit-limit-tokens"] == "100"
    assert last.headers["x-ratelimit-remaining-tokens"] == "0"
    assert "x-ratelimit-reset-tokens" in last.headers
    u = usage(gw.base)["keys"]["tokens"]
    assert u["prompt_tokens"] + u["completion_tokens"] == sum(reported), (u, reported)
    print(f"\n[figure] tokens_per_minute = 100: {len(reported)} answered ({sum(reported)} tokens), then 429 "
          f"(Retry-After {last.headers['retry-after']} s); usage {u}")


def test_a_key_limited_to_its_models_gets_model_not_found_for_others(gw):
    r = requests.post(f"{gw.base}/v1/chat/completions", headers=auth("restricted"),
                      json={**CHAT, "model": "gpt-5"}, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
    r = requests.post(f"{gw.base}/v1/chat/completions", headers=auth("restricted"),
                      json={**CHAT, "model": gw.model}, timeout=30)
    assert r.status_code == 200, r.text


def test_one_key_flooding_does_not_starve_another_keys_request(gw):
    """max_in_flight = 1: of 10 flood requests one runs and nine wait; a single request of
    another key then waits behind at most one of them, not nine. The engine is frozen while
    the queue fills, so the order does not depend on how fast anything runs."""
    done, lock = [], threading.Lock()
    body = {**CHAT, "max_tokens": 16, "ignore_eos": True}

    def send(who, i):
        r = requests.post(f"{gw.base}/v1/chat/completions", headers=auth(who), json=body, timeout=300)
        with lock:
            done.append((who, i, r.status_code))

    def waiting(who):
        return usage(gw.base)["admission"]["clients"].get(who, {}).get("queued")

    pid = engine_pid(gw.base, auth("admin"))
    threads = []
    os.kill(pid, signal.SIGSTOP)
    try:
        threads = [threading.Thread(target=send, args=("flood", i)) for i in range(10)]
        for t in threads:
            t.start()
        wait_until(lambda: waiting("flood") == 9, 20, "nine flood requests to wait")
        threads.append(threading.Thread(target=send, args=("single", 0)))
        threads[-1].start()
        wait_until(lambda: waiting("single") == 1, 20, "the single request to wait")
    finally:
        os.kill(pid, signal.SIGCONT)
    for t in threads:
        t.join(300)
    assert all(s == 200 for _, _, s in done), done
    order = [who for who, _, _ in done]
    position = order.index("single")
    flood_after = order[position + 1:].count("flood")
    # Round-robin: the running one ends, flood's oldest waiting one has its turn, then single.
    assert flood_after >= 7, f"single finished after {10 - flood_after} of 10 flood requests: {order}"
    print(f"\n[figure] fairness, max_in_flight 1: single finished {position + 1}. of 11, "
          f"before {flood_after} of the 9 flood requests that were waiting before it")


def test_a_client_that_leaves_the_queue_is_dropped_from_it(gw):
    pid = engine_pid(gw.base, auth("admin"))
    occupant = None
    os.kill(pid, signal.SIGSTOP)
    try:
        occupant = threading.Thread(target=lambda: requests.post(
            f"{gw.base}/v1/chat/completions", headers=auth("admin"), json=CHAT, timeout=120))
        occupant.start()
        wait_until(lambda: usage(gw.base)["admission"]["in_flight"] == 1, 20, "the occupant to run")
        body = json.dumps(CHAT).encode()
        s = socket.create_connection(("127.0.0.1", gw.api_port))
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
                  + f"authorization: Bearer {KEYS['single']}\r\ncontent-length: {len(body)}\r\n\r\n".encode()
                  + body)
        wait_until(lambda: usage(gw.base)["admission"]["queued"] == 1, 20, "the request to wait")
        s.close()
        wait_until(lambda: usage(gw.base)["admission"]["queued"] == 0, 10,
                   "the request of the client that left to leave the queue")
    finally:
        os.kill(pid, signal.SIGCONT)
    if occupant:
        occupant.join(120)
    wait_until(lambda: usage(gw.base)["admission"]["in_flight"] == 0, 60, "the occupant to end")


def test_a_full_queue_and_the_queue_timeout_are_503_with_retry_after(tight):
    pid = engine_pid(tight.base)
    results, lock = [], threading.Lock()

    def send():
        t = time.monotonic()
        r = requests.post(f"{tight.base}/v1/chat/completions", json=CHAT, timeout=120)
        code = r.json().get("error", {}).get("code") if r.status_code != 200 else None
        with lock:
            results.append((r.status_code, code, r.headers.get("retry-after"), time.monotonic() - t))

    os.kill(pid, signal.SIGSTOP)
    threads = []
    try:
        threads.append(threading.Thread(target=send))
        threads[-1].start()
        wait_until(lambda: usage(tight.base, {})["admission"]["in_flight"] == 1, 20, "the occupant to run")
        for _ in range(2):
            threads.append(threading.Thread(target=send))
            threads[-1].start()
        wait_until(lambda: usage(tight.base, {})["admission"]["queued"] == 2, 20, "two requests to wait")
        # The queue is full: answered at once.
        send()
        assert results[-1][:2] == (503, "queue_full"), results
        # Nothing finishes while the engine is frozen: the two waiting ones time out (2 s).
        wait_until(lambda: len(results) == 3, 30, "the queue timeout")
    finally:
        os.kill(pid, signal.SIGCONT)
    for t in threads:
        t.join(120)
    codes = sorted((s, c) for s, c, _, _ in results)
    assert codes == [(200, None), (503, "queue_full"), (503, "queue_timeout"), (503, "queue_timeout")], results
    assert all(ra and int(ra) >= 1 for s, _, ra, _ in results if s == 503), results
    u = usage(tight.base, {})["keys"]["anonymous"]
    assert u["queue_rejected"] == 3, u
    waited = [f"{w:.1f}" for s, c, _, w in results if c == "queue_timeout"]
    print(f"\n[figure] queue of 2, timeout 2 s, engine frozen: full -> 503 queue_full at once; "
          f"waiting -> 503 queue_timeout after {waited} s; the occupant 200 once thawed")


def test_the_keys_file_is_reloaded_on_change_and_a_bad_file_keeps_the_old_keys(gw):
    new_key = "sk-carol-0123456789abcdef"
    carol = {"Authorization": f"Bearer {new_key}"}
    assert requests.get(f"{gw.base}/v1/models", headers=carol, timeout=10).status_code == 401
    gw.keys.write_text(keys_toml(gw.model, f'[[key]]\nname = "carol"\nkey = "{new_key}"\n'))
    wait_until(lambda: requests.get(f"{gw.base}/v1/models", headers=carol, timeout=10).status_code == 200,
               15, "the new key to work without a restart")
    good = gw.keys.read_text()
    reloads = gw.log_tail(10**6).count("API keys reloaded")
    # Two problems, both reported with their places: a key too short (line 3, column 7) and a
    # limit of 0 (line 4, column 23).
    bad = '[[key]]\nname = "x"\nkey = "short"\nrequests_per_minute = 0\n\n' + good
    gw.keys.write_text(bad)
    want = [f"{gw.keys}:3:7: key is 5 characters long", f"{gw.keys}:4:23: requests_per_minute must be at least 1"]
    try:
        wait_until(lambda: all(w in gw.log_tail(10**6) for w in want), 15, "the bad file to be logged")
        assert requests.get(f"{gw.base}/v1/models", headers=carol, timeout=10).status_code == 200
        assert requests.get(f"{gw.base}/v1/models", headers=auth("admin"), timeout=10).status_code == 200
    finally:
        gw.keys.write_text(good)
    wait_until(lambda: gw.log_tail(10**6).count("API keys reloaded") > reloads, 15, "the good file to be reloaded")
    # SIGHUP reloads too, and does not stop the agent.
    os.kill(gw.proc.pid, signal.SIGHUP)
    wait_until(lambda: 'reason="SIGHUP"' in gw.log_tail(10**6), 10, "a reload on SIGHUP")
    assert gw.proc.poll() is None, "SIGHUP must not stop the agent"
    assert requests.get(f"{gw.base}/v1/models", headers=carol, timeout=10).status_code == 200
