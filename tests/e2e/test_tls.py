"""Mutual TLS on the control plane of a real local ring (`up --local` makes a throwaway CA in
its state dir): a node agent completes a handshake only with a client whose certificate the
cluster CA signed, a client without one or with one from another CA is refused at the TLS
handshake (no HTTP is ever read), a plaintext HTTP request gets a 400 saying the port speaks TLS
only, the token is still required behind the certificate, and the ring serves end to end.
Before, the node API was plain HTTP: every assertion on a refusal fails there, and the state
dir had no CA. Port offset 1900."""

import re
import subprocess
import time

import pytest
import requests

from conftest import Cluster, _env_path

OFFSET = 1900
NODE = 17700 + OFFSET + 1  # rank 1's agent


@pytest.fixture(scope="module")
def tls_ring(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tls")
    cluster = Cluster("llama-rpc", _env_path("LLAMA_CPP_DIR"), _env_path("SMOLLM2_GGUF"), OFFSET, tmp)
    with cluster.serving() as c:
        c.state = tmp / "state-llama-rpc"
        c.pki = c.state / "pki"
        c.token = (c.state / "token").read_text().strip()
        yield c


def url(path="/v1/facts"):
    return f"https://127.0.0.1:{NODE}{path}"


def refusal(exc_info):
    return str(exc_info.value)


def log_since(cluster, start, needles=()):
    """The agents' log after `start`; with `needles`, waits (up to 10 s) until they are all in
    it: the agent logs a refused handshake just after it has sent the alert the client sees."""
    deadline = time.monotonic() + 10
    while True:
        log = cluster.log_path.read_text(errors="replace")[start:]
        if all(n in log for n in needles) or time.monotonic() > deadline:
            return log
        time.sleep(0.1)


def test_the_ring_serves_end_to_end_over_mutual_tls(tls_ring):
    r = requests.post(f"{tls_ring.base}/v1/chat/completions", timeout=60,
                      json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"]
    st = tls_ring.status()
    for n in st["nodes"]:
        tls = n["facts"]["tls"]
        assert tls["cert"]["path"].endswith(f"rank{n['rank']}.crt"), tls
        assert tls["cert"]["days_left"] >= 300 and tls["ca"]["days_left"] >= 3000, tls
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", tls["cert"]["not_after"]), tls
    assert not [w for w in st["warnings"] if "certificate" in w], st["warnings"]


def test_a_client_of_the_cluster_ca_still_needs_the_token(tls_ring):
    cert = (str(tls_ring.pki / "rank0.crt"), str(tls_ring.pki / "rank0.key"))
    ca = str(tls_ring.pki / "ca.crt")
    r = requests.get(url(), cert=cert, verify=ca, timeout=10)
    assert r.status_code == 401, r.text
    r = requests.get(url(), cert=cert, verify=ca, timeout=10,
                     headers={"Authorization": f"Bearer {tls_ring.token}"})
    assert r.status_code == 200 and r.json()["rank"] == 1, r.text


def test_a_client_without_a_certificate_is_refused_at_the_handshake(tls_ring):
    start = len(tls_ring.log_path.read_text(errors="replace"))
    with pytest.raises(requests.exceptions.SSLError) as e:
        requests.get(url(), verify=str(tls_ring.pki / "ca.crt"), timeout=10,
                     headers={"Authorization": f"Bearer {tls_ring.token}"})
    print(f"\n[refusal] no client certificate: {refusal(e)}")
    assert "CERTIFICATE_REQUIRED" in refusal(e).upper().replace(" ", "_"), refusal(e)
    log = log_since(tls_ring, start, ("control connection refused", "peer sent no certificates"))
    assert "control connection refused" in log and "peer sent no certificates" in log, log[-2000:]


def test_a_client_with_a_certificate_from_another_ca_is_refused_at_the_handshake(tls_ring, tmp_path):
    other = tmp_path / "other-pki"
    agent = str(_env_path("LLM_AGENT_BIN"))
    config = str(tls_ring.state / "cluster.toml")
    for args in (["pki", "init"], ["pki", "issue", "rank0"]):
        r = subprocess.run([agent, *args, "--config", config, "--dir", str(other)],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
    # Same cluster name, same address, same file names: only the CA differs.
    start = len(tls_ring.log_path.read_text(errors="replace"))
    with pytest.raises(requests.exceptions.SSLError) as e:
        requests.get(url(), cert=(str(other / "rank0.crt"), str(other / "rank0.key")),
                     verify=str(tls_ring.pki / "ca.crt"), timeout=10,
                     headers={"Authorization": f"Bearer {tls_ring.token}"})
    print(f"\n[refusal] certificate from another CA: {refusal(e)}")
    assert "UNKNOWN_CA" in refusal(e).upper().replace(" ", "_"), refusal(e)
    log = log_since(tls_ring, start, ("control connection refused", "UnknownIssuer"))
    assert "control connection refused" in log and "UnknownIssuer" in log, log[-2000:]
    # And the other way round: a client that trusts only the other CA refuses the node.
    with pytest.raises(requests.exceptions.SSLError) as e:
        requests.get(url(), cert=(str(other / "rank0.crt"), str(other / "rank0.key")),
                     verify=str(other / "ca.crt"), timeout=10)
    assert "CERTIFICATE_VERIFY_FAILED" in refusal(e), refusal(e)


def test_a_plaintext_request_to_a_node_port_is_refused_unread(tls_ring):
    start = len(tls_ring.log_path.read_text(errors="replace"))
    r = requests.get(f"http://127.0.0.1:{NODE}/v1/facts", timeout=10,
                     headers={"Authorization": f"Bearer {tls_ring.token}"})
    print(f"\n[refusal] plaintext HTTP: {r.status_code} {r.text}")
    assert r.status_code == 400, r.text
    assert "speaks TLS only" in r.json()["error"], r.text
    log = log_since(tls_ring, start, ("plaintext HTTP refused",))
    assert "plaintext HTTP refused" in log, log[-2000:]
    # The ring is unaffected by all of the above.
    assert tls_ring.status()["phase"] == "serving"
