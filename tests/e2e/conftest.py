"""Fixtures for end-to-end tests: a real local cluster (`llm-agent up --local 3`) on a real
engine with a real model, and a single-process server of the same engine as the reference.

Inputs come from the environment (scripts/test.sh sets them from scripts/fetch-deps.sh):
  LLM_AGENT_BIN   the llm-agent binary
  SMOLLM2_GGUF    the SmolLM2-135M GGUF
  LLAMA_CPP_DIR   directory with llama-server and ggml-rpc-server
  PRIMA_CPP_DIR   optional: directory with prima.cpp's server and worker binaries
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests


def _env_path(name):
    value = os.environ.get(name)
    if not value:
        pytest.fail(f"{name} is not set: run the suite through scripts/test.sh")
    p = Path(value)
    if not p.exists():
        pytest.fail(f"{name}={value} does not exist")
    return p


def wait_until(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except requests.RequestException as e:  # not up yet
            last = e
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last})")


def port_free(port):
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


class Cluster:
    """A running `llm-agent up --local N`, stopped with SIGINT like a person's Ctrl-C."""

    def __init__(self, engine, engine_dir, model, offset, tmp, extra=()):
        self.engine = engine
        self.offset = offset
        self.api_port = 18500 + offset
        self.base = f"http://127.0.0.1:{self.api_port}"
        self.engine_port = 18080 + offset
        self.log_path = tmp / f"up-{engine}.log"
        self.stdout_path = tmp / f"up-{engine}.out"
        cmd = [
            str(_env_path("LLM_AGENT_BIN")), "up", "--local", "3",
            "--engine", engine, "--model", str(model), "--engine-dir", str(engine_dir),
            "--listen", f"127.0.0.1:{self.api_port}", "--port-offset", str(offset),
            "--ctx-size", "1024", "--threads", "1", "--state-dir", str(tmp / f"state-{engine}"),
            *extra,
        ]
        for p in (self.api_port, self.engine_port):
            assert port_free(p), f"port {p} is already in use on 127.0.0.1"
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            cmd, stdout=open(self.stdout_path, "w"), stderr=open(self.log_path, "w"),
            env={**os.environ, "RUST_LOG": "info,engine=info"}, start_new_session=True,
        )

    def wait_serving(self, timeout=180):
        def ready():
            assert self.proc.poll() is None, f"llm-agent exited early:\n{self.log_path.read_text()[-3000:]}"
            return requests.get(f"{self.base}/readyz", timeout=2).status_code == 200
        wait_until(ready, timeout, "the ring to serve")

    @contextlib.contextmanager
    def serving(self, timeout=180):
        """This cluster once it serves, for a fixture to yield; its log is printed when starting
        it fails, and it is stopped in any case."""
        try:
            self.wait_serving(timeout)
            yield self
        except Exception:
            print(self.log_tail())
            raise
        finally:
            self.stop()

    def status(self):
        return requests.get(f"{self.base}/api/v1/cluster", timeout=5).json()

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                raise AssertionError("llm-agent did not stop within 40 s of SIGINT")

    def stdout(self):
        return self.stdout_path.read_text()

    def log_tail(self, n=4000):
        return self.log_path.read_text()[-n:]


class ReferenceServer:
    """The same engine as one plain process: what the ring's answers must equal."""

    def __init__(self, binary, model, port, tmp, name):
        self.base = f"http://127.0.0.1:{port}"
        assert port_free(port), f"port {port} is already in use"
        self.log = tmp / f"reference-{name}.log"
        self.proc = subprocess.Popen(
            [str(binary), "-m", str(model), "-c", "1024", "-t", "1", "-ngl", "0",
             "--host", "127.0.0.1", "--port", str(port)],
            stdout=open(self.log, "w"), stderr=subprocess.STDOUT, cwd=tmp, start_new_session=True,
        )
        wait_until(lambda: requests.get(f"{self.base}/health", timeout=2).status_code == 200,
                   120, f"reference {name} server")

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def _engine_params():
    prima = os.environ.get("PRIMA_CPP_DIR")
    prima_mark = pytest.mark.skipif(
        not prima,
        reason="PRIMA_CPP_DIR is not set: prima.cpp end-to-end tests SKIPPED "
               "(point it at a directory with prima.cpp's llama-server/llama-cli or prima-server/prima-cli)",
    )
    return [pytest.param("llama-rpc", id="llama-rpc"),
            pytest.param("prima", id="prima", marks=prima_mark)]


@pytest.fixture(scope="module", params=_engine_params())
def ring(request, tmp_path_factory):
    """A serving 3-rank local ring plus a reference server of the same engine."""
    engine = request.param
    tmp = tmp_path_factory.mktemp(f"ring-{engine}")
    model = _env_path("SMOLLM2_GGUF")
    if engine == "llama-rpc":
        engine_dir = _env_path("LLAMA_CPP_DIR")
        offset, extra = 1000, ()
        server_bin = engine_dir / "llama-server"
    else:
        engine_dir = _env_path("PRIMA_CPP_DIR")
        offset, extra = 2000, ("--layer-windows", "10,10,10")
        server_bin = next(p for p in (engine_dir / "prima-server", engine_dir / "llama-server") if p.exists())
    cluster = Cluster(engine, engine_dir, model, offset, tmp, extra)
    reference = None
    try:
        cluster.wait_serving()
        reference = ReferenceServer(server_bin, model, 28080 + offset, tmp, engine)
        yield cluster, reference
    except Exception:
        print(cluster.log_tail())
        raise
    finally:
        if reference:
            reference.stop()
        cluster.stop()
        # Engine processes run with their state dir as cwd, not in argv: check their ports.
        for port in (cluster.engine_port, 50053 + offset, 50054 + offset, 9000 + offset, 9001 + offset):
            assert port_free(port), f"port {port} still open after the cluster stopped"


def sse_events(resp):
    """Parses an SSE response into JSON payloads (stopping at [DONE])."""
    for raw in resp.iter_lines():
        if not raw or not raw.startswith(b"data: "):
            continue
        data = raw[len(b"data: "):]
        if data == b"[DONE]":
            return
        yield json.loads(data)


@pytest.fixture(scope="session")
def smollm2_q8(tmp_path_factory):
    """A Q8_0 copy of SmolLM2 (prima's profiler rejects its Q4_1 weights), made in seconds."""
    from q8 import make_q8
    return make_q8(_env_path("SMOLLM2_GGUF"), tmp_path_factory.mktemp("models") / "smollm2-q8.gguf")


@pytest.fixture
def small_disk(tmp_path):
    """A 40 MiB tmpfs, too small for the 98 MB test model (for a node without room)."""
    d = tmp_path / "small"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(d)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {r.stderr.strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)
