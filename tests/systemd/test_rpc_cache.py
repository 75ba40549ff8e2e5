"""The llama.cpp rpc servers' tensor cache on real systemd hosts: a ring restart reads the
cached weights from the rpc hosts' disks instead of receiving them again over the LAN.

A 3-host llama-rpc ring with SmolLM2 (rank 0 llama-server, ranks 1-2 ggml-rpc-server -c).
Asserts, without timing: the rank units of the rpc servers may write their cache directory
and nothing else; the first start fills the cache (files, facts); the restart sends fewer
bytes to the rpc hosts by at least what the cache holds (the veths' byte counters), writes no
new entry, and the ring answers as before. Timings with a shaped link: bench/rpc_cache.py.
"""


import pytest

from hosts import Lab
import rpc_ring
from rpc_ring import cache_entries, cache_root


@pytest.fixture(scope="module")
def lab():
    binds, model = rpc_ring.inputs()
    with Lab(3, binds=binds) as lab:
        rpc_ring.install(lab, model)
        yield lab
        rpc_ring.stop_agents(lab)


def test_restart_reads_the_weights_from_the_rpc_hosts_cache(lab):
    workers = lab.hosts[1:]
    before = rpc_ring.tx_bytes(lab)
    rpc_ring.start_agents(lab)
    _, first_answer, g1 = rpc_ring.wait_serving(lab)
    cold_bytes = rpc_ring.tx_bytes(lab) - before

    # The rpc servers' units: the cache flag and directory, writable alone.
    st = rpc_ring.status(lab)
    for n, h in zip(st["nodes"][1:], workers):
        unit = n["status"]["unit"]
        assert " -c" in n["status"]["command"], n["status"]["command"]
        assert f"LLAMA_CACHE={cache_root(h.index)}" in h.unit_property(unit, "Environment")
        assert h.unit_property(unit, "ProtectSystem") == "strict"
        assert h.unit_property(unit, "PrivateTmp") == "yes"
        assert h.unit_property(unit, "ReadWritePaths") == cache_root(h.index)
        # Inside the unit's mount namespace, as its user: the cache is writable, the rest of
        # the state dir (and /etc, /usr) is not.
        pid = h.unit_property(unit, "MainPID")
        as_rank = ["nsenter", "-t", pid, "-m", "--", "setpriv", "--reuid=llm-cluster",
                   "--regid=llm-cluster", "--clear-groups", "sh", "-c"]
        h.run(as_rank + [f"touch {cache_root(h.index)}/probe && rm {cache_root(h.index)}/probe"])
        for path in (f"{rpc_ring.STATE}/rank{h.index}/probe", f"{rpc_ring.STATE}/probe"):
            r = h.run(as_rank + [f"touch {path}"], check=False)
            assert r.returncode != 0 and "Read-only file system" in r.stderr, (path, r)

    # The first start filled the cache of the rpc server that holds the big tensors (llama.cpp
    # caches weights over 10 MiB; in SmolLM2 that is the output matrix, tied to the embeddings).
    cold = {h.index: cache_entries(h, h.index) for h in workers}
    cached_bytes = sum(sum(e.values()) for e in cold.values())
    assert cached_bytes > 10 * 2**20, cold
    for h in workers:
        fact = rpc_ring.facts(h)["rpc_cache"]
        assert fact["dir"] == f"{cache_root(h.index)}/rpc"
        assert (fact["entries"], fact["bytes"]) == (len(cold[h.index]), sum(cold[h.index].values()))
        assert fact["max_bytes"] >= 20 * 2**20
    assert rpc_ring.facts(lab.hosts[0]).get("rpc_cache") is None, "the head has no rpc cache"
    # The coordinator's view carries each node's cache with its facts.
    view = rpc_ring.status(lab)["nodes"]
    assert "rpc_cache" not in (view[0]["facts"] or {}), view[0]["facts"]
    for n, h in zip(view[1:], workers):
        assert n["facts"]["rpc_cache"]["dir"] == f"{cache_root(h.index)}/rpc", n["facts"]
    saved_journal = [h.journal(f"llm-rank{h.index}-g{g1}.service", 2000).count("saved to '")
                     for h in workers]
    assert sum(saved_journal) == sum(len(e) for e in cold.values()), saved_journal

    # A ring restart: the tensors in the cache are not sent again.
    before = rpc_ring.tx_bytes(lab)
    killed = rpc_ring.restart_ring(lab)
    _, answer, g2 = rpc_ring.wait_serving(lab, after_generation=killed)
    warm_bytes = rpc_ring.tx_bytes(lab) - before
    print(f"\n[figure] bytes sent to the rpc hosts: first start {cold_bytes}, restart with the "
          f"cache {warm_bytes}; cached {cached_bytes}")
    assert warm_bytes < cold_bytes - 0.9 * cached_bytes, (cold_bytes, warm_bytes, cached_bytes)
    assert answer == first_answer
    # Nothing new written, nothing lost; the cleanup before the start verified the new entries.
    assert {h.index: cache_entries(h, h.index) for h in workers} == cold
    for h in workers:
        assert h.journal(f"llm-rank{h.index}-g{g2}.service", 2000).count("saved to '") == 0
        prune = rpc_ring.facts(h)["rpc_cache"]["last_prune"]
        assert prune["verified_entries"] == len(cold[h.index]), prune
        assert prune["corrupt_entries"] == 0 and prune["removed_entries"] == 0, prune
