"""The CLI as a person uses it: `check-config` on good and bad files, `--help` naming the commands,
exit statuses that mean something (0 ok, 1 runtime failure, 2 usage or config error, 3 tune: not
every key in effect), and logs without colour codes when they go to a file."""

import json
import os
import re
import pty
import random
import select
import shutil
import signal
import struct
import subprocess
import time
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
    assert r.returncode == 2
    lines = r.stderr.splitlines()
    assert f"{bad}:5:8: model path must be absolute (every node resolves it on its own disk)" in lines
    assert any(l.startswith(f"{bad}:6:17: layer_windows apply to engine = \"prima\" only") for l in lines), lines
    assert any(l.startswith(f"{bad}:12:11: address `nas.local` is not an IP address") for l in lines), lines
    assert any("missing: 1" in l for l in lines), lines
    assert lines[-1] == "4 problem(s) found"
    # A typo in a key is named with the keys that would have been valid.
    bad.write_text(bad.read_text().replace("engine =", "engnie ="))
    r = agent("check-config", str(bad))
    assert r.returncode == 2
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
    assert r.returncode == 2, r.stdout
    assert f"model {half}: truncated" in r.stderr, r.stderr


def test_check_config_notes_a_model_that_is_not_on_this_machine(tmp_path):
    missing = tmp_path / "elsewhere.gguf"
    r = agent("check-config", str(config_with_model(tmp_path, missing, "[30]")))
    assert r.returncode == 0, r.stderr
    assert f"note: model {missing} is not on this machine" in r.stdout, r.stdout


# A model file that is there but is no model is a config error: exit status 2.
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
    assert r.returncode == 2, r.stdout
    assert f"model {model}: {expected}" in r.stderr, r.stderr


@pytest.mark.parametrize("depth", [50_000, 150_000])
def test_check_config_survives_deeply_nested_arrays(tmp_path, depth):
    # Arrays of arrays, `depth` levels, 12 bytes a level; the innermost is an empty u32 array.
    nested = struct.pack("<IQ", 9, 1) * (depth - 1) + struct.pack("<IQ", 4, 0)
    model = tmp_path / "deep.gguf"
    model.write_bytes(gguf([ARCH, ("evil.nested", 9, nested), BLOCKS]))
    r = agent("check-config", str(config_with_model(tmp_path, model, "[30]")))
    assert r.returncode == 2, f"exit {r.returncode} (negative: killed by a signal)\n{r.stdout}{r.stderr}"
    assert "evil.nested" in r.stderr and "nested deeper than" in r.stderr, r.stderr


def test_help_names_every_command():
    out = agent("--help").stdout
    for cmd in ("run", "check-config", "up", "status", "bench", "pki", "notify-upgrade",
                "forget-placement", "tune", "completions", "manpage"):
        assert f"  {cmd}" in out, out


# --- exit statuses ------------------------------------------------------------------------------

def valid_config(tmp_path, token_file):
    """A config that validates, with one node (rank 0) and the given token file."""
    path = tmp_path / "cluster.toml"
    path.write_text(
        f'[cluster]\nname = "exit-test"\nengine = "llama-rpc"\ntoken_file = "{token_file}"\n'
        f'state_dir = "{tmp_path / "state"}"\n'
        f'[model]\npath = "{tmp_path / "m.gguf"}"\n'
        '[[node]]\nrank = 0\naddress = "127.0.0.1"\n')
    return path


def test_exit_status_is_documented_in_help_and_man_page():
    help_text = agent("--help").stdout
    man = agent("manpage").stdout
    assert '.SH "EXIT STATUS"' in man
    for code in ("0", "1", "2", "3"):
        assert f"\n  {code}  " in help_text, help_text
        assert f"\\fB{code}\\fR" in man
    readme = (REPO / "README.md").read_text()
    for line in help_text.split("Exit status:\n", 1)[1].strip().splitlines():
        code, meaning = line.split(None, 1)
        assert f"| {code} | {meaning} |" in readme, f"README's exit status table lacks: {line}"


