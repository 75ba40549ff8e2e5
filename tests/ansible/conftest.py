"""Tests of ansible/site.yml against real systemd hosts (tests/systemd/hosts.py).

Everything here is skipped, with the reason shown by `pytest -rs`, when the tests do not run as
root, when the systemd hosts cannot be prepared, or when Ansible is not installed next to this
Python (scripts/check-ansible.sh installs it into a cached venv and runs these tests).
"""

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "systemd"))

import hosts  # noqa: E402
from ansible_tools import ansible_tool  # noqa: E402


def _unavailable():
    if ansible_tool("ansible-playbook") is None:
        return "ansible-playbook is not installed: run scripts/check-ansible.sh"
    return hosts.unavailable_reason(extra_packages=("openssh-server",))


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).resolve().parent
    mine = [i for i in items if here in Path(str(i.fspath)).resolve().parents]
    if not mine:
        return
    reason = _unavailable()
    if reason:
        for item in mine:
            item.add_marker(pytest.mark.skip(reason=reason))
