"""Tests of the systemd hosts harness itself, on one lab of 3 real hosts.

The last test takes the lab down and checks nothing of it is left on the machine.
"""

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import hosts

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def bind_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("optbind")
    (d / "marker").write_text("from the machine\n")
    return d


@pytest.fixture(scope="module")
def lab(lab_factory, bind_dir):
    lab = lab_factory(3, binds=[(bind_dir, "/opt/llm-agent", True)])
    t0 = time.monotonic()
    lab.up()
    lab.wait_up()
    lab.timings["boot"] = time.monotonic() - t0
    print(f"\n{lab}: booted 3 hosts in {lab.timings['boot']:.2f}s")
    yield lab
    lab.down()


def fetch_cmd(url, timeout=3):
    return ["python3", "-c",
            f"import urllib.request as u; r = u.urlopen({url!r}, timeout={timeout}); "
            f"print(r.status); print(r.read().decode(), end='')"]


def test_every_host_is_running(lab):
    assert len(lab.hosts) == 3
    assert len({h.ip for h in lab.hosts}) == 3
    for h in lab.hosts:
        assert h.system_state() in ("running", "degraded"), h.journal(lines=80)
        assert h.run(["hostname"]).stdout.strip() == h.name
        ip = json.loads(h.run(["ip", "-j", "-4", "addr", "show", "eth0"]).stdout)
        assert ip[0]["addr_info"][0]["local"] == h.ip


def test_dbus_from_outside(lab):
    for h in lab.hosts:
        r = subprocess.run(
            ["busctl", f"--address={h.bus_address}", "get-property", "org.freedesktop.systemd1",
             "/org/freedesktop/systemd1", "org.freedesktop.systemd1.Manager", "SystemState"],
            capture_output=True, text=True, timeout=10)
        assert r.returncode == 0, r.stderr
        assert r.stdout.split()[0] == "s"
        assert r.stdout.split()[1].strip('"') in ("running", "degraded")
    # The system bus inside works too (systemctl talks to PID 1; busctl to dbus-daemon).
    names = lab[0].run(["busctl", "--system", "list", "--no-pager"]).stdout
    assert "org.freedesktop.systemd1" in names


def test_tcp_between_hosts_and_journal(lab):
    h1, h2 = lab[1], lab[2]
    h1.run(["systemd-run", "--unit=web", "--property=WorkingDirectory=/opt/llm-agent",
            "python3", "-m", "http.server", "--bind", h1.ip, "8080"])
    h1.wait_active("web.service")
    h1.wait_listening(8080)
    r = h2.run(fetch_cmd(f"http://{h1.ip}:8080/marker"))
    assert r.stdout.splitlines() == ["200", "from the machine"]
    # journald inside h1 saw the request, tagged with the unit.
    deadline = time.monotonic() + 5
    while "GET /marker" not in h1.journal("web.service") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert f'{h2.ip} - - ' in h1.journal("web.service")


def test_bind_is_read_only(lab):
    h = lab[0]
    assert h.run(["cat", "/opt/llm-agent/marker"]).stdout == "from the machine\n"
    r = h.run(["touch", "/opt/llm-agent/x"], check=False)
    assert r.returncode != 0 and "Read-only" in r.stderr


def test_write_file_and_unit(lab):
    h = lab[0]
    h.write_file("/etc/systemd/system/llt-echo@.service", textwrap.dedent("""\
        [Service]
        Type=oneshot
        RemainAfterExit=yes
        ExecStart=/bin/sh -c 'echo hello from %i; cat /etc/llt-test.conf'
        """))
    h.write_file("/etc/llt-test.conf", "conf=1\n", mode=0o600)
    assert oct(os.stat(h.root / "etc/llt-test.conf").st_mode & 0o777) == "0o600"
    h.systemctl("daemon-reload")
    h.systemctl("start", "llt-echo@rank0.service")
    log = h.journal("llt-echo@rank0.service")
    assert "hello from rank0" in log and "conf=1" in log
    # The overlay is per host: the others do not see the file.
    assert not (lab[1].root / "etc/llt-test.conf").exists()


def test_transient_unit_main_pid(lab):
    h = lab[2]
    h.run(["systemd-run", "--unit=x", "--property=Description=llt test unit",
           "--property=KillMode=mixed", "--setenv=LLT=1", "sleep", "300"])
    pid = int(h.wait_active("x.service"))
    assert pid > 1
    assert h.run(["cat", f"/proc/{pid}/comm"]).stdout.strip() == "sleep"
    assert h.unit_property("x.service", "Description") == "llt test unit"
    # Same answer over D-Bus from outside.
    path = h.busctl("call", "org.freedesktop.systemd1", "/org/freedesktop/systemd1",
                    "org.freedesktop.systemd1.Manager", "GetUnit", "s", "x.service"
                    ).stdout.split()[1].strip('"')
    r = h.busctl("get-property", "org.freedesktop.systemd1", path,
                 "org.freedesktop.systemd1.Service", "MainPID")
    assert r.stdout.split() == ["u", str(pid)]
    h.systemctl("stop", "x.service")
    assert h.systemctl("is-active", "x.service", check=False).stdout.strip() != "active"


