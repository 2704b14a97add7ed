#!/usr/bin/env bash
# Issue 14's from-scratch experiment on the H200: default attention vs an EAB slot per layer,
# one configuration, the same tokens in the same order.
#
# On the build machine, once (the SmolLM2 GGUF is 98 MB, too big to carry; its tokenizer is 1.5 MB):
#   scripts/cuda-build.sh                 # .device-bin/eabfit (or eabfit.xz), cuda feature
#   scripts/gpu-pretrain.sh --pack        # .device-bin/smollm2-tokenizer/, written by eabfit
#                                         # from the fetched GGUF (scripts/fetch-assets.sh)
# On the GPU machine, from the repo root with .device-bin carried:
#   scripts/gpu-pretrain.sh
#     1. tokenizes the installed Python sources ($SRC, *.py) with the SmolLM2 tokenizer,
#        <|endoftext|> as BOS and document separator, 0.5% of the files held out;
#     2. runs recipes/pretrain-default.yaml, then recipes/pretrain-eab.yaml, each for $STEPS
#        steps (warmup $WARMUP) under `timeout $RUN_S`;
#     3. scans each model (its final/ folder, else its newest checkpoint) on 16 windows of 1023
#        tokens of the held-out files, and overlays the two scans;
#     4. turns both runs' scalars into curves.csv (and curves.png where matplotlib imports);
#     5. the retrofit (RETROFIT_STEPS > 0, default 60): `eabfit train` of
#        recipes/smollm2-135m-eab.yaml's adapters (slots in every layer, LoRA on layer 1's MLP,
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
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
tok_dir=.device-bin/smollm2-tokenizer

if [ "${1:-}" = --pack ]; then
  set -e
  gguf=${EABFIT_CACHE:-$repo/.cache/assets}/SmolLM2-135M-Instruct.Q4_1.gguf
  [ -f "$gguf" ] || { echo "no $gguf: run scripts/fetch-assets.sh" >&2; exit 1; }
  bin=${EABFIT_BIN:-$repo/target/release/eabfit}
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  # Any text will do: the corpus is thrown away, its tokenizer files are kept.
  "$bin" tokenize --model "$gguf" --out "$tmp/corpus" --val-fraction 0 README.md
  mkdir -p "$tok_dir"
  cp "$tmp/corpus/tokenizer.json" "$tmp/corpus/tokenizer_config.json" "$tok_dir/"
  ls -la "$tok_dir" >&2
  exit 0
fi

