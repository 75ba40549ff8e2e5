"""Where the Ansible commands are: next to this Python (scripts/check-ansible.sh's venv), else on PATH."""

import shutil
import sys
from pathlib import Path


def ansible_tool(name):
    """An Ansible command next to this Python (the venv), else on PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else shutil.which(name)
