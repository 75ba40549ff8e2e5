"""A llama.cpp RPC ring on real systemd hosts, as the packages install it, for the rpc tensor
cache test (test_rpc_cache.py) and its benchmark (bench/rpc_cache.py): one place for the host
setup, the ring restart and the byte counters of the links to the rpc hosts.
"""

import json
import re
import time
from pathlib import Path

from hosts import http
from test_ring_systemd import API_KEY, REPO, TOKEN, config_text

STATE = "/var/lib/llm-cluster"


def cache_root(rank: int) -> str:
    """LLAMA_CACHE of node `rank`'s rpc server (node::rpc_cache::RpcCache::new)."""
    return f"{STATE}/rpc-cache/rank{rank}"


def install(lab, model: Path, rpc_cache: bool = True, backoff_ms: int | None = None):
    """Rank user, state dir, the shipped unit, config, token and API keys on every host.
    `backoff_ms`: a constant restart backoff (the config's doubles with every failure, which
    would make later restarts of a benchmark slower)."""
    unit = (REPO / "packaging/systemd/llm-agent@.service").read_text()
    exec_args = re.search(r"^ExecStart=\S+(.*)$", unit, re.M)[1]
    text = config_text(lab, model).replace(
        "ctx_size = 1024\n", "ctx_size = 1024\n" + ("" if rpc_cache else "rpc_cache = false\n"))
    if backoff_ms is not None:
        old = "backoff_initial_ms = 500\nbackoff_max_ms = 5000\n"
        assert old in text, "the test config's backoff changed"
        text = text.replace(old, f"backoff_initial_ms = {backoff_ms}\nbackoff_max_ms = {backoff_ms}\n")
    for h in lab.hosts:
        h.run("id llm-cluster >/dev/null 2>&1 || useradd --system --home-dir /var/lib/llm-cluster "
              "--shell /usr/sbin/nologin llm-cluster")
        h.run(f"install -d -o llm-cluster -g llm-cluster -m 0750 {STATE}")
        h.write_file("/etc/systemd/system/llm-agent@.service", unit)
        h.write_file("/etc/systemd/system/llm-agent@.service.d/test.conf",
                     f"[Service]\nExecStart=\nExecStart=/opt/llm-agent/llm-agent{exec_args}\n")
        h.write_file("/etc/llm-cluster/cluster.toml", text)
        h.write_file("/etc/llm-cluster/token", TOKEN + "\n", mode=0o600)
        h.write_file("/etc/llm-cluster/api-keys", API_KEY + "\n", mode=0o600)
        h.systemctl("daemon-reload")


def base(lab) -> str:
    return f"http://{lab.hosts[0].ip}:8080"


def status(lab):
    st, _, body = http("GET", f"{base(lab)}/api/v1/cluster",
                       headers={"Authorization": f"Bearer {API_KEY}"})
    assert st == 200, body
    return json.loads(body)


def chat(lab, timeout=30):
    """(status, answer text or body) of a short deterministic chat."""
    st, _, body = http("POST", f"{base(lab)}/v1/chat/completions",
                       {"messages": [{"role": "user", "content": "Name a colour."}],
                        "max_tokens": 8, "temperature": 0},
                       headers={"Authorization": f"Bearer {API_KEY}"}, timeout=timeout)
    if st != 200:
        return st, body
    return st, json.loads(body)["choices"][0]["message"]["content"]


def facts(h):
    st, _, body = http("GET", f"http://{h.ip}:7700/v1/facts",
                       headers={"Authorization": f"Bearer {TOKEN}"})
    assert st == 200, body
    return json.loads(body)


def wait_serving(lab, after_generation=0, timeout=180):
    """Polls until a chat answers 200 on a generation newer than `after_generation`; returns
    (seconds, answer, generation)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            code, answer = chat(lab)
            if code == 200:
                g = status(lab)["generation"]
                if g > after_generation:
                    return time.monotonic() - t0, answer, g
        except OSError:
            pass
        time.sleep(0.05)
    logs = "\n".join(h.journal(f"llm-agent@rank{h.index}.service", 60) for h in lab.hosts)
    raise AssertionError(f"not serving within {timeout} s:\n{logs}")


def start_agents(lab):
    for h in lab.hosts:
        h.systemctl("enable", "--now", f"llm-agent@rank{h.index}.service")


def stop_agents(lab):
    """Agents and every rank unit gone (rank units outlive their agent by design)."""
    for h in lab.hosts:
        h.systemctl("stop", f"llm-agent@rank{h.index}.service", check=False)
        h.run("systemctl stop 'llm-rank*' 2>/dev/null; systemctl reset-failed 2>/dev/null; true",
              check=False)


def restart_ring(lab):
    """What a failure does: the head's engine unit is killed, the coordinator starts a new
    generation on every node and llama-server loads the weights onto the rpc servers again.
    Returns the generation that was killed."""
    st = status(lab)
    unit = st["nodes"][0]["status"]["unit"]
    lab.hosts[0].systemctl("kill", "--signal=SIGKILL", unit)
    return st["generation"]


def tx_bytes(lab) -> int:
    """Bytes the machine's bridge sent towards the rpc hosts (their veths' TX side): the weights
    llama-server sends, plus control traffic."""
    return sum(int(Path(f"/sys/class/net/{h.veth}/statistics/tx_bytes").read_text())
               for h in lab.hosts[1:])


def cache_entries(h, rank) -> dict:
    """name -> size of the rpc cache entries on host h."""
    out = h.run(f"find {cache_root(rank)}/rpc -maxdepth 1 -type f -printf '%f %s\\n' "
                "2>/dev/null; true").stdout
    return {n: int(s) for n, s in (l.split() for l in out.splitlines() if l.strip())}
