#!/usr/bin/env bash
# On the GPU machine (torch + transformers + peft installed, no network): eabfit's `peft` export
# against transformers + PEFT, for a tiny LLaMA and a SmolLM2-shaped model (real config, random
# weights), f32. Needs the carried binary (.device-bin/eabfit or eabfit.xz, scripts/cuda-build.sh).
#   scripts/gpu.sh peft            # task `peft`; results under $OUT (default ./peft-out)
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-peft-out}
mkdir -p "$OUT"
. scripts/lib/device-env.sh
PY=$py
work=$(mktemp -d)
E=$(device_bin "$work") || exit 1
status=0
for shape in tiny smollm2; do
  m=$work/$shape
  "$PY" - "$m" "$shape" <<'PY'
import json, os, random, sys
import torch
from transformers import LlamaConfig, LlamaForCausalLM
out, shape = sys.argv[1], sys.argv[2]
if shape == "tiny":
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512, max_position_embeddings=256, rope_theta=10000.0)
else:  # SmolLM2-135M's configuration
    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
                      rms_norm_eps=1e-5, tie_word_embeddings=True)
cfg.bos_token_id, cfg.eos_token_id = 1, 2
torch.manual_seed(0)
LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
vocab = {f"w{i}": i for i in range(cfg.vocab_size)}
tok = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
       "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": None, "decoder": None,
       "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w0"}}
json.dump(tok, open(os.path.join(out, "tokenizer.json"), "w"))
json.dump({"add_bos_token": False}, open(os.path.join(out, "tokenizer_config.json"), "w"))
random.seed(1)
open(os.path.join(out, "train.txt"), "w").write(" ".join(f"w{random.randrange(3, cfg.vocab_size)}" for _ in range(2000)))
PY
  if [ $shape = smollm2 ]; then
    # scan on CUDA (bf16 and f32) of the SmolLM2-shaped model, 10 x 512 tokens, timed
    for dt in bf16 f32; do
      /usr/bin/time -f "scan cuda $dt wall %e s" "$E" scan --model $m --device cuda --dtype $dt --text $m/train.txt \
        --seq-len 512 --num-seqs 3 --abs 0 --ratio 50 > "$OUT/scan-cuda-$dt.txt" 2>&1 || status=1
      tail -2 "$OUT/scan-cuda-$dt.txt" | tee -a "$OUT/summary.txt"
    done
  fi
  run=$work/$shape-run
  "$E" train recipes/tiny-debug.yaml model.path=$m data.train=$m/train.txt data.eval=$m/train.txt \
    train.out_dir=$run log.dir=$work/tb adapters.eab.init=normal adapters.eab.init_std=0.5 \
    adapters.eab.mask_first_token=false adapters.lora.layers=[1] adapters.lora.rank=4 \
    train.steps=3 optim.lr=0.05 optim.warmup_steps=0 loss.ma.weight=0 > "$OUT/$shape-train.log" 2>&1 || status=1
  "$E" export --model $m --adapter $run/final --out $work/$shape-export --format peft > "$OUT/$shape-export.log" 2>&1 || status=1
  ids=$(seq -s, 3 7 300 | cut -d, -f1-40)
  "$E" logits --model $m --adapter $run/final --ids "$ids" --json $work/$shape-tokens.json >> "$OUT/$shape-export.log" 2>&1 || status=1
  echo "=== $shape" | tee -a "$OUT/summary.txt"
  "$PY" scripts/lib/peft_compare.py $work/$shape-export $work/$shape-tokens.json 2>&1 | tee -a "$OUT/summary.txt"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
done
exit $status
