#!/usr/bin/env bash
# Start llama.cpp's OpenAI-compatible server (llama-cpp-python[server]) as a
# reference to benchmark ferry against with `ferry bench serve`.
#
#   scripts/bench/llama_cpp_server.sh MODEL.gguf [PORT] [HOST]
#
# Environment:
#   LLAMA_VENV     virtual environment to use or create (default: .venv-llama-cpp)
#   LLAMA_VERSION  llama-cpp-python version to install (default: 0.3.36)
#   LLAMA_THREADS  threads for decode and prompt (default: 2)
#   LLAMA_CTX      context size (default: 2048)
#   MODEL_ALIAS    model name the server reports and accepts (default: file name)
#
# llama.cpp is built from source without AMX: with -march=native its AMX
# matmul crashes on these Xeons at the first decode. Flash attention stays off
# so its outputs match llama.cpp's reference runs. Requests queue instead of
# interrupting each other (llama-cpp-python's default cuts a running stream
# short when a new request arrives, which would ruin a concurrent benchmark);
# this server runs one request at a time.
set -euo pipefail

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
    sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
    exit 1
fi

MODEL="$1"
PORT="${2:-8000}"
HOST="${3:-127.0.0.1}"
VENV="${LLAMA_VENV:-.venv-llama-cpp}"
VERSION="${LLAMA_VERSION:-0.3.36}"
THREADS="${LLAMA_THREADS:-2}"
CTX="${LLAMA_CTX:-2048}"
ALIAS="${MODEL_ALIAS:-$(basename "$MODEL")}"

if [[ ! -f "$MODEL" ]]; then
    echo "error: model file not found: $MODEL" >&2
    exit 1
fi

if ! "$VENV/bin/python" -c "import llama_cpp.server" 2>/dev/null; then
    echo "Installing llama-cpp-python[server]==$VERSION into $VENV (builds llama.cpp; several minutes on 2 cores)..." >&2
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --upgrade pip
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" \
    FORCE_CMAKE=1 \
    CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
        "$VENV/bin/pip" install --no-cache-dir "llama-cpp-python[server]==$VERSION"
fi

echo "llama.cpp server: http://$HOST:$PORT/v1 (model \"$ALIAS\", $THREADS threads, flash attention off)" >&2
exec "$VENV/bin/python" -m llama_cpp.server \
    --model "$MODEL" \
    --model_alias "$ALIAS" \
    --host "$HOST" \
    --port "$PORT" \
    --n_threads "$THREADS" \
    --n_threads_batch "$THREADS" \
    --n_ctx "$CTX" \
    --flash_attn false \
    --interrupt_requests false
