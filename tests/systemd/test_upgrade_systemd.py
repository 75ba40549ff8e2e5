"""A rolling engine upgrade of a serving 3-host llama.cpp RPC ring under systemd, host by host,
as `pacman -Syu` node by node does it: the engine's files are replaced by a genuinely different
build (scripts/fetch-deps.sh relinks the same tree with another build number, so its
`--version` differs) and the pacman hook's own command runs inside the host. While the hosts
differ the ring serves on (every request under load gets a 200) and /api/v1/cluster says
"upgrade pending: N/3 nodes on ..."; once all three have the new build the coordinator
restarts the ring exactly once, and serves on the new build.
"""

import re
import shlex
import subprocess
import time
from pathlib import Path

import pytest

from hosts import Lab
from test_ring_systemd import API_KEY, TOKEN, Load, _need, config_text, status

REPO = Path(__file__).resolve().parents[2]
ENGINE_DIR = "/var/lib/engine"


def hook_command():
    """The hook's Exec line, with only the program moved to /opt (as the unit's ExecStart)."""
    hook = (REPO / "packaging/llm-agent-upgrade.hook").read_text()
    exec_line = re.search(r"^Exec\s*=\s*(.+)$", hook, re.M)[1]
    args = shlex.split(exec_line)
    assert args[0] == "/usr/bin/llm-agent", exec_line
    return ["/opt/llm-agent/llm-agent"] + args[1:]


def version_of(binary: Path) -> str:
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
    return next((l for l in (out.stdout + out.stderr).splitlines() if l.startswith("version:")), "")


def install_engine(host, source: str):
    """What pacman does to a package's files: each new file is written beside the old one and
    renamed over it, so a running rank keeps the binary it was started from."""
    for name in ("llama-server", "ggml-rpc-server"):
        host.run(["cp", f"{source}/{name}", f"{ENGINE_DIR}/.{name}.new"])
        host.run(["mv", "-f", f"{ENGINE_DIR}/.{name}.new", f"{ENGINE_DIR}/{name}"])


def wait_for(what, predicate, timeout=60):
    deadline = time.monotonic() + timeout
    while True:
        v = predicate()
        if v:
            return v
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def ring():
    agent = _need("LLM_AGENT_BIN")
    old, new = _need("LLAMA_CPP_DIR"), _need("LLAMA_CPP_REBUILT_DIR")
    model = _need("SMOLLM2_GGUF")
    v_old, v_new = version_of(old / "llama-server"), version_of(new / "llama-server")
    assert v_old and v_new and v_old != v_new, (
        f"the two llama.cpp builds must report different versions: {v_old!r} / {v_new!r}")
    binds = [(agent, "/opt/llm-agent/llm-agent", True), (old, "/opt/llama-old", True),
             (new, "/opt/llama-new", True), (model.parent, "/opt/models", True)]
    with Lab(3, binds=binds) as lab:
        unit = (REPO / "packaging/systemd/llm-agent@.service").read_text()
        exec_args = re.search(r"^ExecStart=\S+(.*)$", unit, re.M)[1]
        config = config_text(lab, model).replace('engine_dir = "/opt/llama"',
                                                 f'engine_dir = "{ENGINE_DIR}"')
        for h in lab.hosts:
            h.run(["useradd", "--system", "--home-dir", "/var/lib/llm-cluster", "--shell",
                   "/usr/sbin/nologin", "llm-cluster"])
            h.run("install -d -o llm-cluster -g llm-cluster -m 0750 /var/lib/llm-cluster")
            h.run(["install", "-d", "-m", "0755", ENGINE_DIR])
            install_engine(h, "/opt/llama-old")
            h.write_file("/etc/systemd/system/llm-agent@.service", unit)
            h.write_file("/etc/systemd/system/llm-agent@.service.d/test.conf",
                         f"[Service]\nExecStart=\nExecStart=/opt/llm-agent/llm-agent{exec_args}\n")
            h.write_file("/etc/llm-cluster/cluster.toml", config)
            h.write_file("/etc/llm-cluster/token", TOKEN + "\n", mode=0o600)
            h.write_file("/etc/llm-cluster/api-keys", API_KEY + "\n", mode=0o600)
            h.systemctl("daemon-reload")
            h.systemctl("enable", "--now", f"llm-agent@rank{h.index}.service")
        base = f"http://{lab.hosts[0].ip}:8080"
        try:
            wait_for("the ring serves", lambda: status(base)["phase"] == "serving", timeout=180)
        except (AssertionError, OSError):
            logs = "\n".join(h.journal(f"llm-agent@rank{h.index}.service", 80) for h in lab.hosts)
            pytest.fail(f"the cluster did not serve within 180 s:\n{logs}")
        yield lab, base, v_old, v_new
        for h in lab.hosts:
            h.systemctl("stop", f"llm-agent@rank{h.index}.service", check=False)


