#!/usr/bin/env bash
# Puts llama.cpp's vocab-only test files (models/ggml-vocab-*.gguf with their
# .gguf.inp / .gguf.out expected tokenizations) into the model cache and prints
# the folder. They ship in the llama-cpp-python sdist (vendor/llama.cpp/models),
# which pip downloads but does not build. engine/tests/llama_cpp_vocabs.rs reads
# them from $FERRY_LLAMA_CPP_VOCABS (scripts/test/all.sh sets it to this output).
set -euo pipefail
version=0.3.36
sha=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
if [ -n "${FERRY_MODEL_DIR:-}" ]; then
  cache=$FERRY_MODEL_DIR
elif [[ "${XDG_CACHE_HOME:-}" == /* ]]; then
  cache=$XDG_CACHE_HOME/ferry/models
else
  cache=$HOME/.cache/ferry/models
fi
dir=$cache/llama.cpp-vocabs-$version
if [ ! -f "$dir/ggml-vocab-llama-spm.gguf.out" ]; then
  mkdir -p "$cache"
  tmp=$(mktemp -d "$cache/.download-XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  # --no-binary for this one package only: with :all: pip builds cmake and
  # ninja from source just to read the sdist's metadata (minutes, not seconds).
  python3 -m pip download --quiet --disable-pip-version-check --no-deps --no-binary llama-cpp-python \
    "llama-cpp-python==$version" -d "$tmp"
  echo "$sha  $tmp/llama_cpp_python-$version.tar.gz" | sha256sum --check --quiet
  tar -xzf "$tmp/llama_cpp_python-$version.tar.gz" -C "$tmp" --wildcards "llama_cpp_python-$version/vendor/llama.cpp/models/ggml-vocab-*"
  # Renamed into place whole, so a killed fetch never leaves half a folder.
  rm -rf "$dir"
  mv "$tmp/llama_cpp_python-$version/vendor/llama.cpp/models" "$dir"
fi
echo "$dir"
