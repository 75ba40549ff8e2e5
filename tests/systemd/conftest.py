"""Tests against real systemd hosts (systemd-nspawn containers, see hosts.py and README.md).

The whole directory is skipped, with the reason shown by `pytest -rs`, when we are not root
or when systemd-nspawn is missing and cannot be installed.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hosts  # noqa: E402

def pytest_collection_modifyitems(config, items):
    here = Path(__file__).resolve().parent
    mine = [i for i in items if here in Path(str(i.fspath)).resolve().parents]
    if not mine:
        return
    reason = hosts.unavailable_reason()
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
