"""Model delivery on real systemd hosts, under the shipped unit's sandbox: the head of a 2-host
llama.cpp RPC ring keeps its models in /var/lib/llm-cluster/models (its `model_dir`), where there
is no file; the worker host has the GGUF. The head's agent fetches it from the worker over the
control API, writes it where ProtectSystem=strict lets it (the state dir), and its llama-server
unit, running as the unprivileged rank user, loads it: the ring serves. The delivered file is
the model byte for byte, owned like its directory and readable by the rank user, with no partial
file left; a restart of the head's agent does not fetch it again.
"""

import hashlib

import pytest

from hosts import Lab
import rpc_ring

MODELS = "/var/lib/llm-cluster/models"


@pytest.fixture(scope="module")
def lab():
    binds, model = rpc_ring.inputs()
    with Lab(2, binds=binds) as lab:
        rpc_ring.install(lab, model)
        text = lab.hosts[0].run("cat /etc/llm-cluster/cluster.toml").stdout
        assert "rank = 0\n" in text, text
        text = text.replace("rank = 0\n", f'rank = 0\nmodel_dir = "{MODELS}"\n', 1)
        for h in lab.hosts:
            h.write_file("/etc/llm-cluster/cluster.toml", text)
        head = lab.hosts[0]
        head.run(f"install -d -o llm-cluster -g llm-cluster -m 0755 {MODELS}")
        yield lab, model
        rpc_ring.stop_agents(lab)


def test_the_head_gets_the_model_from_the_worker_under_the_units_sandbox_and_serves(lab):
    lab, model = lab
    head = lab.hosts[0]
    target = f"{MODELS}/{model.name}"
    assert head.run(f"test -e {target}", check=False).returncode != 0, "the head starts without it"
    rpc_ring.start_agents(lab)
    _, answer, generation = rpc_ring.wait_serving(lab)
    assert answer

    want = hashlib.sha256(model.read_bytes()).hexdigest()
    got = head.run(f"sha256sum {target}").stdout.split()[0]
    assert got == want
    owner = head.run(f"stat -c '%U:%G %a' {target}").stdout.strip()
    assert owner == "llm-cluster:llm-cluster 644", owner
    assert head.run(f"ls -A {MODELS}").stdout.split() == [model.name], "no partial file left"

    st = rpc_ring.status(lab)
    fact = st["nodes"][0]["facts"]["model"]
    assert fact["path"] == target and fact["hash"] == {"state": "done", "sha256": want}, fact
    assert fact["transfer"]["state"] == "done" and fact["transfer"]["from_rank"] == 1, fact
    # The head's engine unit, as the rank user, reads the delivered file.
    assert f"-m {target}" in st["nodes"][0]["status"]["command"], st["nodes"][0]["status"]["command"]

    # A restarted head agent finds its copy (hashed as it arrived) and fetches nothing.
    head.systemctl("restart", "llm-agent@rank0.service")
    _, again, _ = rpc_ring.wait_serving(lab, after_generation=0)
    assert again == answer
    st = rpc_ring.status(lab)
    assert st["nodes"][0]["facts"]["model"].get("transfer") is None, st["nodes"][0]["facts"]["model"]
