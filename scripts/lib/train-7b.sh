#!/usr/bin/env bash
# The real commands at 7B scale on the GPU machine: a LLaMA-2-7B-shaped checkpoint with random
# bf16 weights written as sharded Hugging Face safetensors (scripts/lib/random_checkpoint.py), then
# `eabfit train recipes/llama2-7b-eab.yaml` at seq 2048, batch 4 (slots in every layer + LoRA r16
# on layer 1's MLP, KL teacher), `eabfit verify` and `eabfit export`. train prints tokens/s and the
# peak device memory.
#
# Run from the repo root on the GPU machine with .device-bin (scripts/cuda-build.sh) and the
# Shakespeare texts (.cache/assets/shakespeare, from scripts/fetch-assets.sh) carried:
#   scripts/gpu.sh train-7b            # logs and summaries under $OUT (default ./train-7b-out)
# Environment: TRAIN_STEPS (8), SHAPE (llama2-7b; `tiny` for a smoke run), EABFIT_BIN, PYTHON.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-./train-7b-out}
mkdir -p "$out"
. scripts/lib/device-env.sh
work=${WORK:-/tmp/eabfit-7b}
mkdir -p "$work"
bin=$(device_bin "$work")
text=.cache/assets/shakespeare
model=$work/model
t0=$(date +%s)
[ -f "$model/config.json" ] || "$py" scripts/lib/random_checkpoint.py --shape "${SHAPE:-llama2-7b}" --text "$text" --out "$model" | tee "$out/checkpoint.log"
echo "checkpoint ready after $(( $(date +%s) - t0 )) s" | tee -a "$out/checkpoint.log"
# Random weights have no massive activations, so LoRA goes on a listed layer instead of `birth`.
over=(model.path="$model" data.train=$text data.eval=$text/hamlet_gut.txt data.seq_len=2048
      data.batch_size=4 data.eval_windows=2 optim.grad_accum=1 optim.warmup_steps=2
      adapters.eab.calib_windows=4 "adapters.lora.layers=[1]" train.steps=${TRAIN_STEPS:-8}
      train.out_dir=$work/run train.checkpoint_every=1000 eval.every=1000 log.dir=$work/tb)
"$bin" train recipes/llama2-7b-eab.yaml "${over[@]}" 2>&1 | tee "$out/train.log" | grep -vE '^\s' | tail -n 20
"$bin" verify recipes/llama2-7b-eab.yaml "${over[@]}" --out "$out/verify" 2>&1 | tee "$out/verify.log" | tail -n 20 || true
"$bin" export --model "$model" --adapter "$work/run/best" --out "$work/export" --format hf --force 2>&1 | tee "$out/export.log" | tail -n 5
ls -la "$work/export" | tee -a "$out/export.log"
cp "$work/run/summary.json" "$out/summary.json"
echo "all done after $(( $(date +%s) - t0 )) s"
