"""Lint: every PKGBUILD and every shell script in the repo parses (bash -n) and passes
shellcheck."""

import re
import subprocess

import pytest

from conftest import REPO, run

PKGBUILDS = sorted(REPO.glob("pkgbuilds/*/PKGBUILD"))


def shell_scripts():
    """Tracked files named *.sh or starting with a sh/bash shebang (PKGBUILDs aside)."""
    tracked = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True,
                             check=True).stdout.decode().split("\0")
    found = []
    for name in filter(None, tracked):
        path = REPO / name
        if path in PKGBUILDS or not path.is_file():
            continue
        with open(path, "rb") as f:
            first = f.readline(200)
        if name.endswith(".sh") or re.match(rb"#!\s*(/usr)?/bin/(env\s+)?(ba)?sh\b", first):
            found.append(path)
    return sorted(found)


SCRIPTS = shell_scripts()
# SC2034: variables makepkg reads; SC2154: srcdir/pkgdir, set by makepkg; SC2164: makepkg
# aborts on any failing command, so `cd dir` needs no `|| exit`.
PKGBUILD_EXCLUDES = "SC2034,SC2154,SC2164"


def ids(paths):
    return [str(p.relative_to(REPO)) for p in paths]


def test_there_are_pkgbuilds_and_scripts():
    assert PKGBUILDS and SCRIPTS


@pytest.mark.parametrize("path", PKGBUILDS + SCRIPTS, ids=ids(PKGBUILDS + SCRIPTS))
def test_bash_parses(path):
    res = run(["bash", "-n", path])
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("path", SCRIPTS, ids=ids(SCRIPTS))
def test_shellcheck_script(tools, path):
    res = run([tools.need("shellcheck"), path])
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("path", PKGBUILDS, ids=ids(PKGBUILDS))
def test_shellcheck_pkgbuild(tools, path):
    res = run([tools.need("shellcheck"), "--shell=bash", f"--exclude={PKGBUILD_EXCLUDES}", path])
    assert res.returncode == 0, res.stdout + res.stderr
