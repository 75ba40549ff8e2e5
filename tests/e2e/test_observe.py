"""Seeing the cluster on a real ring over real HTTP: the event stream (`/api/v1/events`, SSE)
with its replay, resume and a real rank crash; Prometheus `/metrics` parsed with the
`prometheus_client` parsers (OpenMetrics, strict, and the Prometheus text one), counters that
move after real requests, the engine's own metrics re-exported, and `api.metrics_listen`.

One local llama-rpc ring behind API keys (what is observed does not depend on the engine).
Port offset 3300; the key-less metrics listener on 21900."""

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import requests
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_prometheus

from conftest import Cluster, _env_path, wait_until

OFFSET = 3300
KEY = "sk-observer-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
METRICS_PORT = 21900


@pytest.fixture(scope="module")
def ring(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("observe")
    keys = tmp / "keys.toml"
    keys.write_text(f'[[key]]\nname = "observer"\nkey = "{KEY}"\n')
    # A link of its own, so that the last test can take the model away and get a refused ring.
    model = tmp / "model.gguf"
    os.link(_env_path("SMOLLM2_GGUF"), model)
    cluster = Cluster("llama-rpc", _env_path("LLAMA_CPP_DIR"), model, OFFSET, tmp,
                      ("--api-keys", str(keys), "--metrics-listen", f"127.0.0.1:{METRICS_PORT}"))
    cluster.tmp, cluster.model = tmp, model
    # `status --watch` follows the ring forming from the moment the agent starts.
    cluster.watch_out = tmp / "watch.out"
    cluster.watch = subprocess.Popen(
        [str(_env_path("LLM_AGENT_BIN")), "status", "--watch", "--timeout", "170", "--url", cluster.base],
        stdout=open(cluster.watch_out, "w"), stderr=subprocess.STDOUT,
        env={**os.environ, "LLM_CLUSTER_API_KEY": KEY})
    try:
        with cluster.serving():
            yield cluster
    finally:
        if cluster.watch.poll() is None:
            cluster.watch.kill()
            cluster.watch.wait()


def status(ring):
    return requests.get(f"{ring.base}/api/v1/cluster", headers=AUTH, timeout=5).json()


def held_events(ring, since=None):
    params = {"follow": "false", **({"since": since} if since is not None else {})}
    r = requests.get(f"{ring.base}/api/v1/events", headers=AUTH, params=params, timeout=5)
    assert r.status_code == 200, r.text
    return r.json()["events"]


def sse_frames(resp):
    """Parsed SSE frames (dicts of field -> value) as they arrive; comments skipped. SSE is
    UTF-8 by definition (requests would guess Latin-1 from the content type)."""
    frame = {}
    for line in resp.iter_lines():
        raw = line.decode("utf-8")
        if raw == "":
            if frame:
                yield frame
            frame = {}
        elif raw.startswith(":"):
            continue
        else:
            field, _, value = raw.partition(":")
            frame[field] = value[1:] if value.startswith(" ") else value


def test_events_need_the_key_and_replay_the_ring_forming(ring):
    r = requests.get(f"{ring.base}/api/v1/events", timeout=5)
    assert r.status_code == 401, r.text
    events = held_events(ring)
    phases = [(e["from"], e["to"]) for e in events if e["kind"] == "phase"]
    print(f"[figure] events while the ring formed: {len(events)}; phases {phases}")
    assert phases[-1][1] == "serving", phases
    assert ("waiting_ready", "serving") in phases, phases
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), seqs
    for e in events:
        assert e["at"].endswith("Z") and "T" in e["at"], e
        assert e["message"], e
        assert set(e) >= {"seq", "at", "kind", "generation", "rank", "message"}, e
    # A resume gets only what came after.
    assert held_events(ring, since=seqs[-2]) == events[-1:]


def test_the_stream_replays_then_carries_a_crash_and_the_restart(ring):
    events = held_events(ring)
    last = events[-1]["seq"]
    with requests.get(f"{ring.base}/api/v1/events", headers={**AUTH, "Last-Event-ID": str(last - 1)},
                      stream=True, timeout=(5, 60)) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream"), resp.headers
        frames = sse_frames(resp)
        first = next(frames)
        assert first["id"] == str(last) and first["event"] == events[-1]["kind"], first
        assert json.loads(first["data"]) == events[-1]
        st = status(ring)
        generation = st["generation"]
        worker = st["nodes"][1]
        os.kill(worker["status"]["pid"], signal.SIGKILL)
        killed = time.monotonic()
        seen = []
        for f in frames:
            e = json.loads(f["data"])
            assert f["event"] == e["kind"] and f["id"] == str(e["seq"]), f
            seen.append(e)
            if e["kind"] == "phase" and e["to"] == "serving":
                break
        print(f"[figure] kill -9 of rank 1 to serving again: {time.monotonic() - killed:.1f} s, "
              f"{len(seen)} events")
    failure = next(e for e in seen if e["kind"] == "failure")
    # The worker, or the head that aborts without it: whichever is reported first.
    assert failure["rank"] in (0, 1) and failure["cause"] == "rank_exited", failure
    assert failure["generation"] == generation and f"rank {failure['rank']}" in failure["reason"], failure
    restart = next(e for e in seen if e["kind"] == "restart")
    assert restart["generation"] == generation + 1 and restart["reason"] == failure["reason"], restart
    assert [e["to"] for e in seen if e["kind"] == "phase"][0] == "stopping", seen


