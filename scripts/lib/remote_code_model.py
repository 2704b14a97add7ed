#!/usr/bin/env python3
"""A random-weight Hugging Face folder of a given shape, for scripts/lib/remote-code.sh.

    python scripts/lib/remote_code_model.py OUT SHAPE      # SHAPE: smollm2, mistral, tiny, tiny-mistral, tiny-llama3,
                                                           #        tiny-qwen2, tiny-qwen3

Writes config.json + model.safetensors (transformers' own init, seed 0), a word-level tokenizer
over w0..w{V-1} (no BOS added, no EOS, so greedy decoding runs its full length), train.txt
(random words) and prompt.txt (12 words). The Mistral shapes have a sliding window (16 and 5)
shorter than the 48-token test sequence. The Qwen shapes get random q/k/v biases (Qwen2) and
q/k head norms (Qwen3; head_dim apart from hidden / heads) instead of transformers' zero biases
and unit norms, which would hide them.
"""

import json
import os
import random
import sys

import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

SHAPES = {
    # SmolLM2-135M's configuration.
    "smollm2": (LlamaConfig, LlamaForCausalLM, dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192,
                rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)),
    # Mistral-7B's proportions (GQA 4:1, head_dim 128, theta 1e6), scaled down, window 16.
    "mistral": (MistralConfig, MistralForCausalLM, dict(hidden_size=512, intermediate_size=1792, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=1, head_dim=128, vocab_size=4096,
                max_position_embeddings=1024, rope_theta=1000000.0, rms_norm_eps=1e-5, sliding_window=16)),
    # LLaMA-3 RoPE scaling (rope_type llama3) on a tiny model.
    "tiny-llama3": (LlamaConfig, LlamaForCausalLM, dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=512, max_position_embeddings=256,
                    tie_word_embeddings=True, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                    "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "tiny": (LlamaConfig, LlamaForCausalLM, dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, vocab_size=512, max_position_embeddings=256)),
    "tiny-mistral": (MistralConfig, MistralForCausalLM, dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2, vocab_size=512, max_position_embeddings=256,
                     sliding_window=5)),
    # Qwen2.5's layout (q/k/v biases, tied head, theta 1e6) with a window it switches off.
    "tiny-qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=2, vocab_size=512, max_position_embeddings=256,
                   rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=False,
                   sliding_window=8)),
    # Qwen3's: q/k head norms, head_dim 32 with hidden 64 and 4 heads, untied head.
    "tiny-qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=512,
                   max_position_embeddings=256, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)),
}


def main():
    if len(sys.argv) != 3 or sys.argv[2] not in SHAPES:
        sys.exit(f"usage: {sys.argv[0]} OUT {{{','.join(SHAPES)}}}")
    out, shape = sys.argv[1], sys.argv[2]
    config_cls, model_cls, kw = SHAPES[shape]
    cfg = config_cls(**kw)
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = None, None, None
    torch.manual_seed(0)
    model = model_cls(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_proj.bias"):
                p.normal_(0.0, 0.5)
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                p.normal_(1.0, 0.3)
    model.generation_config.bos_token_id = model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    model.save_pretrained(out, safe_serialization=True)
    vocab = {f"w{i}": i for i in range(cfg.vocab_size)}
    tok = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
           "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": None,
           "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": False},
           "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w0"}}
    with open(os.path.join(out, "tokenizer.json"), "w") as f:
        json.dump(tok, f)
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({"add_bos_token": False}, f)
    rng = random.Random(1)
    words = lambda n: " ".join(f"w{rng.randrange(3, cfg.vocab_size)}" for _ in range(n))
    with open(os.path.join(out, "train.txt"), "w") as f:
        f.write(words(2000))
    with open(os.path.join(out, "prompt.txt"), "w") as f:
        f.write(words(12))
    print(f"{shape}: {sum(p.numel() for p in model.parameters())} parameters -> {out}")


if __name__ == "__main__":
    main()
