#!/usr/bin/env python3
"""Hold an `eabfit export --format peft` folder, run by transformers + PEFT, against eabfit.

    eabfit export --model M --adapter A --out OUT --format peft        # needs mask_first_token: false
    eabfit logits --model M --adapter A --ids 1,2,3,... --json tokens.json
    python scripts/lib/peft_compare.py OUT tokens.json [--device cuda] [--tol 1e-3]

OUT may also be the folder of `--format both` (its peft/ is used). tokens.json is written by
`eabfit logits`: {"ids": [...], "logits": [[...] per position], ...}.

Two checks, each reported as the max relative difference max|logits - eabfit| / max|eabfit| over
every position and vocabulary entry:

  peft   PeftModel.from_pretrained(base, OUT/peft_adapter), PEFT's own prefix-tuning path. The
         one-token prefix sits at cache position 0 and the tokens at positions 1..T; the stored
         prefix key is the slot key rotated (RoPE) to position 1, which gives eabfit's scores.
  cache  No PEFT: the slots, decoded from prompt_embeddings the way PEFT's get_prompt reshapes
         them (the key rotated back to position 0 with the model's own rotary embedding), passed
         as a DynamicCache prefix with an attention mask of T+1 ones and position_ids 0..T-1,
         which is eabfit's own convention (unrotated slot key, tokens at 0..T-1).

The merged base without any prefix is printed too, for scale (it should differ).
Exit status: 0 when both checks are within --tol, 1 when one is not, 2 on bad input.
Written against transformers 5.x and peft 0.21.
"""

import argparse
import inspect
import json
import sys
from pathlib import Path