def engine_versions(base):
    return [(n.get("facts") or {}).get("engine_version") for n in status(base)["nodes"]]


def test_a_rolling_engine_upgrade_serves_throughout_and_restarts_the_ring_once(ring):
    lab, base, v_old, v_new = ring
    before = status(base)
    generation, restarts = before["generation"], before["restarts"]
    assert before["upgrade"] is None, before["upgrade"]
    old_versions = set(engine_versions(base))
    assert len(old_versions) == 1 and None not in old_versions, old_versions
    notify = hook_command()
    with Load(base) as load:
        # Hosts 2 and 1 first, the head last: every mixed state a user can reach node by node.
        for done, h in enumerate([lab.hosts[2], lab.hosts[1]], start=1):
            install_engine(h, "/opt/llama-new")
            out = h.run(notify).stdout
            assert f"llm-agent@rank{h.index}.service: told to read its facts anew" in out, out
            pending = wait_for(f"upgrade pending after host {h.index}", lambda: (
                (status(base)["upgrade"] or "").startswith(f"upgrade pending: {done}/3 nodes")
                and status(base)["upgrade"]), timeout=30)
            print(f"\n[figure] systemd upgrade: after host {h.index}: {pending}")
            load.until_served(10)  # the mixed ring serves on
            st = status(base)
            assert (st["phase"], st["generation"]) == ("serving", generation), st
        with load.lock:
            mixed_outcomes = list(load.outcomes)
        t_last = time.monotonic()
        install_engine(lab.hosts[0], "/opt/llama-new")
        lab.hosts[0].run(notify)
        wait_for("a new generation serves", lambda: (
            status(base)["phase"] == "serving" and status(base)["generation"] > generation),
            timeout=120)
        restart_s = time.monotonic() - t_last
        load.until_served(5)
        # Checks go on while serving: a second notification restarts nothing.
        for h in lab.hosts:
            h.run(notify)
        time.sleep(3)
        load.until_served(3)
    after = status(base)
    bad_mixed = [o for o in mixed_outcomes if o[0] != 200]
    load.report("rolling engine upgrade under load")
    print(f"[figure] systemd upgrade: mixed phase {len(mixed_outcomes)} requests, "
          f"{len(bad_mixed)} not 200; ring restarts {after['restarts'] - restarts}, generation "
          f"{generation} -> {after['generation']}; last host notified -> new ring serving "
          f"in {restart_s:.1f} s")
    assert not bad_mixed, bad_mixed[:5]
    assert after["restarts"] - restarts == 1, after
    assert after["generation"] == generation + 1, after
    assert after["upgrade"] is None, after["upgrade"]
    versions = engine_versions(base)
    assert len(set(versions)) == 1 and versions[0] and versions[0] not in old_versions, (
        old_versions, versions)
    # The new ring runs the new binaries: each rank unit was started after the upgrade.
    for n, h in zip(after["nodes"], lab.hosts):
        assert n["status"]["generation"] == generation + 1, n["status"]
    head = lab.hosts[0].journal("llm-agent@rank0.service", 400)
    assert "restarting the ring for an upgrade" in head, head[-2000:]
