"""Seeing the cluster on a real ring over real HTTP: the event stream (`/api/v1/events`, SSE)
with its replay, resume and a real rank crash.

One local llama-rpc ring behind API keys (what is observed does not depend on the engine).
Port offset 3300."""

import json
import os
import signal
import time

import pytest
import requests

from conftest import Cluster, _env_path, wait_until

OFFSET = 3300
KEY = "sk-observer-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def ring(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("observe")
    keys = tmp / "keys.toml"
    keys.write_text(f'[[key]]\nname = "observer"\nkey = "{KEY}"\n')
    cluster = Cluster("llama-rpc", _env_path("LLAMA_CPP_DIR"), _env_path("SMOLLM2_GGUF"), OFFSET, tmp,
                      ("--api-keys", str(keys)))
    cluster.tmp = tmp
    with cluster.serving():
        yield cluster


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
