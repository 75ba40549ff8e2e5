"""Several models, one ring: a real 3-rank llama.cpp RPC ring configured with SmolLM2 Q4_1 and
a Q8_0 copy switches between them on demand. Every answer must equal a single-process server of
the model the request named; no request is lost; the switch count is what the requests forced;
a loaded model keeps the ring for min_residency_s before a waiting request switches it away."""

import threading
from datetime import datetime
from pathlib import Path

import openai
import pytest
import requests

from conftest import Cluster, ReferenceServer, _env_path

PROMPT = [{"role": "user", "content": "Write one sentence about the sea."}]
DETERMINISTIC = dict(temperature=0, max_tokens=24, seed=42, extra_body={"cache_prompt": False})
OFFSET = 4000
RESIDENCY_S = 6


def client(base):
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def two_models(tmp_path_factory, smollm2_q8):
    tmp = tmp_path_factory.mktemp("switch")
    q4 = _env_path("SMOLLM2_GGUF")
    engine_dir = _env_path("LLAMA_CPP_DIR")
    cluster = Cluster("llama-rpc", engine_dir, q4, OFFSET, tmp, extra=(
        "--also-model", str(smollm2_q8), "--min-residency", str(RESIDENCY_S),
        "--queue-timeout", "90", "--switch-grace", "10",
        # One request at a time: batched decoding of several slots differs in the last bits
        # from the single-request reference.
        "--max-in-flight", "1"))
    refs = []
    with cluster.serving():
        for i, m in enumerate((q4, Path(smollm2_q8))):
            refs.append(ReferenceServer(engine_dir / "llama-server", m, 28080 + OFFSET + i, tmp, m.stem))
        try:
            yield cluster, {q4.stem: refs[0], Path(smollm2_q8).stem: refs[1]}
        finally:
            for r in refs:
                r.stop()


def listing(cluster):
    r = requests.get(f"{cluster.base}/v1/models", timeout=5)
    assert r.status_code == 200, r.text
    return {m["id"]: m["llm_cluster"]["state"] for m in r.json()["data"]}


def switch_events(cluster):
    r = requests.get(f"{cluster.base}/api/v1/events", params={"follow": "false"}, timeout=5)
    assert r.status_code == 200, r.text
    return [e for e in r.json()["events"] if e["kind"] == "switch"]


def at(e):
    return datetime.fromisoformat(e["at"].replace("Z", "+00:00")).timestamp()


def test_alternating_requests_switch_and_each_answer_is_its_models(two_models):
    cluster, refs = two_models
    first, second = list(refs)
    assert listing(cluster) == {first: "loaded", second: "available"}
    expected = {
        name: client(ref.base).chat.completions.create(model="x", messages=PROMPT, **DETERMINISTIC)
        .choices[0].message.content for name, ref in refs.items()}
    print(f"reference answers: {expected}")
    c = client(cluster.base)
    order = [first, second, first, second]
    for name in order:
        r = c.chat.completions.create(model=name, messages=PROMPT, **DETERMINISTIC)
        assert r.model == name, f"asked for {name}, served by {r.model}"
        assert r.choices[0].message.content == expected[name], name
    events = switch_events(cluster)
    assert [(e["from"], e["to"]) for e in events] == [(first, second), (second, first), (first, second)]
    for e in events:
        print(f"switch {e['from']} -> {e['to']}: drain {e['drain_ms']} ms, stop {e['stop_ms']} ms, "
              f"start {e['start_ms']} ms, total {e['total_ms']} ms")
    assert cluster.status()["switches"] == 3
    assert listing(cluster) == {first: "available", second: "loaded"}
    # The loaded model kept the ring at least min_residency_s each time before the next switch
    # began (a switch's start is its end minus its total).
    for before, after in zip(events, events[1:]):
        began = at(after) - after["total_ms"] / 1000
        assert began >= at(before) + RESIDENCY_S - 0.5, (before, after)


def test_requests_for_both_models_at_once_all_get_their_model(two_models):
    """Concurrent requests for both models: each is served by the model it named (or, if its
    wait ran out, a 503 with Retry-After): never by the other model, never a hang."""
    cluster, refs = two_models
    names = list(refs)
    expected = {
        name: client(ref.base).chat.completions.create(model="x", messages=PROMPT, **DETERMINISTIC)
        .choices[0].message.content for name, ref in refs.items()}
    results = []

    def ask(name):
        r = requests.post(f"{cluster.base}/v1/chat/completions", timeout=150, json={
            "model": name, "messages": PROMPT, "temperature": 0, "max_tokens": 24, "seed": 42,
            "cache_prompt": False})
        results.append((name, r.status_code, r.json(), r.headers.get("retry-after")))

    before = cluster.status()["switches"]
    threads = [threading.Thread(target=ask, args=(names[i % 2],)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(160)
        assert not t.is_alive(), "a request hung"
    assert len(results) == 6, "a request was lost"
    for name, status, body, retry in results:
        if status == 200:
            assert body["model"] == name
            assert body["choices"][0]["message"]["content"] == expected[name]
        else:
            assert status == 503 and retry, (status, body)
    served = sum(1 for _, s, _, _ in results if s == 200)
    print(f"concurrent: {served}/6 served; switches {cluster.status()['switches'] - before}")
    assert served == 6, [r for r in results if r[1] != 200]
    # Oldest waiting request first, one switch per model change: at most 2 here (either model
    # may be loaded when the batch arrives).
    assert cluster.status()["switches"] - before <= 2


def test_an_unknown_model_is_openais_404(two_models):
    cluster, _ = two_models
    r = requests.post(f"{cluster.base}/v1/chat/completions", timeout=10, json={
        "model": "no-such-model", "messages": PROMPT, "max_tokens": 4})
    assert r.status_code == 404, r.text
    assert r.json()["error"]["code"] == "model_not_found"
