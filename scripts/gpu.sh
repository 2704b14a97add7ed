#!/usr/bin/env bash
# The one GPU entry point: named tasks, chained in one device call, from the repo root with
# .device-bin carried. Each task is a script in scripts/lib/ (scripts/README.md has the table).
#
# On the build machine (no GPU), first:
#   scripts/cuda-build.sh                  # .device-bin/eabfit[.xz], the cuda feature
#   scripts/gpu.sh pack [TEST...]          # + the CUDA test binaries (tests/TEST.rs; default
#                                          #   cuda_model cuda_ops cuda_pretrain)
#   scripts/gpu.sh pack-tokenizer          # + .device-bin/smollm2-tokenizer (pretrain-* tasks)
# On the GPU machine:
#   scripts/gpu.sh TASK[=SECONDS] [TASK[=SECONDS]...]
# Tasks (settings are each script's environment variables, read in its header):
#   test            CUDA test binaries packed under .device-bin/tests (TESTS="NAME..." picks,
#                   default all; TEST_ARGS go to each binary)          lib/cuda-tests.sh
#   bench           eabfit vs PyTorch + transformers + PEFT (BENCH_*)   lib/bench.sh
#   train-7b        train / verify / export on a random LLaMA-2-7B      lib/train-7b.sh
#                   (TRAIN_STEPS, 6 here; the export is removed after)
#   train-70b       the layer split: info / ppl / generate / train /     lib/train-70b.sh
#                   export on a random LLaMA-2-70B over several GPUs
#                   (LAYERS, MAP, TRAIN_STEPS, EXPORT; on nvidia-h200-x2
#                   LAYERS=60 for the disk)
#   oom             CUDA out-of-memory messages of bench, scan, train   lib/oom.sh
#   remote-code     the hf export in transformers with remote code      lib/remote-code.sh
#   peft            the peft export in transformers + PEFT               lib/peft.sh
#   pretrain        the from-scratch pair, one call (STEPS, RUN_S, ...)  lib/pretrain.sh
#   pretrain-pair   the pair over several calls (RUNS, PAIR_S, FINISH)  lib/pretrain-pair.sh
#   pretrain-sweep  the settings search (runs the CUDA tests too)       lib/pretrain-sweep.sh
#   pretrain-speed  pretraining tokens/s vs transformers (SPEED_*)      lib/pretrain-speed.sh
#   pretrain-dp     data-parallel tokens/s on 1, 2, 4.. GPUs vs torch   lib/pretrain-dp.sh
#                   DDP (DP_*; an x2/x4/x8 machine, built with nccl)
#   profile         ncu per-kernel time, PROFILE_SHAPES="SHAPE[:MODE] ..."
#                   (default llama2-7b llama-1b; MODE train or forward) lib/profile.sh
# TASK=SECONDS runs that task under `timeout SECONDS`; otherwise under what is left of
# $GPU_TOTAL_S (590) since the driver started. bench, unless BENCH_BUDGET_S is set, keeps to
# what is left less 30 s; a profile shape is skipped with 60 s or less left.
#
# Output ($OUT, default ./gpu-out): two files per task, $OUT/TASK.txt (its console output and
# exit status) and $OUT/TASK.tgz (everything it wrote under its own OUT, less binaries, weights
# and checkpoints); a device call brings back at most 8 files, so at most 4 tasks a call. The
# key lines of each task are printed as it ends; exit status non-zero if any task failed.
# Examples (the calls behind docs/benchmarks.md and docs/pretrain.md):
#   scripts/gpu.sh test bench                                   # CUDA tests, then the benchmark
#   scripts/gpu.sh train-7b=330 oom=80 remote-code=170
#   STEPS=300 WARMUP=30 RUN_S=230 RETROFIT_S=90 SRC=/opt/torch/.venv/lib/python3.12/site-packages/torch \
#     scripts/gpu.sh test pretrain
#   RUNS=default PAIR_S=430 scripts/gpu.sh test pretrain-pair
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
lib=$repo/scripts/lib

case "${1:-}" in
  pack) shift; exec "$lib/cuda-tests.sh" --pack "$@" ;;
  pack-tokenizer) exec "$lib/pretrain.sh" --pack ;;
  ""|-h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 2 ;;
esac

