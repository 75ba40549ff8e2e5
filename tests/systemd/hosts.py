"""Real systemd hosts for tests: N systemd-nspawn containers on a private bridge.

Each host is a systemd-nspawn container booting the machine's own systemd (252) as PID 1,
with its own dbus-daemon and journald, in its own network namespace with one veth on a
per-lab bridge.  The rootfs is a small shared skeleton (a few /etc files) plus the machine's
/usr bind-mounted read-only; every boot runs with --volatile=overlay, so nothing a test does
inside a host survives it and the skeleton is never written.

Works on a machine whose PID 1 is not systemd (cgroup v1 hybrid): nspawn runs with
--register=no --keep-unit from a cgroup of our own in both hierarchies.

Usage (as root):

    from hosts import Lab
    Lab.prepare()                                  # once: package + skeleton
    with Lab(3, binds=[("/path/to/bin", "/opt/llm-agent", True)]) as lab:
        h0, h1, _ = lab.hosts
        h0.systemctl("start", "foo.service")
        h1.run(["python3", "-c", "..."]).stdout
        h0.bus_address        # unix:path=/proc/<leader>/root/run/dbus/system_bus_socket

Naming: every object a lab creates carries the lab's id, "llt" + hex (9 chars):
bridge <id>b, netns and machine <id>h<i>, host-side veth <id>v<i>, cgroups
/sys/fs/cgroup/{systemd,unified}/<id>/h<i>, state /tmp/llt-labs/<id>/.  cleanup_stale()
only touches objects named like that whose owning process is gone.

Stdlib only.
"""

from __future__ import annotations

import atexit
import fcntl
import ipaddress
import json
import os
import random
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

ROOTFS = Path(os.path.expanduser("~/.cache/llm-cluster/nspawn-root-v1"))
STATE_DIR = Path("/tmp/llt-labs")
CGROUP_ROOTS = (Path("/sys/fs/cgroup/systemd"), Path("/sys/fs/cgroup/unified"))
UNIFIED = Path("/sys/fs/cgroup/unified")
PREFIX = "llt"
ID_LEN = 9
BOOT_TIMEOUT = 60.0
# The PATH inside a host: nsenter would otherwise hand the caller's PATH (pyenv shims, venvs) in.
HOST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# /etc files a host needs from the machine (missing ones are skipped).
_ETC_COPY = (
    "passwd", "group", "shadow", "gshadow", "nsswitch.conf", "login.defs", "pam.d", "pam.conf",
    "security", "dbus-1", "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "profile", "profile.d",
    "bash.bashrc", "environment", "alternatives", "protocols", "services", "ethertypes",
    "iproute2", "host.conf", "gai.conf", "localtime", "python3", "python3.11", "ssl",
    "ca-certificates", "mime.types", "inputrc", "debian_version",
)
# Units that make no sense in a test host (a preset disables all enabled-by-default services).
_MASK = (
    "console-getty.service", "getty@tty1.service", "getty.target", "systemd-firstboot.service",
    "systemd-networkd-wait-online.service", "systemd-timesyncd.service", "apt-daily.timer",
    "apt-daily-upgrade.timer", "e2scrub_all.timer", "fstrim.timer", "man-db.timer",
    "dpkg-db-backup.timer", "logrotate.timer", "cron.service", "ssh.service",
)


class LabError(RuntimeError):
    pass


class HostCommandError(subprocess.CalledProcessError):
    """A command inside a host failed; str() carries its output."""

    def __init__(self, host, returncode, cmd, output, stderr):
        super().__init__(returncode, cmd, output, stderr)
        self.host = host

    def __str__(self):
        return (f"{self.host}: {self.cmd} exited {self.returncode}\n"
                f"stdout: {(self.output or '')[-2000:]}\nstderr: {(self.stderr or '')[-2000:]}")


# --------------------------------------------------------------------------------------------
# small helpers

