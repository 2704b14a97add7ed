#!/usr/bin/env bash
# Issue 10 in one GPU call: the packed test binaries (scripts/gpu-test.sh --pack cuda ops adapters), then
# scripts/bench-gpu.sh (eabfit vs PyTorch + PEFT) in the time left. Run from the repo root on the
# GPU machine with .device-bin carried (scripts/gpu-test.sh --pack cuda ops builds it):
#   scripts/gpu-speed.sh
# Keeps what comes back to a few files under $OUT: gpu-test.txt, bench-table.md,
# benchmarks.json, bench-results.jsonl, bench-logs.tgz.
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
echo "gpu-speed done in $(( $(date +%s) - t0 )) s"
