#!/usr/bin/env bash
# One GPU call of ~9 minutes: the CUDA test binary (scripts/gpu-test.sh cuda), then issue 14's
# pretraining pair sized to fit (scripts/gpu-pretrain.sh: 300 steps x 32 x 1024 tokens = 9.8M
# tokens per model from torch's own Python sources, 11.3M tokens; then the scans, the curves
# and the retrofit of the default model). Run from the repo root on the GPU machine with
# .device-bin carried (scripts/gpu-test.sh --pack cuda; scripts/gpu-pretrain.sh --pack):
#   scripts/gpu-tests-and-pretrain.sh
# $OUT gets gpu-test.txt and gpu-pretrain.sh's files (7 in all).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-./gpu-tests-and-pretrain-out}
mkdir -p "$out"
tmp=$(mktemp -d)
OUT=$tmp scripts/gpu-test.sh cuda > "$out/gpu-test.txt" 2>&1
echo "gpu-test exit $?" >> "$out/gpu-test.txt"
cat "$tmp"/gpu-test/*.log >> "$out/gpu-test.txt" 2>/dev/null
grep -E "test result|exit" "$out/gpu-test.txt" | head -n 4
OUT=$out SRC=${SRC:-/opt/torch/.venv/lib/python3.12/site-packages/torch} STEPS=${STEPS:-300} \
  WARMUP=${WARMUP:-30} RUN_S=${RUN_S:-230} RETROFIT_S=${RETROFIT_S:-90} scripts/gpu-pretrain.sh \
  > "$tmp/pretrain.txt" 2>&1
echo "gpu-pretrain exit $?"
tail -n 40 "$tmp/pretrain.txt"
