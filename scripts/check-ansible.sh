#!/usr/bin/env bash
# Checks the Ansible playbook in ansible/ (CI entry point, called by scripts/test.sh):
#   - ansible-lint with the production profile (ansible/.ansible-lint);
#   - ansible-playbook --syntax-check of site.yml with the example inventory;
#   - tests/ansible: a real converge of three systemd hosts over ssh (tests/systemd/hosts.py),
#     a served chat completion, a second run with changed=0 (needs root; skipped otherwise).
# Python tools (tests/ansible/requirements.txt) go into a cached venv, rebuilt when that file
# changes: ~/.cache/llm-cluster/venv-ansible.
# Environment: LLM_AGENT_BIN, LLAMA_CPP_DIR, SMOLLM2_GGUF (exported by scripts/test.sh; found
# here when unset: target/debug/llm-agent and scripts/fetch-deps.sh).
# The output ends with pytest's summary line; the exit status is pytest's (or the lint's).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CACHE=${LLM_CLUSTER_CACHE:-$HOME/.cache/llm-cluster}
VENV=$CACHE/venv-ansible
REQ=tests/ansible/requirements.txt

step() { printf '\n==> %s\n' "$*"; }

step "python tools for the Ansible checks ($VENV)"
if [ ! -x "$VENV/bin/ansible-lint" ] || ! cmp -s "$REQ" "$VENV/requirements.txt"; then
  python3 -m venv "$VENV"
  nice "$VENV/bin/pip" install -q --disable-pip-version-check -r "$REQ"
  cp "$REQ" "$VENV/requirements.txt"
fi
"$VENV/bin/ansible" --version | sed -n 1p
"$VENV/bin/ansible-lint" --nocolor --version 2>/dev/null | sed -n 1p

# The venv's tools first (ansible-lint runs ansible-playbook and ansible-galaxy from PATH).
export PATH="$VENV/bin:$PATH"
export ANSIBLE_NOCOLOR=1 ANSIBLE_FORCE_COLOR=0 NO_COLOR=1

step "ansible-lint (profile: production)"
(cd ansible && nice ansible-lint --nocolor)

step "ansible-playbook --syntax-check"
(cd ansible && ansible-playbook -i inventory.example.yml site.yml --syntax-check)

step "a real converge of three systemd hosts over ssh (tests/ansible)"
if [ -z "${LLM_AGENT_BIN:-}" ] && [ -x target/debug/llm-agent ]; then
  export LLM_AGENT_BIN=$ROOT/target/debug/llm-agent
fi
if [ -z "${LLAMA_CPP_DIR:-}" ] || [ -z "${SMOLLM2_GGUF:-}" ]; then
  eval "$(bash scripts/fetch-deps.sh)"
  export LLAMA_CPP_DIR SMOLLM2_GGUF
fi
exec nice "$VENV/bin/python" -m pytest -rs -v -s -p no:cacheprovider tests/ansible
