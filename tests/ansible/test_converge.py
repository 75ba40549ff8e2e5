"""`ansible-playbook site.yml` against three real systemd hosts, reached over ssh.

The hosts come from the systemd-hosts harness (tests/systemd/hosts.py): systemd-nspawn
containers booting this machine's systemd, each in its own network namespace on a bridge. Each
gets Debian's sshd (the machine's /usr) with a throwaway root key. The playbook converges every
role except package installation (the hosts are Debian, not Arch): the agent and llama.cpp are
bind-mounted under /opt, the model is copied by the model role to rank 0 only (llama-rpc), and
the services role starts `llm-agent@rankN`, waits for /readyz and gets a chat completion.
A second run must report changed=0 on every host.
"""

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ansible_tools import ansible_tool
from hosts import Lab, http  # tests/systemd, on sys.path through conftest.py

REPO = Path(__file__).resolve().parents[2]
PLAYBOOK = REPO / "ansible" / "site.yml"
API_KEY = "sk-ansible-test"
RECAP = re.compile(r"^(\S+)\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)"
                   r"\s+skipped=(\d+)", re.M)

SSHD_CONFIG = """\
# sshd for tests/ansible: root with a throwaway key, nothing else.
ListenAddress {ip}
HostKey /etc/ssh/ssh_host_ed25519_key
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
AuthorizedKeysFile .ssh/authorized_keys
PrintMotd no
Subsystem sftp /usr/lib/openssh/sftp-server
"""


def _need(name):
    v = os.environ.get(name)
    if not v or not Path(v).exists():
        pytest.fail(f"{name} is not set or missing: run through scripts/check-ansible.sh")
    return Path(v)


def start_sshd(host, pubkey):
    """Debian's ssh.service inside a host: unmasked, host key, root's authorized_keys."""
    # The harness masks ssh.service (a symlink to /dev/null in the skeleton); the overlay takes
    # the removal. The skeleton's passwd predates openssh-server: add its privsep user.
    host.run("rm -f /etc/systemd/system/ssh.service")
    host.run("getent passwd sshd >/dev/null || useradd --system --no-create-home "
             "--home-dir /run/sshd --shell /usr/sbin/nologin sshd")
    host.run("install -d -m 0755 /etc/ssh && "
             "ssh-keygen -q -t ed25519 -N '' -f /etc/ssh/ssh_host_ed25519_key")
    host.write_file("/etc/ssh/sshd_config", SSHD_CONFIG.format(ip=host.ip))
    host.run("install -d -m 0700 /root/.ssh")
    host.write_file("/root/.ssh/authorized_keys", pubkey, mode=0o600)
    host.systemctl("daemon-reload")
    host.systemctl("start", "ssh.service")


def write_inventory(path, lab, key, model):
    node_vars = {
        "ansible_user": "root",
        "ansible_ssh_private_key_file": str(key),
        "ansible_ssh_common_args": "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
                                   "-o LogLevel=ERROR",
        "ansible_python_interpreter": "/usr/bin/python3",
        # Debian hosts: no Arch packages. What they would install comes from /opt (bind mounts).
        "llm_cluster_install_packages": False,
        "llm_agent_bin": "/opt/llm-agent/llm-agent",
        "llm_engine_dir": "/opt/llama",
        "llm_cluster_name": "ansible-test",
        "llm_engine": "llama-rpc",
        "llm_model_src": str(model),
        "llm_model_path": f"/var/lib/llm-cluster/models/{model.name}",
        "llm_model_name": "smollm2",
        "llm_model_ctx_size": 1024,
        "llm_threads": 1,
        "llm_api_keys": [API_KEY],
        "llm_ready_timeout_s": 120,
        "llm_backoff_initial_ms": 500,
        "llm_backoff_max_ms": 5000,
    }
    inventory = {"all": {"children": {"llm_nodes": {
        "hosts": {f"node{h.index}": {"ansible_host": h.ip, "llm_rank": h.index} for h in lab.hosts},
        "vars": node_vars}}}}
    # JSON is YAML: the yaml inventory plugin reads it.
    path.write_text(json.dumps(inventory, indent=2) + "\n")