def scrape(url, headers=AUTH):
    r = requests.get(url, headers=headers, timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/openmetrics-text"), r.headers
    families = list(parse_openmetrics(r.text))
    # The Prometheus text parser reads the same exposition.
    assert {f.name for f in parse_prometheus(r.text)} >= {"llm_cluster_requests", "llm_cluster_ring_phase"}
    samples = {}
    for f in families:
        for s in f.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return {f.name: f for f in families}, samples


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_need_the_key_and_move_after_real_requests(ring):
    url = f"{ring.base}/metrics"
    r = requests.get(url, timeout=5)
    assert r.status_code == 401, r.text
    r = requests.get(url, headers={"Authorization": "Bearer sk-wrong-0123456789abcdef"}, timeout=5)
    assert r.status_code == 401, r.text
    _, before = scrape(url)
    chat = {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 8, "temperature": 0}
    r = requests.post(f"{ring.base}/v1/chat/completions", headers=AUTH, json=chat, timeout=60)
    assert r.status_code == 200, r.text
    with requests.post(f"{ring.base}/v1/chat/completions", headers=AUTH, json={**chat, "stream": True},
                       stream=True, timeout=60) as s:
        assert s.status_code == 200
        body = b"".join(s.iter_content(None))
    assert b"[DONE]" in body
    route = "/v1/chat/completions"
    # A stream is accounted when the server sees its body end, which may be just after the
    # client read its last bytes.
    wait_until(lambda: value(scrape(url)[1], "llm_cluster_request_duration_seconds_count", route=route)
               - value(before, "llm_cluster_request_duration_seconds_count", route=route) >= 2,
               10, "both requests to be accounted")
    families, after = scrape(url)
    ok = dict(route=route, status="200", key="observer")
    moved = {
        "requests": value(after, "llm_cluster_requests_total", **ok) - value(before, "llm_cluster_requests_total", **ok),
        "prompt_tokens": value(after, "llm_cluster_prompt_tokens_total", key="observer")
        - value(before, "llm_cluster_prompt_tokens_total", key="observer"),
        "completion_tokens": value(after, "llm_cluster_completion_tokens_total", key="observer")
        - value(before, "llm_cluster_completion_tokens_total", key="observer"),
        "durations": value(after, "llm_cluster_request_duration_seconds_count", route=route)
        - value(before, "llm_cluster_request_duration_seconds_count", route=route),
        "ttfts": value(after, "llm_cluster_time_to_first_token_seconds_count", route=route)
        - value(before, "llm_cluster_time_to_first_token_seconds_count", route=route),
        "engine_prompt_tokens": value(after, "llm_engine_prompt_tokens_total")
        - value(before, "llm_engine_prompt_tokens_total"),
    }
    print(f"[figure] after 2 chat completions (1 streamed): {moved}")
    assert moved["requests"] == 2, moved
    assert moved["prompt_tokens"] > 0 and moved["completion_tokens"] > 0, moved
    assert moved["durations"] == 2 and moved["ttfts"] == 1, moved
    assert moved["engine_prompt_tokens"] > 0, moved
    unauth = dict(route="/metrics", status="401", key="unauthenticated")
    assert value(after, "llm_cluster_requests_total", **unauth) >= 2, "refusals are counted"
    assert value(after, "llm_cluster_ring_phase", phase="serving") == 1
    assert value(after, "llm_cluster_ring_phase", phase="refused") == 0
    assert value(after, "llm_cluster_ring_generation") >= 1
    assert value(after, "llm_cluster_in_flight") == 0 and value(after, "llm_cluster_queued") == 0
    for rank in range(3):
        assert value(after, "llm_cluster_node_up", rank=str(rank), address="127.0.0.1") == 1
        assert value(after, "llm_cluster_node_state", rank=str(rank), state="running") == 1
    assert value(after, "llm_cluster_model_switches_total") == 0
    assert value(after, "llm_cluster_model_transfers_total") == 0
    assert families["llm_engine_prompt_tokens"].type == "counter"
    assert value(after, "llm_cluster_engine_metrics_up") == 1


def test_metrics_count_the_crash_and_sample_every_rank(ring):
    # Sampled every 10 s by the driver.
    def sampled():
        _, s = scrape(f"{ring.base}/metrics")
        return all(value(s, "llm_cluster_rank_memory_bytes", rank=str(r)) > 0 for r in range(3)) and all(
            value(s, "llm_cluster_rank_cpu_seconds_total", rank=str(r)) > 0 for r in range(3))
    wait_until(sampled, 30, "every rank's CPU and memory in /metrics")
    _, s = scrape(f"{ring.base}/metrics")
    print("[figure] rank memory MiB: " + ", ".join(
        f"{value(s, 'llm_cluster_rank_memory_bytes', rank=str(r)) / 2**20:.0f}" for r in range(3)))
    # The kill -9 of the event test above.
    assert value(s, "llm_cluster_ring_restarts_total", cause="rank_exited") >= 1, \
        {k: v for k, v in s.items() if "restarts" in k[0]}


def test_the_metrics_listener_needs_no_key(ring):
    families, samples = scrape(f"http://127.0.0.1:{METRICS_PORT}/metrics", headers={})
    print("[figure] metric families: " + " ".join(f"{n}({f.type})" for n, f in sorted(families.items())))
    # Every metric the shipped Grafana dashboard queries exists.
    dashboard = (Path(__file__).resolve().parents[2] / "config" / "grafana-dashboard.json").read_text()
    queried = set(re.findall(r"llm_(?:cluster|engine)_[a-z_]+", dashboard))
    exposed = {name for (name, _) in samples}
    missing = sorted(q for q in queried if q not in exposed)
    assert not missing, f"the dashboard queries metrics /metrics does not have: {missing}"
    assert "llm_cluster_requests" in families and "llm_engine_prompt_tokens" in families
    assert value(samples, "llm_cluster_ring_phase", phase="serving") == 1
    r = requests.get(f"http://127.0.0.1:{METRICS_PORT}/api/v1/cluster", timeout=5)
    assert r.status_code == 404, "only /metrics there"


def agent_status(*args, key=KEY):
    env = {k: v for k, v in os.environ.items() if k != "LLM_CLUSTER_API_KEY"}
    if key:
        env["LLM_CLUSTER_API_KEY"] = key
    return subprocess.run([str(_env_path("LLM_AGENT_BIN")), "status", *args], capture_output=True, text=True,
                          timeout=60, env=env)


def test_status_watch_followed_the_ring_forming_to_serving(ring):
    assert ring.watch.wait(timeout=60) == 0, ring.watch_out.read_text()
    out = ring.watch_out.read_text()
    print(f"[figure] status --watch while the ring formed:\n{out}")
    # Not a terminal: plain lines, one per stage, then the report.
    assert "\x1b[" not in out, "no escape codes when not on a terminal"
    # Stages are sampled (each second), events are not: every phase change is there.
    stages = [line for line in out.splitlines() if line.startswith("… ")]
    assert stages, out
    for change in ("waiting_for_nodes → starting", "starting → waiting_ready", "waiting_ready → serving"):
        assert f"phase     {change}" in out, out
    assert "● local (llama-rpc): serving" in out, out


def test_status_of_a_serving_ring(ring):
    r = agent_status("--url", ring.base)
    assert r.returncode == 0, r
    print(f"[figure] llm-agent status:\n{r.stdout}")
    for want in ["● local (llama-rpc): serving", "Phase: serving generation", "rank 0  ", "rank 2  ",
                 "engine: llama-server", "model: sha256 ", "Recent events:", "failure", "restart"]:
        assert want in r.stdout, f"{want!r} not in:\n{r.stdout}"
    # From the config: rank 0's api.listen.
    r = agent_status("--config", str(ring.tmp / "state-llama-rpc" / "cluster.toml"), "--json")
    assert r.returncode == 0, r
    doc = json.loads(r.stdout)
    assert doc["cluster"]["phase"] == "serving" and doc["cluster"]["serving_since"], doc["cluster"]
    assert [n["state"] for n in doc["cluster"]["nodes"]] == ["running"] * 3
    assert doc["events"] and doc["events"][-1]["kind"] in ("phase", "placement"), doc["events"]
    # The API has keys: without one it is a usage error that says what to do.
    r = agent_status("--url", ring.base, key=None)
    assert r.returncode == 2 and "--api-key" in r.stderr, r


def test_status_of_an_unreachable_coordinator_is_1():
    # Nothing listens on port 9 in this test's network namespace.
    for extra in ((), ("--json",), ("--watch", "--timeout", "2")):
        r = agent_status("--url", "http://127.0.0.1:9", *extra)
        assert r.returncode == 1, r
        assert "127.0.0.1:9" in r.stderr, r


def test_status_of_a_refused_ring_is_3(ring):
    # The model goes away, then rank 0 dies: the ring restarts and is refused.
    ring.model.unlink()
    head = status(ring)["nodes"][0]["status"]["pid"]
    os.kill(head, signal.SIGKILL)
    wait_until(lambda: status(ring)["phase"] == "refused", 60, "the ring to be refused")
    r = agent_status("--url", ring.base)
    print(f"[figure] llm-agent status of a refused ring:\n{r.stdout}")
    assert r.returncode == 3, r
    assert ": refused" in r.stdout and "not found" in r.stdout, r.stdout
    r = agent_status("--url", ring.base, "--json")
    assert r.returncode == 3 and json.loads(r.stdout)["cluster"]["phase"] == "refused", r
    r = agent_status("--url", ring.base, "--watch", "--timeout", "2")
    assert r.returncode == 3, r
    assert "refused" in r.stdout, r.stdout
    _, s = scrape(f"{ring.base}/metrics")
    assert value(s, "llm_cluster_ring_phase", phase="refused") == 1


def test_up_local_shows_the_ring_forming_on_a_terminal_only(ring, tmp_path):
    # The module's ring runs with its output in files: no progress there.
    assert "checking nodes" not in ring.log_tail(100000) and "loading the model" not in ring.stdout()
    # On a terminal (a pseudo-terminal here): a spinner with what the ring waits for.
    import pty
    import select
    primary, secondary = pty.openpty()
    cmd = [str(_env_path("LLM_AGENT_BIN")), "up", "--local", "2", "--engine", "llama-rpc",
           "--model", str(_env_path("SMOLLM2_GGUF")), "--engine-dir", str(_env_path("LLAMA_CPP_DIR")),
           "--listen", "127.0.0.1:21850", "--port-offset", "3350", "--ctx-size", "1024",
           "--state-dir", str(tmp_path / "state")]
    proc = subprocess.Popen(cmd, stdin=secondary, stdout=secondary, stderr=secondary, start_new_session=True,
                            env={**os.environ, "RUST_LOG": "warn"})
    os.close(secondary)
    seen = b""
    try:
        deadline = time.monotonic() + 120
        while b"llm-cluster is serving" not in seen and time.monotonic() < deadline:
            ready, _, _ = select.select([primary], [], [], 1)
            if ready:
                try:
                    seen += os.read(primary, 65536)
                except OSError:
                    break
        text = seen.decode("utf-8", "replace")
        assert "llm-cluster is serving" in text, text[-3000:]
        shown = [s for s in ("checking nodes", "starting ranks", "loading the model") if s in text]
        print(f"[figure] up --local on a terminal showed: {shown}")
        assert shown, text[-3000:]
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=40)
        finally:
            os.close(primary)


