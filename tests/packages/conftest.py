"""Fixtures for the Arch package tests: the tools (scripts/build-packages.sh --provision) and one
real makepkg build of llm-agent + llm-cluster per session (scripts/build-packages.sh).

The build runs lazily, the first time a test needs a package, and at most once. A test that needs
the packages FAILS when the build failed (test_build.py shows the log's tail) and SKIPS, with the
reason, when this machine cannot build at all (not root and makepkg missing, no cargo). Tests
that need a tool skip the same way when it is missing and cannot be installed.
"""

import functools
import io
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pkgfiles  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "scripts" / "build-packages.sh"
AGENT_PKGBUILD = REPO / "pkgbuilds" / "llm-agent" / "PKGBUILD"
AGENT_SRCINFO = pkgfiles.srcinfo(REPO / "pkgbuilds" / "llm-agent" / ".SRCINFO")
# The packages built from pkgbuilds/llm-agent (llm-agent, llm-cluster).
PKGNAMES = [name for name in AGENT_SRCINFO if name != "pkgbase"]
CANNOT_RUN = 77  # build-packages.sh: this machine cannot build (the reason is on stderr)
IS_ROOT = os.geteuid() == 0


def run(cmd, **kw):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)


def last_line(text):
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


class Tools:
    """What `build-packages.sh --provision` achieved: tools installed (as root) or a reason."""

    def __init__(self):
        res = run(["bash", BUILD_SCRIPT, "--provision"])
        self.error = self.reason = None
        if res.returncode == CANNOT_RUN:
            self.reason = last_line(res.stderr)
        elif res.returncode != 0:
            self.error = f"build-packages.sh --provision failed (exit {res.returncode}):\n{res.stderr}"

    def need(self, tool):
        if self.error:
            pytest.fail(self.error, pytrace=False)
        path = shutil.which(tool)
        if path is None:
            pytest.skip(f"{tool} is not installed: {self.reason or 'not found on PATH'}")
        return path


class Build:
    """The session's makepkg build, run on first use. Keeps the package paths, or why there are
    none, so every test that needs a package reports the same failure or skip."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.done = False
        self.error = self.skip = None
        self.paths = {}
        self.stderr = ""
        self._roots = {}

    def run_once(self):
        if self.done:
            return
        self.done = True
        # The working tree, so the packages hold the files these tests read their expectations from.
        cmd = ["bash", str(BUILD_SCRIPT), "--worktree", "--out", str(self.tmp / "out")]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        err = []
        for line in proc.stderr:  # live with `pytest -s`: a cold build takes minutes
            sys.stderr.write(line)
            err.append(line)
        out = proc.stdout.read()
        rc = proc.wait()
        self.stderr = "".join(err)
        if rc == CANNOT_RUN:
            self.skip = f"cannot build the packages here: {last_line(self.stderr)}"
        elif rc != 0:
            self.error = f"the package build failed (exit {rc}): {last_line(self.stderr)}"
        else:
            for line in out.splitlines():
                path = Path(line)
                # NAME-PKGVER-PKGREL-ARCH.pkg.tar.zst
                self.paths[path.name.rsplit("-", 3)[0]] = path

    def require(self):
        self.run_once()
        if self.skip:
            pytest.skip(self.skip)
        if self.error:
            pytest.fail(f"{self.error}\n(test_build.py::test_build_succeeds shows the log's tail)",
                        pytrace=False)

    def package(self, name):
        self.require()
        if name not in self.paths:
            pytest.fail(f"the build printed no {name} package: {sorted(self.paths.values())}",
                        pytrace=False)
        return self.paths[name]

    def tar(self, name):
        """The package as an open tarfile (zstd decompressed by the zstd tool)."""
        res = subprocess.run(["zstd", "-dcq", str(self.package(name))], capture_output=True)
        assert res.returncode == 0, f"{name}: not a zstd file: {res.stderr.decode()}"
        return tarfile.open(fileobj=io.BytesIO(res.stdout))

    def members(self, name):
        """{path: TarInfo} of the package's files and directories, metadata files left out."""
        with self.tar(name) as t:
            return {m.name.rstrip("/"): m for m in t.getmembers()
                    if not (m.name.startswith(".") and "/" not in m.name)}

    def pkginfo(self, name):
        """The package's .PKGINFO as {key: [values]}."""
        with self.tar(name) as t:
            text = t.extractfile(".PKGINFO").read().decode()
        info = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.partition(" = ")
                info.setdefault(key, []).append(value)
        return info

    def root(self, name):
        """The package extracted (with bsdtar, as pacman would), modes and owners kept."""
        if name not in self._roots:
            package = self.package(name)
            dest = self.tmp / f"root-{name}"
            dest.mkdir()
            res = run(["bsdtar", "-xpf", package, "-C", dest])
            assert res.returncode == 0, f"bsdtar -x {name}: {res.stderr}"
            self._roots[name] = dest
        return self._roots[name]


def pytest_collection_modifyitems(items):
    """test_build.py first among this directory's tests: with -s the build's log shows under
    it, and when the build fails its failure, with the log's tail, comes first."""
    here = Path(__file__).resolve().parent
    idx = [n for n, item in enumerate(items) if item.path.parent == here]
    mine = sorted((items[n] for n in idx), key=lambda item: item.path.name != "test_build.py")
    for n, item in zip(idx, mine):
        items[n] = item


@pytest.fixture(scope="session")
def tools():
    return Tools()


@pytest.fixture(scope="session")
def build(tools, tmp_path_factory):
    return Build(tmp_path_factory.mktemp("packages"))


@functools.cache
def planned(pkgname):
    """What package_PKGNAME installs, with makepkg's renames: {path: pkgfiles.Planned}.
    Raises when the PKGBUILD cannot be read that way; tests use plan_or_fail."""
    return pkgfiles.after_makepkg(pkgfiles.planned_install(AGENT_PKGBUILD, pkgname))


def plan_or_fail(pkgname):
    try:
        return planned(pkgname)
    except (RuntimeError, ValueError) as e:
        pytest.fail(str(e), pytrace=False)


def agent_bin():
    """The agent binary's path in the package: where package() installs cargo's output."""
    found = [path for path, p in plan_or_fail("llm-agent").items()
             if p.src == "target/release/llm-agent"]
    if len(found) != 1:
        pytest.fail(f"package_llm-agent installs target/release/llm-agent {len(found)} times",
                    pytrace=False)
    return found[0]