def test_exit_status_2_for_usage_errors(tmp_path):
    for args in ([], ["no-such-command"], ["run"], ["run", "--node", "head"],
                 ["up", "--local", "0", "--model", "m.gguf"],
                 ["up", "--model", str(tmp_path / "missing.gguf")],
                 ["tune", "--persist"], ["tune", "--check", "--apply"]):
        r = agent(*args)
        assert r.returncode == 2, (args, r.returncode, r.stderr)
        assert r.stderr.strip(), f"{args}: exit 2 without saying why"


def test_exit_status_2_for_config_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[cluster]\nname = "lab"\n')
    for args in (["check-config", str(bad)], ["run", "--config", str(bad), "--node", "0"],
                 ["run", "--config", str(tmp_path / "missing.toml"), "--node", "0"]):
        r = agent(*args)
        assert r.returncode == 2, (args, r.returncode, r.stderr)
        assert str(bad.parent) in r.stderr, r.stderr
    # A config that validates but does not list this node: the unit's instance name is wrong.
    good = valid_config(tmp_path, tmp_path / "token")
    r = agent("run", "--config", str(good), "--node", "rank7")
    assert r.returncode == 2, r.stderr
    assert "no [[node]] with rank = 7" in r.stderr


def test_exit_status_1_for_runtime_failures(tmp_path):
    # The config is fine; the token file it names is not there (yet): retrying may succeed.
    good = valid_config(tmp_path, tmp_path / "token-not-written-yet")
    assert agent("check-config", str(good)).returncode == 0
    r = agent("run", "--config", str(good), "--node", "rank0")
    assert r.returncode == 1, r.stderr
    assert "token-not-written-yet" in r.stderr


def sysctl_conf():
    """(key, value) pairs of the packaged sysctl.d file, as the agent reads them."""
    pairs = []
    for line in (REPO / "sysctl.d/99-llm-net.conf").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";")) and "=" in line:
            k, v = line.split("=", 1)
            pairs.append((k.strip().lstrip("-"), " ".join(v.split())))
    return pairs


def tune_in_fake_proc(fake, etc, *args):
    """`llm-agent tune ARGS` in a mount namespace of its own where /proc/sys is the directory
    `fake` and /etc/sysctl.d is `etc`: the real binary and paths, this machine left alone."""
    script = (f'mount --bind "{fake}" /proc/sys && mount --bind "{etc}" /etc/sysctl.d && '
              f'exec "{os.environ["LLM_AGENT_BIN"]}" tune "$@"')
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
                           "tune", *args], capture_output=True, text=True, timeout=30)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                    reason="needs root and unshare (a private mount namespace)")
