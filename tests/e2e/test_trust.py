"""A node agent trusts nothing it can derive itself (issue 13 item 5), on a real llama.cpp RPC ring.

Every node has the same cluster.toml, so each node agent plans its own rank and refuses a
`PUT /v1/rank` that differs. Each rogue spec is sent with the real control token straight to a
node agent: it must get a 4xx naming the field, and the ring must go on serving the same
generation. A spec with generation u64::MAX once made the coordinator's next generation wrap to
0, after which every restart failed with 409: it is refused, and a restart afterwards works.
Port offset 1950.
"""

import os
import signal
import time

import pytest
import requests

from conftest import Cluster, _env_path, wait_until

OFFSET = 1950
CHAT = {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def trust_ring(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trust")
    cluster = Cluster("llama-rpc", _env_path("LLAMA_CPP_DIR"), _env_path("SMOLLM2_GGUF"), OFFSET, tmp)
    with cluster.serving() as c:
        state = tmp / "state-llama-rpc"
        c.token = (state / "token").read_text().strip()
        # `up --local` runs the control plane over mutual TLS: speak as rank 0 (the coordinator)
        # does, with its certificate, so only the spec itself can be refused.
        pki = state / "pki"
        c.tls = {"cert": (str(pki / "rank0.crt"), str(pki / "rank0.key")), "verify": str(pki / "ca.crt")}
        yield c


def node_url(rank):
    return f"https://127.0.0.1:{17700 + OFFSET + rank}/v1/rank"


def get_rank(cluster, rank):
    r = requests.get(node_url(rank), headers={"Authorization": f"Bearer {cluster.token}"}, timeout=5,
                     **cluster.tls)
    assert r.status_code == 200, r.text
    return r.json()


def put_rank(cluster, rank, spec):
    return requests.put(node_url(rank), json=spec, timeout=10, **cluster.tls,
                        headers={"Authorization": f"Bearer {cluster.token}"})


def chat_answers(cluster):
    r = requests.post(f"{cluster.base}/v1/chat/completions", json=CHAT, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] is not None


def rogue_specs(head, worker):
    """(name, rank, spec, field the refusal must name)"""
    def w(**kw):
        return {**worker, **kw}

    def h(**kw):
        return {**head, **kw}
    return [
        ("rpc server on every interface", 1, w(address="0.0.0.0"), "address"),
        ("no fence: empty peers", 1, w(peers=[]), "peers"),
        ("another master", 1, w(master="10.9.9.9"), "master"),
        ("another next", 1, w(next="10.9.9.9"), "next"),
        ("another rpc port", 1, w(ports={**worker["ports"], "rpc": 22}), "ports"),
        ("another model file", 0, h(model_path="/etc/shadow"), "model_path"),
        ("a foreign rpc worker", 0, h(rpc_workers=["10.9.9.9:50052"]), "rpc_workers"),
        ("another ring place", 1, w(rank=2), "rank"),
        ("generation that wraps", 1, w(generation=18446744073709551615), "generation"),
        ("generation past the JSON-safe range", 1, w(generation=2**53), "generation"),
    ]


def test_each_rogue_spec_is_refused_by_name_and_the_ring_keeps_serving(trust_ring):
    cluster = trust_ring
    chat_answers(cluster)
    before = cluster.status()
    heads, workers = get_rank(cluster, 0), get_rank(cluster, 1)
    head, worker = heads["spec"], workers["spec"]
    assert head and worker, "the ring runs a spec on both nodes"
    # The next generation with the planned spec would be accepted: the refusals below are for
    # the rogue field, not for the generation or the token.
    for name, rank, spec, field in rogue_specs(head, worker):
        spec = {**spec, "generation": spec["generation"] if field == "generation" else before["generation"] + 1}
        r = put_rank(cluster, rank, spec)
        print(f"[figure] {name}: PUT /v1/rank on rank {rank} -> {r.status_code} {r.text}")
        assert r.status_code == 400, f"{name}: {r.status_code} {r.text}"
        message = r.json()["error"]
        assert f"{field}: expected" in message, f"{name}: {message}"
        assert "plans from its config" in message, f"{name}: {message}"
    # Nothing restarted: same generation, same processes, and a chat still answers.
    chat_answers(cluster)
    after = cluster.status()
    assert after["phase"] == "serving"
    assert after["generation"] == before["generation"]
    for rank, st in ((0, heads), (1, workers)):
        now = get_rank(cluster, rank)
        assert now["generation"] == st["generation"] and now["pid"] == st["pid"], f"rank {rank} changed: {now}"


def test_a_u64_max_generation_no_longer_breaks_restarts(trust_ring):
    cluster = trust_ring
    before = cluster.status()
    worker = get_rank(cluster, 1)
    r = put_rank(cluster, 1, {**worker["spec"], "generation": 18446744073709551615})
    assert r.status_code == 400 and "generation: expected" in r.json()["error"], r.text
    # A restart afterwards takes the next generation, not 0, and serves again.
    os.kill(worker["pid"], signal.SIGKILL)
    killed_at = time.monotonic()
    wait_until(lambda: cluster.status()["phase"] == "serving"
               and cluster.status()["generation"] > before["generation"], 120, "the ring to serve again")
    after = cluster.status()
    assert after["generation"] == before["generation"] + 1, after
    assert get_rank(cluster, 1)["generation"] == after["generation"]
    chat_answers(cluster)
    print(f"[figure] after a refused u64::MAX generation, rank 1 killed -> serving generation "
          f"{after['generation']} in {time.monotonic() - killed_at:.2f} s")
