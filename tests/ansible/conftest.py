"""Tests of ansible/site.yml against real systemd hosts (tests/systemd/hosts.py).

Everything here is skipped, with the reason shown by `pytest -rs`, when the tests do not run as
root, when the systemd hosts cannot be prepared, or when Ansible is not installed next to this
Python (scripts/check-ansible.sh installs it into a cached venv and runs these tests).
"""

import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "systemd"))

import hosts  # noqa: E402

_state = {}


def ansible_tool(name):
    """An Ansible command next to this Python (the venv), else on PATH."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    return shutil.which(name)


def _unavailable():
    if "reason" not in _state:
        reason = None
        if os.geteuid() != 0:
            reason = "the Ansible converge test boots systemd hosts (systemd-nspawn) and needs root"
        elif ansible_tool("ansible-playbook") is None:
            reason = "ansible-playbook is not installed: run scripts/check-ansible.sh"
        else:
            try:
                hosts.prepare(extra_packages=("openssh-server",))
                hosts.cleanup_stale()
            except Exception as e:  # noqa: BLE001 - any failure means: cannot run here
                reason = f"systemd hosts or openssh-server cannot be prepared: {e}"
        _state["reason"] = reason
    return _state["reason"]


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).resolve().parent
    mine = [i for i in items if here in Path(str(i.fspath)).resolve().parents]
    if not mine:
        return
    reason = _unavailable()
    if reason:
        for item in mine:
            item.add_marker(pytest.mark.skip(reason=reason))
