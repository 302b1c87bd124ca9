#!/usr/bin/env bash
# Every test, on a fresh machine too: installs what the tests need (the Python
# clients of tests/requirements.txt, the default model), then runs the Rust unit
# and integration tests (release profile: the real model runs at speed and the
# binary is shared with the end-to-end tests), then the end-to-end suite that
# drives `ferry serve` with real clients over HTTP/1.1, HTTP/2 and HTTP/3.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check -r tests/requirements.txt
scripts/fetch-model.sh >/dev/null
export FERRY_TEST_MODEL=${FERRY_TEST_MODEL:-$PWD/models/SmolLM2-135M-Instruct.Q4_1.gguf}
scripts/check-import-cycles.py
cargo build --release --locked --bin ferry
cargo test --release --locked --workspace
FERRY_BIN=$PWD/target/release/ferry python3 -m pytest tests/e2e -q
