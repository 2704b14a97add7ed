"""Write a random-weight LLaMA-shaped checkpoint as a Hugging Face folder: config.json, sharded
bf16 safetensors with model.safetensors.index.json, and a word-level tokenizer.json built from a
text corpus. For measuring eabfit's real commands (train, verify, export) at 7B and 70B scale
where no real weights exist (the GPU machine has none and cannot download them).

    python scripts/lib/random_checkpoint.py --shape llama2-7b --text DIR_OR_FILE --out DIR
    python scripts/lib/random_checkpoint.py --shape llama2-70b --layers 40 --text DIR --out DIR

Each shard is written as soon as it is full, so host memory holds one shard (--shard-gib), not
the model: LLaMA-2-70B is ~129 GiB of bf16. --layers N keeps the first N decoder layers (the
config says N) for a disk too small for all 80 (~1.6 GiB a layer).
"""
import argparse, json, os, re, collections, glob

import torch
from safetensors.torch import save_file

SHAPES = {
    # meta-llama/Llama-2-7b-hf
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                      rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096,
                      tie_word_embeddings=False),
    # meta-llama/Llama-2-70b-hf: grouped-query attention, 64 query / 8 KV heads
    "llama2-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8, vocab_size=32000,
                       rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096,
                       tie_word_embeddings=False),
    # a two-layer shape of the same family, for a quick smoke run of this script
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=2000,
                 rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096,
                 tie_word_embeddings=False),
}


def tokenizer(text_path, vocab_size):
    files = sorted(glob.glob(os.path.join(text_path, "*.txt"))) if os.path.isdir(text_path) else [text_path]
    counts = collections.Counter()
    for f in files:
        counts.update(re.findall(r"\S+", open(f, encoding="utf-8", errors="replace").read().lower()))
    words = [w for w, _ in counts.most_common(vocab_size - 3)]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in words:
        vocab.setdefault(w, len(vocab))
    special = lambda i, s: {"id": i, "content": s, "single_word": False, "lstrip": False,
                            "rstrip": False, "normalized": False, "special": True}
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")],
        "normalizer": {"type": "Lowercase"},
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
        },
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": False},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b")
    ap.add_argument("--text", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-gib", type=float, default=4.0)
    ap.add_argument("--layers", type=int, default=None, help="keep the first N decoder layers")
    a = ap.parse_args()
    cfg = dict(SHAPES[a.shape], model_type="llama", architectures=["LlamaForCausalLM"],
               bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16")
    if a.layers is not None:
        if not 1 <= a.layers <= cfg["num_hidden_layers"]:
            ap.error(f"--layers must be 1..{cfg['num_hidden_layers']} for {a.shape}")
        cfg["num_hidden_layers"] = a.layers
    os.makedirs(a.out, exist_ok=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(a.seed)
    d, f, L, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    hd = d // cfg["num_attention_heads"]
    q = cfg["num_attention_heads"] * hd
    kv = cfg["num_key_value_heads"] * hd

    def rnd(*shape, std=0.02):
        return (torch.randn(*shape, generator=g, device=dev, dtype=torch.float32) * std).to(torch.bfloat16).cpu()

    tensors = [("model.embed_tokens.weight", lambda: rnd(v, d)), ("lm_head.weight", lambda: rnd(v, d)),
               ("model.norm.weight", lambda: torch.ones(d, dtype=torch.bfloat16))]
    for i in range(L):
        p = f"model.layers.{i}."
        tensors += [(p + "self_attn.q_proj.weight", lambda: rnd(q, d)),
                    (p + "self_attn.k_proj.weight", lambda: rnd(kv, d)),
                    (p + "self_attn.v_proj.weight", lambda: rnd(kv, d)),
                    (p + "self_attn.o_proj.weight", lambda: rnd(d, q)),
                    (p + "mlp.gate_proj.weight", lambda: rnd(f, d)),
                    (p + "mlp.up_proj.weight", lambda: rnd(f, d)),
                    (p + "mlp.down_proj.weight", lambda: rnd(d, f)),
                    (p + "input_layernorm.weight", lambda: torch.ones(d, dtype=torch.bfloat16)),
                    (p + "post_attention_layernorm.weight", lambda: torch.ones(d, dtype=torch.bfloat16))]
    limit = int(a.shard_gib * (1 << 30))
    # Shards go to disk as they fill, under temporary names: the count is known only at the end.
    written, cur, size = [], {}, 0

    def flush():
        tmp = os.path.join(a.out, f"part-{len(written):05d}.safetensors.tmp")
        save_file(cur, tmp, metadata={"format": "pt"})
        written.append((tmp, list(cur)))

    total = 0
    for name, make in tensors:
        t = make()
        if cur and size + t.numel() * 2 > limit:
            flush(); cur, size = {}, 0
        cur[name] = t; size += t.numel() * 2; total += t.numel() * 2
    flush()
    weight_map = {}
    for i, (tmp, names) in enumerate(written):
        fname = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
        os.replace(tmp, os.path.join(a.out, fname))
        for n in names:
            weight_map[n] = fname
    shards = written
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map},
              open(os.path.join(a.out, "model.safetensors.index.json"), "w"), indent=1)
    json.dump(cfg, open(os.path.join(a.out, "config.json"), "w"), indent=1)
    json.dump(tokenizer(a.text, v), open(os.path.join(a.out, "tokenizer.json"), "w"))
    json.dump({"add_bos_token": True, "bos_token": "<s>", "eos_token": "</s>"},
              open(os.path.join(a.out, "tokenizer_config.json"), "w"))
    print(f"wrote {a.shape} ({total / 2**30:.1f} GiB in {len(shards)} shards) to {a.out}")


if __name__ == "__main__":
    main()
