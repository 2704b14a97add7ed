# Sourced by the issue-14 GPU scripts (gpu-pretrain.sh, -sweep, -pair, -speed): the eabfit
# binary, the CUDA libraries and the token corpus, each set up once per warm machine.
# Expects: cwd = repo root with .device-bin carried (scripts/cuda-build.sh;
# scripts/gpu.sh pack-tokenizer), or $EABFIT_BIN naming a binary. Sets: bin, py, work, corpus, src, tok_dir; defines log.
work=${WORK:-/tmp/eabfit-pretrain}
src=${SRC:-/opt/torch/.venv/lib/python3.12/site-packages}
tok_dir=.device-bin/smollm2-tokenizer
. scripts/lib/device-env.sh
mkdir -p "$work/logs"
# eabfit's plots (scan_run's) need a TrueType font; the H200 has no system one, and matplotlib
# carries DejaVu Sans.
font=$("$py" -c 'import matplotlib, os; print(os.path.join(matplotlib.get_data_path(), "fonts/ttf/DejaVuSans.ttf"))' 2>/dev/null)
[ -z "${EABFIT_FONT:-}" ] && [ -f "$font" ] && export EABFIT_FONT=$font
log() { echo "[$(date +%T)] $*" | tee -a "$work/logs/summary.txt"; }

bin=$(device_bin "$work") || exit 1
[ -f "$tok_dir/tokenizer.json" ] || { echo "no $tok_dir: run scripts/gpu.sh pack-tokenizer on the build machine" >&2; exit 1; }

# The corpus: every *.py under $src, <|endoftext|> as BOS and separator, 0.5% of files held out.
# Reused while the machine stays warm.
corpus=$work/corpus
tokenize_corpus() {
  if [ ! -f "$corpus/corpus.json" ]; then
    local t=$(date +%s)
    log "tokenize $src (*.py)"
    "$bin" tokenize --tokenizer "$tok_dir" --ext .py --val-fraction 0.005 \
      --bos '<|endoftext|>' --sep '<|endoftext|>' --out "$corpus" "$src" > "$work/logs/tokenize.txt" 2>&1
    log "tokenize exit $? in $(( $(date +%s) - t )) s"
  fi
  tail -n 3 "$work/logs/tokenize.txt" | tee -a "$work/logs/summary.txt"
}

# Held-out text for scans and verify: the held-out files, whole, until ~1 MB.
heldout_text() {
  xargs -d '\n' cat < "$corpus/val-files.txt" 2>/dev/null | head -c 1000000 > "$work/heldout.txt"
}

# scan_run NAME RUN_DIR LOG_DIR PNG: scans the run's final/ (else its newest checkpoint) on 16
# held-out windows of $SCAN_LEN (1023) tokens into LOG_DIR/scan-NAME.{json,txt} and PNG.
scan_run() {
  local name=$1 run=$2 logs=$3 png=$4 model=$2/final
  [ -f "$model/config.json" ] || model=$(ls -d "$run"/checkpoints/step-* 2>/dev/null | tail -n 1)
  [ -n "$model" ] && [ -f "$model/config.json" ] || { log "scan $name: no model in $run"; return 1; }
  log "scan $name ($model)"
  "$bin" scan --model "$model" --device "${DEVICE:-cuda}" --text "$work/heldout.txt" \
    --seq-len "${SCAN_LEN:-1023}" --num-seqs 16 --json "$logs/scan-$name.json" --plot "$png" \
    > "$logs/scan-$name.txt" 2>&1
  log "scan $name exit $?"
  tee -a "$work/logs/summary.txt" < "$logs/scan-$name.txt"
}

# retrofit MODEL DIR: issue 14's retrofit of a pretrained model, `eabfit train` with
# recipes/smollm2-135m-eab-macbeth.yaml's adapters (slots in every layer, LoRA on layer 1's MLP, KL to
# the frozen model) for $RETROFIT_STEPS (60) steps under `timeout $RETROFIT_S`, on held-in files
# (never the held-out ones), then `eabfit verify` before/after on the held-out text. Logs and
# runs go to DIR.
retrofit() {
  local model=$1 dir=$2 t=$(date +%s)
  find "$src" -name '*.py' -size +2k | sort | grep -vxFf "$corpus/val-files.txt" | head -n 2000 \
    | xargs -d '\n' cat 2>/dev/null | head -c 2000000 > "$work/train.txt"
  local over=(model.path="$model" model.device="${DEVICE:-cuda}" model.dtype="${DTYPE:-bf16}"
    data.train="$work/train.txt" data.eval="$work/heldout.txt" data.seq_len="${RETROFIT_LEN:-512}"
    data.batch_size=8 "adapters.lora.layers=[1]" train.steps="${RETROFIT_STEPS:-60}"
    train.out_dir="$dir/retrofit" train.checkpoint_every=1000 eval.every=20 log.dir="$dir/tb"
    log.name=retrofit verify.text="$work/heldout.txt" verify.seq_len="${SCAN_LEN:-1023}"
    verify.windows=16)
  log "retrofit: ${RETROFIT_STEPS:-60} steps on $model"
  timeout "${RETROFIT_S:-120}" "$bin" train recipes/smollm2-135m-eab-macbeth.yaml "${over[@]}" \
    > "$dir/retrofit-train.txt" 2>&1
  log "retrofit train exit $? in $(( $(date +%s) - t )) s"
  grep -E "^trained|tokens/s" "$dir/retrofit-train.txt" | tail -n 2 | tee -a "$work/logs/summary.txt"
  timeout "${VERIFY_S:-60}" "$bin" verify recipes/smollm2-135m-eab-macbeth.yaml "${over[@]}" \
    --out "$dir/retrofit-verify" > "$dir/retrofit-verify.txt" 2>&1
  log "retrofit verify exit $?"
  tail -n 14 "$dir/retrofit-verify.txt" | tee -a "$work/logs/summary.txt"
}
