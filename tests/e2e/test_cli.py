"""The CLI as a person uses it: `check-config` on good and bad files, `--help` naming the commands."""

import os
import struct
import subprocess
import zipfile
from pathlib import Path

import pytest

from conftest import _env_path

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


def config_with_model(tmp_path, model, windows=None):
    cfg = tmp_path / "cluster.toml"
    cfg.write_text(
        f'[cluster]\nname = "lab"\nengine = "prima"\n[model]\npath = "{model}"\n'
        + (f"layer_windows = {windows}\n" if windows else "")
        + '[[node]]\nrank = 0\naddress = "127.0.0.1"\n')
    return cfg


def gguf_string(s):
    return struct.pack("<Q", len(s)) + s.encode()


def gguf(kvs):
    """A GGUF v3 header with the given (key, type, payload) metadata and no tensor data."""
    out = b"GGUF" + struct.pack("<IQQ", 3, 0, len(kvs))
    for key, ty, payload in kvs:
        out += gguf_string(key) + struct.pack("<I", ty) + payload
    return out


ARCH = ("general.architecture", 8, gguf_string("llama"))
BLOCKS = ("llama.block_count", 4, struct.pack("<I", 30))


def test_check_config_reads_the_real_model(tmp_path):
    model = _env_path("SMOLLM2_GGUF")
    r = agent("check-config", str(config_with_model(tmp_path, model, "[30]")))
    assert r.returncode == 0, r.stderr
    assert "30 layers" in r.stdout, r.stdout
    # Half a download: the header is whole, the tensor data is not.
    half = tmp_path / "half.gguf"
    with open(model, "rb") as src, open(half, "wb") as dst:
        dst.write(src.read(os.path.getsize(model) // 2))
    r = agent("check-config", str(config_with_model(tmp_path, half)))
    assert r.returncode != 0, r.stdout
    assert f"model {half}: truncated" in r.stderr, r.stderr


def test_check_config_notes_a_model_that_is_not_on_this_machine(tmp_path):
    missing = tmp_path / "elsewhere.gguf"
    r = agent("check-config", str(config_with_model(tmp_path, missing, "[30]")))
    assert r.returncode == 0, r.stderr
    assert f"note: model {missing} is not on this machine" in r.stdout, r.stdout


# Exit status: 1 today; a config error becomes 2 with the exit-code work (issue 8, item 8), so
# these only require "not success" plus the message.
@pytest.mark.parametrize("kind", ["empty", "zip", "truncated", "directory"])
def test_check_config_refuses_a_model_file_that_is_not_a_gguf(tmp_path, kind):
    model = tmp_path / "m.gguf"
    if kind == "empty":
        model.write_bytes(b"")
        expected = "is empty"
    elif kind == "zip":
        with zipfile.ZipFile(model, "w") as z:
            z.writestr("weights.bin", b"\0" * 64)
        expected = "not a GGUF file (starts with PK\\x03\\x04, a zip archive?)"
    elif kind == "truncated":
        model.write_bytes(gguf([ARCH, BLOCKS])[:30])
        expected = "truncated after 30 bytes"
    else:
        model.mkdir()
        expected = "is a directory"
    r = agent("check-config", str(config_with_model(tmp_path, model)))
    assert r.returncode != 0, r.stdout
    assert f"model {model}: {expected}" in r.stderr, r.stderr


@pytest.mark.parametrize("depth", [50_000, 150_000])
def test_check_config_survives_deeply_nested_arrays(tmp_path, depth):
    # Arrays of arrays, `depth` levels, 12 bytes a level; the innermost is an empty u32 array.
    nested = struct.pack("<IQ", 9, 1) * (depth - 1) + struct.pack("<IQ", 4, 0)
    model = tmp_path / "deep.gguf"
    model.write_bytes(gguf([ARCH, ("evil.nested", 9, nested), BLOCKS]))
    r = agent("check-config", str(config_with_model(tmp_path, model, "[30]")))
    assert r.returncode > 0, f"exit {r.returncode} (negative: killed by a signal)\n{r.stdout}{r.stderr}"
    assert "evil.nested" in r.stderr and "nested deeper than" in r.stderr, r.stderr


def test_help_names_every_command():
    out = agent("--help").stdout
    for cmd in ("run", "check-config", "up", "tune", "completions", "manpage"):
        assert f"  {cmd}" in out, out
