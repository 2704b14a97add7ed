#!/usr/bin/env bash
# One GPU call for the checks that need the real commands on the H200, in order of weight:
#   1. scripts/gpu-train-7b.sh     train / verify / export on a random LLaMA-2-7B-shaped checkpoint
#   2. scripts/gpu-oom-check.sh    CUDA out of memory in bench, scan and train explained
#   3. scripts/gpu-remote-code.sh  the hf export in transformers with trust_remote_code
# Each under its own time limit; everything they write is packed into $OUT/checks.tgz, their
# console output into $OUT/{train-7b,oom,remote-code}.txt.
# Run from the repo root on the GPU machine with .device-bin and .cache/assets/shakespeare carried.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-./gpu-checks-out}
mkdir -p "$out"
work=$(mktemp -d)
py=/opt/torch/.venv/bin/python
[ -x "$py" ] || py=python3
bin=$work/eabfit
if [ -f .device-bin/eabfit ]; then cp .device-bin/eabfit "$bin"; else
  "$py" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' .device-bin/eabfit.xz "$bin"; fi
chmod +x "$bin"
export EABFIT_BIN=$bin
t0=$(date +%s)
OUT=$work/train-7b TRAIN_STEPS=${TRAIN_STEPS:-6} timeout "${T7B_S:-330}" scripts/gpu-train-7b.sh > "$out/train-7b.txt" 2>&1
echo "train-7b exit $? at $(( $(date +%s) - t0 )) s" | tee -a "$out/train-7b.txt"
rm -rf /tmp/eabfit-7b/export
OUT=$work timeout "${OOM_S:-80}" scripts/gpu-oom-check.sh > "$out/oom.txt" 2>&1
echo "oom exit $? at $(( $(date +%s) - t0 )) s" | tee -a "$out/oom.txt"
OUT=$work/remote-code timeout "${RC_S:-170}" scripts/gpu-remote-code.sh > "$out/remote-code.txt" 2>&1
echo "remote-code exit $? at $(( $(date +%s) - t0 )) s" | tee -a "$out/remote-code.txt"
tar -czf "$out/checks.tgz" -C "$work" --exclude=eabfit --exclude='*.safetensors' . 2>/dev/null
ls -la "$out"
