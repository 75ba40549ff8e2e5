#!/usr/bin/env bash
# Benchmarks a local 3-rank ring (release build). Figures, not pass/fail.
#   scripts/bench.sh          time to first token, coordinator overhead on tok/s, recovery time
#                             after a killed rank; one JSON line per engine (bench/bench_local.py)
#   scripts/bench.sh bringup  `up --local 3` to the first token vs the same engines launched by
#                             hand, alternating in one run; prints the ratio (bench/bringup.py)
#   scripts/bench.sh gateway [speed|limits]
#                             direct vs coordinator vs nginx latency and throughput, and what slow
#                             and huge requests get, with the agent's memory (bench/gateway.py;
#                             installs Debian's nginx and wrk with apt-get when missing)
#   scripts/bench.sh switch   model switch time between two models (drain, stop, start, first
#                             token), idle and with a request in flight (bench/switch.py)
#   scripts/bench.sh rpc-cache [--rate 100mbit] [--runs 3] [--models smollm2,wide]
#                             llama-rpc ring restart without the rpc tensor cache, with it emptied
#                             and with it filled, on systemd hosts over a tbf-shaped link; root
#                             (bench/rpc_cache.py)
#   scripts/bench.sh deliver [--runs 2] [--quick] [--no-big]
#                             model delivery's transfer rate vs the link rate: a node without
#                             the model fetches it from one that has it, on systemd hosts over
#                             tbf-shaped links (none, 1 Gbit, 100 Mbit) and under
#                             delivery.max_mbit; root (bench/deliver.py)
#   scripts/bench.sh slots    llama-server's slot settings (idle-slot caching, prompt cache, KV
#                             layout): 4 concurrent chats a round through the coordinator, per
#                             variant (bench/slots.py)
#   scripts/bench.sh matrix [bench flags]
#                             `llm-agent bench --matrix`: llama.cpp RPC (and prima.cpp when
#                             PRIMA_CPP_DIR is set; on a Q8_0 copy of the model made with
#                             tests/e2e/q8.py) over 2..4 nodes and 0/5/10/20 ms per link, through
#                             delaying relays; writes bench/results/matrix-<date>.{json,txt,svg}.
#                             Run it in a network namespace of its own when others use the ports.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${LLM_CLUSTER_CACHE:-$HOME/.cache/llm-cluster}
eval "$(bash scripts/fetch-deps.sh)"
export LLAMA_CPP_DIR SMOLLM2_GGUF
cargo build --release --locked -q
export LLM_AGENT_BIN=$PWD/target/release/llm-agent
VENV=$CACHE/venv-e2e
[ -x "$VENV/bin/python" ] || { python3 -m venv "$VENV"; "$VENV/bin/pip" install -q -r tests/requirements.txt; }
case "${1:-local}" in
  local) exec "$VENV/bin/python" bench/bench_local.py ;;
  bringup) exec "$VENV/bin/python" bench/bringup.py ;;
  gateway) shift; exec "$VENV/bin/python" bench/gateway.py "$@" ;;
  switch) exec "$VENV/bin/python" bench/switch.py ;;
  rpc-cache) shift; exec "$VENV/bin/python" bench/rpc_cache.py "$@" ;;
  deliver) shift; exec "$VENV/bin/python" bench/deliver.py "$@" ;;
  slots) exec "$VENV/bin/python" bench/slots.py ;;
  matrix)
    shift
    prima=()
    if [ -n "${PRIMA_CPP_DIR:-}" ]; then
      q8=$CACHE/models/$(basename "$SMOLLM2_GGUF" .gguf).Q8_0-copy.gguf
      [ -s "$q8" ] || "$VENV/bin/python" tests/e2e/q8.py "$SMOLLM2_GGUF" "$q8"
      prima=(--prima-dir "$PRIMA_CPP_DIR" --prima-model-file "$q8")
    fi
    exec "$LLM_AGENT_BIN" bench --matrix --model-file "$SMOLLM2_GGUF" --llama-dir "$LLAMA_CPP_DIR" \
      "${prima[@]}" "$@" ;;
  *) echo "usage: scripts/bench.sh [local|bringup|gateway [speed|limits]|slots|rpc-cache [...]|deliver [...]|matrix [bench flags]|switch]" >&2; exit 2 ;;
esac
