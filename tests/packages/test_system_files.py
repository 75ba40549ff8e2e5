"""The packaged systemd unit, sysusers, tmpfiles, sysctl and modules-load files: systemd's own
tools accept them (applied to scratch roots only: this machine's users, units and sysctls are not
touched), and they agree with each other and with the package."""

import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest

import pkgfiles
from conftest import IS_ROOT, REPO, agent_bin, plan_or_fail, run

UNITS = sorted(REPO.glob("packaging/systemd/*.service"))
UNIT = UNITS[0].name if len(UNITS) == 1 else None
SYSTEM_UNIT_DIR = "usr/lib/systemd/system"
SYSCTL = "usr/lib/sysctl.d/" + next(REPO.glob("sysctl.d/*.conf")).name
# The most `systemd-analyze security` may report for the unit (0 = locked down, 10 = exposed).
MAX_EXPOSURE = 5.0
# Congestion controls built into every kernel (no module to load).
BUILTIN_CC = {"reno", "cubic"}


def packaged(build, glob):
    """The packaged files matching GLOB (a path in the package), at least one."""
    found = sorted(build.root("llm-agent").glob(glob))
    assert found, f"the package has no {glob}"
    return found


def unit_settings(build):
    return pkgfiles.unit_settings(packaged(build, f"{SYSTEM_UNIT_DIR}/{UNIT}")[0].read_text())


def instance():
    """A unit instance the packaged example config defines: `rank<first node's rank>`."""
    plan = plan_or_fail("llm-agent")
    config = next(p for p, e in plan.items() if p.startswith("etc/") and e.src)
    nodes = tomllib.loads((REPO / plan[config].src).read_text())["node"]
    return UNIT.replace("@.", f"@rank{nodes[0]['rank']}.")


@pytest.fixture(scope="session")
def units_root(build, tmp_path_factory):
    """A scratch root with this machine's unit files and the package on top."""
    def make():
        root = tmp_path_factory.mktemp("root-units")
        (root / SYSTEM_UNIT_DIR).mkdir(parents=True)
        (root / "etc").mkdir()
        for d in ("/usr/lib/systemd/system", "/lib/systemd/system"):
            if Path(d).is_dir():
                subprocess.run(["cp", "-a", f"{d}/.", root / SYSTEM_UNIT_DIR], check=True)
                break
        subprocess.run(["cp", "-a", f"{build.root('llm-agent')}/.", root], check=True)
        return root
    return make


def test_there_is_one_unit():
    assert UNIT, f"expected one unit in packaging/systemd, found {UNITS}"


def test_systemd_analyze_verify(tools, units_root):
    analyze = tools.need("systemd-analyze")
    root = units_root()
    res = run([analyze, "verify", f"--root={root}", "--man=no", instance()], cwd=root)
    out = (res.stdout + res.stderr).strip()
    assert res.returncode == 0 and not out, f"exit {res.returncode}:\n{out}"


def test_security_exposure(tools, units_root):
    analyze = tools.need("systemd-analyze")
    root = units_root()
    res = run([analyze, "security", "--offline=true", f"--root={root}", instance()], cwd=root)
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", res.stdout)
    if m is None:
        pytest.skip(f"systemd-analyze security --offline is not available here: {res.stderr.strip()}")
    assert float(m.group(1)) <= MAX_EXPOSURE, f"exposure {m.group(1)} > {MAX_EXPOSURE} (hardening lost?)"


def test_exec_start_runs_the_packaged_binary_and_config(build):
    """ExecStart names the packaged binary, a subcommand and options the binary accepts, the
    packaged config (a backup file, so pacman keeps local edits) and the instance as the node."""
    exec_start = unit_settings(build)[("Service", "ExecStart")]
    assert len(exec_start) == 1, exec_start
    argv = shlex.split(exec_start[0])
    assert argv[0] == f"/{agent_bin()}", f"ExecStart runs {argv[0]}, the package has /{agent_bin()}"
    opts = dict(zip(argv[2::2], argv[3::2]))
    assert set(argv[2::2]) == set(opts) and all(o.startswith("--") for o in opts), argv
    binary = build.root("llm-agent") / agent_bin()
    res = run([binary, argv[1], "--help"])
    assert res.returncode == 0, f"llm-agent has no subcommand {argv[1]}: {res.stderr}"
    for opt in opts:
        assert re.search(rf"^\s*{re.escape(opt)}\b", res.stdout, re.M), \
            f"`llm-agent {argv[1]}` has no option {opt}:\n{res.stdout}"
    config = opts.get("--config", "").lstrip("/")
    assert config in build.pkginfo("llm-agent").get("backup", []), \
        f"--config {opts.get('--config')} is not a backup file of the package"
    assert opts.get("--node") == "%i", "the instance name must select the node"


