#!/usr/bin/env bash
# Issue 14's pair on the H200, over one or more calls while the machine stays warm: the default
# model and its EAB twins, trained at once on the same tokens in the same order, then (FINISH=1)
# brought to one common step, scanned, plotted, and the default model retrofitted.
#
# The setting ($SETTING, overrides of recipes/pretrain-default.yaml) is by default the reference
# one (batch 32, lr 1e-3, weight decay 0.1, warmup 300) with the learning rate held after the
# warmup, since the runs stop on time. The 2026-12-03 pair used batch 8, lr 2e-3 and no weight
# decay, and drifted apart slowly (docs/pretrain.md):
#   SETTING="data.batch_size=8 optim.lr=2e-3 optim.weight_decay=0 optim.warmup_steps=200 optim.min_lr_ratio=1.0"
# Runs ($RUNS, names from this list):
#   default     default attention
#   eab         a slot per layer as the issue sets it: v' zeros, k' normal 0.02, no decay
#   eab-lr10    the same slots at 10x the learning rate (does a slot that moves faster take
#               the sink's job before an outlier forms?)
#   eab-nobos   the same slots with position 0 (the BOS) hidden from every query
#               (eab.mask_first_token): the slot is then the only key all queries share
# Each call:  scripts/gpu.sh pretrain-pair          # trains $PAIR_S seconds in all (pretrain
#             --max-seconds; each run its share, one after another unless PARALLEL=1),
#             resuming each run from its newest checkpoint
# Last call:  FINISH=1 PAIR_S=300 scripts/gpu.sh pretrain-pair
#             trains every run to the same step (the one all can reach in $PAIR_S seconds at
#             their last measured rates, or the step of the run furthest ahead when that is
#             later: give PAIR_S room for the runs behind to catch up), then scans each on 16 held-out windows of 1023 tokens
#             (plots with matplotlib's DejaVu font), overlays them, writes the curves, and runs
#             the retrofit: `eabfit train` of recipes/smollm2-135m-eab-macbeth.yaml's adapters (slots in
#             every layer, LoRA on layer 1's MLP, KL to the frozen model) on the default model
#             for $RETROFIT_STEPS steps, then `eabfit verify` before/after.
# $OUT (at most 8 files): pair.tgz (logs, scalars, scans, summaries), summary.txt, and with
# FINISH=1 curves.png, scan-overlay.png, scan-default.png, scan-eab.png, scan-eab-lr10.png.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-./gpu-pretrain-pair-out}
mkdir -p "$out"
. scripts/lib/pretrain-common.sh
pair_s=${PAIR_S:-420}
setting=${SETTING:-data.batch_size=32 optim.lr=1e-3 optim.weight_decay=0.1 optim.warmup_steps=300 optim.min_lr_ratio=1.0}
read -r -a runs <<< "${RUNS:-default eab eab-lr10}"
t0=$(date +%s)
pair=$work/pair
mkdir -p "$pair"
tokenize_corpus
[ -f "$corpus/corpus.json" ] || { log "no corpus"; exit 1; }

