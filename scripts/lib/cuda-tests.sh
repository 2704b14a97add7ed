#!/usr/bin/env bash
# CUDA test binaries: packed here, run on the GPU machine.
#
# On the build machine (no GPU):
#   scripts/gpu.sh pack [TEST...]        # TEST: names of tests/*.rs, default: cuda_model
#                                        #   cuda_ops cuda_pretrain
#     builds with `scripts/cuda-build.sh --tests --no-run` (the cuda feature; also refreshes
#     .device-bin/eabfit), then strips each named test executable and xz-compresses it into
#     .device-bin/tests/NAME.xz (git-ignored). If .device-bin as a whole is then over the
#     64 MiB carry limit, eabfit is compressed to .device-bin/eabfit.xz as well.
#
# On the GPU machine (from the repo root, with .device-bin carried):
#   scripts/gpu.sh test          # task `test`: TESTS="NAME_OR_PATH..." picks, TEST_ARGS are ARGS
#   scripts/lib/cuda-tests.sh [TEST_OR_PATH...] [-- ARGS]
#     default: every .device-bin/tests/* ; a name means .device-bin/tests/NAME[.xz]; a path is
#     used as is (.xz unpacked first). Each runs with LD_LIBRARY_PATH set to the CUDA 13 libraries
#     of the torch venv, `--test-threads=1 --nocapture` and ARGS, under `timeout`
#     ($GPU_TEST_TIMEOUT, default 300 s). Logs: $OUT/gpu-test/NAME.log (OUT default ./gpu-test-out),
#     summary in $OUT/gpu-test/summary.txt. Exit status: non-zero if any binary failed.
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
carried=$repo/.device-bin
limit=$(( 64 * 1048576 ))
log() { echo "gpu-test: $*" >&2; }

# --- build machine: pack ------------------------------------------------------------------
if [ "${1:-}" = --pack ]; then
  shift
  names=("$@")
  [ ${#names[@]} -gt 0 ] || names=(cuda_model cuda_ops cuda_pretrain)
  build_log=$(mktemp)
  trap 'rm -f "$build_log"' EXIT
  "$repo/scripts/cuda-build.sh" --tests --no-run 2>&1 | tee "$build_log" >&2
  mkdir -p "$carried/tests"
  for name in "${names[@]}"; do
    # cargo: "  Executable tests/cuda_ops.rs (target-cuda/release/deps/cuda_ops-0123abcd)"
    exe=$(sed -nE "s#^[[:space:]]*Executable tests/$name\.rs \((.*)\)[[:space:]]*\$#\1#p" "$build_log" | tail -n1)
    [ -n "$exe" ] || { log "no test executable for tests/$name.rs in the build output"; exit 1; }
    case "$exe" in /*) ;; *) exe=$repo/$exe ;; esac
    strip -o "$carried/tests/$name.part" "$exe"
    xz -T0 -6 -c "$carried/tests/$name.part" > "$carried/tests/$name.xz"
    rm -f "$carried/tests/$name.part" "$carried/tests/$name"
    log "packed $exe -> .device-bin/tests/$name.xz ($(stat -c %s "$carried/tests/$name.xz") bytes)"
  done
  total=$(du -sb "$carried" | cut -f1)
  if [ "$total" -gt "$limit" ] && [ -f "$carried/eabfit" ]; then
    xz -T0 -6 -c "$carried/eabfit" > "$carried/eabfit.xz"
    rm -f "$carried/eabfit"
    log ".device-bin was over 64 MiB: eabfit compressed to .device-bin/eabfit.xz"
    total=$(du -sb "$carried" | cut -f1)
  fi
  log ".device-bin: $total bytes in all (carry limit $limit)"
  find "$carried" -type f -printf '%10s  %p\n' | sed "s#$repo/##" >&2
  [ "$total" -le "$limit" ] || { log "still over the carry limit"; exit 1; }
  exit 0
fi

# --- GPU machine: run ---------------------------------------------------------------------
. "$repo/scripts/lib/device-env.sh"
out=${OUT:-./gpu-test-out}/gpu-test
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

targets=() extra=()
while [ $# -gt 0 ]; do
  if [ "$1" = -- ]; then shift; extra=("$@"); break; fi
  targets+=("$1"); shift
done
if [ ${#targets[@]} -eq 0 ]; then
  for f in "$carried"/tests/*; do [ -f "$f" ] && targets+=("$f"); done
fi
[ ${#targets[@]} -gt 0 ] || { log "no test binaries under .device-bin/tests (run scripts/gpu.sh pack here first)"; exit 1; }

{
  echo "# $(date -u '+%F %T') UTC on $(hostname)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
} | tee "$out/summary.txt"
failed=0
for t in "${targets[@]}"; do
  if [ ! -e "$t" ]; then
    if [ -e "$carried/tests/$t.xz" ]; then t=$carried/tests/$t.xz
    elif [ -e "$carried/tests/$t" ]; then t=$carried/tests/$t
    else log "no test binary $t"; echo "$t: missing" >> "$out/summary.txt"; failed=1; continue; fi
  fi
  name=$(basename "$t" .xz)
  exe=$work/$name
  if [ "${t%.xz}" != "$t" ]; then unxz_to "$t" "$exe"; else cp "$t" "$exe"; chmod +x "$exe"; fi
  log "running $name"
  start=$(date +%s)
  set +e
  timeout "${GPU_TEST_TIMEOUT:-300}" "$exe" --test-threads=1 --nocapture "${extra[@]}" > "$out/$name.log" 2>&1
  rc=$?
  set -e
  result=$(grep -E '^test result:' "$out/$name.log" | tail -n1 || true)
  echo "$name: rc $rc in $(( $(date +%s) - start )) s; ${result:-no result line}" | tee -a "$out/summary.txt"
  if [ $rc -ne 0 ]; then
    failed=1
    { grep -E '^test .* FAILED$|panicked at|^---- ' "$out/$name.log" || true; } | head -n 40 | tee -a "$out/summary.txt"
    tail -n 20 "$out/$name.log"
  fi
done
exit $failed