def test_tune_exit_status_json_and_persist(tmp_path):
    fake, etc = tmp_path / "proc-sys", tmp_path / "sysctl.d"
    etc.mkdir()
    wanted = sysctl_conf()

    def put(key, value):
        p = fake / key.replace(".", "/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(value.replace(" ", "\t") + "\n")

    for key, value in wanted:
        put(key, value)
    # bbr offered: the agent never needs modprobe here.
    put("net.ipv4.tcp_available_congestion_control", "reno cubic bbr")

    r = tune_in_fake_proc(fake, etc, "--check", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert report["in_effect"] and not report["changed"] and report["persisted"] is None
    assert [k["key"] for k in report["keys"]] == [k for k, _ in wanted]
    assert {k["state"] for k in report["keys"]} == {"already_set"}

    # One floor below its value: check says 3, apply raises it and persists what is in effect.
    floor, value = next((k, v) for k, v in wanted if v.isdigit())
    put(floor, str(int(value) // 2))
    r = tune_in_fake_proc(fake, etc, "--check")
    assert r.returncode == 3, r.stdout + r.stderr
    assert "differs" in r.stdout
    r = tune_in_fake_proc(fake, etc, "--apply", "--persist", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert report["changed"] and report["in_effect"]
    assert report["persisted"] == {"path": "/etc/sysctl.d/99-llm-net.conf", "written": True}
    states = {k["key"]: k["state"] for k in report["keys"]}
    assert states[floor] == "applied"
    persisted = (etc / "99-llm-net.conf").read_text()
    for key, v in wanted:
        assert f"\n{key} = {v}\n" in persisted, persisted

    # Nothing to do: nothing changed, the file is not rewritten.
    r = tune_in_fake_proc(fake, etc, "--apply", "--persist", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert not report["changed"] and report["persisted"]["written"] is False

    # A key this host cannot set: reported, left out of the file, exit 3 (not a failure).
    absent = wanted[-1][0]
    (fake / absent.replace(".", "/")).unlink()
    r = tune_in_fake_proc(fake, etc, "--apply", "--persist", "--json")
    assert r.returncode == 3, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert {k["key"]: k["state"] for k in report["keys"]}[absent] == "not_settable"
    assert report["changed"], "the file lost a key"
    assert absent not in (etc / "99-llm-net.conf").read_text()


# --- logs ---------------------------------------------------------------------------------------

def up_logs(tmp_path, stderr, env_extra):
    """Starts `up --local 1` with its stderr on `stderr` (no engine binaries: only the agents'
    own logs) and NO_COLOR unset unless `env_extra` sets it."""
    offset = random.randint(100, 2000)
    model = tmp_path / "m.gguf"
    model.write_bytes(b"")
    (tmp_path / "engines").mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    env.update({"RUST_LOG": "info", **env_extra})
    proc = subprocess.Popen(
        [os.environ["LLM_AGENT_BIN"], "up", "--local", "1", "--model", str(model),
         "--engine-dir", str(tmp_path / "engines"), "--listen", "127.0.0.1:0",
         "--port-offset", str(offset), "--state-dir", str(tmp_path / f"state-{offset}")],
        stdout=subprocess.DEVNULL, stderr=stderr, env=env)
    return proc


def wait_for(read, needle, proc, timeout=30):
    deadline = time.monotonic() + timeout
    seen = b""
    while needle not in seen:
        assert proc.poll() is None, f"up exited early ({proc.returncode}):\n{seen.decode(errors='replace')}"
        assert time.monotonic() < deadline, f"no {needle!r} within {timeout} s:\n{seen!r}"
        seen += read()
    return seen


def stop(proc):
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_logs_redirected_to_a_file_have_no_colour_codes(tmp_path):
    log = tmp_path / "up.log"
    with open(log, "wb") as f:
        proc = up_logs(tmp_path, f, {})
        try:
            wait_for(lambda: (time.sleep(0.2), log.read_bytes())[1], b"local cluster starting", proc)
        finally:
            stop(proc)
    text = log.read_bytes()
    assert b" INFO " in text, text[:2000]
    assert b"\x1b" not in text, f"escape codes in a log file: {text[:600]!r}"


def pty_logs(tmp_path, env_extra):
    """What `up` writes to stderr when stderr is a terminal (a pseudo-terminal here)."""
    master, slave = pty.openpty()
    proc = up_logs(tmp_path, slave, env_extra)
    os.close(slave)

    def read():
        ready, _, _ = select.select([master], [], [], 0.5)
        return os.read(master, 65536) if ready else b""

    try:
        seen = wait_for(read, b"local cluster starting", proc)
        proc.send_signal(signal.SIGINT)
        # Keep reading while it stops: a full terminal buffer would block its last lines.
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                seen += read()
            except OSError:  # EIO: the terminal's other side is closed
                break
        return seen
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        os.close(master)


def test_logs_on_a_terminal_are_coloured_unless_no_color(tmp_path):
    # Colour is SGR (ESC [ ... m). The progress spinner of `up --local` may also clear its line
    # on a terminal (ESC [ 2K), which is no colour: NO_COLOR leaves it.
    colour = re.compile(rb"\x1b\[[0-9;]*m")
    assert colour.search(pty_logs(tmp_path, {})), "a terminal gets colour"
    plain = pty_logs(tmp_path, {"NO_COLOR": "1"})
    assert b" INFO " in plain
    assert not colour.search(plain), f"NO_COLOR is set: {plain[:600]!r}"
