#!/usr/bin/env bash
# A short end-to-end of scripts/gpu-pretrain.sh before the full run: a small corpus (torch's own
# Python sources), PROBE_STEPS steps of each recipe under PROBE_RUN_S seconds, the scans, the
# curves. It measures eabfit's pretraining throughput on the GPU (to size the full run to one
# 10-minute call) and checks the script end to end. Run from the repo root on the GPU machine,
# .device-bin carried (scripts/cuda-build.sh; scripts/gpu-pretrain.sh --pack):
#   scripts/gpu-pretrain-probe.sh
# Writes everything as one file, $OUT/pretrain-probe.tgz, and prints the summary.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-./gpu-pretrain-probe-out}
mkdir -p "$out"
work=$(mktemp -d)
OUT=$work/out WORK=$work/work SRC=${PROBE_SRC:-/opt/torch/.venv/lib/python3.12/site-packages/torch} \
  STEPS=${PROBE_STEPS:-300} WARMUP=${PROBE_WARMUP:-30} RUN_S=${PROBE_RUN_S:-50} \
  timeout "${PROBE_TOTAL_S:-240}" scripts/gpu-pretrain.sh > "$work/probe.txt" 2>&1
echo "gpu-pretrain exit $?" >> "$work/probe.txt"
cp -r "$work/work/logs" "$work/out/" 2>/dev/null
cp "$work/probe.txt" "$work/out/"
tar -czf "$out/pretrain-probe.tgz" -C "$work/out" .
grep -E "tokens/s|exit|tokenize|ppl|massive|top-1" "$work/probe.txt" | tail -n 30