def test_documentation_is_in_the_package(build):
    for doc in " ".join(unit_settings(build).get(("Unit", "Documentation"), [])).split():
        if doc.startswith("man:"):
            name, section = re.fullmatch(r"man:([^(]+)\((\d)\)", doc).groups()
            packaged(build, f"usr/share/man/man{section}/{name}.{section}.gz")


def test_writable_paths_are_created_by_tmpfiles(build):
    made = {d.path for f in packaged(build, "usr/lib/tmpfiles.d/*.conf")
            for d in pkgfiles.tmpfiles_dirs(f.read_text())}
    for paths in unit_settings(build).get(("Service", "ReadWritePaths"), []):
        for path in paths.split():
            assert path.lstrip("-") in made, f"ReadWritePaths={path}: no tmpfiles.d line creates it"


@pytest.fixture(scope="session")
def sys_root(build, tmp_path_factory):
    """A scratch root with the package's sysusers.d and tmpfiles.d files applied to it."""
    state = {}

    def make():
        if not IS_ROOT:
            pytest.skip("applying sysusers/tmpfiles to a scratch root needs root (chown)")
        if not state:
            root = tmp_path_factory.mktemp("root-sys")
            for sub in ("etc", "usr/lib/sysusers.d", "usr/lib/tmpfiles.d"):
                (root / sub).mkdir(parents=True)
            for kind in ("sysusers.d", "tmpfiles.d"):
                for f in packaged(build, f"usr/lib/{kind}/*.conf"):
                    (root / "usr/lib" / kind / f.name).write_bytes(f.read_bytes())
            state["root"] = root
            state["sysusers"] = run(["systemd-sysusers", f"--root={root}"])
            state["tmpfiles"] = run(["systemd-tmpfiles", "--create", f"--root={root}"])
        return state
    return make


def passwd(root, name, db="passwd"):
    for line in (root / "etc" / db).read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return fields
    return None


def test_sysusers_creates_system_users(build, sys_root):
    s = sys_root()
    assert s["sysusers"].returncode == 0, s["sysusers"].stderr
    for f in packaged(build, "usr/lib/sysusers.d/*.conf"):
        users = pkgfiles.sysusers_users(f.read_text())
        assert users, f"{f.name}: no user"
        for name, home in users.items():
            entry = passwd(s["root"], name)
            assert entry, f"systemd-sysusers did not create {name}"
            assert int(entry[2]) < 1000, f"{name} is not a system user: {entry}"
            if home:
                assert entry[5] == home, entry


def test_tmpfiles_creates_the_state_directories(build, sys_root):
    s = sys_root()
    assert s["tmpfiles"].returncode == 0, s["tmpfiles"].stderr
    for f in packaged(build, "usr/lib/tmpfiles.d/*.conf"):
        for d in pkgfiles.tmpfiles_dirs(f.read_text()):
            user, group = passwd(s["root"], d.user), passwd(s["root"], d.group, "group")
            assert user and group, f"{d.path}: owner {d.user}:{d.group} is created by no sysusers.d file"
            st = (s["root"] / d.path.lstrip("/")).stat()
            got = (oct(st.st_mode & 0o7777), st.st_uid, st.st_gid)
            assert Path(s["root"] / d.path.lstrip("/")).is_dir(), d.path
            assert got == (oct(d.mode), int(user[2]), int(group[2])), f"{d.path}: {got}"


def test_sysusers_homes_are_tmpfiles_directories(build):
    made = {d.path for f in packaged(build, "usr/lib/tmpfiles.d/*.conf")
            for d in pkgfiles.tmpfiles_dirs(f.read_text())}
    for f in packaged(build, "usr/lib/sysusers.d/*.conf"):
        for name, home in pkgfiles.sysusers_users(f.read_text()).items():
            assert home is None or home in made, f"{name}'s home {home} is created by no tmpfiles.d line"


def test_sysctl_file_parses_and_names_existing_keys(build):
    """Every line is `key = value` and every key exists on this kernel (nothing is applied)."""
    entries = pkgfiles.sysctl_entries(packaged(build, SYSCTL)[0].read_text())
    assert entries
    missing = [f"line {n}: /proc/sys/{k.replace('.', '/')}" for n, k, _ in entries
               if not Path("/proc/sys", k.replace(".", "/")).exists()]
    assert not missing, f"keys this kernel does not have: {missing}"


def test_congestion_control_module_is_loaded_at_boot(build):
    cc = {k: v for _, k, v in pkgfiles.sysctl_entries(packaged(build, SYSCTL)[0].read_text())}
    modules = [line for f in packaged(build, "usr/lib/modules-load.d/*.conf")
               for _, line in pkgfiles.conf_lines(f.read_text())]
    bad = [m for m in modules if not re.fullmatch(r"[a-z0-9_-]+", m)]
    assert not bad, f"not module names: {bad}"
    wanted = cc.get("net.ipv4.tcp_congestion_control")
    if wanted and wanted not in BUILTIN_CC:
        assert f"tcp_{wanted}" in modules, f"{wanted} is selected but tcp_{wanted} is not loaded at boot"
