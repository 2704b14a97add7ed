#!/usr/bin/env bash
# The second, shorter GPU call of 2026-12-02: the OOM check (bench at batch 64, train, scan), the
# remote-code check of the LLaMA-3 shape cut off in gpu-checks.sh, and the benchmark cases the
# first run mis-batched (forward at batch 4, 7B train at seq 4096 batch 1).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-./gpu-followup-out}
mkdir -p "$out"
work=$(mktemp -d)
py=/opt/torch/.venv/bin/python
[ -x "$py" ] || py=python3
bin=$work/eabfit
"$py" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' .device-bin/eabfit.xz "$bin"
chmod +x "$bin"
export EABFIT_BIN=$bin
OUT=$work timeout 100 scripts/gpu-oom-check.sh > "$out/oom.txt" 2>&1; echo "oom exit $?" >> "$out/oom.txt"
OUT=$work/rc SHAPES=tiny-llama3 timeout 60 scripts/gpu-remote-code.sh > "$out/remote-code.txt" 2>&1; echo "rc exit $?" >> "$out/remote-code.txt"
OUT=$work/bench BENCH_BUDGET_S=150 BENCH_RUN_TIMEOUT=60 BENCH_STEPS=3 BENCH_WARMUP=1 \
  BENCH_CASES="llama2-7b:forward:2048:4 llama-1b:forward:2048:4 llama2-7b:train:4096:1" \
  scripts/bench-gpu.sh > "$out/bench.txt" 2>&1
cp "$work/bench/table.md" "$out/bench-table.md"; cp "$work/bench/benchmarks.json" "$out/benchmarks.json"
tar -czf "$out/logs.tgz" -C "$work" --exclude=eabfit --exclude='*.safetensors' . 2>/dev/null