def run_playbook(inventory, tmp, *extra):
    env = dict(os.environ, ANSIBLE_CONFIG=str(REPO / "ansible" / "ansible.cfg"),
               ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0", ANSIBLE_HOST_KEY_CHECKING="False",
               ANSIBLE_LOCAL_TEMP=str(tmp / "ansible-local"),
               ANSIBLE_SSH_CONTROL_PATH_DIR=str(tmp / "cp"),
               ANSIBLE_CALLBACKS_ENABLED="ansible.posix.profile_tasks",
               PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    t0 = time.monotonic()
    r = subprocess.run([ansible_tool("ansible-playbook"), "-i", str(inventory), str(PLAYBOOK),
                        *extra], cwd=REPO / "ansible", env=env, text=True,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=900)
    return r, time.monotonic() - t0


def close_ssh_masters(control_dir):
    """End the ssh master connections (ControlPersist) this test's ansible runs left."""
    for sock in sorted(control_dir.glob("*")) if control_dir.is_dir() else ():
        subprocess.run(["ssh", "-o", f"ControlPath={sock}", "-O", "exit", "unused"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=10, check=False)


def recap(output):
    """PLAY RECAP's text and per host counts (profile_tasks' TASKS RECAP follows it)."""
    section = output[output.rfind("PLAY RECAP"):]
    section = section.split("TASKS RECAP")[0]
    return section.rstrip(), {m[0]: {"ok": int(m[1]), "changed": int(m[2]),
                                     "unreachable": int(m[3]), "failed": int(m[4]),
                                     "skipped": int(m[5])}
                              for m in RECAP.findall(section)}


def slowest_tasks(output, n=5):
    """The n slowest tasks as profile_tasks lists them after TASKS RECAP."""
    section = output[output.rfind("TASKS RECAP"):]
    return [l for l in section.splitlines() if re.search(r" -+ [0-9.]+s$", l)][:n]


def diagnose(lab, output):
    journals = "\n".join(f"--- {h.name} llm-agent@rank{h.index}:\n"
                         + h.journal(f"llm-agent@rank{h.index}.service", 40) for h in lab.hosts)
    return f"{output[-12000:]}\n{journals}"


@pytest.fixture(scope="module")
def converged(tmp_path_factory):
    agent = _need("LLM_AGENT_BIN")
    llama = _need("LLAMA_CPP_DIR")
    model = _need("SMOLLM2_GGUF")
    tmp = tmp_path_factory.mktemp("ansible")
    key = tmp / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "llm-cluster-ansible-test",
                    "-f", str(key)], check=True)
    binds = [(agent, "/opt/llm-agent/llm-agent", True), (llama, "/opt/llama", True)]
    with Lab(3, binds=binds) as lab:
        try:
            for h in lab.hosts:
                start_sshd(h, (tmp / "id_ed25519.pub").read_text())
            for h in lab.hosts:
                h.wait_listening(22)
            inventory = tmp / "inventory.yml"
            write_inventory(inventory, lab, key, model)

            first, seconds = run_playbook(inventory, tmp)
            (tmp / "first-run.log").write_text(first.stdout)
            if first.returncode != 0:
                pytest.fail(f"the first ansible-playbook run failed ({first.returncode}):\n"
                            + diagnose(lab, first.stdout))
            print(f"\n[figure] ansible converge: {seconds:.1f} s (3 hosts, every role but packages, "
                  f"up to a served chat completion)")
            print("  slowest tasks:\n" + "\n".join(f"    {l}" for l in slowest_tasks(first.stdout)))
            _, first_recap = recap(first.stdout)
            second, seconds2 = run_playbook(inventory, tmp)
            (tmp / "second-run.log").write_text(second.stdout)
            text, second_recap = recap(second.stdout)
            print(f"[figure] ansible second run: {seconds2:.1f} s (logs: {tmp}/first-run.log, "
                  f"second-run.log)\n{text}")
            if second.returncode != 0:
                pytest.fail(f"the second ansible-playbook run failed ({second.returncode}):\n"
                            + diagnose(lab, second.stdout))
            yield {"lab": lab, "tmp": tmp, "inventory": inventory, "model": model,
                   "first": first.stdout, "first_recap": first_recap,
                   "second": second.stdout, "second_recap": second_recap}
        finally:
            for h in lab.hosts:
                h.systemctl("stop", f"llm-agent@rank{h.index}.service", check=False)
            close_ssh_masters(tmp / "cp")


