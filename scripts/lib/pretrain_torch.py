"""What a user would run instead of `eabfit pretrain`: transformers' LlamaForCausalLM built from
the same config as recipes/pretrain-default.yaml (122.7M parameters, SDPA attention), f32 master
weights under bf16 autocast, fused torch AdamW with the same groups (no decay on norms), the same
warmup and gradient clipping, on the same corpus folder `eabfit tokenize` wrote (windows of BOS
plus 1023 tokens). Trains for --seconds and prints tokens/s and the peak memory, the figures
scripts/lib/pretrain-speed.sh sets eabfit's against in the same call.

    python scripts/lib/pretrain_torch.py CORPUS_DIR [--batch 32] [--seconds 45] [--compile]
"""

import argparse
import json
import os
import time

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("corpus")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--seconds", type=float, default=45.0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--compile", action="store_true")
    a = ap.parse_args()

    meta = json.load(open(os.path.join(a.corpus, "corpus.json")))
    tokens = np.fromfile(os.path.join(a.corpus, "train.bin"), dtype="<u4")
    n = a.seq - 1
    windows = len(tokens) // n
    cfg = LlamaConfig(
        vocab_size=meta["vocab_size"], hidden_size=768, intermediate_size=2048,
        num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
        max_position_embeddings=a.seq, rope_theta=10000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True, initializer_range=0.02,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").cuda()
    params = sum(p.numel() for p in model.parameters())
    decay = [p for nm, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for nm, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=a.lr, betas=(0.9, 0.95), eps=1e-8, fused=True,
    )
    step_fn = model
    if a.compile:
        step_fn = torch.compile(model)
    rng = np.random.default_rng(0)
    bos = np.full((a.batch, 1), meta["bos_id"], dtype=np.int64)

    def batch():
        idx = rng.integers(0, windows, a.batch)
        body = np.stack([tokens[i * n:(i + 1) * n] for i in idx]).astype(np.int64)
        return torch.from_numpy(np.concatenate([bos, body], 1)).cuda(non_blocking=True)

    torch.cuda.reset_peak_memory_stats()
    step, done, loss = 0, 0, float("nan")
    start = None
    while True:
        ids = batch()
        for g in opt.param_groups:
            g["lr"] = a.lr * min(1.0, (step + 1) / a.warmup)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = step_fn(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        # The first steps (allocation, autotuning, compilation) are left out of the rate.
        if step == 5:
            torch.cuda.synchronize()
            start = time.time()
        elif step > 5:
            done += ids.numel()
            if time.time() - start >= a.seconds:
                loss = out.loss.item()
                break
    torch.cuda.synchronize()
    wall = time.time() - start
    print(f"torch {torch.__version__} transformers LlamaForCausalLM sdpa"
          f"{' compiled' if a.compile else ''}: {params} parameters, batch {a.batch}, "
          f"{step} steps, loss {loss:.4f}")
    print(f"{done / wall:.0f} tokens/s, peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB, "
          f"{1000 * wall / (step - 5):.1f} ms/step")


if __name__ == "__main__":
    main()
