#!/usr/bin/env bash
# The layer split at 70B on a GPU machine of several H200s: a LLaMA-2-70B-shaped checkpoint with
# random bf16 weights written as sharded Hugging Face safetensors (scripts/lib/random_checkpoint.py
# --shape llama2-70b, ~129 GiB for 80 layers), then through eabfit with --device-map: `info` (the
# plan), `ppl` (a split forward, timed), `generate` (KV-cached decoding across the GPUs) and
# `train recipes/llama2-70b-eab.yaml` (slots in every layer + LoRA r16 on layer 1, KL teacher on
# the same split weights, T 2048), which prints each GPU's peak memory, then `export --dtype bf16`
# of the trained adapter with the same map (the streaming merge, each layer on its GPU; its peak
# host memory printed where /usr/bin/time exists), removed after.
#
# Run from the repo root on the GPU machine with .device-bin (scripts/cuda-build.sh) and the
# Shakespeare texts (.cache/assets/shakespeare) carried:
#   scripts/gpu.sh train-70b                       # on nvidia-h200-x4: all 80 layers fit the disk
#   LAYERS=60 scripts/gpu.sh train-70b             # on nvidia-h200-x2 (128 GB disk)
# The checkpoint stays in $WORK between calls while the machine is warm, so a second call skips
# writing it. Environment: LAYERS (80), MAP (auto; or e.g. cuda:0=0-39,cuda:1=40-79),
# TRAIN_STEPS (4), SEQ (2048), EXPORT (1; 0 skips the export, as does a disk without room for a
# second copy of the checkpoint), WORK (/tmp/eabfit-70b), EABFIT_BIN, PYTHON.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-./train-70b-out}
mkdir -p "$out"
. scripts/lib/device-env.sh
work=${WORK:-/tmp/eabfit-70b}
mkdir -p "$work"
bin=$(device_bin "$work")
layers=${LAYERS:-80}
map=${MAP:-auto}
seq=${SEQ:-2048}
text=.cache/assets/shakespeare
model=$work/model-$layers
t0=$(date +%s)
nvidia-smi --query-gpu=index,name,memory.used,memory.total --format=csv | tee "$out/gpus.txt"
if [ ! -f "$model/config.json" ]; then
  # ~1.61 GiB per layer + 0.5 GiB of embedding and head, and 8 GiB to spare.
  need=$(( (layers * 161 + 50) * 1024 / 100 + 8 * 1024 ))
  have=$(df -Pm "$work" | awk 'NR == 2 {print $4}')
  if [ "$have" -lt "$need" ]; then
    echo "train-70b: $layers layers need ~$need MiB of disk, $work has $have MiB: set LAYERS lower" >&2
    exit 1
  fi
  rm -rf "$work"/model-*
  "$py" scripts/lib/random_checkpoint.py --shape llama2-70b --layers "$layers" --text "$text" \
    --out "$model" | tee "$out/checkpoint.log"
fi
echo "checkpoint ready after $(( $(date +%s) - t0 )) s" | tee -a "$out/checkpoint.log"
"$bin" info --model "$model" --device-map "$map" 2>&1 | tee "$out/info.log"
"$bin" ppl --model "$model" --device-map "$map" --text "$text/hamlet_gut.txt" --seq-len "$seq" \
  --max-windows 2 2>&1 | tee "$out/ppl.log"
"$bin" generate --model "$model" --device-map "$map" --prompt "to be or not to be" \
  --max-new-tokens 16 2>&1 | tee "$out/generate.log" | tail -n 3
# Random weights have no massive activations, so LoRA stays on the recipe's listed layer 1.
over=(model.path="$model" model.device_map="$map" data.train=$text data.eval=$text/hamlet_gut.txt
      data.seq_len="$seq" data.eval_windows=2 optim.grad_accum=1 optim.warmup_steps=2
      adapters.eab.calib_windows=2 train.steps=${TRAIN_STEPS:-4} train.out_dir=$work/run
      train.checkpoint_every=1000 eval.every=1000 log.dir=$work/tb)
"$bin" train recipes/llama2-70b-eab.yaml "${over[@]}" 2>&1 | tee "$out/train.log" | grep -vE '^\s' | tail -n 20
cp "$work/run/summary.json" "$out/summary.json"
# The export is as large as the checkpoint: only with room for it (and 4 GiB to spare).
if [ "${EXPORT:-1}" = 1 ]; then
  need=$(( $(du -sm "$model" | awk '{print $1}') + 4096 ))
  have=$(df -Pm "$work" | awk 'NR == 2 {print $4}')
  if [ "$have" -lt "$need" ]; then
    echo "export: skipped, it needs ~$need MiB of disk and $work has $have MiB (set LAYERS lower)" | tee "$out/export.log"
  else
    timer=()
    [ -x /usr/bin/time ] && timer=(/usr/bin/time -f "export: peak host memory %M KiB, %e s")
    rc=0
    ${timer[@]+"${timer[@]}"} "$bin" export --model "$model" --adapter "$work/run/final" \
      --out "$work/export" --force --dtype bf16 --device-map "$map" 2>&1 | tee "$out/export.log" || rc=$?
    du -sh "$work/export" 2>/dev/null | tee -a "$out/export.log"
    rm -rf "$work/export"
    [ "$rc" = 0 ]
  fi
fi
echo "all done after $(( $(date +%s) - t0 )) s"
