#!/usr/bin/env python3
"""Hold an `eabfit export --format hf` folder, run by transformers with its own remote code, against eabfit.

    eabfit export --model M --adapter A --out OUT --format hf
    eabfit logits --model M --adapter A --ids 3,10,17,... --json logits.json
    eabfit generate --model OUT --prompt "..." --raw --max-new-tokens 32 --json generate.json
    python scripts/lib/remote_code_compare.py OUT logits.json generate.json [--device cuda] [--tol 1e-4] [--json result.json]

Three checks:

  refuse   AutoModelForCausalLM.from_pretrained(OUT) without trust_remote_code (explicitly False, and
           left unset with no terminal to ask on) raises: the folder never loads as a slot-free base model.
  logits   AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True), float32: max relative
           difference max|logits - eabfit| / max|eabfit| over every position and vocabulary entry <= --tol.
  generate model.generate(prompt_ids, do_sample=False, max_new_tokens=len(eabfit's ids)), KV-cached, gives
           exactly eabfit generate's tokens.

Also reported, not required: a left-padded batch of two prompts decodes as each prompt alone.

Exit status: 0 when all pass, 1 when one fails, 2 on bad input. Written against transformers 5.x.
"""

import argparse
import json
import sys
from pathlib import Path


def die(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def load_json(path, keys):
    try:
        v = json.loads(Path(path).read_text())
        for k in keys:
            v[k]
        return v
    except (OSError, ValueError, KeyError, TypeError) as e:
        die(f"{path}: not the JSON expected (needs {', '.join(keys)}): {e}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("export_dir", help="folder written by `eabfit export --format hf` (with EAB slots)")
    ap.add_argument("logits_json", help="JSON written by `eabfit logits`")
    ap.add_argument("generate_json", help="JSON written by `eabfit generate --json`")
    ap.add_argument("--tol", type=float, default=1e-4, help="largest max relative logit difference allowed (default 1e-4)")
    ap.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args()

    root = Path(args.export_dir)
    try:
        cfg = json.loads((root / "config.json").read_text())
    except (OSError, ValueError) as e:
        die(f"{root}/config.json: {e}")
    if "auto_map" not in cfg or "eab" not in cfg:
        die(f"{root}: config.json has no auto_map/eab block; not an `eabfit export --format hf` with slots")
    ref = load_json(args.logits_json, ["ids", "logits"])
    gen = load_json(args.generate_json, ["prompt_ids", "ids"])
    if not ref["ids"] or len(ref["ids"]) != len(ref["logits"]):
        die(f"{args.logits_json}: {len(ref['ids'])} ids but {len(ref['logits'])} rows of logits")
    if not gen["ids"]:
        die(f"{args.generate_json}: no generated tokens")

    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # TF32 matmuls are ~1e-3 accurate: keep float32 exact on Ampere and later.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    result = {
        "export": str(root),
        "model_type": cfg.get("model_type"),
        "mask_first_token": cfg["eab"].get("mask_first_token"),
        "sliding_window": cfg.get("sliding_window"),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "device": str(device),
        "tol": args.tol,
    }

    refused = {}
    for label, kw in (("trust_remote_code=False", {"trust_remote_code": False}), ("unset", {})):
        try:
            AutoModelForCausalLM.from_pretrained(root, **kw)
            refused[label] = "LOADED"
        except Exception as e:  # transformers' own refusal is a ValueError; anything but a load counts
            refused[label] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    result["refuse"] = refused
    result["refuse_ok"] = all(v != "LOADED" for v in refused.values())

    model = AutoModelForCausalLM.from_pretrained(root, trust_remote_code=True, dtype=torch.float32).to(device).eval()
    result["class"] = type(model).__name__
    result["attn_implementation"] = model.config._attn_implementation

    want = torch.tensor(ref["logits"], dtype=torch.float64)
    with torch.no_grad():
        ids = torch.tensor([ref["ids"]], dtype=torch.long, device=device)
        got = model(input_ids=ids).logits[0].double().cpu()
    if got.shape != want.shape:
        die(f"{args.logits_json}: logits of shape {tuple(want.shape)}, transformers gives {tuple(got.shape)}")
    diff = (got - want).abs().max().item()
    scale = want.abs().max().item()
    result["logits_tokens"] = len(ref["ids"])
    result["logits_max_abs_diff"] = diff
    result["logits_max_rel_diff"] = diff / max(scale, 1e-30)
    result["logits_argmax_agree"] = (got.argmax(-1) == want.argmax(-1)).double().mean().item()
    result["logits_ok"] = result["logits_max_rel_diff"] <= args.tol

    # For scale: transformers' own class for the family drops the slots (it warns about
    # unexpected keys); the slot-free model should be far from eabfit's.
    family = {"eab_llama": "LlamaForCausalLM", "eab_mistral": "MistralForCausalLM"}.get(cfg.get("model_type"))
    try:
        plain = getattr(transformers, family).from_pretrained(root, dtype=torch.float32).to(device).eval()
        with torch.no_grad():
            plain_logits = plain(input_ids=ids).logits[0].double().cpu()
        result["plain_max_rel_diff"] = (plain_logits - want).abs().max().item() / max(scale, 1e-30)
        del plain
    except Exception as e:  # for scale only: never fails the required checks
        print(f"warning: the slot-free {family} did not run: {type(e).__name__}: {e}", file=sys.stderr)

    n_new = len(gen["ids"])
    with torch.no_grad():
        prompt = torch.tensor([gen["prompt_ids"]], dtype=torch.long, device=device)
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=False,
            max_new_tokens=n_new,
            pad_token_id=0,
        )
    hf_ids = out[0, prompt.shape[1]:].tolist()
    result["generate_tokens"] = n_new
    result["generate_eabfit"] = gen["ids"]
    result["generate_transformers"] = hf_ids
    result["generate_first_difference"] = next(
        (i for i, (a, b) in enumerate(zip(hf_ids, gen["ids"])) if a != b), None if len(hf_ids) == n_new else min(len(hf_ids), n_new)
    )
    result["generate_ok"] = hf_ids == gen["ids"]
    result["pass"] = result["refuse_ok"] and result["logits_ok"] and result["generate_ok"]

    # Reported, not required: a left-padded batch of the prompt and its tail decodes as each
    # row alone (positions and the hidden first token follow each row's own start).
    try:
        p_ids = gen["prompt_ids"]
        tail = p_ids[len(p_ids) // 2:]
        with torch.no_grad():
            alone = [
                model.generate(torch.tensor([x], device=device), attention_mask=torch.ones(1, len(x), dtype=torch.long, device=device),
                               do_sample=False, max_new_tokens=8, pad_token_id=0)[0, len(x):].tolist()
                for x in (p_ids, tail)
            ]
            pad = len(p_ids) - len(tail)
            batch_ids = torch.tensor([p_ids, [0] * pad + tail], device=device)
            batch_mask = torch.tensor([[1] * len(p_ids), [0] * pad + [1] * len(tail)], device=device)
            batched = model.generate(batch_ids, attention_mask=batch_mask, do_sample=False, max_new_tokens=8,
                                     pad_token_id=0)[:, len(p_ids):].tolist()
        result["left_padded_batch_ok"] = batched == alone
    except Exception as e:  # reported only: never fails the required checks
        result["left_padded_batch_ok"] = f"{type(e).__name__}: {e}"

    mark = lambda ok: "ok" if ok else "FAIL"
    print(f"export   {root} ({result['class']}, {result['model_type']}, mask_first_token {result['mask_first_token']}, "
          f"sliding_window {result['sliding_window']}, {device}, transformers {transformers.__version__})")
    for label, v in refused.items():
        print(f"refuse   {label:<24} -> {v}  {mark(v != 'LOADED')}")
    print(f"logits   {len(ref['ids'])} tokens: max rel diff {result['logits_max_rel_diff']:.3e} (max abs {diff:.3e}, "
          f"|logits| up to {scale:.3g}, argmax agree {result['logits_argmax_agree']:.3f})  {mark(result['logits_ok'])}")
    if "plain_max_rel_diff" in result:
        print(f"plain    {family} by name, slots dropped: max rel diff {result['plain_max_rel_diff']:.3e} (for scale)")
    print(f"generate {n_new} greedy tokens: transformers == eabfit: {result['generate_ok']}"
          + ("" if result["generate_ok"] else f" (first difference at {result['generate_first_difference']})")
          + f"  {mark(result['generate_ok'])}")
    print(f"batch    left-padded batch of 2 == each row alone (8 greedy tokens): {result['left_padded_batch_ok']}  (reported, not required)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    sys.exit(0 if result["pass"] else 1)


if __name__ == "__main__":
    main()
