"""Sticky placement with prima.cpp's Halda scheduler (runs when PRIMA_CPP_DIR is set): the first
start profiles the nodes and Halda places the layers; once that ring serves, the placement is
kept and the next start (after a killed rank) passes it explicitly — no profiling, so it serves
sooner and cannot drop ranks differently. `llm-agent forget-placement` makes the next start
profile again. Uses a Q8_0 copy of SmolLM2 (the profiler rejects Q4_1)."""

import os
import signal
import subprocess
import time

import pytest
import requests

from conftest import Cluster, _env_path, wait_until

pytestmark = pytest.mark.skipif(
    not os.environ.get("PRIMA_CPP_DIR"),
    reason="PRIMA_CPP_DIR is not set: prima.cpp placement tests SKIPPED",
)


def serving_generation(cluster, above, timeout):
    t = time.monotonic()
    wait_until(lambda: (lambda s: s["phase"] == "serving" and s["generation"] > above)(cluster.status()),
               timeout, f"a generation above {above} to serve")
    return time.monotonic() - t


def kill_a_running_worker(cluster):
    st = cluster.status()
    worker = next(n for n in st["nodes"][1:] if n["state"] == "running")
    os.kill(worker["status"]["pid"], signal.SIGKILL)
    return st["generation"]


def test_halda_placement_is_remembered_and_reused_then_forgotten(tmp_path, smollm2_q8):
    cluster = Cluster("prima", _env_path("PRIMA_CPP_DIR"), smollm2_q8, 2700, tmp_path)
    try:
        profiled = serving_generation(cluster, 0, 240)
        wait_until(lambda: (cluster.status()["placement"] or {}).get("windows") is not None, 30,
                   "Halda's placement to be read")
        first = cluster.status()["placement"]
        assert first["source"] == "halda", first
        assert sum(first["windows"]) == 30 and first["windows"][0] > 0, first
        generation = kill_a_running_worker(cluster)
        remembered = serving_generation(cluster, generation, 120)
        st = cluster.status()
        assert st["placement"]["source"] == "remembered", st["placement"]
        assert st["placement"]["windows"] == first["windows"]
        head = st["nodes"][0]["status"]["command"]
        kept = [w for w in first["windows"] if w > 0]
        assert f"-lw {','.join(map(str, kept))}" in head, head
        assert f"--world {len(kept)}" in head, head
        r = requests.post(f"{cluster.base}/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
        assert r.status_code == 200, r.text
        # Forgotten: the next start profiles again.
        config = tmp_path / "state-prima" / "cluster.toml"
        out = subprocess.run([str(_env_path("LLM_AGENT_BIN")), "forget-placement", "--config", str(config)],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0 and "forgot the placement" in out.stdout, out
        generation = kill_a_running_worker(cluster)
        reprofiled = serving_generation(cluster, generation, 240)
        assert cluster.status()["placement"]["source"] == "halda"
        print(f"\n[figure] prima Halda: first start {profiled:.1f} s to serving (profiling); "
              f"restart with the remembered placement {remembered:.1f} s; after forget-placement "
              f"{reprofiled:.1f} s (profiling again); placement {first['windows']}")
    finally:
        print(cluster.log_tail(2000))
        cluster.stop()
