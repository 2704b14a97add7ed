#!/usr/bin/env bash
# CUDA out of memory in bench, scan and train: each must end with one error line that names
# the batch and sequence length in use and what to lower (src/error.rs explain_oom).
#
# On the build machine: scripts/cuda-build.sh            (-> .device-bin/eabfit[.xz])
# On the GPU machine, from the repo root with .device-bin carried:
#   scripts/gpu.sh oom
# It writes a random LLaMA-shaped model with a word-level tokenizer and a long context (no
# download; plain Python, no packages) under $OUT/oom (OUT default ./gpu-oom-out), then runs
#   eabfit bench --shape llama2-7b --device cuda --batch 64 --seq 2048 --steps 1 --warmup 0
#   eabfit scan  --model M --text T --device cuda --seq-len 262144 --num-seqs 1
#   eabfit train recipes/tiny-debug.yaml model.path=M model.device=cuda data.seq_len=4096 \
#       data.batch_size=2048 ...
# and checks each message. Exit status: non-zero if any check failed.
set -uo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
. "$repo/scripts/lib/device-env.sh"
out=${OUT:-./gpu-oom-out}/oom
mkdir -p "$out"
bin=$(device_bin "$out") || exit 1

"$py" - "$out" <<'EOF'
import json, random, struct, sys, os
out = sys.argv[1]
model = os.path.join(out, "model")
os.makedirs(model, exist_ok=True)
words = ["w%d" % i for i in range(60)]
vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>"] + words)}
d, f, layers, heads = 64, 128, 2, 4
cfg = {"model_type": "llama", "hidden_size": d, "intermediate_size": f, "num_hidden_layers": layers,
       "num_attention_heads": heads, "num_key_value_heads": heads, "rms_norm_eps": 1e-5,
       "rope_theta": 10000.0, "vocab_size": len(vocab), "max_position_embeddings": 1 << 20,
       "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2}
json.dump(cfg, open(os.path.join(model, "config.json"), "w"))
shapes = {"model.embed_tokens.weight": [len(vocab), d], "model.norm.weight": [d]}
for l in range(layers):
    p = "model.layers.%d." % l
    for n, s in [("input_layernorm.weight", [d]), ("post_attention_layernorm.weight", [d]),
                 ("self_attn.q_proj.weight", [d, d]), ("self_attn.k_proj.weight", [d, d]),
                 ("self_attn.v_proj.weight", [d, d]), ("self_attn.o_proj.weight", [d, d]),
                 ("mlp.gate_proj.weight", [f, d]), ("mlp.up_proj.weight", [f, d]),
                 ("mlp.down_proj.weight", [d, f])]:
        shapes[p + n] = s
rng = random.Random(0)
header, blobs, off = {}, [], 0
for name, s in shapes.items():
    n = 1
    for x in s:
        n *= x
    norm = name.endswith("norm.weight")
    data = struct.pack("<%df" % n, *[1.0 if norm else rng.gauss(0, 0.05) for _ in range(n)])
    header[name] = {"dtype": "F32", "shape": s, "data_offsets": [off, off + len(data)]}
    blobs.append(data)
    off += len(data)
h = json.dumps(header).encode()
h += b" " * ((8 - len(h) % 8) % 8)
with open(os.path.join(model, "model.safetensors"), "wb") as fh:
    fh.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))
special = lambda i, s: {"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                        "normalized": False, "special": True}
tok = {"version": "1.0", "truncation": None, "padding": None,
       "added_tokens": [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")],
       "normalizer": None, "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": None,
       "decoder": None, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}}
json.dump(tok, open(os.path.join(model, "tokenizer.json"), "w"))
json.dump({"add_bos_token": True, "bos_token": "<s>", "eos_token": "</s>"},
          open(os.path.join(model, "tokenizer_config.json"), "w"))
with open(os.path.join(out, "text.txt"), "w") as fh:
    fh.write(" ".join(rng.choice(words) for _ in range(300_000)))
EOF

fail=0
# check NAME WANT_EXIT PATTERN -- CMD...
check() {
  local name=$1 want=$2 pattern=$3
  shift 4
  "$@" > "$out/$name.stdout" 2> "$out/$name.stderr"
  local rc=$?
  local line
  line=$(grep -v '^\s*$' "$out/$name.stderr" | tail -n1)
  if [ "$rc" = "$want" ] && grep -qE "$pattern" <<<"$line"; then
    echo "PASS $name (exit $rc): $line"
  else
    echo "FAIL $name (exit $rc, want $want): $line"
    fail=1
  fi
}

check bench 3 '^error: out of memory in bench llama2-7b train at batch 64 x seq_len 2048: lower --batch or --seq' -- \
  "$bin" bench --shape llama2-7b --device cuda --batch 64 --seq 2048 --steps 1 --warmup 0
check train 1 '^error: out of memory in train at batch 2048 x seq_len 4096: lower data.batch_size' -- \
  "$bin" train "$repo/recipes/tiny-debug.yaml" "model.path=$out/model" model.device=cuda \
  "data.train=$out/text.txt" "data.eval=$out/text.txt" data.seq_len=4096 data.batch_size=2048 \
  data.eval_windows=1 optim.grad_accum=1 "adapters.lora.layers=[0]" \
  "train.out_dir=$out/run" "log.dir=$out/tb"
check scan 1 '^error: out of memory in scan at batch 1 x seq_len 262144: lower --seq-len' -- \
  "$bin" scan --model "$out/model" --text "$out/text.txt" --device cuda --seq-len 262144 --num-seqs 1
exit $fail
