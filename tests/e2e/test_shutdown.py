"""Shutdown as designed: asked to stop (SIGTERM, as systemd does), the agent stops accepting new
connections but lets a completion already streaming finish, then stops every rank. Before, the
API server task was aborted and the stream was cut mid-answer."""

import os
import signal
import threading
import time

import requests

from conftest import Cluster, _env_path, port_free, sse_events


def test_sigterm_lets_a_stream_in_flight_finish_then_stops_everything(tmp_path):
    offset = 1500
    cluster = Cluster("llama-rpc", _env_path("LLAMA_CPP_DIR"), _env_path("SMOLLM2_GGUF"),
                      offset, tmp_path)
    try:
        cluster.wait_serving()
        body = {"messages": [{"role": "user", "content": "Tell me a long story."}],
                "max_tokens": 64, "temperature": 0, "stream": True}
        finish, chunks, errors = [], [], []
        first = threading.Event()

        def stream():
            with requests.post(f"{cluster.base}/v1/chat/completions", json=body, stream=True,
                               timeout=60) as r:
                assert r.status_code == 200, r.text
                for ev in sse_events(r):
                    if "error" in ev:
                        errors.append(ev["error"])
                        continue
                    chunks.append(ev)
                    first.set()
                    reason = ev["choices"][0].get("finish_reason")
                    if reason:
                        finish.append(reason)

        t = threading.Thread(target=stream)
        t.start()
        assert first.wait(60), "no first chunk"
        os.killpg(cluster.proc.pid, signal.SIGTERM)
        # A new connection is no longer accepted while the stream drains.
        time.sleep(0.5)
        try:
            requests.get(f"{cluster.base}/healthz", timeout=2)
            refused = False
        except requests.ConnectionError:
            refused = True
        t.join(60)
        assert not t.is_alive(), "the stream did not end"
        assert errors == [], f"the stream was cut: {errors}"
        assert finish == ["length"], f"the stream did not finish: {finish} after {len(chunks)} chunks"
        assert refused, "a new connection was accepted after SIGTERM"
        cluster.proc.wait(timeout=40)
        assert cluster.proc.returncode == 0, cluster.log_tail()
    finally:
        cluster.stop()
    for port in (cluster.api_port, cluster.engine_port, 50053 + offset, 50054 + offset):
        assert port_free(port), f"port {port} still open after the agent stopped"
