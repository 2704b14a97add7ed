#!/usr/bin/env bash
# Issue 14's from-scratch experiment on the H200: default attention vs an EAB slot per layer,
# one configuration, the same tokens in the same order.
#
# On the build machine, once (the SmolLM2 GGUF is 98 MB, too big to carry; its tokenizer is 1.5 MB):
#   scripts/cuda-build.sh                 # .device-bin/eabfit (or eabfit.xz), cuda feature
#   scripts/gpu.sh pack-tokenizer        # .device-bin/smollm2-tokenizer/, written by eabfit
#                                         # from the fetched GGUF (scripts/fetch-assets.sh)
# On the GPU machine, from the repo root with .device-bin carried:
#   scripts/gpu.sh pretrain
#     1. tokenizes the installed Python sources ($SRC, *.py) with the SmolLM2 tokenizer,
#        <|endoftext|> as BOS and document separator, 0.5% of the files held out;
#     2. runs recipes/pretrain-default.yaml, then recipes/pretrain-eab.yaml, each for $STEPS
#        steps (warmup $WARMUP) under `timeout $RUN_S`;
#     3. scans each model (its final/ folder, else its newest checkpoint) on 16 windows of 1023
#        tokens of the held-out files, and overlays the two scans;
#     4. turns both runs' scalars into curves.csv (and curves.png where matplotlib imports);
#     5. the retrofit (RETROFIT_STEPS > 0, default 60): `eabfit train` of
#        recipes/smollm2-135m-eab-macbeth.yaml's adapters (slots in every layer, LoRA on layer 1's MLP,
#        KL to the frozen model) on the default model, on held-in training files, then
#        `eabfit verify` (massive count and perplexity before/after) on the held-out text,
#        under `timeout $RETROFIT_S`.
# Work folder $WORK (default /tmp/eabfit-pretrain) survives between calls while the machine
# stays warm: the corpus is reused, and a run that has checkpoints resumes from its newest
# (keep STEPS and WARMUP as they were: they set the learning-rate schedule). Tokenizing ran at
# ~77k tokens/s per core on the build machine: ~100 s for the 115.6M tokens on 16 cores, so a
# first call fits tokenize + 2 x RUN_S + the scans in its 10 minutes.
# Back in $OUT (at most 8 files): pretrain.tgz (logs, scan JSON, scalars, summaries),
# scan-overlay.png, scan-default.png, scan-eab.png, curves.png, summary.txt.
set -uo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
cd "$repo"

if [ "${1:-}" = --pack ]; then
  set -e
  gguf=${EABFIT_CACHE:-$repo/.cache/assets}/SmolLM2-135M-Instruct.Q4_1.gguf
  [ -f "$gguf" ] || { echo "no $gguf: run scripts/fetch-assets.sh" >&2; exit 1; }
  bin=${EABFIT_BIN:-$repo/target/release/eabfit}
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  # Any text will do: the corpus is thrown away, its tokenizer files are kept.
  "$bin" tokenize --model "$gguf" --out "$tmp/corpus" --val-fraction 0 README.md
  mkdir -p .device-bin/smollm2-tokenizer
  cp "$tmp/corpus/tokenizer.json" "$tmp/corpus/tokenizer_config.json" .device-bin/smollm2-tokenizer/
  ls -la .device-bin/smollm2-tokenizer >&2
  exit 0
fi

out=${OUT:-./gpu-pretrain-out}
mkdir -p "$out"
. scripts/lib/pretrain-common.sh
steps=${STEPS:-500}
warmup=${WARMUP:-100}
run_s=${RUN_S:-180}
t0=$(date +%s)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$work/logs/summary.txt"
tokenize_corpus
heldout_text

for v in default eab; do
  run=$work/runs/$v
  resume=()
  ls -d "$run"/checkpoints/step-* > /dev/null 2>&1 && resume=(--resume "$run")
  log "pretrain $v: $steps steps, warmup $warmup, ${resume[*]:-fresh}"
  timeout "$run_s" "$bin" pretrain "recipes/pretrain-$v.yaml" \
    "data.corpus=$corpus" "train.out_dir=$run" "log.dir=$work/tb" \
    "train.steps=$steps" "optim.warmup_steps=$warmup" \
    "train.checkpoint_every=100" "eval.every=50" "${resume[@]}" \
    > "$work/logs/pretrain-$v.txt" 2>&1
  log "pretrain $v exit $? at $(( $(date +%s) - t0 )) s"
  tail -n 4 "$work/logs/pretrain-$v.txt" | tee -a "$work/logs/summary.txt"
  scan_run "$v" "$run" "$work/logs" "$out/scan-$v.png"
  cp "$work/tb/pretrain-$v/scalars.jsonl" "$work/logs/scalars-$v.jsonl" 2>/dev/null
  cp "$run/summary.json" "$work/logs/summary-$v.json" 2>/dev/null
done

if [ -f "$work/logs/scan-default.json" ] && [ -f "$work/logs/scan-eab.json" ]; then
  "$bin" plot "$work/logs/scan-default.json" "$work/logs/scan-eab.json" --out "$out/scan-overlay.png"
fi
"$py" scripts/lib/pretrain_curves.py "$work/tb" "$work/logs/curves.png" pretrain-default pretrain-eab 2>&1 \
  | tee -a "$work/logs/summary.txt"
cp "$work/logs/curves.png" "$out/" 2>/dev/null

model=$work/runs/default/final
[ -f "$model/config.json" ] || model=$(ls -d "$work"/runs/default/checkpoints/step-* 2>/dev/null | tail -n 1)
if [ "${RETROFIT_STEPS:-60}" -gt 0 ] && [ -n "$model" ] && [ -f "$model/config.json" ]; then
  retrofit "$model" "$work/logs"
fi

log "done at $(( $(date +%s) - t0 )) s"
cp "$work/logs/summary.txt" "$out/summary.txt"
tar -czf "$out/pretrain.tgz" -C "$work/logs" --exclude=retrofit .
ls -la "$out"
