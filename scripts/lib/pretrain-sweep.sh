#!/usr/bin/env bash
# Issue 14's settings search, one H200 call of ~9 minutes: which setting grows the default
# model's massive activation soonest, and does a slot model grow one too.
#
# Every run is recipes/pretrain-default.yaml's 122.7M-parameter LLaMA (12 layers, d 768, T 1024)
# with the learning rate held constant after 200 warmup steps (min_lr_ratio 1: the runs stop on
# time, not at a schedule's end), changed as the table below says. All of them train at once,
# each for $SWEEP_S seconds (`pretrain --max-seconds`), sharing the GPU, so each gets about the
# same device time; they are compared at equal steps, at equal tokens and at the end.
#   b32         the reference: batch 32, lr 1e-3, weight decay 0.1
#   b8, b4      batch 8 / 4: 4x / 8x the optimizer steps per token
#   b8-lr2e-3   b8 at twice the learning rate
#   b8-wd0      b8 without weight decay
#   eab-b8      b8 with a slot per layer (v' zeros, k' normal 0.02, no decay): b8's twin
# $SWEEP_RUNS replaces the list (a line a run: its name, then its overrides).
# First, while the corpus is tokenized on the CPU ($SRC, every *.py: ~115M tokens), the CUDA
# tests run (scripts/lib/cuda-tests.sh cuda). Run from the repo root with .device-bin carried:
#   scripts/gpu.sh pretrain-sweep
# $OUT: sweep.txt (the table), sweep.png, sweep.tgz (logs, scalars, summaries), gpu-test.txt.
# The table's pick is the default-attention run with the highest top-1/median among those whose
# top-1 sits in one dim on the first token (the paper's shape) in most windows, if any.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-./gpu-pretrain-sweep-out}
mkdir -p "$out"
. scripts/lib/pretrain-common.sh
sweep_s=${SWEEP_S:-380}
t0=$(date +%s)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$work/logs/summary.txt"

