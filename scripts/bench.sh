#!/usr/bin/env bash
# Benchmarks a local 3-rank ring (release build): time to first token, coordinator overhead on
# tok/s, and recovery time after a killed rank. Prints one JSON line per engine.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${LLM_CLUSTER_CACHE:-$HOME/.cache/llm-cluster}
eval "$(bash scripts/fetch-deps.sh)"
export LLAMA_CPP_DIR SMOLLM2_GGUF
cargo build --release --locked -q
export LLM_AGENT_BIN=$PWD/target/release/llm-agent
VENV=$CACHE/venv-e2e
[ -x "$VENV/bin/python" ] || { python3 -m venv "$VENV"; "$VENV/bin/pip" install -q -r tests/requirements.txt; }
exec "$VENV/bin/python" bench/bench_local.py
