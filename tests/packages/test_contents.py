"""What is inside the packages: exactly the files and directories the PKGBUILD's package
functions install (with their modes, all owned by root), the .PKGINFO makepkg derives from the
PKGBUILD, and the repo's files unchanged."""

import platform
import stat

import pytest

from conftest import AGENT_SRCINFO, PKGNAMES, REPO, plan_or_fail, planned, run


def repo_files():
    """Files package() takes from the source tree as they are (not built under target/); one
    failing parameter when the PKGBUILD cannot be read, so that is a failure, not no tests."""
    try:
        plan = planned("llm-agent")
    except (RuntimeError, ValueError):
        return [pytest.param(None, id="package_llm-agent-unreadable")]
    return sorted(p for p, e in plan.items() if e.src is not None and not e.src.startswith("target/"))


def version():
    base = AGENT_SRCINFO["pkgbase"]
    return f"{base['pkgver'][0]}-{base['pkgrel'][0]}"


@pytest.mark.parametrize("name", PKGNAMES)
def test_files_modes_and_owners(build, name):
    members = build.members(name)
    plan = plan_or_fail(name)
    problems = [f"missing {p}" for p in sorted(set(plan) - set(members))]
    problems += [f"unexpected {p}" for p in sorted(set(members) - set(plan))]
    for path in sorted(set(plan) & set(members)):
        m, want = members[path], plan[path]
        kind = "directory" if want.src is None else "file"
        if (kind == "directory") != m.isdir() or not (m.isdir() or m.isfile()):
            problems.append(f"{path}: expected a {kind}, found tar type {m.type!r}")
        if stat.S_IMODE(m.mode) != want.mode:
            problems.append(f"{path}: mode {stat.S_IMODE(m.mode):04o}, expected {want.mode:04o}")
        if (m.uid, m.gid) != (0, 0) or (m.uname, m.gname) != ("root", "root"):
            problems.append(f"{path}: owned by {m.uname}:{m.gname} ({m.uid}:{m.gid})")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", PKGNAMES)
def test_pkginfo_is_the_pkgbuilds(build, name):
    """.PKGINFO carries what the PKGBUILD (its .SRCINFO) says, for this machine's architecture."""
    want = AGENT_SRCINFO[name]
    got = build.pkginfo(name)
    assert got["pkgname"] == [name]
    assert got["pkgver"] == [version()]
    arch = "any" if want["arch"] == ["any"] else platform.machine()
    assert arch in want["arch"] + ["any"]
    assert got["arch"] == [arch]
    for pkginfo_key, srcinfo_key in (("depend", "depends"), ("optdepend", "optdepends"),
                                     ("backup", "backup"), ("provides", "provides"),
                                     ("conflict", "conflicts"), ("license", "license")):
        assert got.get(pkginfo_key, []) == want.get(srcinfo_key, []), \
            f"{name}: .PKGINFO {pkginfo_key} differs from .SRCINFO {srcinfo_key}"


def test_meta_package_pins_the_agent_built_with_it():
    assert f"llm-agent={version()}" in AGENT_SRCINFO["llm-cluster"]["depends"]


def test_backup_entries_are_files_in_the_package(build):
    backup = build.pkginfo("llm-agent").get("backup", [])
    assert backup, "llm-agent has no backup entry: pacman would overwrite a node's config"
    members = build.members("llm-agent")
    for entry in backup:
        assert not entry.startswith("/") and entry in members and members[entry].isfile(), \
            f"backup entry {entry} is not a (relative) file path in the package"


@pytest.mark.parametrize("path", repo_files())
def test_repo_file_packaged_unchanged(build, path):
    src = plan_or_fail("llm-agent")[path].src
    got = (build.root("llm-agent") / path).read_bytes()
    assert got == (REPO / src).read_bytes(), f"/{path} differs from {src}"


def test_every_packaging_file_is_installed():
    """What the repo keeps for the package (packaging/, sysctl.d/, modules-load.d/) is all in it."""
    res = run(["git", "-C", REPO, "ls-files", "packaging", "sysctl.d", "modules-load.d"])
    assert res.returncode == 0, res.stderr
    tracked = set(res.stdout.split())
    assert tracked
    installed = {e.src for e in plan_or_fail("llm-agent").values()}
    assert not tracked - installed, f"not installed by package_llm-agent: {sorted(tracked - installed)}"


def test_license_text_is_shipped(build):
    """Arch ships licenses outside its common set (MIT among them) as the package's own file."""
    if "MIT" not in AGENT_SRCINFO["llm-agent"]["license"]:
        pytest.skip("llm-agent is not MIT-licensed")
    shipped = build.root("llm-agent") / "usr/share/licenses/llm-agent/LICENSE"
    assert shipped.is_file(), "no /usr/share/licenses/llm-agent/LICENSE"
    assert shipped.read_bytes() == (REPO / "LICENSE").read_bytes()