def test_sysctl_in_host_leaves_machine_alone(lab):
    h, other = lab[0], lab[1]
    key = "net.ipv4.tcp_congestion_control"
    machine = hosts.machine_sysctl(key)
    allowed = hosts.machine_sysctl("net.ipv4.tcp_allowed_congestion_control").split()
    choice = next((c for c in ("reno", "bbr") if c != machine and c in allowed), None)
    if choice is None:
        pytest.skip(f"no congestion control other than {machine} is allowed: {allowed}")
    h.set_sysctl(key, choice)
    assert h.sysctl(key) == choice
    assert hosts.machine_sysctl(key) == machine
    assert other.sysctl(key) == machine

    # The way a node would do it: a drop-in applied by systemd-sysctl inside the host.
    rmem_key = "net.ipv4.tcp_rmem"
    machine_rmem = hosts.machine_sysctl(rmem_key)
    want = "4096 65536 1048576"
    assert machine_rmem.split() != want.split()
    h.write_file("/etc/sysctl.d/90-llt.conf", f"{rmem_key} = {want}\n")
    h.systemctl("restart", "systemd-sysctl.service")
    assert h.sysctl(rmem_key).split() == want.split()
    assert hosts.machine_sysctl(rmem_key) == machine_rmem
    assert other.sysctl(rmem_key) == machine_rmem


def test_ip_address_allow_deny_is_enforced(lab):
    """systemd's per-unit IP firewall (cgroup BPF) works inside these hosts."""
    h0, h1, h2 = lab.hosts
    h0.run(["systemd-run", "--unit=fenced", "-p", "IPAddressDeny=any",
            "-p", f"IPAddressAllow={h1.ip}", "-p", "IPAddressAllow=localhost",
            "python3", "-m", "http.server", "--bind", "0.0.0.0", "9000"])
    h0.wait_active("fenced.service")
    h0.wait_listening(9000)
    assert h1.run(fetch_cmd(f"http://{h0.ip}:9000/", timeout=3)).stdout.startswith("200")
    assert h0.run(fetch_cmd("http://127.0.0.1:9000/")).stdout.startswith("200")
    r = h2.run(fetch_cmd(f"http://{h0.ip}:9000/", timeout=1.5), check=False)
    assert r.returncode != 0 and "timed out" in r.stderr, r
    h0.systemctl("stop", "fenced.service")


@pytest.mark.skipif(shutil.which("nft") is None, reason="nft is not installed on the machine")
def test_nft_rules_stay_in_host_netns(lab):
    h0, h1, h2 = lab.hosts
    h0.run("nft add table inet llt && nft add chain inet llt input "
           "'{ type filter hook input priority 0; policy accept; }' && "
           f"nft add rule inet llt input tcp dport 9100 ip saddr != {h1.ip} drop")
    h0.run(["systemd-run", "--unit=nft-web", "python3", "-m", "http.server", "9100"])
    h0.wait_listening(9100)
    assert h1.run(fetch_cmd(f"http://{h0.ip}:9100/")).stdout.startswith("200")
    r = h2.run(fetch_cmd(f"http://{h0.ip}:9100/", timeout=1.5), check=False)
    assert r.returncode != 0 and "timed out" in r.stderr, r
    machine_rules = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True)
    assert "inet llt" not in machine_rules.stdout
    h0.run("nft delete table inet llt")


def _set_child_subreaper(on):
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(36, 1 if on else 0, 0, 0, 0) == 0      # PR_SET_CHILD_SUBREAPER


def test_cleanup_stale_after_crash():
    """A test process killed with SIGKILL leaves a running lab; cleanup_stale removes it."""
    code = textwrap.dedent(f"""\
        import sys, time
        sys.path.insert(0, {str(HERE)!r})
        import hosts
        lab = hosts.Lab(1)
        lab.up(); lab.wait_up()
        print(lab.id, lab.hosts[0].proc.pid, flush=True)
        time.sleep(120)
        """)
    # Become the orphaned nspawn's parent, so we can reap it (PID 1 here may not soon).
    _set_child_subreaper(True)
    try:
        p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        try:
            lab_id, nspawn_pid = p.stdout.readline().split()
            nspawn_pid = int(nspawn_pid)
            assert lab_id.startswith("llt"), lab_id
        finally:
            p.send_signal(signal.SIGKILL)
            p.wait()
    finally:
        _set_child_subreaper(False)
    assert hosts._comm(nspawn_pid) == "systemd-nspawn"
    assert Path("/sys/fs/cgroup/unified", lab_id).exists()
    assert lab_id in hosts.cleanup_stale()
    deadline = time.monotonic() + 5
    while os.waitpid(nspawn_pid, os.WNOHANG)[0] != nspawn_pid:
        assert time.monotonic() < deadline, "the stale nspawn did not exit"
        time.sleep(0.05)
    assert not Path(f"/proc/{nspawn_pid}").exists()
    assert not Path("/sys/fs/cgroup/unified", lab_id).exists()
    assert not Path("/sys/fs/cgroup/systemd", lab_id).exists()
    assert not [n for n in hosts._netns_names() if n.startswith(lab_id)]
    assert not [link for link in hosts._links() if link["ifname"].startswith(lab_id)]


def test_down_leaves_nothing(lab):
    nspawn = [h.proc.pid for h in lab.hosts]
    leaders = [h.leader for h in lab.hosts]
    t0 = time.monotonic()
    lab.down()
    print(f"\n{lab}: down in {time.monotonic() - t0:.2f}s, nspawn exit codes {lab.exit_codes}")
    assert lab.leftovers() == []
    # nspawn exits 0 when the host powered off cleanly on SIGTERM.
    assert set(lab.exit_codes.values()) == {0}, lab.exit_codes
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
    assert lab.id not in netns and lab.id not in links
    for root in hosts.CGROUP_ROOTS:
        assert not (root / lab.id).exists()
    for pid in nspawn + leaders:
        assert not Path(f"/proc/{pid}").exists() or hosts._comm(pid) not in (
            "systemd-nspawn", "systemd")
    lab.down()   # idempotent
