#!/usr/bin/env bash
# The test command: fetch the real assets (SmolLM2-135M GGUF, the texts, the head of a real
# Qwen2 GGUF) if missing, install the pinned torch + transformers + peft + gguf environment
# (scripts/lib/py-env.sh, once; tests/transformers.rs runs transformers in it through
# EABFIT_PYTHON), then run every test in release mode (candle in a debug build is 10-50x slower).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-assets.sh --qwen2-gguf >/dev/null
EABFIT_PYTHON=$(scripts/lib/py-env.sh)
export EABFIT_PYTHON
cargo test --release "$@"
