#!/usr/bin/env bash
# Per-kernel GPU time of eabfit's training step, by kernel name (Nsight Compute's summary), to see
# where a step's time goes. Run on the GPU machine from the repo root with .device-bin carried:
#   scripts/gpu.sh profile                   # PROFILE_SHAPES="SHAPE[:MODE] ...", default: llama2-7b llama-1b
#   PROFILE_SHAPES=pretrain scripts/gpu.sh profile   # issue 14's pretraining step instead
# Each shape: `eabfit bench --mode $PROFILE_MODE --warmup 0 --steps 1` (train by default, or
# forward; T 2048; batch 4 for llama2-7b, 8 for llama-1b in train, 4 in forward) under
# `ncu --csv --metrics gpu__time_duration.sum`: one step, plus the
# random-weight setup (curand kernels). Kernels run serialised under ncu: the sum is GPU time,
# launch gaps are not in it. Writes $OUT/profile-SHAPE[-forward].txt.xz (one row per launch) and prints
# the 30 kernels that took longest, summed by name (scripts/lib/profile_summary.py, which reads the
# .xz file again later).
# The shape `pretrain` is `eabfit pretrain recipes/pretrain-default.yaml` (122.7M parameters,
# batch $PROFILE_BATCH, default 32, T 1024) for 2 steps on torch.nn's sources, one held-out window
# evaluated before and after: its kernel time per step, set against the wall time per step that
# `pretrain` reports alone (scripts/lib/pretrain-speed.sh), says whether a step waits on the GPU
# or on launches.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-./profile-out}
mkdir -p "$out"
. scripts/lib/device-env.sh
ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n1)
[ -n "$ncu" ] || { echo "gpu-profile: no ncu" >&2; exit 1; }
bin=$(device_bin "$(mktemp -d)")
shapes=("$@")
[ ${#shapes[@]} -gt 0 ] || shapes=(llama2-7b llama-1b)
mode=${PROFILE_MODE:-train}
for shape in "${shapes[@]}"; do
  batch=4; [ "$shape" = llama-1b ] && [ "$mode" = train ] && batch=8
  f=$out/profile-$shape.txt; [ "$mode" = train ] || f=$out/profile-$shape-$mode.txt
  if [ "$shape" = pretrain ]; then
    corpus=$(mktemp -d)/corpus
    "$bin" tokenize --tokenizer .device-bin/smollm2-tokenizer --ext .py --val-fraction 0.05 \
      --bos '<|endoftext|>' --sep '<|endoftext|>' --out "$corpus" \
      /opt/torch/.venv/lib/python3.12/site-packages/torch/nn > /dev/null
    cmd=(pretrain recipes/pretrain-default.yaml "data.corpus=$corpus" "train.out_dir=$corpus.run"
         "log.dir=$corpus.tb" "data.batch_size=${PROFILE_BATCH:-32}" data.eval_windows=1 train.steps=2
         optim.warmup_steps=1)
    f=$out/profile-pretrain.txt
  else
    cmd=(bench --shape "$shape" --mode "$mode" --seq 2048 --batch "$batch" --warmup 0 --steps 1
         --device cuda)
  fi
  timeout "${PROFILE_TIMEOUT_S:-240}" "$ncu" --clock-control none --csv --print-units base \
    --metrics gpu__time_duration.sum "$bin" "${cmd[@]}" > "$f" 2>&1
  echo "== $shape $mode (rc $?)"
  python3 scripts/lib/profile_summary.py "$f"
  # The pretraining profile holds two steps and two evaluations: step 2 alone as well.
  [ "$shape" = pretrain ] && python3 scripts/lib/profile_summary.py "$f" --step 2 --top 40
  xz -f "$f"
done
