"""The makepkg build itself: it succeeds, builds every package the PKGBUILD declares, and runs
the agent's tests in check()."""

import re

import pytest

from conftest import PKGNAMES


def test_build_succeeds(build):
    build.run_once()
    if build.error:
        tail = "\n".join(build.stderr.splitlines()[-80:])
        pytest.fail(f"{build.error}\n{tail}", pytrace=False)
    build.require()
    assert sorted(build.paths) == sorted(PKGNAMES), build.paths


def test_check_ran_the_agent_tests(build):
    """makepkg's check() ran cargo test (BUILDENV has `check`) and every test binary passed."""
    build.require()
    results = re.findall(r"cargo test result: (\w+)", build.stderr)
    assert results, "no `test result:` line in the build output: check() did not run cargo test"
    assert set(results) == {"ok"}, results
