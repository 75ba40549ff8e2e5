"""A 3-host ring under systemd with mutual TLS on the control plane, and a packet capture on the
lab's bridge (tcpdump, on the machine) while it starts and serves: the capture holds TLS
control traffic and not one copy of the control token. The certificates are made the way an
operator makes them, with `llm-agent pki init` / `pki issue rankN` on one machine (here the
machine running the test, as the Ansible controller does), then copied to each host with the
config (keys mode 0600). A second capture, of one plaintext request the test itself sends,
shows that the method sees a token that crosses the wire: that is what every control request
looked like before. Without TLS support the agents refuse the config ([tls] is unknown) and
the ring never serves.
"""

import re
import shutil
import signal
import socket
import ssl
import subprocess
import time

import pytest

from hosts import Lab, http
from test_ring_systemd import API_KEY, REPO, TOKEN, _need, config_text


def capture(bridge, pcap):
    """tcpdump on the bridge, full packets, each delivered and written as it comes
    (--immediate-mode, -U), so stopping it loses none."""
    tcpdump = shutil.which("tcpdump")
    if not tcpdump:
        pytest.fail("tcpdump is not installed (a test dependency: .ci/run installs it)")
    p = subprocess.Popen([tcpdump, "-i", bridge, "-w", str(pcap), "-U", "--immediate-mode",
                          "-s", "0", "-n", "tcp"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while not (pcap.exists() and pcap.stat().st_size > 0):  # the pcap header: listening
        assert p.poll() is None, p.stderr.read().decode()
        assert time.monotonic() < deadline, "tcpdump did not start"
        time.sleep(0.05)
    return p


def stop(p):
    time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    p.wait(timeout=10)


def packets(pcap, bpf):
    r = subprocess.run(["tcpdump", "-r", str(pcap), "-nn", bpf], capture_output=True, text=True)
    return len(r.stdout.splitlines())


def test_a_tls_ring_serves_and_the_wire_carries_no_token(tmp_path):
    agent = _need("LLM_AGENT_BIN")
    llama = _need("LLAMA_CPP_DIR")
    model = _need("SMOLLM2_GGUF")
    binds = [(agent, "/opt/llm-agent/llm-agent", True), (llama, "/opt/llama", True),
             (model.parent, "/opt/models", True)]
    with Lab(3, binds=binds) as lab:
        config = config_text(lab, model) + "\n[tls]\n"
        (tmp_path / "cluster.toml").write_text(config)
        pki = tmp_path / "pki"
        for args in (["init"], *[["issue", f"rank{h.index}"] for h in lab.hosts]):
            subprocess.run([str(agent), "pki", *args, "--config", str(tmp_path / "cluster.toml"),
                            "--dir", str(pki)], check=True, capture_output=True, text=True)
        unit = (REPO / "packaging/systemd/llm-agent@.service").read_text()
        exec_args = re.search(r"^ExecStart=\S+(.*)$", unit, re.M)[1]
        for h in lab.hosts:
            h.run(["useradd", "--system", "--home-dir", "/var/lib/llm-cluster", "--shell",
                   "/usr/sbin/nologin", "llm-cluster"])
            h.run("install -d -o llm-cluster -g llm-cluster -m 0750 /var/lib/llm-cluster")
            h.write_file("/etc/systemd/system/llm-agent@.service", unit)
            h.write_file("/etc/systemd/system/llm-agent@.service.d/test.conf",
                         f"[Service]\nExecStart=\nExecStart=/opt/llm-agent/llm-agent{exec_args}\n")
            h.write_file("/etc/llm-cluster/cluster.toml", config)
            h.write_file("/etc/llm-cluster/token", TOKEN + "\n", mode=0o600)
            h.write_file("/etc/llm-cluster/api-keys", API_KEY + "\n", mode=0o600)
            # Each node gets the CA certificate and its own certificate and key, nothing else.
            h.write_file("/etc/llm-cluster/pki/ca.crt", (pki / "ca.crt").read_bytes())
            for ext, mode in (("crt", 0o644), ("key", 0o600)):
                h.write_file(f"/etc/llm-cluster/pki/rank{h.index}.{ext}",
                             (pki / f"rank{h.index}.{ext}").read_bytes(), mode=mode)
            r = h.run(["/opt/llm-agent/llm-agent", "check-config", "/etc/llm-cluster/cluster.toml"],
                      check=False)
            assert r.returncode == 0 and f"rank{h.index} (" in r.stdout, r.stdout + r.stderr
            h.systemctl("daemon-reload")

        pcap = tmp_path / "tls.pcap"
        dump = capture(lab.bridge, pcap)
        try:
            for h in lab.hosts:
                h.systemctl("enable", "--now", f"llm-agent@rank{h.index}.service")
            base = f"http://{lab.hosts[0].ip}:8080"
            deadline = time.monotonic() + 180
            served = 0
            while served < 5:
                try:
                    st, _, body = http("POST", f"{base}/v1/chat/completions", {
                        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
                        headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
                    served += st == 200
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    logs = "\n".join(h.journal(f"llm-agent@rank{h.index}.service", 60)
                                     for h in lab.hosts)
                    pytest.fail(f"the TLS ring did not serve within 180 s:\n{logs}")
                time.sleep(0.2)
            # A few long polls and facts rounds cross the wire while it serves.
            time.sleep(6)
            st, _, body = http("GET", f"{base}/api/v1/cluster",
                               headers={"Authorization": f"Bearer {API_KEY}"})
            assert st == 200 and b'"tls"' in body and b"days_left" in body, body[:500]
        finally:
            stop(dump)
            for h in lab.hosts:
                logs = h.journal(f"llm-agent@rank{h.index}.service", 400)
                assert "control plane runs over plain HTTP" not in logs, logs[-2000:]

        data = pcap.read_bytes()
        control = packets(pcap, "tcp port 7700")
        print(f"\n[figure] capture on {lab.bridge} with TLS: {len(data)} bytes, {control} packets "
              f"on the control port, token found: {TOKEN.encode() in data}")
        assert control > 20, f"only {control} control packets captured"
        assert b"\x16\x03" in data, "no TLS record in the capture"
        assert TOKEN.encode() not in data, "the control token crossed the bridge in clear text"
        assert b"/v1/rank" not in data, "a control request crossed the bridge in clear text"

        # A node refuses a client without a certificate at the handshake...
        h1 = lab.hosts[1]
        ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        with pytest.raises(ssl.SSLError) as e:
            with socket.create_connection((h1.ip, 7700), timeout=10) as s:
                with ctx.wrap_socket(s, server_hostname=h1.ip) as t:
                    t.sendall(b"GET /v1/facts HTTP/1.1\r\nhost: x\r\n\r\n")
                    t.recv(100)
        assert "CERTIFICATE_REQUIRED" in str(e.value), e.value
        # ...and what a plaintext request puts on the wire, token and all, is what the method
        # finds: the node answers 400 without reading it.
        plain = tmp_path / "plain.pcap"
        dump = capture(lab.bridge, plain)
        try:
            st, _, body = http("GET", f"http://{h1.ip}:7700/v1/facts",
                               headers={"Authorization": f"Bearer {TOKEN}"})
        finally:
            stop(dump)
        assert st == 400 and b"speaks TLS only" in body, body
        assert TOKEN.encode() in plain.read_bytes(), "the capture does not see plaintext bytes"
        for h in lab.hosts:
            h.systemctl("stop", f"llm-agent@rank{h.index}.service", check=False)
