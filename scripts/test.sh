#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit tests, then end-to-end tests on a real local
# ring (llama.cpp RPC always; prima.cpp when PRIMA_CPP_DIR points at its binaries).
# Fetches and caches what it needs (scripts/fetch-deps.sh); safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${LLM_CLUSTER_CACHE:-$HOME/.cache/llm-cluster}

step() { printf '\n==> %s\n' "$*"; }

step "fetching engines and the test model (cached under $CACHE)"
eval "$(bash scripts/fetch-deps.sh)"
export LLAMA_CPP_DIR LLAMA_CPP_REBUILT_DIR SMOLLM2_GGUF

step "cargo fmt --check"
cargo fmt --all -- --check
step "cargo clippy -D warnings"
cargo clippy --all-targets --locked -- -D warnings
step "unit tests"
cargo test --locked
cargo build --locked
export LLM_AGENT_BIN=$PWD/target/debug/llm-agent

step "python tools for the end-to-end tests"
VENV=$CACHE/venv-e2e
if [ ! -x "$VENV/bin/pytest" ] || ! cmp -s tests/requirements.txt "$VENV/requirements.txt"; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q -r tests/requirements.txt
  cp tests/requirements.txt "$VENV/requirements.txt"
fi

step "end-to-end: 3-rank local rings through the coordinator"
if [ -z "${PRIMA_CPP_DIR:-}" ]; then
  echo "note: PRIMA_CPP_DIR is not set; the prima.cpp end-to-end tests will be SKIPPED (llama.cpp RPC runs)"
fi
# The rings' fixed ports (agents 17700+, API 18500+, rpc 50052+ ...) lie in Linux's ephemeral
# range (32768-60999): a client socket or a helper process (chromedriver) that happened to be
# given one would make a rank fail to bind it. As root the suite runs in a network namespace of
# its own (loopback only, like every ring of it), whose ephemeral ports start above them.
if [ "$(id -u)" = 0 ] && unshare --net true 2>/dev/null; then
  unshare --net -- sh -c 'ip link set lo up && sysctl -qw net.ipv4.ip_local_port_range="60000 65000" && exec "$@"' \
    sh "$VENV/bin/pytest" -rs -v -s -p no:cacheprovider tests/e2e
else
  "$VENV/bin/pytest" -rs -v -s -p no:cacheprovider tests/e2e
fi

step "systemd hosts: a 3-host ring under llm-agent@ units (systemd-nspawn)"
if [ "$(id -u)" = 0 ]; then
  "$VENV/bin/pytest" -rs -v -s -p no:cacheprovider tests/systemd
else
  echo "SKIPPED: the systemd-host tests boot containers with systemd-nspawn and need root"
fi

step "Ansible: ansible-lint (production), syntax check, a converge of three systemd hosts over ssh"
bash scripts/check-ansible.sh

step "Arch packages: lint, .SRCINFO, real makepkg build of llm-agent + llm-cluster, contents"
# Without root (to install makepkg) or makepkg on PATH the tests that need it are reported skipped.
"$VENV/bin/pytest" -rs -v -s -p no:cacheprovider tests/packages
