#!/usr/bin/env bash
# The test command: fetch the real assets (SmolLM2-135M GGUF, Shakespeare) if missing, then run
# every test in release mode (candle in a debug build is 10-50x slower).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-assets.sh >/dev/null
cargo test --release "$@"
