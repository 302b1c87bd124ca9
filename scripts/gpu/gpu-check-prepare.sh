#!/usr/bin/env bash
# Prepares, on a machine without a GPU, what scripts/gpu/gpu-check.sh needs on the
# GPU machine, which has CUDA, nvcc, PyTorch and transformers but no Rust and
# no network: stripped release builds of `ferry` (with `--features cuda`) and
# of the kernels' and engine's unit tests, and the default model's tokenizer
# as a Hugging Face folder (gpu-bin/tokenizer, read from its GGUF: the GPU
# machine makes random weights of that shape itself), all in gpu-bin/ (ignored
# by git; it is what travels to the GPU machine, so it stays under 64 MiB). It also
# checks the parts of the GPU check that can be checked here: the float64
# references' self-test (g++), the kernel harness parsed and type-checked by
# g++ against a stand-in for CUDA's names, and the script's syntax.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=gpu-bin
target=${CARGO_TARGET_DIR:-target}
rm -rf "$out"
mkdir -p "$out"

cargo build --release --locked --features cuda --bin ferry
cp "$target/release/ferry" "$out/ferry"
# The unit-test binaries of a package's library, by Cargo's own report of them.
test_exe() {
    cargo test --release --locked -p "$1" --features cuda --lib --no-run --message-format=json |
        python3 -c 'import sys, json
for m in map(json.loads, sys.stdin):
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["lib"]:
        print(m["executable"])' | tail -1
}
cp "$(test_exe ferry-kernels)" "$out/ferry-kernels-tests"
cp "$(test_exe ferry-engine)" "$out/ferry-engine-tests"
strip "$out"/ferry "$out"/ferry-kernels-tests "$out"/ferry-engine-tests

# The tokenizer (PyPI gguf and tokenizers, in a venv of their own).
venv=$target/gpu-check-venv
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check gguf tokenizers
"$venv/bin/python" scripts/gpu/gpu-check/gguf_tokenizer.py "${FERRY_TEST_MODEL:-$(scripts/fetch/fetch-model.sh)}" "$out/tokenizer"

# What can be checked without a GPU.
scripts/gpu/gpu-check/host-checks.sh
python3 -m py_compile scripts/gpu/gpu-check/*.py
du -sh "$out"
ls -l "$out" "$out/tokenizer"
size=$(du -sb "$out" | cut -f1)
if ((size > 64 * 1024 * 1024)); then
    echo "gpu-bin is $size bytes, more than the 64 MiB the GPU machine takes" >&2
    exit 1
fi