# Every task name is checked before the first one runs: a typo must not cost a device call.
script_of() {
  case "$1" in
    test) echo cuda-tests.sh ;; bench) echo bench.sh ;; train-7b) echo train-7b.sh ;;
    train-70b) echo train-70b.sh ;;
    oom) echo oom.sh ;; remote-code) echo remote-code.sh ;; peft) echo peft.sh ;;
    pretrain) echo pretrain.sh ;; pretrain-pair) echo pretrain-pair.sh ;;
    pretrain-sweep) echo pretrain-sweep.sh ;; pretrain-speed) echo pretrain-speed.sh ;;
    pretrain-dp) echo pretrain-dp.sh ;; profile) echo profile.sh ;;
    *) return 1 ;;
  esac
}
for arg in "$@"; do
  name=${arg%%=*}
  script_of "$name" > /dev/null || { echo "gpu.sh: unknown task '$name' (scripts/gpu.sh --help)" >&2; exit 2; }
  [ "$name" = "$arg" ] || [[ ${arg#*=} =~ ^[0-9]+$ ]] || { echo "gpu.sh: $arg: seconds must be a whole number" >&2; exit 2; }
done

t0=$(date +%s)
total=${GPU_TOTAL_S:-590}
left() { echo $(( total - ($(date +%s) - t0) )); }
out=${OUT:-./gpu-out}
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d)

# One eabfit binary for every task; xz may be missing on the GPU machine, Python's lzma is not.
if [ -z "${EABFIT_BIN:-}" ]; then
  if [ -f .device-bin/eabfit ]; then EABFIT_BIN=$repo/.device-bin/eabfit
  elif [ -f .device-bin/eabfit.xz ]; then
    py=/opt/torch/.venv/bin/python
    [ -x "$py" ] || py=python3
    "$py" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
      .device-bin/eabfit.xz "$work/eabfit"
    chmod +x "$work/eabfit"
    EABFIT_BIN=$work/eabfit
  else
    echo "gpu.sh: no .device-bin/eabfit[.xz]: run scripts/cuda-build.sh on the build machine" >&2; exit 1
  fi
fi
export EABFIT_BIN

# run_task NAME SECONDS DIR: the task's script with OUT=DIR, under `timeout SECONDS`.
run_task() {
  local name=$1 secs=$2 dir=$3 script
  script=$lib/$(script_of "$name")
  case "$name" in
    test)
      # shellcheck disable=SC2086
      OUT=$dir timeout "$secs" "$script" ${TESTS:-} ${TEST_ARGS:+-- $TEST_ARGS}
      local rc=$?
      cat "$dir"/gpu-test/*.log 2>/dev/null
      return $rc ;;
    bench)
      OUT=$dir BENCH_BUDGET_S=${BENCH_BUDGET_S:-$(( secs - 30 ))} timeout "$secs" "$script" ;;
    train-7b)
      OUT=$dir TRAIN_STEPS=${TRAIN_STEPS:-6} timeout "$secs" "$script"
      local rc=$?
      # The 7B export is 13 GB: free the disk for the tasks after it.
      rm -rf "${WORK:-/tmp/eabfit-7b}/export"
      return $rc ;;
    profile)
      local p rc=0
      for p in ${PROFILE_SHAPES:-llama2-7b llama-1b}; do
        local l; l=$(left)
        [ "$l" -gt 60 ] || { echo "profile $p: skipped, $l s left"; continue; }
        local mode=train; [ "${p#*:}" = "$p" ] || mode=${p#*:}
        OUT=$dir PROFILE_MODE=$mode PROFILE_TIMEOUT_S=${PROFILE_TIMEOUT_S:-$(( l - 10 ))} timeout "$secs" "$script" "${p%%:*}" || rc=$?
      done
      return $rc ;;
    *)
      OUT=$dir timeout "$secs" "$script" ;;
  esac
}

status=0
for arg in "$@"; do
  name=${arg%%=*}
  secs=$(left); [ "$name" = "$arg" ] || secs=${arg#*=}
  if [ "$secs" -le 0 ]; then
    echo "$name: skipped, no time left" | tee "$out/$name.txt"; status=1; continue
  fi
  dir=$work/$name
  mkdir -p "$dir"
  run_task "$name" "$secs" "$dir" > "$out/$name.txt" 2>&1
  rc=$?
  [ $rc = 0 ] || status=1
  echo "$name exit $rc after $(( $(date +%s) - t0 )) s" | tee -a "$out/$name.txt"
  grep -E "^test result|PASS|FAIL|tokens/s|^trained|peak device memory|passed|failed" "$out/$name.txt" | tail -n 8
  tar -czf "$out/$name.tgz" -C "$dir" --exclude=eabfit --exclude='*.safetensors' \
    --exclude=checkpoints --exclude=final . 2>/dev/null
done
ls -la "$out"
exit $status