def test_check_config_checks_metrics_listen(tmp_path):
    base = ('[cluster]\nname = "lab"\nengine = "llama-rpc"\n[model]\npath = "/m.gguf"\n'
            '[api]\nlisten = "127.0.0.1:8080"\nmetrics_listen = "{}"\n[[node]]\nrank = 0\naddress = "127.0.0.1"\n')
    good, bad = tmp_path / "good.toml", tmp_path / "bad.toml"
    good.write_text(base.format("127.0.0.1:9464"))
    bad.write_text(base.format("127.0.0.1:8080"))
    agent = str(_env_path("LLM_AGENT_BIN"))
    r = subprocess.run([agent, "check-config", str(good)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r
    r = subprocess.run([agent, "check-config", str(bad)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2, r
    assert "1 problem(s) found" in r.stderr, r.stderr
    assert f"{bad}:8:" in r.stderr and "api.metrics_listen (127.0.0.1:8080) uses the port of api.listen" in r.stderr, r.stderr


def test_an_open_event_stream_does_not_hold_the_shutdown_up(ring):
    with requests.get(f"{ring.base}/api/v1/events", headers=AUTH, stream=True, timeout=(5, 60)) as resp:
        frames = sse_frames(resp)
        next(frames)
        ring.stop()  # asserts the agent is gone within 40 s
        # The stream ended with the server: the rest reads to its end instead of hanging.
        rest = list(frames)
    print(f"[figure] frames after the stop: {len(rest)}")
