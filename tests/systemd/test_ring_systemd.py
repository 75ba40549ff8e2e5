"""A real 3-host cluster under systemd: each node runs the shipped `llm-agent@.service` as
`llm-agent@rankN`, ranks are transient units started over D-Bus, on llama.cpp RPC with SmolLM2.

Covers: serving through the coordinator on host 0; a rank unit killed with `systemctl kill`
(seen through D-Bus, ring restarted); `systemctl restart llm-agent@rank1` keeps the rank unit's
MainPID with no failed request; the per-key sysctl report inside a host; the engine port fence.
"""

import json
import os
import re
import socket
import threading
import time
from pathlib import Path

import pytest

from hosts import Lab, http

REPO = Path(__file__).resolve().parents[2]
TOKEN = "systemd-test-token-0123456789abcdef"
API_KEY = "sk-systemd-test"


def _need(name):
    v = os.environ.get(name)
    if not v or not Path(v).exists():
        pytest.fail(f"{name} is not set or missing: run through scripts/test.sh")
    return Path(v)


def config_text(lab, model):
    nodes = "".join(
        f"\n[[node]]\nrank = {h.index}\naddress = \"{h.ip}\"\nagent_port = 7700\nthreads = 1\n"
        f"engine_dir = \"/opt/llama\"\n" for h in lab.hosts)
    return f"""[cluster]
name = "systemd-test"
engine = "llama-rpc"
token_file = "/etc/llm-cluster/token"
state_dir = "/var/lib/llm-cluster"
rank_user = "llm-cluster"

[model]
path = "/opt/models/{model.name}"
name = "smollm2"
ctx_size = 1024

[api]
listen = "0.0.0.0:8080"
api_keys_file = "/etc/llm-cluster/api-keys"

[supervision]
ready_timeout_s = 120
backoff_initial_ms = 500
backoff_max_ms = 5000
node_timeout_s = 15
{nodes}"""


