#!/usr/bin/env bash
# eabfit vs PyTorch (transformers + PEFT) on the GPU machine: training-step and forward
# throughput, step time, peak memory and MFU for the same random-weight models, same step.
#
# Run from the repo root on the GPU machine with .device-bin carried (eabfit or eabfit.xz, from
# scripts/cuda-build.sh or scripts/gpu.sh pack):
#   scripts/gpu.sh bench                     # task `bench`; results under $OUT (default ./bench-out)
#
# Cases (BENCH_CASES, "shape:mode:seq[:batches[:split]]" words, batches comma-separated), default:
# the cases of issue 10:
#   llama2-7b:train:2048:4,2,1 llama-1b:train:2048:8,4,2,1 llama2-7b:forward:2048:4
#   llama-1b:forward:2048:4 llama2-7b:train:4096:1
# A fifth field splits the layers over the host's GPUs: `auto` gives eabfit `--device-map auto`
# and PyTorch transformers + accelerate `device_map="auto"` (bench_torch.py --device-map auto);
# an explicit map (cuda:0=0-39/cuda:1=40-79, `/` for `,`) goes to eabfit as it is and to
# PyTorch as auto. The layer-split case of issue 22, on nvidia-h200-x2 or larger:
#   BENCH_CASES="llama2-70b:train:2048:1:auto llama2-70b:forward:2048:1:auto" scripts/gpu.sh bench
# For each case eabfit tries the case's batches (else BENCH_BATCHES, default "4 2 1") until one fits
# (eabfit bench exits 3 on CUDA out-of-memory); PyTorch then runs at the batch eabfit got (or, if
# eabfit fitted none, the first of BENCH_BATCHES that fits). A train case that fits at no batch
# is retried once at half the sequence length with batches "2 1" (both tools), time allowing.
# PyTorch runs twice per case: eager, then compiled (torch.compile of each decoder layer and of
# the KL loss, 3+ warm-up steps for the compilations; BENCH_TORCH_COMPILE=0 skips it), and the
# table gives eabfit's ratio to each.
# Last, time allowing, the first train case that fitted again with `--attention blocked` (the
# composite the fused kernel replaced; BENCH_AB_ATTENTION=0 skips it) and with --release-pool
# --event-tracking (candle's allocator defaults, which eabfit turns off).
#
# Every run: BENCH_WARMUP (2) untimed + BENCH_STEPS (5) timed steps, under `timeout`; GPU memory
# sampled with nvidia-smi every 100 ms alongside. The whole script keeps to BENCH_BUDGET_S
# (default 530 s): a run that would not fit in what is left is skipped and marked so.
#
# Writes $OUT/results.jsonl (one object per run: case, tool, status, batch, nvidia-smi peak, the
# tool's own JSON report), $OUT/table.md (printed at the end), $OUT/benchmarks.json (per case:
# eabfit and PyTorch tokens/s, peak GiB, batch, ratio, date; docs/runs/benchmarks.json is a copy),
# logs in $OUT/logs/.
# Environment: EABFIT_BIN (default .device-bin/eabfit[.xz]), PYTHON (default the torch venv),
# BENCH_DEVICE (cuda; `cpu` with tiny cases for a smoke test without a GPU).
set -uo pipefail
cd "$(dirname "$0")/../.."

t0=$(date +%s)
budget=${BENCH_BUDGET_S:-530}
out=${OUT:-./bench-out}
steps=${BENCH_STEPS:-5}
warmup=${BENCH_WARMUP:-2}
batches=${BENCH_BATCHES:-4 2 1}
cases=${BENCH_CASES:-llama2-7b:train:2048:4,2,1 llama-1b:train:2048:8,4,2,1 llama2-7b:forward:2048:4 llama-1b:forward:2048:4 llama2-7b:train:4096:1}
device=${BENCH_DEVICE:-cuda}
run_timeout=${BENCH_RUN_TIMEOUT:-180}
# The compiled PyTorch anchor (torch.compile of each decoder layer and the loss) beside eager.
compiled=${BENCH_TORCH_COMPILE:-1}
min_run_s=${BENCH_MIN_RUN_S:-30}
mkdir -p "$out/logs" "$out/json"
results=$out/results.jsonl
: > "$results"
log() { echo "bench-gpu: [$(( $(date +%s) - t0 ))s] $*" >&2; }

