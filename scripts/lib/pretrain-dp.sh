#!/usr/bin/env bash
# Data-parallel pretraining throughput on a several-GPU host (nvidia-h200-x2/-x4/-x8), against
# PyTorch DDP in the same call: recipes/pretrain-default.yaml's 122.7M model with
# $DP_BATCH (16) windows per GPU, on 1, 2, 4, ... GPUs up to $DP_MAX (all GPUs), each for
# $DP_S (45) seconds of training; then `torchrun --nproc_per_node N scripts/lib/pretrain_torch.py`
# (transformers' LlamaForCausalLM under DDP, same per-GPU batch and corpus) at each N.
# Needs an eabfit built with `scripts/cuda-build.sh --features nccl` (in .device-bin or
# $EABFIT_BIN) and NCCL's libnccl.so.2, which torch's wheel brings.
#   scripts/gpu.sh pretrain-dp           (on nvidia-h200-x2, -x4 or -x8)
# Prints tokens/s and the scaling efficiency tokens/s(N) / (N x tokens/s(1)) of both; $OUT/dp.txt.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-./gpu-pretrain-dp-out}
mkdir -p "$out"
SRC=${SRC:-/opt/torch/.venv/lib/python3.12/site-packages/torch} WORK=${WORK:-/tmp/eabfit-dp} \
  . scripts/lib/pretrain-common.sh
site=/opt/torch/.venv/lib/python3.12/site-packages/nvidia
export LD_LIBRARY_PATH=$site/nccl/lib:$LD_LIBRARY_PATH
# NVLink multicast stays off on these machines, in every process started here.
export NCCL_NVLS_ENABLE=0
tokenize_corpus
gpus=$(nvidia-smi -L | wc -l)
max=${DP_MAX:-$gpus}
batch=${DP_BATCH:-16}
secs=${DP_S:-45}
ns=""
for n in 1 2 4 8; do [ "$n" -le "$max" ] && ns="$ns $n"; done
rate() { grep -oE '[0-9]+ tokens/s' "$1" | tail -n 1 | cut -d' ' -f1; }
declare -A eab torch
for n in $ns; do
  log "eabfit x$n"
  "$bin" pretrain recipes/pretrain-default.yaml "data.corpus=$corpus" "train.out_dir=$work/n$n" \
    "log.dir=$work/tb" "data.batch_size=$batch" "train.devices=cuda*$n" train.steps=100000 \
    train.checkpoint_every=100000 eval.every=100000 data.eval_windows=1 \
    --max-seconds "$secs" > "$work/eabfit-n$n.txt" 2>&1
  log "exit $?"
  tail -n 3 "$work/eabfit-n$n.txt" | tee -a "$work/logs/summary.txt"
  eab[$n]=$(rate "$work/eabfit-n$n.txt")
  log "torch DDP x$n"
  "$(dirname "$py")/torchrun" --standalone --nproc_per_node "$n" scripts/lib/pretrain_torch.py \
    "$corpus" --batch "$batch" --seconds "$secs" > "$work/torch-n$n.txt" 2>&1
  log "exit $?"
  tail -n 2 "$work/torch-n$n.txt" | tee -a "$work/logs/summary.txt"
  torch[$n]=$(rate "$work/torch-n$n.txt")
done
{
  echo "GPUs  eabfit tok/s  eff   torch DDP tok/s  eff   (batch $batch per GPU, seq 1024)"
  for n in $ns; do
    e=${eab[$n]:-0} t=${torch[$n]:-0}
    awk -v n="$n" -v e="$e" -v t="$t" -v e1="${eab[1]:-0}" -v t1="${torch[1]:-0}" 'BEGIN {
      ee = e1 > 0 ? e / (n * e1) : 0; te = t1 > 0 ? t / (n * t1) : 0
      printf "%4d  %12d  %4.2f  %15d  %4.2f\n", n, e, ee, t, te }'
  done
} | tee -a "$work/logs/summary.txt"
cp "$work/logs/summary.txt" "$out/dp.txt"