RAYON_NUM_THREADS=12 tokenize_corpus &
tok_pid=$!
tmp=$(mktemp -d)
OUT=$tmp scripts/lib/cuda-tests.sh cuda > "$out/gpu-test.txt" 2>&1
echo "gpu-test exit $?" >> "$out/gpu-test.txt"
cat "$tmp"/gpu-test/*.log >> "$out/gpu-test.txt" 2>/dev/null
grep -E "^test |test result|exit" "$out/gpu-test.txt" | tee -a "$work/logs/summary.txt"
wait "$tok_pid"
[ -f "$corpus/corpus.json" ] || { log "no corpus"; exit 1; }

# $SWEEP_RUNS replaces the list: one run a line, its name then its overrides.
runs=(
  "b32 data.batch_size=32 eval.every=32"
  "b8 data.batch_size=8 eval.every=128"
  "b4 data.batch_size=4 eval.every=256"
  "b8-lr2e-3 data.batch_size=8 eval.every=128 optim.lr=2e-3"
  "b8-wd0 data.batch_size=8 eval.every=128 optim.weight_decay=0"
  "eab-b8 data.batch_size=8 eval.every=128 eab.enabled=true"
)
[ -n "${SWEEP_RUNS:-}" ] && mapfile -t runs < <(grep -v '^[[:space:]]*$' <<< "$SWEEP_RUNS")
sweep=$work/sweep
mkdir -p "$sweep"
log "sweep: ${#runs[@]} runs at once, $sweep_s s each"
pids=()
for spec in "${runs[@]}"; do
  read -r name overrides <<< "$spec"
  # shellcheck disable=SC2086
  timeout $(( sweep_s + 120 )) "$bin" pretrain recipes/pretrain-default.yaml \
    "data.corpus=$corpus" "train.out_dir=$sweep/$name" "log.dir=$sweep/tb" "log.name=$name" \
    train.steps=1000000 optim.warmup_steps=200 optim.min_lr_ratio=1.0 data.eval_windows=8 \
    train.checkpoint_every=1000000 $overrides --max-seconds "$sweep_s" \
    > "$sweep/$name.txt" 2>&1 &
  pids+=($!)
done
for i in "${!pids[@]}"; do
  wait "${pids[$i]}"
  log "${runs[$i]%% *}: exit $? ($(tail -n 1 "$sweep/${runs[$i]%% *}.txt" | cut -c1-100))"
done

"$py" - "$sweep" "$out" <<'PY' 2>&1 | tee "$out/sweep.txt" | tee -a "$work/logs/summary.txt"
import json, os, sys
sweep, out = sys.argv[1], sys.argv[2]
runs = {}
for name in sorted(os.listdir(os.path.join(sweep, "tb"))):
    p = os.path.join(sweep, "tb", name, "scalars.jsonl")
    if not os.path.exists(p):
        continue
    sc = {}
    for d in map(json.loads, open(p)):
        sc.setdefault(d["tag"], {})[d["step"]] = d["value"]
    runs[name] = sc
rows = []
for name, sc in runs.items():
    ratio, ppl, tok = sc.get("eval/max_top1_over_median", {}), sc.get("eval/ppl", {}), sc.get("train/tokens", {})
    if not ratio or not tok:
        continue
    last = max(ratio)
    tokens_per_step = tok[max(tok)] / max(tok)
    summ_p = os.path.join(sweep, name, "summary.json")
    summ = json.load(open(summ_p)) if os.path.exists(summ_p) else {}
    layer = lambda tag, i: sc.get(f"layers/{tag}/{i:02d}", {}).get(last)
    n_layers = sum(1 for t in sc if t.startswith("layers/top1_over_median/"))
    worst = max(range(n_layers), key=lambda i: layer("top1_over_median", i) or 0)
    slot = [layer("eab_slot_attn", i) for i in range(n_layers)]
    attn0 = [layer("first_token_attn", i) or 0 for i in range(n_layers)]
    rows.append(dict(name=name, steps=last, tokens=last * tokens_per_step,
                     tps=summ.get("tokens_per_s", float("nan")), ratio=ratio[last], worst=worst,
                     first=layer("top1_first", worst), share=layer("top1_dim_share", worst),
                     top1_0=layer("top1", 0), top1_l=layer("top1", n_layers - 1),
                     massive=sc.get("eval/massive_count", {}).get(last), ppl=ppl.get(last),
                     attn0=sum(attn0) / max(n_layers, 1),
                     slot=None if slot[0] is None else sum(slot) / n_layers))
pct = lambda v: "-" if v is None else "%.0f%%" % (100 * v)
print("| run | steps | tokens (M) | tok/s (shared GPU) | top-1/median (max, layer) | its top-1: in one dim / on token 0 | top-1 layer 0 / last | massive | val ppl | attn@0 | attn@slot |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    slot = "-" if r["slot"] is None else "%.4f" % r["slot"]
    print("| %s | %d | %.1f | %.0f | %.1f (%d) | %s / %s | %.0f / %.0f | %s | %.1f | %.3f | %s |" % (
        r["name"], r["steps"], r["tokens"] / 1e6, r["tps"], r["ratio"], r["worst"],
        pct(r["share"]), pct(r["first"]), r["top1_0"] or 0, r["top1_l"] or 0, r["massive"],
        r["ppl"], r["attn0"], slot))
# The paper's pattern: one dim, on the first token. A ratio without it is a stream that grows
# everywhere, which is no massive activation however high it climbs.
shaped = [r for r in rows if not r["name"].startswith("eab") and (r["first"] or 0) >= 0.5
          and (r["share"] or 0) >= 0.5]
if shaped:
    best = max(shaped, key=lambda r: r["ratio"])
    print(f"fastest-forming outlier of the paper's shape (default attention): {best['name']}")
else:
    print("no default-attention run has its top-1 in one dim on the first token yet")
try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    sys.exit(0)
fig, axes = plt.subplots(1, 3, figsize=(16, 5))
for name, sc in runs.items():
    ratio, tok, ppl = sc.get("eval/max_top1_over_median", {}), sc.get("train/tokens", {}), sc.get("eval/ppl", {})
    if not ratio or not tok:
        continue
    tps = tok[max(tok)] / max(tok)
    xs = sorted(ratio)
    axes[0].plot(xs, [ratio[x] for x in xs], label=name)
    axes[1].plot([x * tps / 1e6 for x in xs], [ratio[x] for x in xs], label=name)
    axes[2].plot([x * tps / 1e6 for x in sorted(ppl)], [ppl[x] for x in sorted(ppl)], label=name)
axes[0].set_xlabel("step"); axes[0].set_ylabel("max top-1 / median |h|")
axes[1].set_xlabel("tokens (M)"); axes[1].set_ylabel("max top-1 / median |h|")
axes[2].set_xlabel("tokens (M)"); axes[2].set_ylabel("validation perplexity"); axes[2].set_yscale("log")
for a in axes:
    a.legend(fontsize=8)
fig.tight_layout()
fig.savefig(os.path.join(out, "sweep.png"), dpi=90)
PY

log "done at $(( $(date +%s) - t0 )) s"
cp "$work/logs/summary.txt" "$out/summary.txt"
tar -czf "$out/sweep.tgz" -C "$sweep" --exclude='checkpoints' --exclude='final' . -C "$work/logs" tokenize.txt
ls -la "$out"