def _sh(args, check=True, timeout=30, **kw):
    return subprocess.run(args, check=check, timeout=timeout, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def _quiet(args, timeout=30):
    """Run a teardown command, ignore failures."""
    try:
        subprocess.run(args, timeout=timeout, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        pass


def _proc_start_time(pid: int):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _alive(pid: int, start_time) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return False
    if fields[0] in ("Z", "X"):        # a zombie owner is gone too
        return False
    return start_time is None or int(fields[19]) == start_time


def _children(pid: int):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        out = []
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    with open(f"/proc/{d}/stat") as f:
                        if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                            out.append(int(d))
                except (OSError, IndexError, ValueError):
                    pass
        return out


def _comm(pid: int):
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return None


def http(method, url, body=None, headers=None, timeout=30, context=None):
    """A JSON request from the machine to a host's HTTP endpoint: (status, headers, body bytes).
    HTTP errors are answers, not exceptions; connection failures raise OSError. context: an
    ssl.SSLContext for https (a client certificate for a mutual-TLS control port)."""
    import urllib.error
    import urllib.request
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={
        "Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def machine_sysctl(key: str) -> str:
    """The machine's own value of a sysctl (read here, in the caller's namespaces)."""
    return Path("/proc/sys", key.replace(".", "/")).read_text().strip()


def _links():
    try:
        return json.loads(_sh(["ip", "-j", "link", "show"]).stdout or "[]")
    except (subprocess.SubprocessError, ValueError):
        return []


def _netns_names():
    try:
        return [n["name"] for n in json.loads(_sh(["ip", "-j", "netns", "list"]).stdout or "[]")]
    except (subprocess.SubprocessError, ValueError):
        return []


def _used_networks():
    nets = []
    for cmd in (["ip", "-j", "route", "show", "table", "all"], ["ip", "-j", "addr", "show"]):
        try:
            data = json.loads(_sh(cmd).stdout or "[]")
        except (subprocess.SubprocessError, ValueError):
            continue
        for e in data:
            cands = []
            if "dst" in e:
                cands.append(e["dst"])
            for a in e.get("addr_info", []):
                if a.get("family") == "inet":
                    cands.append(f"{a['local']}/{a.get('prefixlen', 32)}")
            for c in cands:
                if c == "default":
                    continue
                try:
                    nets.append(ipaddress.ip_network(c, strict=False))
                except ValueError:
                    pass
    return [n for n in nets if n.version == 4]


def _rm_cgroup_tree(path: Path):
    if not path.is_dir():
        return
    for root, dirs, _files in os.walk(path, topdown=False):
        for d in dirs:
            try:
                os.rmdir(os.path.join(root, d))
            except OSError:
                pass
    try:
        os.rmdir(path)
    except OSError:
        pass


def _cgroup_empty(path: Path) -> bool:
    try:
        return "populated 0" in (path / "cgroup.events").read_text()
    except OSError:
        return True


def _kill_cgroup(path: Path, timeout=5.0):
    """SIGKILL everything in a unified cgroup subtree and wait until it is empty."""
    if not path.is_dir():
        return
    try:
        (path / "cgroup.kill").write_text("1")
    except OSError:
        # Old kernels: kill each pid of the subtree.
        for root, _d, files in os.walk(path):
            if "cgroup.procs" in files:
                try:
                    for pid in Path(root, "cgroup.procs").read_text().split():
                        try:
                            os.kill(int(pid), signal.SIGKILL)
                        except OSError:
                            pass
                except OSError:
                    pass
    deadline = time.monotonic() + timeout
    while not _cgroup_empty(path) and time.monotonic() < deadline:
        time.sleep(0.05)


# --------------------------------------------------------------------------------------------
# one-time preparation

def have_nspawn() -> bool:
    return shutil.which("systemd-nspawn") is not None or Path("/usr/bin/systemd-nspawn").exists()


def _apt_install(packages):
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    opts = ["-y", "-q", "-o", "DPkg::Lock::Timeout=300", "--no-install-recommends"]
    r = subprocess.run(["nice", "apt-get", "install", *opts, *packages], env=env, text=True,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=900)
    if r.returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=600)
        r = subprocess.run(["nice", "apt-get", "install", *opts, *packages], env=env, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=900)
    if r.returncode != 0:
        raise LabError(f"apt-get install {' '.join(packages)} failed:\n{r.stdout[-3000:]}")


def prepare(extra_packages=(), rootfs: Path = ROOTFS) -> Path:
    """Install what the lab needs (only what is missing) and build the skeleton rootfs once.

    extra_packages: Debian packages to install on the machine if `dpkg -s` says they are
    missing (e.g. "nftables"); hosts see them through the read-only /usr bind.
    """
    if os.geteuid() != 0:
        raise LabError("the systemd hosts lab needs root")
    needed = []
    if not have_nspawn():
        needed.append("systemd-container")
    for tool, pkg in (("ip", "iproute2"), ("busctl", "systemd"), ("nsenter", "util-linux"),
                      ("dbus-daemon", "dbus-daemon")):
        if shutil.which(tool) is None and not Path("/usr/bin", tool).exists():
            needed.append(pkg)
    for pkg in extra_packages:
        if subprocess.run(["dpkg", "-s", pkg], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL).returncode != 0:
            needed.append(pkg)
    if needed:
        _apt_install(sorted(set(needed)))
    _build_rootfs(Path(rootfs))
    return Path(rootfs)


def _build_rootfs(root: Path):
    if (root / ".complete").exists():
        return
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(str(root) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (root / ".complete").exists():
            return
        tmp = Path(f"{root}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        for d in ("etc", "var/tmp", "var/lib/dbus", "var/log/journal", "run", "tmp", "proc",
                  "sys", "dev", "root", "usr", "opt", "srv", "home", "mnt"):
            (tmp / d).mkdir(parents=True, exist_ok=True)
        for d in ("bin", "sbin", "lib", "lib64"):
            if Path("/usr", d).exists():
                os.symlink(f"usr/{d}", tmp / d)
        os.chmod(tmp / "tmp", 0o1777)
        os.chmod(tmp / "var/tmp", 0o1777)
        os.chmod(tmp / "root", 0o700)
        etc = tmp / "etc"
        present = [f"/etc/{n}" for n in _ETC_COPY if os.path.lexists(f"/etc/{n}")]
        _sh(["cp", "-a", *present, str(etc)])
        # A file, not a link into /usr, or nspawn refuses the tree.
        shutil.copyfile("/usr/lib/os-release", etc / "os-release")
        # Empty machine-id: a fresh id per boot, first-boot presets apply every time.
        (etc / "machine-id").write_text("")
        os.symlink("/etc/machine-id", tmp / "var/lib/dbus/machine-id")
        (etc / "hosts").write_text("127.0.0.1 localhost\n::1 localhost ip6-localhost\n")
        (etc / "fstab").write_text("")
        (etc / "sysctl.d").mkdir(exist_ok=True)
        sysd = etc / "systemd"
        (sysd / "system").mkdir(parents=True)
        (sysd / "system-preset").mkdir()
        (sysd / "system-preset/00-llt-hosts.preset").write_text("disable *\n")
        for u in _MASK:
            os.symlink("/dev/null", sysd / "system" / u)
        # journald keeps the journal in /run (the overlay is thrown away anyway); small caps
        # keep a host's memory down, no rate limit so tests see every line.
        (sysd / "journald.conf.d").mkdir()
        (sysd / "journald.conf.d/llt.conf").write_text(
            "[Journal]\nStorage=volatile\nRuntimeMaxUse=16M\nRateLimitBurst=0\n")
        (tmp / ".complete").write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"))
        if root.exists():   # an incomplete earlier attempt
            shutil.rmtree(root)
        os.rename(tmp, root)


# --------------------------------------------------------------------------------------------
# stale cleanup

_ID_RE = re.compile(r"^(llt[0-9a-z]{6})(?:b|h\d+|v\d+)?$")


def _lab_owner_alive(lab_id: str) -> bool:
    d = STATE_DIR / lab_id
    try:
        st = json.loads((d / "state.json").read_text())
    except (OSError, ValueError):
        # A lab writes its state before creating anything; a state dir without it that is
        # only seconds old belongs to a lab that is starting right now.
        try:
            return time.time() - d.stat().st_mtime < 30
        except OSError:
            return False
    return _alive(st.get("owner_pid", -1), st.get("owner_start"))


_UNAVAILABLE: dict[tuple, str | None] = {}


def unavailable_reason(extra_packages=()) -> str | None:
    """None when labs can run here (after preparing them once), else why not. For test suites'
    skip markers; computed once per process and package set."""
    key = tuple(extra_packages)
    if key not in _UNAVAILABLE:
        reason = None
        if os.geteuid() != 0:
            reason = "systemd hosts need root (network namespaces, bridges, cgroups, nspawn)"
        elif not Path("/sys/fs/cgroup/unified").is_dir() and not Path(
                "/sys/fs/cgroup/cgroup.controllers").exists():
            reason = "systemd hosts need a cgroup v2 hierarchy (unified or hybrid)"
        else:
            try:
                prepare(extra_packages=extra_packages)
                cleanup_stale()
            except Exception as e:  # noqa: BLE001 - any failure means: cannot run here
                packages = " and ".join(["systemd-nspawn", *extra_packages])
                reason = f"{packages} cannot be installed or prepared: {e}"
        _UNAVAILABLE[key] = reason
    return _UNAVAILABLE[key]


def cleanup_stale(prefix: str = PREFIX) -> list[str]:
    """Remove leftovers (netns, bridges, veths, cgroups, processes, state dirs) of labs
    whose owning process is gone.  Only names made by this harness (prefix + id) are touched.
    Returns the ids that were cleaned."""
    if not prefix.startswith(PREFIX):
        raise ValueError(f"prefix must start with {PREFIX!r}")
    ids = set()
    for name in _netns_names():
        m = _ID_RE.match(name)
        if m and name.startswith(prefix):
            ids.add(m.group(1))
    for link in _links():
        m = _ID_RE.match(link.get("ifname", ""))
        if m and link["ifname"].startswith(prefix):
            ids.add(m.group(1))
    for cg in CGROUP_ROOTS:
        if cg.is_dir():
            for d in cg.iterdir():
                m = _ID_RE.match(d.name)
                if m and d.name == m.group(1) and d.name.startswith(prefix) and d.is_dir():
                    ids.add(d.name)
    if STATE_DIR.is_dir():
        for d in STATE_DIR.iterdir():
            m = _ID_RE.match(d.name)
            if m and d.name.startswith(prefix):
                ids.add(d.name)
    cleaned = []
    for lab_id in sorted(ids):
        if _lab_owner_alive(lab_id):
            continue
        _teardown_by_id(lab_id)
        cleaned.append(lab_id)
    return cleaned


def _teardown_by_id(lab_id: str, procs=(), term_timeout=10.0):
    """Remove everything a lab with this id may have created, in order. Safe to repeat.
    procs: the lab's nspawn Popen objects, when we are their parent."""
    # 1. nspawn: SIGTERM is a clean poweroff of the guest (well under a second here).
    procs = [p for p in procs if p is not None]
    for p in procs:
        if p.poll() is None:
            try:
                p.send_signal(signal.SIGTERM)
            except OSError:
                pass
    deadline = time.monotonic() + term_timeout
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    # 2. Whatever is left in the lab's cgroups (a killed nspawn leaves the guest running).
    _kill_cgroup(UNIFIED / lab_id)
    for p in procs:
        if p.poll() is None:
            try:
                p.kill()
                p.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                pass
    # 3. Network: veths go with their netns, but the host side may outlive a crash.
    names = [link.get("ifname", "") for link in _links()]
    for name in names:
        if name.startswith(f"{lab_id}v"):
            _quiet(["ip", "link", "del", name])
    for ns in _netns_names():
        if ns.startswith(f"{lab_id}h"):
            _quiet(["ip", "netns", "del", ns])
    if f"{lab_id}b" in names:
        _quiet(["ip", "link", "del", f"{lab_id}b"])
    # 4. cgroup dirs in both hierarchies.
    for cg in CGROUP_ROOTS:
        _rm_cgroup_tree(cg / lab_id)
    # 5. State.
    shutil.rmtree(STATE_DIR / lab_id, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# hosts and labs

class Host:
    """One booted container. Created by Lab; `index`, `name`, `ip` are fixed before up()."""

    def __init__(self, lab: "Lab", index: int):
        self.lab = lab
        self.index = index
        self.name = f"{lab.id}h{index}"          # netns name == machine name == hostname
        self.veth = f"{lab.id}v{index}"
        self.ip = str(lab.network.network_address + 11 + index)
        self.cgroups = [cg / lab.id / f"h{index}" for cg in CGROUP_ROOTS]
        self.log_path = lab.dir / f"h{index}.log"
        self.proc: subprocess.Popen | None = None
        self._leader: int | None = None

    def __repr__(self):
        return f"<Host {self.name} {self.ip} leader={self._leader}>"

    # ---- identity
    @property
    def nspawn_pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def leader(self) -> int:
        """The container's PID 1 (systemd) as a pid of the machine."""
        if self._leader and _comm(self._leader) == "systemd":
            return self._leader
        if not self.proc:
            raise LabError(f"{self.name} is not started")
        for c in _children(self.proc.pid):
            if _comm(c) == "systemd":
                self._leader = c
                return c
        raise LabError(f"{self.name}: no systemd child of nspawn {self.proc.pid}\n{self.log()}")

    @property
    def root(self) -> Path:
        """The container's root as seen from the machine (its overlay)."""
        return Path(f"/proc/{self.leader}/root")

    @property
    def bus_address(self) -> str:
        return f"unix:path=/proc/{self.leader}/root/run/dbus/system_bus_socket"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-8000:]
        except OSError:
            return ""

    # ---- the link
    def shape_inbound(self, rate: str | None, burst: str = "64kb", latency: str = "400ms"):
        """Rate-limit what the lab sends this host, or with rate None stop limiting it. A tbf
        qdisc on the machine's side of the host's veth: tbf shapes a link's egress, and that
        side's egress is everything the bridge forwards to the host (netem does not exist on
        every kernel; tbf does). burst must hold the largest (GSO) packet, 64 KiB on a veth."""
        if rate is None:
            _sh(["tc", "qdisc", "del", "dev", self.veth, "root"], check=False)
            return
        _sh(["tc", "qdisc", "replace", "dev", self.veth, "root", "tbf", "rate", rate,
             "burst", burst, "latency", latency])

    # ---- running things inside
    def run(self, cmd, check=True, timeout=30, input=None, env=None, cwd="/"):
        """Run a command inside the host (all its namespaces, root dir and cwd).

        cmd: a list, or a string run with `sh -c`. Returns CompletedProcess with text
        stdout/stderr; raises CalledProcessError (with output in the message) when check."""
        argv = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        full_env = {"PATH": HOST_PATH, "LANG": "C.UTF-8", "HOME": "/root", "TERM": "dumb",
                    "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"}
        if env:
            full_env.update(env)
        # -a: mount, uts, ipc, net, pid, cgroup, time (user ns is skipped: the same as ours).
        # -r/-w without a value: the target's root and cwd (a value would be a path of ours);
        # env -C then changes into cwd inside the host.
        nsargs = ["nsenter", "-t", str(self.leader), "-a", "-r", "-w", "--",
                  "env", "-i", "-C", cwd or "/", *[f"{k}={v}" for k, v in full_env.items()],
                  *argv]
        r = subprocess.run(nsargs, input=input, text=True, timeout=timeout,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if check and r.returncode != 0:
            raise HostCommandError(self.name, r.returncode, argv, r.stdout, r.stderr)
        return r

    def systemctl(self, *args, check=True, timeout=30):
        return self.run(["systemctl", "--no-pager", *args], check=check, timeout=timeout)

    def journal(self, unit: str | None = None, lines: int = 200) -> str:
        args = ["journalctl", "--no-pager", "-o", "short-precise", "-n", str(lines)]
        if unit:
            args += ["-u", unit]
        return self.run(args, check=False).stdout

    def sysctl(self, key: str) -> str:
        """A sysctl as seen inside the host (its own netns for net.*)."""
        return self.run(["cat", "/proc/sys/" + key.replace(".", "/")]).stdout.strip()

    def set_sysctl(self, key: str, value: str):
        """Write a sysctl inside the host (net.* keys are the host's own netns)."""
        self.run(["sh", "-c", 'echo "$1" > "/proc/sys/$2"', "sh", value, key.replace(".", "/")])

    def wait_listening(self, port: int, timeout: float = 10.0):
        """Wait until something in the host listens on TCP `port`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.run(["ss", "-Hltn", f"sport = :{port}"], check=False).stdout.strip():
                return
            time.sleep(0.1)
        raise LabError(f"{self.name}: nothing listens on :{port} after {timeout}s")

    def busctl(self, *args, check=True, timeout=30):
        """busctl against the host's system bus, from outside."""
        return _sh(["busctl", f"--address={self.bus_address}", *args], check=check,
                   timeout=timeout)

    def system_state(self) -> str:
        r = self.busctl("get-property", "org.freedesktop.systemd1", "/org/freedesktop/systemd1",
                        "org.freedesktop.systemd1.Manager", "SystemState", check=False,
                        timeout=5)
        if r.returncode != 0:
            return ""
        return r.stdout.split()[-1].strip('"') if r.stdout.split() else ""

    def unit_property(self, unit: str, prop: str) -> str:
        return self.systemctl("show", "--value", "-p", prop, unit).stdout.strip()

    def wait_active(self, unit: str, timeout=15.0) -> str:
        """Wait until a unit is active; returns its MainPID (inside the host's pid ns)."""
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.systemctl("is-active", unit, check=False).stdout.strip()
            if state == "active":
                return self.unit_property(unit, "MainPID")
            if state == "failed":
                break
            time.sleep(0.1)
        raise LabError(f"{self.name}: {unit} is {state!r}\n{self.journal(unit, 50)}")

    # ---- files
    def _path(self, path: str) -> Path:
        if not path.startswith("/"):
            raise ValueError("host paths are absolute")
        return self.root / path.lstrip("/")

    def write_file(self, path: str, text: str | bytes, mode: int = 0o644):
        """Write a file into the host's overlay (parents are created)."""
        p = self._path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        data = text.encode() if isinstance(text, str) else text
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            os.write(fd, data)
            os.fchmod(fd, mode)
        finally:
            os.close(fd)

    def read_file(self, path: str) -> str:
        return self._path(path).read_text()


class Lab:
    """N systemd hosts on a bridge.  A context manager: up(), wait_up() ... down()."""

    prepare = staticmethod(prepare)
    cleanup_stale = staticmethod(cleanup_stale)
    machine_sysctl = staticmethod(machine_sysctl)

    def __init__(self, n: int, binds=(), prefix: str | None = None, *, nspawn_args=(),
                 cgroup: str = "unified", bpf: bool = True, rootfs: Path = ROOTFS,
                 boot_timeout: float = BOOT_TIMEOUT):
        """n hosts; binds: (src, dst, read_only) for every host; prefix: name prefix, must
        start with "llt" (default "llt"), the rest of the 9-char id is random hex;
        nspawn_args: extra systemd-nspawn options for every host;
        cgroup: "unified" (cgroup v2 inside the host, like a current distribution; needed for
        IPAddressAllow=/IPAddressDeny=/IPAccounting=) or "legacy" (cgroup v1 inside);
        bpf: let the hosts use bpf(2) (nspawn's seccomp filter blocks it by default, which
        silently disables systemd's IP firewall)."""
        if cgroup not in ("unified", "legacy"):
            raise ValueError("cgroup: 'unified' or 'legacy'")
        prefix = prefix or PREFIX
        if not prefix.startswith(PREFIX) or len(prefix) > 6 or not re.fullmatch(r"[a-z0-9]+", prefix):
            raise ValueError("prefix: 'llt' plus at most 3 of [a-z0-9]")
        if not 1 <= n <= 200:
            raise ValueError("1 <= n <= 200")
        self.n = n
        self.id = prefix + "".join(random.choice("0123456789abcdef")
                                   for _ in range(ID_LEN - len(prefix)))
        self.bridge = f"{self.id}b"
        self.binds = [(str(s), str(d), bool(ro)) for s, d, ro in binds]
        self.nspawn_args = list(nspawn_args)
        self.cgroup = cgroup
        self.bpf = bpf
        self.rootfs = Path(rootfs)
        self.boot_timeout = boot_timeout
        self.dir = STATE_DIR / self.id
        self.network: ipaddress.IPv4Network | None = None
        self.hosts: list[Host] = []
        self._started = False
        self._down = False
        self._lock = threading.Lock()
        self.timings: dict[str, float] = {}
        self.exit_codes: dict[str, int | None] = {}

    def __repr__(self):
        return f"<Lab {self.id} {self.network} hosts={len(self.hosts)}>"

    def __enter__(self):
        try:
            self.up()
            self.wait_up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc):
        self.down()
        return False

    def __getitem__(self, i) -> Host:
        return self.hosts[i]

    @property
    def gateway(self) -> str:
        """The bridge's address on the machine (hosts can reach the machine there)."""
        return str(self.network.network_address + 1)

    # ---- up
    def _pick_network(self):
        used = _used_networks()
        for _ in range(500):
            net = ipaddress.ip_network(f"10.{random.randint(200, 250)}.{random.randint(0, 255)}.0/24")
            if not any(net.overlaps(u) for u in used):
                return net
        raise LabError("no free 10.200-250.x.0/24 subnet")

    def up(self):
        """Create bridge, netns, veths and cgroups and start all nspawns (no waiting)."""
        if self._started:
            raise LabError("a Lab is started once")
        if not (self.rootfs / ".complete").exists():
            prepare(rootfs=self.rootfs)
        self._started = True
        t0 = time.monotonic()
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "state.json").write_text(json.dumps({
            "owner_pid": os.getpid(), "owner_start": _proc_start_time(os.getpid()),
            "n": self.n}))
        atexit.register(self.down)
        _install_sigterm_handler()
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        # Choose the subnet and create the bridge under a lock so parallel labs differ.
        with open(STATE_DIR / ".net.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.network = self._pick_network()
            _sh(["ip", "link", "add", self.bridge, "type", "bridge"])
            _sh(["ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge])
            _sh(["ip", "link", "set", self.bridge, "up"])
        (self.dir / "state.json").write_text(json.dumps({
            "owner_pid": os.getpid(), "owner_start": _proc_start_time(os.getpid()),
            "n": self.n, "network": str(self.network), "bridge": self.bridge}))
        self.hosts = [Host(self, i) for i in range(self.n)]
        for h in self.hosts:
            self._plumb(h)
        for h in self.hosts:
            self._spawn(h)
        self.timings["up"] = time.monotonic() - t0

    def _plumb(self, h: Host):
        _sh(["ip", "netns", "add", h.name])
        _sh(["ip", "link", "add", h.veth, "type", "veth", "peer", "name", "eth0", "netns", h.name])
        _sh(["ip", "link", "set", h.veth, "master", self.bridge, "up"])
        _sh(["ip", "-n", h.name, "link", "set", "lo", "up"])
        _sh(["ip", "-n", h.name, "addr", "add", f"{h.ip}/24", "dev", "eth0"])
        _sh(["ip", "-n", h.name, "link", "set", "eth0", "up"])
        # No default route on purpose: a host reaches its lab (and the machine at the
        # bridge address) and nothing else.
        for cg in h.cgroups:
            cg.mkdir(parents=True, exist_ok=True)

    def _spawn(self, h: Host):
        args = ["systemd-nspawn", "-q", "-D", str(self.rootfs), "--volatile=overlay",
                "--bind-ro=/usr", "-b", "-M", h.name, "--register=no", "--keep-unit",
                "--console=passive", "--private-network",
                f"--network-namespace-path=/run/netns/{h.name}"]
        # Follow the machine's /usr: packages installed after the skeleton was built bring
        # alternatives links (iptables, awk, ...) and libraries.
        for f in ("/etc/alternatives", "/etc/ld.so.cache"):
            if os.path.exists(f):
                args.append(f"--bind-ro={f}")
        for src, dst, ro in self.binds:
            args.append(f"--bind{'-ro' if ro else ''}={src}:{dst}")
        if self.bpf:
            args.append("--system-call-filter=bpf")
        args += self.nspawn_args
        # Move ourselves into the host's cgroups in both hierarchies, then become nspawn.
        wrapper = 'for c in "$1" "$2"; do echo $$ > "$c/cgroup.procs"; done; shift 2; exec "$@"'
        log = open(h.log_path, "wb")
        try:
            h.proc = subprocess.Popen(
                ["sh", "-c", wrapper, "sh", *[str(c) for c in h.cgroups], *args],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
                env={"PATH": HOST_PATH, "LANG": "C.UTF-8",
                     # nspawn cannot see the host's systemd version under the empty /usr of
                     # the skeleton and would fall back to legacy; say what we want.
                     "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1" if self.cgroup == "unified" else "0"})
        finally:
            log.close()
        with open(self.dir / "pids", "a") as f:
            f.write(f"{h.proc.pid}\n")

    def wait_up(self, timeout: float | None = None):
        """Wait until every host's SystemState is running or degraded (over its bus)."""
        timeout = self.boot_timeout if timeout is None else timeout
        t0 = time.monotonic()
        deadline = t0 + timeout
        pending = list(self.hosts)
        states = {}
        while pending:
            for h in list(pending):
                if h.proc.poll() is not None:
                    raise LabError(f"{h.name}: systemd-nspawn exited with {h.proc.returncode}\n"
                                   f"--- nspawn log:\n{h.log()}")
                try:
                    h.leader
                except LabError:
                    states[h.name] = "(no leader yet)"
                    continue
                st = h.system_state()
                states[h.name] = st or "(no bus yet)"
                if st in ("running", "degraded"):
                    pending.remove(h)
            if not pending:
                break
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {h.name} nspawn log:\n{h.log()}" for h in pending)
                raise LabError(f"hosts not up after {timeout:.0f}s: {states}\n{logs}")
            time.sleep(0.1)
        self.timings["wait_up"] = time.monotonic() - t0

    # ---- down
    def down(self):
        """Stop every host and remove everything the lab created. Idempotent; survives Ctrl-C."""
        with self._lock:
            if self._down or not self._started:
                self._down = True
                return
            self._down = True
        t0 = time.monotonic()
        old = None
        if threading.current_thread() is threading.main_thread():
            try:
                old = signal.signal(signal.SIGINT, signal.SIG_IGN)
            except (ValueError, TypeError):
                old = None
        try:
            _teardown_by_id(self.id, [h.proc for h in self.hosts])
            # 0 from every nspawn means every host powered off cleanly on SIGTERM.
            self.exit_codes = {h.name: (h.proc.returncode if h.proc else None)
                               for h in self.hosts}
        finally:
            if old is not None:
                signal.signal(signal.SIGINT, old)
            try:
                atexit.unregister(self.down)
            except Exception:
                pass
        self.timings["down"] = time.monotonic() - t0

    # ---- what a lab leaves behind (for tests of the harness itself)
    def leftovers(self) -> list[str]:
        out = []
        out += [f"netns {n}" for n in _netns_names() if n.startswith(self.id)]
        out += [f"link {l['ifname']}" for l in _links() if l.get("ifname", "").startswith(self.id)]
        out += [f"cgroup {cg / self.id}" for cg in CGROUP_ROOTS if (cg / self.id).exists()]
        for h in self.hosts:
            if h.proc and h.proc.poll() is None:
                out.append(f"nspawn pid {h.proc.pid}")
            if h._leader and _comm(h._leader) is not None:
                out.append(f"leader pid {h._leader}")
        if self.dir.exists():
            out.append(f"state {self.dir}")
        return out


def _install_sigterm_handler():
    """Turn SIGTERM into SystemExit so finally blocks and atexit tear labs down."""
    if threading.current_thread() is not threading.main_thread():
        return
    try:
        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
            def _term(signum, frame):
                raise SystemExit(128 + signum)
            signal.signal(signal.SIGTERM, _term)
    except (ValueError, TypeError):
        pass