. scripts/lib/device-env.sh

work=$(mktemp -d)
trap 'rm -rf "$work"; [ -n "${smi_pid:-}" ] && kill "$smi_pid" 2>/dev/null' EXIT

# --- the eabfit binary ----------------------------------------------------------------------
bin=$(device_bin "$work") || exit 1

{
  echo "# $(date -u '+%F %T') UTC on $(hostname)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  echo "python $py (torch/transformers/peft versions are in each torch report)"
  echo "steps $steps after $warmup warm-up; batches tried: $batches"
} | tee "$out/env.txt" >&2

# --- one run: mem sampler + timeout + record ------------------------------------------------
has_smi=0; command -v nvidia-smi >/dev/null 2>&1 && [ "$device" != cpu ] && has_smi=1
smi_pid=

# record CASE TOOL STATUS BATCH SMI_MIB JSON_FILE NOTE
record() {
  "$py" - "$@" >> "$results" <<'EOF'
import json, sys
case, tool, status, batch, smi, jf, note = sys.argv[1:8]
rep = None
if jf and jf != "-":
    try:
        rep = json.loads(open(jf).read().strip().splitlines()[-1])
    except Exception:
        rep = None
print(json.dumps({"case": case, "tool": tool, "status": status,
                  "batch": int(batch) if batch.isdigit() else None,
                  "smi_peak_gib": (int(smi) / 1024) if smi.isdigit() else None,
                  "note": note, "report": rep}))
EOF
}

# run_one CASE TOOL BATCH LOGNAME CMD... ; sets RUN_STATUS (ok|oom|timeout|error|skipped), RUN_SMI
run_one() {
  local case=$1 tool=$2 batch=$3 name=$4; shift 4
  local left=$(( budget - ($(date +%s) - t0) ))
  if [ "$left" -lt "$min_run_s" ]; then
    RUN_STATUS=skipped RUN_SMI=-
    log "$case $tool b$batch: skipped (${left}s of the budget left)"
    return
  fi
  local limit=$(( left - 5 < run_timeout ? left - 5 : run_timeout ))
  local smi_file=$work/$name.smi
  if [ $has_smi = 1 ]; then
    # A split samples every GPU (the peak reported is the largest one's), else GPU 0.
    local which=(-i 0); [ -z "${RUN_SPLIT:-}" ] || which=()
    nvidia-smi "${which[@]}" --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$smi_file" 2>/dev/null &
    smi_pid=$!
  fi
  log "$case $tool b$batch (timeout ${limit}s): $*"
  timeout "$limit" "$@" > "$out/logs/$name.log" 2>&1
  local rc=$?
  if [ -n "$smi_pid" ]; then kill "$smi_pid" 2>/dev/null; wait "$smi_pid" 2>/dev/null; smi_pid=; fi
  RUN_SMI=$( [ -s "$smi_file" ] && grep -E '^[0-9]+' "$smi_file" | sort -n | tail -n1 || echo -)
  [ -n "$RUN_SMI" ] || RUN_SMI=-
  case $rc in
    0) RUN_STATUS=ok ;;
    3) RUN_STATUS=oom ;;
    124|137) RUN_STATUS=timeout ;;
    *) if grep -qiE 'out of memory|OUT_OF_MEMORY' "$out/logs/$name.log"; then RUN_STATUS=oom; else RUN_STATUS=error; fi ;;
  esac
  log "$case $tool b$batch: $RUN_STATUS (rc $rc, nvidia-smi peak ${RUN_SMI} MiB) $(grep -E '^(bench|torch) ' "$out/logs/$name.log" | tail -n1)"
  [ "$RUN_STATUS" = error ] && tail -n 5 "$out/logs/$name.log" >&2
}