@pytest.fixture(scope="module")
def cluster():
    agent = _need("LLM_AGENT_BIN")
    llama = _need("LLAMA_CPP_DIR")
    model = _need("SMOLLM2_GGUF")
    binds = [(agent, "/opt/llm-agent/llm-agent", True), (llama, "/opt/llama", True),
             (model.parent, "/opt/models", True)]
    machine_before = {k: Lab.machine_sysctl(k) for k in (
        "net.ipv4.tcp_rmem", "net.ipv4.tcp_wmem", "net.ipv4.tcp_congestion_control",
        "net.core.rmem_max", "net.core.default_qdisc")}
    with Lab(3, binds=binds) as lab:
        unit = (REPO / "packaging/systemd/llm-agent@.service").read_text()
        # The unit's own command line with only the program moved to /opt (said once, in the unit).
        exec_args = re.search(r"^ExecStart=\S+(.*)$", unit, re.M)[1]
        for h in lab.hosts:
            # What the packages do: the rank user (sysusers), its state dir (tmpfiles), the unit,
            # the config and the token. The binary lives in /opt because /usr is the machine's.
            h.run(["useradd", "--system", "--home-dir", "/var/lib/llm-cluster", "--shell",
                   "/usr/sbin/nologin", "llm-cluster"])
            h.run("install -d -o llm-cluster -g llm-cluster -m 0750 /var/lib/llm-cluster")
            h.write_file("/etc/systemd/system/llm-agent@.service", unit)
            h.write_file("/etc/systemd/system/llm-agent@.service.d/test.conf",
                         f"[Service]\nExecStart=\nExecStart=/opt/llm-agent/llm-agent{exec_args}\n")
            h.write_file("/etc/llm-cluster/cluster.toml", config_text(lab, model))
            h.write_file("/etc/llm-cluster/token", TOKEN + "\n", mode=0o600)
            h.write_file("/etc/llm-cluster/api-keys", API_KEY + "\n", mode=0o600)
            h.systemctl("daemon-reload")
        t0 = time.monotonic()
        for h in lab.hosts:
            h.systemctl("enable", "--now", f"llm-agent@rank{h.index}.service")
        base = f"http://{lab.hosts[0].ip}:8080"
        deadline = time.monotonic() + 180
        while True:
            try:
                st, _, body = http("POST", f"{base}/v1/chat/completions", {
                    "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1},
                    headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
                if st == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                logs = "\n".join(h.journal(f"llm-agent@rank{h.index}.service", 80) for h in lab.hosts)
                pytest.fail(f"the cluster did not serve within 180 s:\n{logs}")
            time.sleep(0.2)
        first_token = time.monotonic() - t0
        print(f"\n[figure] systemd: all llm-agent@ units started -> first served token in {first_token:.2f} s")
        yield lab, base, machine_before
        for h in lab.hosts:
            h.systemctl("stop", f"llm-agent@rank{h.index}.service", check=False)


def status(base):
    st, _, body = http("GET", f"{base}/api/v1/cluster", headers={"Authorization": f"Bearer {API_KEY}"})
    assert st == 200, body
    return json.loads(body)


def chat(base, timeout=30):
    return http("POST", f"{base}/v1/chat/completions",
                {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 8,
                 "temperature": 0}, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=timeout)


def wait_serving_after(base, generation, timeout=120):
    t0 = time.monotonic()
    saw_503 = False
    while time.monotonic() - t0 < timeout:
        st, headers, _ = chat(base)
        if st == 503:
            saw_503 = True
            assert "Retry-After" in headers or "retry-after" in headers
        elif st == 200 and status(base)["generation"] > generation:
            return time.monotonic() - t0, saw_503
        time.sleep(0.2)
    raise AssertionError("not serving again in time")


def test_ranks_are_units_of_the_rank_user_and_serve(cluster):
    lab, base, _ = cluster
    st = status(base)
    assert st["phase"] == "serving"
    g = st["generation"]
    for n, h in zip(st["nodes"], lab.hosts):
        assert n["status"]["unit"] == f"llm-rank{h.index}-g{g}.service", n
        assert h.unit_property(n["status"]["unit"], "ActiveState") == "active"
        assert h.unit_property(n["status"]["unit"], "User") == "llm-cluster"
        assert h.unit_property(n["status"]["unit"], "LimitMEMLOCK") == "infinity"
        # journald's per-unit cap on engine output (runner::ENGINE_LOG_LINES per 30 s).
        assert h.unit_property(n["status"]["unit"], "LogRateLimitIntervalUSec") == "30s"
        assert h.unit_property(n["status"]["unit"], "LogRateLimitBurst") == "2000"
        assert int(h.unit_property(n["status"]["unit"], "MainPID")) > 0
    # The API keys file is enforced.
    code, _, _ = http("POST", f"{base}/v1/chat/completions", {"messages": []})
    assert code == 401
    code, _, body = chat(base)
    assert code == 200 and json.loads(body)["choices"][0]["message"]["content"]


def test_agent_logs_to_journald_with_fields(cluster):
    lab, _, _ = cluster
    out = lab.hosts[1].run(["journalctl", "-u", "llm-agent@rank1.service", "-o", "json",
                            "--no-pager", "-n", "500"]).stdout
    entries = [json.loads(l) for l in out.splitlines() if l.strip()]
    tuning = [e for e in entries if e.get("MESSAGE") == "network tuning"]
    assert tuning, "no structured tuning entries in the journal"
    assert all("KEY" in e and "STATE" in e for e in tuning), tuning[0]


def test_sysctl_report_matches_what_the_host_allows(cluster):
    lab, _, machine_before = cluster
    h = lab.hosts[1]
    st, _, body = http("GET", f"http://{h.ip}:7700/v1/facts", headers={"Authorization": f"Bearer {TOKEN}"})
    assert st == 200, body
    report = {r["key"]: r for r in json.loads(body)["network"]}
    print("\n[figure] sysctl report of a host:\n" + "\n".join(
        f"  {k}: {r['state']} {r.get('reason', '')}" for k, r in report.items()))
    # Host-wide keys are read-only in a container's network namespace.
    assert report["net.core.rmem_max"]["state"] == "not_settable"
    assert "read-only" in report["net.core.rmem_max"]["reason"]
    # default_qdisc does not exist in a non-initial network namespace.
    assert report["net.core.default_qdisc"]["state"] == "not_settable"
    assert "absent" in report["net.core.default_qdisc"]["reason"]
    # Per-namespace TCP keys are applied (or were already right) and are in effect.
    for key in ("net.ipv4.tcp_rmem", "net.ipv4.tcp_wmem", "net.ipv4.tcp_congestion_control",
                "net.ipv4.tcp_window_scaling"):
        assert report[key]["state"] in ("applied", "already_set"), report[key]
        assert " ".join(h.sysctl(key).split()) == report[key]["after"]
    conf = (REPO / "sysctl.d/99-llm-net.conf").read_text().splitlines()
    wanted = {k.strip(): v.strip() for k, v in (l.split("=", 1) for l in conf
                                                if "=" in l and not l.lstrip().startswith("#"))}
    cc = "net.ipv4.tcp_congestion_control"
    assert h.sysctl(cc) == wanted[cc]
    # The machine's own values are untouched.
    for k, v in machine_before.items():
        assert Lab.machine_sysctl(k) == v, k


def test_non_peer_cannot_reach_a_rank_port(cluster):
    lab, base, _ = cluster
    st = status(base)
    worker = lab.hosts[1]
    port = 50052 + 1
    probe = ("import socket,sys\ns=socket.socket();s.settimeout(2)\n"
             f"try:\n s.connect(('{worker.ip}',{port}));print('open')\nexcept OSError as e:\n print('refused',e)\n")
    # The rpc server has no authentication: only the head may connect.
    assert lab.hosts[2].run(["python3", "-c", probe]).stdout.startswith("refused")
    with socket.socket() as s:  # from the machine (the bridge address): not a peer either
        s.settimeout(2)
        with pytest.raises(OSError):
            s.connect((worker.ip, port))
    # The head is allowed: the ring serves through it.
    assert lab.hosts[0].run(["python3", "-c", probe]).stdout.startswith("open")
    assert status(base)["generation"] == st["generation"], "probing must not break the ring"


def test_agent_restart_keeps_the_rank_unit_and_loses_no_request(cluster):
    lab, base, _ = cluster
    h = lab.hosts[1]
    st = status(base)
    unit = st["nodes"][1]["status"]["unit"]
    pid_before = h.unit_property(unit, "MainPID")
    failures, done = [], threading.Event()

    def load():
        while not done.is_set():
            code, _, body = chat(base)
            if code != 200:
                failures.append((code, body[:200]))
    t = threading.Thread(target=load)
    t.start()
    try:
        time.sleep(1)
        h.systemctl("restart", "llm-agent@rank1.service")
        h.wait_active("llm-agent@rank1.service")
        time.sleep(3)
    finally:
        done.set()
        t.join()
    assert h.unit_property(unit, "MainPID") == pid_before
    assert h.unit_property(unit, "ActiveState") == "active"
    assert not failures, failures
    after = status(base)
    assert after["generation"] == st["generation"]
    assert after["nodes"][1]["state"] == "running" and after["nodes"][1]["status"]["unit"] == unit
    assert "adopted running rank unit" in h.journal("llm-agent@rank1.service", 100)


def test_a_wedged_agent_is_restarted_by_the_watchdog(cluster):
    """An agent that stops answering (here: SIGSTOP, as a process wedged on a hung driver call
    would) stops feeding systemd's watchdog; systemd kills and restarts it, and the new agent
    adopts the rank unit, which ran on untouched. The shipped unit's WatchdogSec is shortened by
    a drop-in so the test takes seconds."""
    lab, base, _ = cluster
    h = lab.hosts[1]
    agent = "llm-agent@rank1.service"
    dropin = "/etc/systemd/system/llm-agent@rank1.service.d/watchdog.conf"
    h.write_file(dropin, "[Service]\nWatchdogSec=3s\nTimeoutAbortSec=2s\n")
    h.systemctl("daemon-reload")
    h.systemctl("restart", agent)
    h.wait_active(agent)
    try:
        st = status(base)
        unit = st["nodes"][1]["status"]["unit"]
        rank_pid = h.unit_property(unit, "MainPID")
        agent_pid = h.unit_property(agent, "MainPID")
        restarts = int(h.unit_property(agent, "NRestarts"))
        # A healthy agent feeds the watchdog: two intervals pass without a restart.
        time.sleep(6)
        assert h.unit_property(agent, "MainPID") == agent_pid, "restarted while healthy"
        assert int(h.unit_property(agent, "NRestarts")) == restarts
        h.run(["kill", "-STOP", agent_pid])
        deadline = time.monotonic() + 60
        while not (h.unit_property(agent, "MainPID") not in ("0", agent_pid)
                   and h.unit_property(agent, "ActiveState") == "active"):
            assert time.monotonic() < deadline, "the watchdog did not restart the stopped agent"
            time.sleep(0.2)
        assert int(h.unit_property(agent, "NRestarts")) == restarts + 1
        assert "Watchdog timeout" in h.journal(agent, 200)
        assert h.unit_property(unit, "MainPID") == rank_pid, "the rank unit must run on"
        deadline = time.monotonic() + 60
        while chat(base)[0] != 200:
            assert time.monotonic() < deadline, "not serving after the agent's restart"
            time.sleep(0.2)
    finally:
        h.run(["rm", "-f", dropin])
        h.systemctl("daemon-reload")
        h.systemctl("restart", agent)
        h.wait_active(agent)


def test_coordinator_restart_adopts_the_running_ring(cluster):
    lab, base, _ = cluster
    st = status(base)
    pids = [h.unit_property(n["status"]["unit"], "MainPID") for n, h in zip(st["nodes"], lab.hosts)]
    lab.hosts[0].systemctl("restart", "llm-agent@rank0.service")
    lab.hosts[0].wait_active("llm-agent@rank0.service")
    deadline = time.monotonic() + 60
    while True:
        try:
            code, _, _ = chat(base)
            if code == 200:
                break
        except OSError:
            pass  # the API is down while its agent restarts
        assert time.monotonic() < deadline, "not serving within 60 s of the coordinator's restart"
        time.sleep(0.2)
    after = status(base)
    assert after["generation"] == st["generation"], "the new coordinator restarted the ring"
    assert [h.unit_property(n["status"]["unit"], "MainPID") for n, h in zip(after["nodes"], lab.hosts)] == pids
    out = lab.hosts[0].run(["journalctl", "-u", "llm-agent@rank0.service", "-o", "json",
                            "--no-pager", "-n", "300"]).stdout
    reasons = [json.loads(l).get("REASON", "") for l in out.splitlines() if l.strip()]
    assert any(r.startswith("adopting the running generation") for r in reasons), reasons


RING_FAILED = "ring failed; stopping every rank to restart it"


def journal_entries(host, unit, after_cursor=None):
    """The unit's journal entries as dicts (structured fields such as REASON included)."""
    args = ["journalctl", "-u", unit, "-o", "json", "--no-pager"]
    args += [f"--after-cursor={after_cursor}"] if after_cursor else ["-n", "1"]
    out = host.run(args).stdout
    return [json.loads(l) for l in out.splitlines() if l.strip()]


def test_killed_rank_unit_restarts_the_ring(cluster):
    lab, base, _ = cluster
    coordinator = "llm-agent@rank0.service"
    last = journal_entries(lab.hosts[0], coordinator)
    cursor = last[-1]["__CURSOR"] if last else None
    st = status(base)
    unit = st["nodes"][2]["status"]["unit"]
    lab.hosts[2].systemctl("kill", "--signal=SIGKILL", unit)
    seconds, saw_503 = wait_serving_after(base, st["generation"])
    print(f"\n[figure] systemd: killed rank unit -> serving again in {seconds:.2f} s")
    after = status(base)
    assert after["restarts"] >= st["restarts"] + 1
    assert after["nodes"][2]["status"]["unit"] != unit
    # The failure that caused this restart, as the coordinator recorded it: it must name the
    # signal (a failed D-Bus read once showed up as "killed by signal 0").
    deadline = time.monotonic() + 10
    while True:
        reasons = [e.get("REASON", "") for e in journal_entries(lab.hosts[0], coordinator, cursor)
                   if e.get("MESSAGE") == RING_FAILED]
        if reasons or time.monotonic() > deadline:
            break
        time.sleep(0.2)  # journald may not have written it yet
    assert reasons, f"no {RING_FAILED!r} entry after the kill"
    assert "rank 2" in reasons[0] and "killed by signal 9" in reasons[0], reasons
