#!/usr/bin/env bash
# Pretraining throughput of one process alone on the H200 (the sweep and the pair share the GPU
# between processes, so their tokens/s are not this): recipes/pretrain-default.yaml's 122.7M
# model at each batch of $SPEED_BATCHES (32 8), each for $SPEED_S (45) seconds of training, on
# torch's own sources; then, in the same call, what a user would run instead on the same corpus
# (scripts/lib/pretrain_torch.py: transformers' LlamaForCausalLM, SDPA, bf16 autocast, fused AdamW)
# at the same batches, eager and, with SPEED_COMPILE=1, under torch.compile.
#   scripts/gpu.sh pretrain-speed
# Prints each run's last lines (tokens/s, steps); $OUT/speed.txt.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-./gpu-pretrain-speed-out}
mkdir -p "$out"
SRC=${SRC:-/opt/torch/.venv/lib/python3.12/site-packages/torch} WORK=${WORK:-/tmp/eabfit-speed} \
  . scripts/lib/pretrain-common.sh
tokenize_corpus
for b in ${SPEED_BATCHES:-32 8}; do
  log "batch $b"
  "$bin" pretrain recipes/pretrain-default.yaml "data.corpus=$corpus" "train.out_dir=$work/b$b" \
    "log.dir=$work/tb" "data.batch_size=$b" train.steps=100000 train.checkpoint_every=100000 \
    eval.every=100000 data.eval_windows=1 --max-seconds "${SPEED_S:-45}" > "$work/b$b.txt" 2>&1
  log "exit $?"
  tail -n 4 "$work/b$b.txt" | tee -a "$work/logs/summary.txt"
done
for b in ${SPEED_BATCHES:-32 8}; do
  for c in "" ${SPEED_COMPILE:+--compile}; do
    log "torch batch $b $c"
    "$py" scripts/lib/pretrain_torch.py "$corpus" --batch "$b" --seconds "${SPEED_S:-45}" $c \
      > "$work/torch-b$b$c.txt" 2>&1
    log "exit $?"
    tail -n 2 "$work/torch-b$b$c.txt" | tee -a "$work/logs/summary.txt"
  done
done
cp "$work/logs/summary.txt" "$out/speed.txt"