# bench_case SHAPE MODE SEQ "BATCHES" [EXTRA eabfit ARGS...]: eabfit down the batches, then torch
# at eabfit's batch. Sets CASE_FIT (the batch eabfit ran at, or empty). RUN_SPLIT (a device map)
# runs both tools split over the GPUs.
bench_case() {
  local shape=$1 mode=$2 seq=$3 bl=$4; shift 4
  local extra=("$@")
  local tag=${extra[*]:+ ${extra[*]}}
  local case="$shape $mode t$seq${RUN_SPLIT:+ split ${RUN_SPLIT}}${tag}"
  local slug=$shape-$mode-t$seq${RUN_SPLIT:+-split}${extra[*]:+-knobs}
  local place=(--device "$device") tplace=(--device "$device")
  if [ -n "${RUN_SPLIT:-}" ]; then place=(--device-map "$RUN_SPLIT"); tplace=(--device-map auto); fi
  CASE_FIT=
  local b status=none
  for b in $bl; do
    local jf=$out/json/eabfit-$slug-b$b.json
    rm -f "$jf"
    run_one "$case" eabfit "$b" "eabfit-$slug-b$b" "$bin" bench --shape "$shape" --mode "$mode" \
      --seq "$seq" --batch "$b" --steps "$steps" --warmup "$warmup" "${place[@]}" \
      --json "$jf" "${extra[@]}"
    status=$RUN_STATUS
    record "$case" eabfit "$status" "$b" "$RUN_SMI" "$( [ $status = ok ] && echo "$jf" || echo -)" "${extra[*]}"
    if [ "$status" = ok ]; then CASE_FIT=$b; break; fi
    [ "$status" = oom ] || break
  done
  [ ${#extra[@]} -eq 0 ] || return 0   # knob variants: eabfit only
  local tb=${CASE_FIT:-$bl}
  local tool flag wu
  for tool in torch torch-compiled; do
    flag=; wu=$warmup
    if [ $tool = torch-compiled ]; then
      [ "$compiled" = 1 ] || continue
      # accelerate's hooks around each layer of a split model are left to eager mode.
      [ -z "${RUN_SPLIT:-}" ] || continue
      # Compilation and the adapter on/off recompile happen in the first steps: warm up longer.
      flag=--compile; wu=$(( warmup > 3 ? warmup : 3 ))
    fi
    for b in $tb; do
      local jf=$out/json/$tool-$slug-b$b.json
      rm -f "$jf"
      run_one "$case" $tool "$b" "$tool-$slug-b$b" "$py" scripts/lib/bench_torch.py --shape "$shape" \
        --mode "$mode" --seq "$seq" --batch "$b" --steps "$steps" --warmup "$wu" \
        "${tplace[@]}" --json "$jf" $flag
      record "$case" $tool "$RUN_STATUS" "$b" "$RUN_SMI" "$( [ $RUN_STATUS = ok ] && echo "$jf" || echo -)" ""
      [ "$RUN_STATUS" = oom ] || break
    done
  done
}

declare -A fit
retry=()
for c in $cases; do
  IFS=: read -r shape mode seq cb split <<< "$c"
  bl=${cb//,/ }
  RUN_SPLIT=${split//\//,}
  bench_case "$shape" "$mode" "$seq" "${bl:-$batches}"
  RUN_SPLIT=
  [ -z "$split" ] || continue   # no half-length retry or knob variants for a split case
  fit[$c]=$CASE_FIT
  if [ -z "$CASE_FIT" ] && [ "$mode" = train ] && [ "$seq" -ge "${BENCH_RETRY_MIN_SEQ:-1024}" ]; then retry+=("$shape:$mode:$(( seq / 2 ))"); fi
done
for c in "${retry[@]}"; do
  IFS=: read -r shape mode seq <<< "$c"
  log "retrying $shape $mode at seq $seq (no batch fitted at $(( seq * 2 )))"
  bench_case "$shape" "$mode" "$seq" "2 1"
done
# The attention lever (the blocked composite the kernel replaced), then candle's allocator
# defaults, on the first train case that fitted.
for c in $cases; do
  IFS=: read -r shape mode seq cb <<< "$c"
  if [ "$mode" = train ] && [ -n "${fit[$c]:-}" ] && [ "$device" != cpu ]; then
    [ "${BENCH_AB_ATTENTION:-1}" = 1 ] && bench_case "$shape" "$mode" "$seq" "${fit[$c]}" --attention blocked
    bench_case "$shape" "$mode" "$seq" "${fit[$c]}" --release-pool --event-tracking
    break
  fi
done

# --- table ------------------------------------------------------------------------------------
"$py" - "$results" > "$out/table.md" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
def f(x, fmt):
    return "" if x is None else format(x, fmt)
ok_torch, ok_compiled = {}, {}
for r in rows:
    if r["tool"] in ("torch", "torch-compiled") and r["status"] == "ok":
        (ok_torch if r["tool"] == "torch" else ok_compiled)[r["case"]] = r["report"]
print("| case | tool | batch | status | tokens/s | ms/step | peak alloc GiB | nvidia-smi peak GiB | MFU | eabfit/torch tokens/s | eabfit/compiled tokens/s |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    rep = r["report"] or {}
    ratio, ratio_c = "", ""
    key = r["case"].split(" --")[0].rstrip()
    t, tc = ok_torch.get(key), ok_compiled.get(key)
    if r["tool"] == "eabfit" and rep and t:
        ratio = f(rep["tokens_per_s"] / t["tokens_per_s"], ".3f")
    if r["tool"] == "eabfit" and rep and tc:
        ratio_c = f(rep["tokens_per_s"] / tc["tokens_per_s"], ".3f")
    print("| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
        r["case"], r["tool"], r["batch"] if r["batch"] is not None else "", r["status"],
        f(rep.get("tokens_per_s"), ",.0f"), f(rep.get("ms_per_step"), ".1f"),
        f(rep.get("peak_alloc_gib"), ".1f"), f(r["smi_peak_gib"], ".1f"),
        f(rep["mfu"] * 100, ".1f") + "%" if rep.get("mfu") is not None else "", ratio, ratio_c))
phased = [r for r in rows if r["tool"] == "eabfit" and r["report"] and r["report"].get("phases_ms")]
if phased:
    names = []
    for r in phased:
        for k in r["report"]["phases_ms"]:
            if k not in names:
                names.append(k)
    print()
    print("eabfit phases of the last warm-up step (ms, each closed by a synchronisation):")
    print()
    print("| case | batch | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for r in phased:
        p = r["report"]["phases_ms"]
        print("| {} | {} | {} |".format(r["case"], r["batch"], " | ".join(f(p.get(k), ".1f") for k in names)))
print()
print("MFU: 6N tokens/step for train (teacher fwd 2N + student fwd 2N + activation-gradient bwd 2N),"
      " 2N for forward; N = matmul parameters incl. lm_head; peak 989 TFLOP/s (H200 dense bf16)."
      " peak alloc: eabfit = CUDA memory-pool high-water mark, torch = max_memory_allocated.")
EOF
# --- JSON summary: one object per case --------------------------------------------------------
"$py" - "$results" > "$out/benchmarks.json" <<'EOF'
import json, sys, datetime
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
cases = {}
for r in rows:
    if r["note"]:
        continue
    c = cases.setdefault(r["case"], {"case": r["case"]})
    rep = r["report"] or {}
    prev = c.get(r["tool"])
    if prev and prev["status"] == "ok":
        continue
    c[r["tool"]] = {"status": r["status"], "batch": r["batch"],
                    "tokens_per_s": rep.get("tokens_per_s"),
                    "peak_gib": rep.get("peak_alloc_gib", rep.get("peak_gib")),
                    "ms_per_step": rep.get("ms_per_step")}
for c in cases.values():
    e, t, tc = c.get("eabfit", {}), c.get("torch", {}), c.get("torch-compiled", {})
    if e.get("tokens_per_s") and t.get("tokens_per_s"):
        c["ratio"] = e["tokens_per_s"] / t["tokens_per_s"]
    if e.get("tokens_per_s") and tc.get("tokens_per_s"):
        c["ratio_compiled"] = e["tokens_per_s"] / tc["tokens_per_s"]
print(json.dumps({"date": datetime.datetime.utcnow().strftime("%Y-%m-%d"),
                  "cases": list(cases.values())}, indent=1))
EOF
log "done in $(( $(date +%s) - t0 )) s; results in $out"
cat "$out/table.md"