out=${OUT:-./gpu-pretrain-out}
work=${WORK:-/tmp/eabfit-pretrain}
src=${SRC:-/opt/torch/.venv/lib/python3.12/site-packages}
steps=${STEPS:-500}
warmup=${WARMUP:-100}
run_s=${RUN_S:-180}
py=/opt/torch/.venv/bin/python
[ -x "$py" ] || py=python3
export LD_LIBRARY_PATH=${EABFIT_CUDA_LIB:-/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
mkdir -p "$out" "$work/logs"
bin=$work/eabfit
if [ -f .device-bin/eabfit ]; then cp .device-bin/eabfit "$bin"; else
  "$py" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' .device-bin/eabfit.xz "$bin"; fi
chmod +x "$bin"
[ -f "$tok_dir/tokenizer.json" ] || { echo "no $tok_dir: run scripts/gpu-pretrain.sh --pack on the build machine" >&2; exit 1; }
log() { echo "[$(date +%T)] $*" | tee -a "$work/logs/summary.txt"; }
t0=$(date +%s)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$work/logs/summary.txt"

corpus=$work/corpus
if [ ! -f "$corpus/corpus.json" ]; then
  log "tokenize $src (*.py)"
  "$bin" tokenize --tokenizer "$tok_dir" --ext .py --val-fraction 0.005 \
    --bos '<|endoftext|>' --sep '<|endoftext|>' --out "$corpus" "$src" > "$work/logs/tokenize.txt" 2>&1
  log "tokenize exit $? at $(( $(date +%s) - t0 )) s"
fi
cat "$work/logs/tokenize.txt" | tee -a "$work/logs/summary.txt"
# Held-out text for the scans: the held-out files, whole, until ~1 MB.
xargs -d '\n' cat < "$corpus/val-files.txt" 2>/dev/null | head -c 1000000 > "$work/heldout.txt"

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
  model=$run/final
  [ -f "$model/config.json" ] || model=$(ls -d "$run"/checkpoints/step-* 2>/dev/null | tail -n 1)
  if [ -n "$model" ] && [ -f "$model/config.json" ]; then
    log "scan $v ($model)"
    "$bin" scan --model "$model" --device cuda --text "$work/heldout.txt" --seq-len 1023 \
      --num-seqs 16 --json "$work/logs/scan-$v.json" --plot "$out/scan-$v.png" \
      > "$work/logs/scan-$v.txt" 2>&1
    log "scan $v exit $?"
    cat "$work/logs/scan-$v.txt" | tee -a "$work/logs/summary.txt"
  fi
  cp "$work/tb/pretrain-$v/scalars.jsonl" "$work/logs/scalars-$v.jsonl" 2>/dev/null
  cp "$run/summary.json" "$work/logs/summary-$v.json" 2>/dev/null
done

if [ -f "$work/logs/scan-default.json" ] && [ -f "$work/logs/scan-eab.json" ]; then
  "$bin" plot "$work/logs/scan-default.json" "$work/logs/scan-eab.json" --out "$out/scan-overlay.png"
fi

# Curves: every scalar of both runs as one CSV; a plot of the ones issue 14 asks for.
"$py" - "$work/logs" "$out" <<'PY' 2>&1 | tee -a "$work/logs/summary.txt"
import csv, json, os, sys
logs, out = sys.argv[1], sys.argv[2]
rows = []
for v in ("default", "eab"):
    p = os.path.join(logs, f"scalars-{v}.jsonl")
    if os.path.exists(p):
        rows += [(v, d["tag"], d["step"], d["value"]) for d in map(json.loads, open(p))]
with open(os.path.join(logs, "curves.csv"), "w", newline="") as f:
    csv.writer(f).writerows([("run", "tag", "step", "value")] + rows)
print(f"curves.csv: {len(rows)} points")
try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    print("no matplotlib: curves.csv only")
    sys.exit(0)
panels = [("eval/ppl", "validation perplexity"), ("eval/max_top1_over_median", "max top-1 / median |h|"),
          ("eval/massive_count", "massive count"), ("layers/first_token_attn/", "attention on position 0 (mean over layers)"),
          ("layers/eab_slot_attn/", "attention on the slot (mean over layers)"), ("train/loss", "training loss")]
fig, axes = plt.subplots(2, 3, figsize=(15, 8))
for ax, (tag, title) in zip(axes.flat, panels):
    for v in ("default", "eab"):
        pts = {}
        for run, t, s, val in rows:
            if run == v and (t == tag or (tag.endswith("/") and t.startswith(tag))) and val is not None:
                pts.setdefault(s, []).append(val)
        if pts:
            xs = sorted(pts)
            ax.plot(xs, [sum(pts[x]) / len(pts[x]) for x in xs], label=v)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.legend()
fig.tight_layout()
fig.savefig(os.path.join(out, "curves.png"), dpi=90)
print("curves.png written")
PY

retrofit_steps=${RETROFIT_STEPS:-60}
model=$work/runs/default/final
[ -f "$model/config.json" ] || model=$(ls -d "$work"/runs/default/checkpoints/step-* 2>/dev/null | tail -n 1)
if [ "$retrofit_steps" -gt 0 ] && [ -n "$model" ] && [ -f "$model/config.json" ]; then
  # Training text: held-in files (never the held-out ones the scans and verify read), ~2 MB.
  find "$src" -name '*.py' -size +2k | sort | grep -vxFf "$corpus/val-files.txt" | head -n 2000 \
    | xargs -d '\n' cat 2>/dev/null | head -c 2000000 > "$work/train.txt"
  over=(model.path="$model" model.device=cuda model.dtype=bf16 data.train="$work/train.txt"
        data.eval="$work/heldout.txt" data.seq_len=512 data.batch_size=8 "adapters.lora.layers=[1]"
        train.steps="$retrofit_steps" train.out_dir="$work/retrofit" train.checkpoint_every=1000
        eval.every=20 log.dir="$work/tb" log.name=retrofit verify.text="$work/heldout.txt"
        verify.seq_len=1023 verify.windows=16)
  log "retrofit: $retrofit_steps steps on $model"
  timeout "${RETROFIT_S:-120}" "$bin" train recipes/smollm2-135m-eab.yaml "${over[@]}" \
    > "$work/logs/retrofit-train.txt" 2>&1
  log "retrofit train exit $? at $(( $(date +%s) - t0 )) s"
  grep -E "^trained|tokens/s" "$work/logs/retrofit-train.txt" | tail -n 2 | tee -a "$work/logs/summary.txt"
  timeout "${VERIFY_S:-60}" "$bin" verify recipes/smollm2-135m-eab.yaml "${over[@]}" --out "$work/logs/retrofit-verify" \
    > "$work/logs/retrofit-verify.txt" 2>&1
  log "retrofit verify exit $?"
  tail -n 12 "$work/logs/retrofit-verify.txt" | tee -a "$work/logs/summary.txt"
fi

log "done at $(( $(date +%s) - t0 )) s"
cp "$work/logs/summary.txt" "$out/summary.txt"
tar -czf "$out/pretrain.tgz" -C "$work/logs" .
ls -la "$out"
