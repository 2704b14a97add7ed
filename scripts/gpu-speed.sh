#!/usr/bin/env bash
# Issue 10 in one GPU call: the packed test binaries (scripts/gpu-test.sh --pack cuda ops adapters), then
# scripts/bench-gpu.sh (eabfit vs PyTorch + PEFT) in the time left. Run from the repo root on the
# GPU machine with .device-bin carried (scripts/gpu-test.sh --pack cuda ops builds it):
#   scripts/gpu-speed.sh
# Keeps what comes back to a few files under $OUT: gpu-test.txt, bench-table.md,
# benchmarks.json, bench-results.jsonl, bench-logs.tgz. With SPEED_TRAIN_7B=1 it then runs
# scripts/gpu-train-7b.sh (the real train / verify / export at 7B; .cache/assets/shakespeare
# carried too) into train-7b.txt and train-7b.tgz. With SPEED_PROFILE="SHAPE:MODE ..." it ends
# with scripts/gpu-profile.sh for each (per-kernel GPU time) into profile.txt, time allowing.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-./gpu-speed-out}
mkdir -p "$out"
t0=$(date +%s)
work=$(mktemp -d)
OUT=$work scripts/gpu-test.sh > "$out/gpu-test.txt" 2>&1
echo "gpu-test exit $? after $(( $(date +%s) - t0 )) s" >> "$out/gpu-test.txt"
cat "$work"/gpu-test/*.log >> "$out/gpu-test.txt" 2>/dev/null
left=$(( ${SPEED_BUDGET_S:-560} - ($(date +%s) - t0) ))
OUT=$work/bench BENCH_BUDGET_S=$left scripts/bench-gpu.sh > "$out/bench.txt" 2>&1
cp "$work/bench/table.md" "$out/bench-table.md" 2>/dev/null
cp "$work/bench/benchmarks.json" "$out/benchmarks.json" 2>/dev/null
cp "$work/bench/results.jsonl" "$out/bench-results.jsonl" 2>/dev/null
tar -czf "$out/bench-logs.tgz" -C "$work/bench" logs env.txt 2>/dev/null
echo "bench done after $(( $(date +%s) - t0 )) s"
# The real command at 7B after the benchmark (needs .cache/assets/shakespeare carried too).
if [ "${SPEED_TRAIN_7B:-0}" = 1 ]; then
  left=$(( ${SPEED_TOTAL_S:-590} - ($(date +%s) - t0) ))
  OUT=$work/train-7b TRAIN_STEPS=${TRAIN_STEPS:-6} timeout "$left" scripts/gpu-train-7b.sh > "$work/train-7b.txt" 2>&1
  echo "gpu-train-7b exit $? after $(( $(date +%s) - t0 )) s" >> "$work/train-7b.txt"
  cp "$work/train-7b.txt" "$out/train-7b.txt"
  tar -czf "$out/train-7b.tgz" -C "$work" train-7b 2>/dev/null
  grep -E "^trained|tokens/s|PASS|FAIL|verify|exit" "$work/train-7b.txt" | tail -n 12
fi
for p in ${SPEED_PROFILE:-}; do
  left=$(( ${SPEED_TOTAL_S:-590} - ($(date +%s) - t0) ))
  [ "$left" -gt 60 ] || { echo "profile $p: skipped, $left s left" >> "$out/profile.txt"; continue; }
  OUT=$out PROFILE_MODE=${p#*:} PROFILE_TIMEOUT_S=$(( left - 10 )) scripts/gpu-profile.sh "${p%%:*}" >> "$out/profile.txt" 2>&1
done
echo "gpu-speed done in $(( $(date +%s) - t0 )) s"
