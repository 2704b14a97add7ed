# Sourced by the issue-14 GPU scripts (gpu-pretrain-sweep.sh, gpu-pretrain-pair.sh): the eabfit
# binary, the CUDA libraries and the token corpus, each set up once per warm machine.
# Expects: cwd = repo root with .device-bin carried (scripts/cuda-build.sh;
# scripts/gpu-pretrain.sh --pack), or $EABFIT_BIN naming a binary. Sets: bin, py, work, corpus, src, tok_dir; defines log.
work=${WORK:-/tmp/eabfit-pretrain}
src=${SRC:-/opt/torch/.venv/lib/python3.12/site-packages}
tok_dir=.device-bin/smollm2-tokenizer
py=/opt/torch/.venv/bin/python
[ -x "$py" ] || py=python3
export LD_LIBRARY_PATH=${EABFIT_CUDA_LIB:-/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
mkdir -p "$work/logs"
log() { echo "[$(date +%T)] $*" | tee -a "$work/logs/summary.txt"; }

bin=$work/eabfit
if [ -n "${EABFIT_BIN:-}" ]; then cp "$EABFIT_BIN" "$bin"; elif [ -f .device-bin/eabfit ]; then cp .device-bin/eabfit "$bin"; else
  "$py" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
    .device-bin/eabfit.xz "$bin"; fi
chmod +x "$bin"
[ -f "$tok_dir/tokenizer.json" ] || { echo "no $tok_dir: run scripts/gpu-pretrain.sh --pack on the build machine" >&2; exit 1; }

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