overrides_of() {
  case "$1" in
    default) echo "" ;;
    eab) echo "eab.enabled=true" ;;
    eab-lr10) echo "eab.enabled=true eab.lr_scale=10" ;;
    eab-nobos) echo "eab.enabled=true eab.mask_first_token=true" ;;
    *) echo "unknown run $1" >&2; return 1 ;;
  esac
}
step_of() { # newest checkpoint's step, 0 if none
  local ck
  ck=$(ls -d "$pair/$1"/checkpoints/step-* 2>/dev/null | tail -n 1)
  [ -n "$ck" ] && echo $((10#${ck##*step-})) || echo 0
}

# The runs share the call one after another ($PARALLEL=0, the default: one process alone
# trained faster than the sum of processes sharing the GPU, docs/pretrain.md) or at once.
parallel=${PARALLEL:-0}
run_s=$pair_s
[ "$parallel" = 1 ] || run_s=$(( pair_s / ${#runs[@]} ))
# FINISH: one target step for all, from the steps each made per second last time.
steps=1000000
limit=(--max-seconds "$run_s")
if [ "${FINISH:-0}" = 1 ]; then
  target=$("$py" - "$pair" "$run_s" "${runs[@]}" <<'PY'
import json, os, sys
pair, secs, names = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
reach, at = [], []
for n in names:
    cks = sorted(os.listdir(os.path.join(pair, n, "checkpoints")))
    step = int(cks[-1].split("-")[1])
    s = json.load(open(os.path.join(pair, n, "summary.json")))
    per_step = s["tokens"] / s["steps"]
    # 0.9: the start (corpus, model, first evaluation) is not in the measured rate
    reach.append(step + int(0.9 * s["tokens_per_s"] / per_step * secs))
    at.append(step)
# Never below a run's own step: a run already past the target could not come back to it.
print(max(min(reach), max(at)))
PY
)
  [ -n "$target" ] || { log "FINISH needs a previous call's checkpoints and summaries"; exit 1; }
  steps=$target
  limit=()
  log "finish: every run to step $steps"
fi

pids=()
rcs=()
for name in "${runs[@]}"; do
  resume=()
  [ "$(step_of "$name")" -gt 0 ] && resume=(--resume "$pair/$name")
  log "pretrain $name from step $(step_of "$name") (${setting}; $(overrides_of "$name"))"
  # shellcheck disable=SC2046,SC2086
  timeout $(( run_s + 150 )) "$bin" pretrain "${RECIPE:-recipes/pretrain-default.yaml}" \
    "data.corpus=$corpus" "train.out_dir=$pair/$name" "log.dir=$pair/tb" "log.name=$name" \
    $setting $(overrides_of "$name") "train.steps=$steps" train.checkpoint_every=${EVAL_EVERY:-250} train.keep_checkpoints=2 \
    eval.every=${EVAL_EVERY:-250} "${limit[@]}" "${resume[@]}" >> "$pair/$name.txt" 2>&1 &
  pids+=($!)
  if [ "$parallel" != 1 ]; then wait "$!"; rcs+=($?); fi
done
for i in "${!pids[@]}"; do
  [ "$parallel" = 1 ] && { wait "${pids[$i]}"; rcs+=($?); }
  log "${runs[$i]}: exit ${rcs[$i]} at $(( $(date +%s) - t0 )) s: $(grep -E '^last eval' "$pair/${runs[$i]}.txt" | tail -n 1)"
  grep -E "tokens/s" "$pair/${runs[$i]}.txt" | tail -n 1 | tee -a "$work/logs/summary.txt"
done

if [ "${FINISH:-0}" = 1 ]; then
  heldout_text
  scans=()
  for name in "${runs[@]}"; do
    scan_run "$name" "$pair/$name" "$pair" "$out/scan-$name.png" && scans+=("$pair/scan-$name.json")
  done
  # The overlay takes two scans: the default model and the first twin.
  [ ${#scans[@]} -ge 2 ] && "$bin" plot "${scans[@]:0:2}" --out "$out/scan-overlay.png"
  "$py" scripts/lib/pretrain_curves.py "$pair/tb" "$pair/curves.png" "${runs[@]}" 2>&1 | tee -a "$work/logs/summary.txt"
  cp "$pair/curves.png" "$out/" 2>/dev/null
  model=$pair/default/final
  [ "${RETROFIT_STEPS:-60}" -gt 0 ] && [ -f "$model/config.json" ] && retrofit "$model" "$pair"
fi

log "done at $(( $(date +%s) - t0 )) s"
cp "$work/logs/summary.txt" "$out/summary.txt"
tar -czf "$out/pair.tgz" -C "$pair" --exclude=checkpoints --exclude=final --exclude='retrofit/*.safetensors' . \
  -C "$work/logs" tokenize.txt
ls -la "$out"