def test_first_run_converges_every_host(converged):
    recaps = converged["first_recap"]
    assert sorted(recaps) == ["node0", "node1", "node2"], recaps
    for host, r in recaps.items():
        assert r["failed"] == 0 and r["unreachable"] == 0, (host, r)
        assert r["changed"] > 0, (host, r)
    out = converged["first"]
    assert "Send one chat completion through the coordinator" in out


def test_second_run_changes_nothing(converged):
    recaps = converged["second_recap"]
    assert sorted(recaps) == ["node0", "node1", "node2"], converged["second"][-6000:]
    changed = {h: r for h, r in recaps.items() if r["changed"] or r["failed"] or r["unreachable"]}
    tasks = re.findall(r"^TASK \[(.+?)\].*\n(?:.*\n)*?changed: \[(\S+?)\]", converged["second"], re.M)
    assert not changed, f"second run not idempotent: {changed}\n{tasks}\n{converged['second'][-8000:]}"


def test_cluster_serves_through_the_coordinator(converged):
    lab = converged["lab"]
    base = f"http://{lab.hosts[0].ip}:8080"
    assert http("GET", f"{base}/readyz")[0] == 200
    code, _, _ = http("POST", f"{base}/v1/chat/completions", {"messages": []})
    assert code == 401, "the API keys file from the inventory is enforced"
    code, _, body = http("POST", f"{base}/v1/chat/completions",
                      {"messages": [{"role": "user", "content": "Name a colour."}],
                       "max_tokens": 8, "temperature": 0},
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    assert code == 200, body
    assert json.loads(body)["choices"][0]["message"]["content"].strip()


def test_files_on_the_nodes(converged):
    lab, model = converged["lab"], converged["model"]
    configs = {h.read_file("/etc/llm-cluster/cluster.toml") for h in lab.hosts}
    assert len(configs) == 1, "cluster.toml differs between nodes"
    config = configs.pop()
    sha = hashlib.sha256(model.read_bytes()).hexdigest()
    assert f'sha256 = "{sha}"' in config
    for h in lab.hosts:
        assert f'address = "{h.ip}"' in config
    # One token, generated once on the controller next to the inventory, root-only on the nodes.
    token = (converged["tmp"] / "credentials" / "llm-cluster-token").read_text().strip()
    assert len(token) == 43
    for h in lab.hosts:
        assert h.read_file("/etc/llm-cluster/token").strip() == token
        assert h.run(["stat", "-c", "%a %U", "/etc/llm-cluster/token"]).stdout.split() == ["600", "root"]
        assert h.run(["stat", "-c", "%a", "/etc/llm-cluster"]).stdout.strip() == "750"
        assert h.run(["systemctl", "is-enabled", f"llm-agent@rank{h.index}.service"]).stdout.strip() == "enabled"
    # Mutual TLS: the CA made on the controller, its key never on a node; each node holds the CA
    # certificate and its own certificate and key (0600, root's), which check-config accepts.
    assert "\n[tls]\n" in config
    pki = converged["tmp"] / "credentials" / "pki"
    assert (pki / "ca.key").exists()
    for h in lab.hosts:
        files = h.run(["ls", "/etc/llm-cluster/pki"]).stdout.split()
        assert sorted(files) == sorted(["ca.crt", f"rank{h.index}.crt", f"rank{h.index}.key"]), files
        assert h.read_file("/etc/llm-cluster/pki/ca.crt") == (pki / "ca.crt").read_text()
        key = f"/etc/llm-cluster/pki/rank{h.index}.key"
        assert h.run(["stat", "-c", "%a %U", key]).stdout.split() == ["600", "root"]
        r = h.run(["/opt/llm-agent/llm-agent", "check-config", "/etc/llm-cluster/cluster.toml"])
        assert f"rank{h.index} (" in r.stdout and "plain HTTP" not in r.stderr, r.stdout + r.stderr
    # llama-rpc: the model on rank 0 only, readable by the rank user.
    path = f"/var/lib/llm-cluster/models/{model.name}"
    owner = lab.hosts[0].run(["stat", "-c", "%U %a", path]).stdout.split()
    assert owner == ["llm-cluster", "644"]
    assert lab.hosts[0].run(["sha256sum", path]).stdout.split()[0] == sha
    for h in lab.hosts[1:]:
        assert h.run(["test", "-e", path], check=False).returncode == 1


def packaged_sysctls():
    """(key, value) of sysctl.d/99-llm-net.conf: the values are said there only."""
    pairs = []
    for line in (REPO / "sysctl.d/99-llm-net.conf").read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";")):
            k, v = line.split("=", 1)
            pairs.append((k.strip().lstrip("-"), " ".join(v.split())))
    assert pairs, "no settings in sysctl.d/99-llm-net.conf"
    return pairs


