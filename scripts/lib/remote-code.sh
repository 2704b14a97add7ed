#!/usr/bin/env bash
# On the GPU machine (torch + transformers 5.x, no network): eabfit's `hf` export, loaded by
# transformers with its own remote code, against eabfit. Per shape (SmolLM2-shaped LLaMA, and a
# Mistral-shaped model whose sliding window is shorter than the test sequence, and a tiny LLaMA-3
# with llama3 RoPE scaling; random weights)
# and per mask_first_token (false, true): train 3 steps of slots + LoRA from a wide random slot
# init, export, then scripts/lib/remote_code_compare.py checks that the folder refuses to load
# without trust_remote_code and, under eager and sdpa, that its f32 logits are within 1e-4 (max
# relative; TF32 stays off) of eabfit's (base + adapter, not the export), that 32 greedy tokens of
# generate() equal eabfit generate, a left-padded batch each row alone, and that the cache never
# holds the slot. tests/transformers.rs runs the same checks on the CPU (1e-5) in every test run.
#
#   scripts/gpu.sh remote-code                       # task `remote-code`; results under $OUT (default ./remote-code-out)
#   EABFIT_BIN=target/release/eabfit SHAPES="tiny tiny-mistral" DEVICE=cpu scripts/lib/remote-code.sh   # on a CPU
#
# EABFIT_BIN: the eabfit binary (default .device-bin/eabfit); PYTHON: python with torch and
# transformers (default /opt/torch/.venv/bin/python, else python3); DEVICE: torch device for
# transformers (default cuda when available). eabfit itself runs on the CPU in f32.
# Prints one table; writes $OUT/remote-code.json and per case $OUT/<case>.json and logs.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-remote-code-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
. scripts/lib/device-env.sh
PY=$py
E=$(device_bin "$(mktemp -d)") || exit 2
[ -x "$E" ] || { echo "error: no eabfit binary at $E (set EABFIT_BIN)" >&2; exit 2; }
SHAPES=${SHAPES:-smollm2 mistral tiny-llama3}
DEVARG=()
[ -n "${DEVICE:-}" ] && DEVARG=(--device "$DEVICE")
"$PY" -c 'import torch, transformers; print(f"torch {torch.__version__}, transformers {transformers.__version__}, cuda {torch.cuda.is_available()}")' \
  | tee "$OUT/versions.txt" || { echo "error: $PY cannot import torch and transformers" >&2; exit 2; }
"$E" --version | tee -a "$OUT/versions.txt"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
status=0
cases=()
for shape in $SHAPES; do
  m=$work/$shape
  if ! "$PY" scripts/lib/remote_code_model.py "$m" "$shape" > "$OUT/$shape-model.log" 2>&1; then
    echo "FAIL $shape: building the random model (see $OUT/$shape-model.log)"; tail -5 "$OUT/$shape-model.log"; status=1; continue
  fi
  for mask in false true; do
    name=$shape-mask-$mask
    run=$work/$name-run
    log=$OUT/$name.log
    : > "$log"
    ok=1
    "$E" train recipes/tiny-debug.yaml model.path=$m data.train=$m/train.txt data.eval=$m/train.txt \
      train.out_dir=$run log.dir=$work/tb adapters.eab.init=normal adapters.eab.init_std=1.0 \
      adapters.eab.mask_first_token=$mask adapters.lora.layers=[1] adapters.lora.rank=4 \
      train.steps=3 optim.lr=0.05 optim.warmup_steps=0 loss.ma.weight=0 >> "$log" 2>&1 || ok=0
    [ $ok = 1 ] && { "$E" export --model $m --adapter $run/final --out $work/$name-export --format hf >> "$log" 2>&1 || ok=0; }
    # 48 tokens: longer than the Mistral-shaped model's window (16).
    ids=$(seq -s, 3 7 400 | cut -d, -f1-48)
    [ $ok = 1 ] && { "$E" logits --model $m --adapter $run/final --ids "$ids" --json $work/$name-logits.json >> "$log" 2>&1 || ok=0; }
    prompt=$(cat $m/prompt.txt)
    [ $ok = 1 ] && { "$E" generate --model $work/$name-export --prompt "$prompt" --raw --max-new-tokens 32 \
      --json $work/$name-generate.json >> "$log" 2>&1 || ok=0; }
    if [ $ok = 0 ]; then
      echo "FAIL $name: an eabfit step failed (see $log)"; tail -5 "$log"; status=1; continue
    fi
    echo "=== $name"
    "$PY" scripts/lib/remote_code_compare.py $work/$name-export $work/$name-logits.json $work/$name-generate.json \
      --tol 1e-4 --json "$OUT/$name.json" "${DEVARG[@]}" < /dev/null 2>> "$log" | tee -a "$log"
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
    cases+=("$name")
  done
done

"$PY" - "$OUT" "${cases[@]}" <<'PY'
import json, sys
from pathlib import Path
out, names = Path(sys.argv[1]), sys.argv[2:]
rows = []
for n in names:
    p = out / f"{n}.json"
    rows.append(json.loads(p.read_text()) | {"case": n} if p.is_file() else {"case": n, "pass": False, "error": "no result (see log)"})
print()
print("| case | window | attention | max rel logit diff | slots dropped (for scale) | greedy tokens equal | left-padded batch | cache without the slot | pass |")
print("|---|---|---|---|---|---|---|---|---|")
for r in rows:
    if "error" in r:
        print(f"| {r['case']} | - | - | - | - | - | - | - | FAIL ({r['error']}) |")
        continue
    for impl, a in r["attn"].items():
        print(f"| {r['case']} | {r['sliding_window']} | {impl} | {a['logits_max_rel_diff']:.2e} | {r['plain_max_rel_diff']:.2e} | "
              f"{a['generate_ok']} | "
              f"{a['batch_ok']} | {a['cache_lengths']} | {'pass' if r['pass'] else 'FAIL ' + ', '.join(r['failed'])} |")
(out / "remote-code.json").write_text(json.dumps(rows, indent=1))
print(f"\n{sum(r['pass'] for r in rows)} passed, {sum(not r['pass'] for r in rows)} failed")
PY
[ ${#cases[@]} = 0 ] && status=1
exit $status