def die(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def find_export(path):
    d = Path(path)
    for cand in (d, d / "peft"):
        if (cand / "config.json").is_file() and (cand / "peft_adapter" / "adapter_config.json").is_file():
            return cand
    die(
        f"{d}: not a peft export (expected config.json and peft_adapter/adapter_config.json; "
        "write one with `eabfit export --format peft` or `--format both`)"
    )


def rotate_half(x):
    import torch

    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def compare(name, got, want, tol=None):
    """Max |got - want| relative to max |want|; also argmax agreement per position."""
    got = got.detach().to("cpu").double()
    diff = (got - want).abs().max().item()
    scale = want.abs().max().item()
    rel = diff / max(scale, 1e-30)
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    status = "(no prefix, for scale)" if tol is None else "ok" if rel <= tol else "FAIL"
    print(f"{name:<6} max rel diff {rel:.3e}  (max abs {diff:.3e}, |logits| up to {scale:.3g}, argmax agree {agree:.3f})  {status}")
    return rel


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("export_dir", help="folder written by `eabfit export --format peft` (or both)")
    ap.add_argument("tokens_json", help="JSON written by `eabfit logits` (ids and eabfit's logits)")
    ap.add_argument("--tol", type=float, default=1e-3, help="largest max relative difference allowed (default 1e-3)")
    ap.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    ap.add_argument("--attn", default="eager", choices=["eager", "sdpa"], help="attention implementation (default eager)")
    args = ap.parse_args()

    root = find_export(args.export_dir)
    try:
        ref = json.loads(Path(args.tokens_json).read_text())
        ids = [int(i) for i in ref["ids"]]
        ref_logits = ref["logits"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        die(f"{args.tokens_json}: not a JSON of `eabfit logits` ({e})")
    if ref.get("mask_first_token"):
        die(
            f"{args.tokens_json}: eabfit ran with mask_first_token = true, which a PEFT prefix cannot express "
            "(and `eabfit export --format peft` refuses)"
        )
    if not ids or len(ref_logits) != len(ids):
        die(f"{args.tokens_json}: {len(ids)} ids but {len(ref_logits)} rows of logits")

    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    from transformers.cache_utils import DynamicCache

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # TF32 matmuls are ~1e-3 accurate: keep float32 exact on Ampere and later.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")

    want = torch.tensor(ref_logits, dtype=torch.float64)
    T, V = want.shape
    try:
        base = AutoModelForCausalLM.from_pretrained(root, dtype=torch.float32, attn_implementation=args.attn)
    except TypeError:  # transformers < 4.56 spells it torch_dtype
        base = AutoModelForCausalLM.from_pretrained(root, torch_dtype=torch.float32, attn_implementation=args.attn)
    base = base.to(device).eval()
    cfg = base.config
    if cfg.vocab_size != V:
        die(f"{args.tokens_json}: logits over {V} tokens, the export's vocab_size is {cfg.vocab_size}")
    if max(ids) >= V:
        die(f"{args.tokens_json}: token id {max(ids)} is outside the vocabulary ({V})")
    window = getattr(cfg, "sliding_window", None)
    if window is not None and T >= window:
        print(
            f"warning: sliding_window {window} <= {T} tokens: transformers hides the prefix from queries "
            f"{window} or more positions after it, eabfit never hides the slot; expect a difference",
            file=sys.stderr,
        )

    acfg = json.loads((root / "peft_adapter" / "adapter_config.json").read_text())
    if acfg.get("peft_type") != "PREFIX_TUNING" or acfg.get("num_virtual_tokens") != 1:
        die(f"{root}/peft_adapter: not a one-token PREFIX_TUNING adapter")
    n_layers, heads, token_dim = acfg["num_layers"], acfg["num_attention_heads"], acfg["token_dim"]
    hd = token_dim // heads
    pe = load_file(str(root / "peft_adapter" / "adapter_model.safetensors"))["prompt_embeddings"]
    if tuple(pe.shape) != (1, n_layers * 2 * token_dim):
        die(f"prompt_embeddings has shape {tuple(pe.shape)}, expected (1, {n_layers * 2 * token_dim})")
    print(
        f"export  {root}\n        {cfg.model_type}, {n_layers} layers, prefix of {heads} KV heads x {hd}, "
        f"{T} tokens, {device}, attn {args.attn}"
    )

    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    results = {}
    with torch.no_grad():
        plain = base(input_ids=input_ids).logits[0]
        compare("plain", plain, want)

        # cache: PEFT's get_prompt reshape, by hand: view(batch, 1, L*2, heads, hd),
        # permute([2, 0, 3, 1, 4]) -> per layer key (even) and value (odd), (batch, heads, 1, hd).
        kv = pe.to(device=device, dtype=torch.float32).view(1, 1, n_layers * 2, heads, hd).permute(2, 0, 3, 1, 4)
        keys_at_1, values = kv[0::2], kv[1::2]
        rotary = base.get_decoder().rotary_emb
        cos, sin = rotary(keys_at_1[0], position_ids=torch.tensor([[1]], device=device))  # (1, 1, hd)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (1, 1, 1, hd) against (batch, heads, 1, hd)
        # R(-1) x = x cos - rotate_half(x) sin undoes x cos + rotate_half(x) sin.
        keys = keys_at_1 * cos - rotate_half(keys_at_1) * sin
        cache = DynamicCache()
        for layer in range(n_layers):
            cache.update(keys[layer].contiguous(), values[layer].contiguous(), layer)
        params = inspect.signature(base.forward).parameters
        cache_kw = {"cache": cache} if "cache" in params else {"past_key_values": cache}
        out = base(
            input_ids=input_ids,
            attention_mask=torch.ones(1, T + 1, dtype=torch.long, device=device),
            position_ids=torch.arange(T, device=device).unsqueeze(0),
            use_cache=True,
            **cache_kw,
        )
        results["cache"] = compare("cache", out.logits[0], want, args.tol)

        # peft: the adapter as PEFT loads and runs it.
        model = PeftModel.from_pretrained(base, str(root / "peft_adapter")).to(device).eval()
        out = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
        results["peft"] = compare("peft", out.logits[0], want, args.tol)

    bad = [k for k, r in results.items() if not r <= args.tol]
    if bad:
        print(f"FAIL: {', '.join(bad)} above {args.tol:g}")
        sys.exit(1)
    print(f"pass: peft and cache within {args.tol:g} of eabfit")


if __name__ == "__main__":
    main()
