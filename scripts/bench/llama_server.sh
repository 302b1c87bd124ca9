#!/usr/bin/env bash
# Start llama.cpp's own C++ server (`llama-server`: continuous batching over
# `-np` slots), the strongest llama.cpp peer to benchmark ferry against with
# `ferry bench serve`. Builds it first when needed, from the llama-cpp-python
# sdist on PyPI (its vendor/llama.cpp tree), with cmake and ninja from PyPI.
#
#   scripts/bench/llama_server.sh MODEL.gguf [PORT] [SLOTS] [HOST]
#   scripts/bench/llama_server.sh --build-only
#
# Environment:
#   LLAMA_BUILD    build directory (default: .llama-server-build)
#   LLAMA_VERSION  llama-cpp-python sdist version (default: 0.3.36)
#   LLAMA_THREADS  threads for decode and prompt (default: 2)
#   LLAMA_CTX      context per slot (default: 2048; the server gets SLOTS times it)
#   MODEL_ALIAS    model name the server reports and accepts (default: file name)
#
# Built without AMX (with -march=native its AMX matmul crashes on some Xeons
# at the first decode), flash attention off (its outputs then match
# llama.cpp's reference runs). The binaries (llama-server, llama-bench,
# llama-quantize) land in $LLAMA_BUILD/bin.
set -euo pipefail
cd "$(dirname "$0")/../.."

BUILD="${LLAMA_BUILD:-.llama-server-build}"
VERSION="${LLAMA_VERSION:-0.3.36}"
THREADS="${LLAMA_THREADS:-2}"
CTX="${LLAMA_CTX:-2048}"

build() {
    [[ -x "$BUILD/bin/llama-server" ]] && return
    echo "Building llama-server from llama-cpp-python==$VERSION (several minutes on 2 cores)..." >&2
    mkdir -p "$BUILD"
    python3 -m venv "$BUILD/venv"
    "$BUILD/venv/bin/pip" install --quiet cmake ninja
    # The sdist itself, found on PyPI's simple index: `pip download` of an
    # sdist would first build its build dependencies from source.
    mkdir -p "$BUILD/sdist"
    "$BUILD/venv/bin/python" - "$VERSION" "$BUILD/sdist" <<'PY'
import re, sys, urllib.request
version, dest = sys.argv[1], sys.argv[2]
page = urllib.request.urlopen("https://pypi.org/simple/llama-cpp-python/").read().decode()
name = f"llama_cpp_python-{version}.tar.gz"
url = next(m for m in re.findall(r'href="([^"]+)"', page) if m.split("#")[0].endswith("/" + name))
urllib.request.urlretrieve(url.split("#")[0], f"{dest}/{name}")
PY
    tar -xzf "$BUILD"/sdist/llama_cpp_python-*.tar.gz -C "$BUILD"
    local src
    src=$(echo "$BUILD"/llama_cpp_python-*/vendor/llama.cpp)
    PATH="$BUILD/venv/bin:$PATH" cmake -S "$src" -B "$BUILD/cmake" -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON \
        -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF >&2
    PATH="$BUILD/venv/bin:$PATH" cmake --build "$BUILD/cmake" -j "${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
        --target llama-server llama-bench llama-quantize >&2
    mkdir -p "$BUILD/bin"
    cp "$BUILD"/cmake/bin/llama-server "$BUILD"/cmake/bin/llama-bench "$BUILD"/cmake/bin/llama-quantize "$BUILD/bin/"
}

if [[ "${1:-}" == "--build-only" ]]; then
    build
    exit 0
fi
if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
    sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'
    exit 1
fi
MODEL="$1"
PORT="${2:-8000}"
SLOTS="${3:-16}"
HOST="${4:-127.0.0.1}"
ALIAS="${MODEL_ALIAS:-$(basename "$MODEL")}"
if [[ ! -f "$MODEL" ]]; then
    echo "error: model file not found: $MODEL" >&2
    exit 1
fi
build
exec "$BUILD/bin/llama-server" -m "$MODEL" --host "$HOST" --port "$PORT" --alias "$ALIAS" \
    -np "$SLOTS" -c $((CTX * SLOTS)) -t "$THREADS" -tb "$THREADS" -fa off --cont-batching --no-webui