def test_network_tuning_only_where_settable(converged):
    lab = converged["lab"]
    h = lab.hosts[1]
    text = h.read_file("/etc/sysctl.d/99-llm-net.conf")
    in_file = dict(l.split("=", 1) for l in text.splitlines() if "=" in l and not l.startswith("#"))
    in_file = {k.strip(): " ".join(v.split()) for k, v in in_file.items()}
    r = h.run(["/opt/llm-agent/llm-agent", "tune", "--check", "--json"], check=False)
    states = {k["key"]: k["state"] for k in json.loads(r.stdout)["keys"]}
    unsettable = []
    for key, want in packaged_sysctls():
        path = "/proc/sys/" + key.replace(".", "/")
        if h.run(["test", "-w", path], check=False).returncode != 0:
            # Absent, or host-wide and read-only in a container's network namespace. Unless the
            # machine's own value already meets the floor (then it is in effect and persisted),
            # it is reported by the role and not written to the file.
            unsettable.append(key)
            if states.get(key) == "already_set":
                assert in_file.get(key) == " ".join(h.sysctl(key).split()), (key, text)
                continue
            assert key not in in_file, (key, text)
            assert re.search(rf"{re.escape(key)}: (not_settable|unsupported)", converged["first"]), key
            continue
        # Settable here: in effect, and in the file with the value in effect. A value may only
        # differ from the wanted one by being larger in every field (buffer sizes are floors).
        now = " ".join(h.sysctl(key).split())
        assert in_file.get(key) == now, (key, in_file.get(key), now)
        if now != want:
            pairs = list(zip(now.split(), want.split()))
            assert len(now.split()) == len(want.split()) and all(
                n.isdigit() and w.isdigit() and int(n) >= int(w) for n, w in pairs), (key, now, want)
    assert unsettable, "a container's network namespace has read-only host-wide keys"
    # The agent agrees: every key it can set is in effect (exit 3: the unsettable ones that are
    # not already in effect).
    assert r.returncode == 3, r.stdout + r.stderr
    assert {k for k, s in states.items() if s != "already_set"} <= set(unsettable), states


def test_changed_config_restarts_the_agents_and_serves_again(converged):
    lab = converged["lab"]
    pids = {h.index: h.unit_property(f"llm-agent@rank{h.index}.service", "MainPID") for h in lab.hosts}
    r, seconds = run_playbook(converged["inventory"], converged["tmp"], "-e", "llm_model_ctx_size=2048")
    (converged["tmp"] / "third-run.log").write_text(r.stdout)
    print(f"\n[figure] ansible run with a changed cluster.toml (agents restarted): {seconds:.1f} s")
    assert r.returncode == 0, diagnose(lab, r.stdout)
    _, recaps = recap(r.stdout)
    assert all(x["changed"] > 0 and x["failed"] == 0 for x in recaps.values()), recaps
    assert "RUNNING HANDLER [llm : Restart llm-agent]" in r.stdout
    for h in lab.hosts:
        assert "ctx_size = 2048" in h.read_file("/etc/llm-cluster/cluster.toml")
        after = h.unit_property(f"llm-agent@rank{h.index}.service", "MainPID")
        assert after != pids[h.index], f"llm-agent@rank{h.index} was not restarted"
    # The playbook's own check (readyz + chat completion) passed; and from here too:
    code, _, body = http("POST", f"http://{lab.hosts[0].ip}:8080/v1/chat/completions",
                      {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    assert code == 200, body
