"""The CLI as a person uses it: `check-config` on good and bad files, `--help` naming the commands."""

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def agent(*args):
    return subprocess.run([os.environ["LLM_AGENT_BIN"], *args], capture_output=True, text=True, timeout=30)


def test_check_config_accepts_the_shipped_example():
    r = agent("check-config", str(REPO / "config/cluster.example.toml"))
    assert r.returncode == 0, r.stderr
    assert "ok" in r.stdout and "engine prima" in r.stdout


def test_check_config_lists_every_problem_with_its_location(tmp_path):
    bad = tmp_path / "cluster.toml"
    bad.write_text(
        '[cluster]\nname = "lab"\nengine = "llama-rpc"\n'
        '[model]\npath = "models/m.gguf"\nlayer_windows = [10, 20]\n'
        '[[node]]\nrank = 0\naddress = "10.0.0.1"\n'
        '[[node]]\nrank = 2\naddress = "nas.local"\n')
    r = agent("check-config", str(bad))
    assert r.returncode == 1
    lines = r.stderr.splitlines()
    assert f"{bad}:5:8: model path must be absolute (every node resolves it on its own disk)" in lines
    assert any(l.startswith(f"{bad}:6:17: layer_windows apply to engine = \"prima\" only") for l in lines), lines
    assert any(l.startswith(f"{bad}:12:11: address `nas.local` is not an IP address") for l in lines), lines
    assert any("missing: 1" in l for l in lines), lines
    assert lines[-1] == "4 problem(s) found"
    # A typo in a key is named with the keys that would have been valid.
    bad.write_text(bad.read_text().replace("engine =", "engnie ="))
    r = agent("check-config", str(bad))
    assert r.returncode == 1
    assert f"{bad}:3:1: unknown field `engnie`" in r.stderr


def test_help_names_every_command():
    out = agent("--help").stdout
    for cmd in ("run", "check-config", "up", "tune", "completions", "manpage"):
        assert f"  {cmd}" in out, out
