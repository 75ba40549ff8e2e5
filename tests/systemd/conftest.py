"""Tests against real systemd hosts (systemd-nspawn containers, see hosts.py and README.md).

The whole directory is skipped, with the reason shown by `pytest -rs`, when we are not root
or when systemd-nspawn is missing and cannot be installed.
"""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hosts  # noqa: E402

_state = {}


def _lab_unavailable():
    """None when labs can run here, else the reason (computed once per session)."""
    if "reason" not in _state:
        reason = None
        if os.geteuid() != 0:
            reason = "systemd hosts need root (network namespaces, bridges, cgroups, nspawn)"
        elif not Path("/sys/fs/cgroup/unified").is_dir() and not Path(
                "/sys/fs/cgroup/cgroup.controllers").exists():
            reason = "systemd hosts need a cgroup v2 hierarchy (unified or hybrid)"
        else:
            try:
                hosts.prepare()
                hosts.cleanup_stale()
            except Exception as e:  # noqa: BLE001 - any failure means: cannot run here
                reason = f"systemd-nspawn cannot be installed or prepared: {e}"
        _state["reason"] = reason
    return _state["reason"]


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).resolve().parent
    mine = [i for i in items if here in Path(str(i.fspath)).resolve().parents]
    if not mine:
        return
    reason = _lab_unavailable()
    if reason:
        marker = pytest.mark.skip(reason=reason)
        for item in mine:
            item.add_marker(marker)


@pytest.fixture(scope="session")
def lab_factory():
    """Make labs that are torn down at the end of the session at the latest."""
    labs = []

    def make(n, **kw):
        lab = hosts.Lab(n, **kw)
        labs.append(lab)
        return lab

    yield make
    for lab in labs:
        lab.down()
