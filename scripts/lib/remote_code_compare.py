#!/usr/bin/env python3
"""Hold an `eabfit export --format hf` folder, run by transformers with its own remote code, against eabfit.

    eabfit export --model M --adapter A --out OUT --format hf
    eabfit logits --model M --adapter A --ids 3,10,17,... --json logits.json
    eabfit generate --model OUT --prompt "..." --raw --max-new-tokens 32 --json generate.json
    python scripts/lib/remote_code_compare.py OUT logits.json generate.json [--attn eager,sdpa] [--tol 1e-5]
        [--half] [--compile] [--device cuda] [--json result.json]

Checks, each required (exit 1 when one fails):

  refuse   AutoModelForCausalLM.from_pretrained(OUT) without trust_remote_code (explicitly False, and
           left unset with no terminal to ask on) raises: the folder never loads as a slot-free base model.
  quiet    loading the model (each --attn), AutoTokenizer with trust_remote_code=True and
           PreTrainedTokenizerFast (no remote code) log no warning.
  per attention implementation in --attn (eager, sdpa, flash_attention_2), float32:
    logits   max relative difference max|logits - eabfit| / max|eabfit| over every position and
             vocabulary entry <= --tol.
    generate model.generate(prompt_ids, greedy, max_new_tokens=len(eabfit's ids)), KV-cached, gives
             exactly eabfit generate's tokens.
    batch    three rows of mixed lengths (the prompt and two of its tails), left padded, give each
             row's greedy tokens alone, and each step's logits within --tol of the row's alone. A row
             that reaches EOS stops when alone; in the batch generate() fills its remaining steps
             with the pad token (0), which the check requires as well.
    cache    after a cached forward of the prompt, every layer's cache holds as many keys as the cache
             of transformers' own family class (slots dropped) on the same input: never the slot.
  --half     sdpa in bfloat16 and float16: the max relative difference of the logits to eabfit's
             float32 is at most 3x (+ 1e-3) what the same precision costs transformers' own family
             class on the same weights (slots dropped), and a left-padded batch generates.
  --compile  torch.compile(model) under sdpa: logits within --tol of eabfit's.

Also printed, for scale: transformers' own family class on the same folder (slots dropped), and
AutoTokenizer without trust_remote_code (transformers resolves the folder's config first; see
docs/transformers.md). Exit status: 0 when all pass, 1 when one fails, 2 on bad input.
Written against transformers 5.25 (scripts/lib/py-env.sh pins the versions).
"""

import argparse
import json
import logging
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


class Warnings(logging.Handler):
    """Collects what transformers logs at WARNING and above while it is attached."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.seen = []

    def emit(self, record):
        self.seen.append(record.getMessage().splitlines()[0][:200])

    def __enter__(self):
        logging.getLogger("transformers").addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger("transformers").removeHandler(self)


def rel_diff(got, want):
    got = got.detach().to("cpu").double()
    return (got - want).abs().max().item() / max(want.abs().max().item(), 1e-30)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("export_dir", help="folder written by `eabfit export --format hf` (with EAB slots)")
    ap.add_argument("logits_json", help="JSON written by `eabfit logits`")
    ap.add_argument("generate_json", help="JSON written by `eabfit generate --json`")
    ap.add_argument("--attn", default="eager,sdpa", help="attention implementations, comma-separated (default eager,sdpa)")
    ap.add_argument("--tol", type=float, default=1e-5, help="largest max relative logit difference allowed (default 1e-5)")
    ap.add_argument("--half", action="store_true", help="also run sdpa in bfloat16 and float16")
    ap.add_argument("--compile", action="store_true", help="also run torch.compile(model) under sdpa")
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
    if not gen["ids"] or len(gen["prompt_ids"]) < 4:
        die(f"{args.generate_json}: needs generated tokens and a prompt of 4 tokens or more")
    impls = [a for a in args.attn.split(",") if a]
    if not impls or any(a not in ("eager", "sdpa", "flash_attention_2") for a in impls):
        die(f"--attn {args.attn!r}: choose from eager, sdpa, flash_attention_2")

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # TF32 matmuls are ~1e-3 accurate: keep float32 exact on Ampere and later.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    r = {
        "export": str(root),
        "model_type": cfg.get("model_type"),
        "mask_first_token": cfg["eab"].get("mask_first_token"),
        "sliding_window": cfg.get("sliding_window"),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "device": str(device),
        "tol": args.tol,
    }
    failed = []

    def check(name, ok):
        if not ok:
            failed.append(name)
        return "ok" if ok else "FAIL"

    refused = {}
    for label, kw in (("trust_remote_code=False", {"trust_remote_code": False}), ("unset", {})):
        try:
            AutoModelForCausalLM.from_pretrained(root, **kw)
            refused[label] = "LOADED"
        except Exception as e:  # transformers' own refusal is a ValueError; anything but a load counts
            refused[label] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    r["refuse"] = refused
    for label, v in refused.items():
        print(f"refuse   {label:<24} -> {v}  {check('refuse', v != 'LOADED')}")

    with Warnings() as w:
        AutoTokenizer.from_pretrained(root, trust_remote_code=True)
    r["tokenizer_warnings"] = w.seen
    print(f"quiet    AutoTokenizer(trust_remote_code=True): {w.seen or 'no warning'}  {check('quiet', not w.seen)}")
    with Warnings() as w:
        PreTrainedTokenizerFast.from_pretrained(root)
    r["tokenizer_by_class_warnings"] = w.seen
    print(f"quiet    PreTrainedTokenizerFast, no remote code: {w.seen or 'no warning'}  {check('quiet', not w.seen)}")
    with Warnings() as w:
        try:
            AutoTokenizer.from_pretrained(root)
            outcome = "loads"
        except Exception as e:
            outcome = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
    r["tokenizer_untrusted"] = {"outcome": outcome, "warnings": w.seen}
    print(f"         AutoTokenizer(unset), for the record: {outcome}, warnings {w.seen or 'none'}")

    def load(impl, dtype=torch.float32):
        with Warnings() as w:
            m = AutoModelForCausalLM.from_pretrained(root, trust_remote_code=True, attn_implementation=impl, dtype=dtype)
        return m.to(device).eval(), w.seen

    want = torch.tensor(ref["logits"], dtype=torch.float64)
    ids = torch.tensor([ref["ids"]], dtype=torch.long, device=device)
    prompt = gen["prompt_ids"]
    rows = [prompt, prompt[len(prompt) // 3:], prompt[2 * len(prompt) // 3:]]

    def greedy(model, batch, n, logits=False):
        """Greedy tokens of each row of `batch`, left padded with 0; with `logits`, also each
        step's logits, (B, steps, V) in float64 on the CPU."""
        width = max(len(x) for x in batch)
        x = torch.tensor([[0] * (width - len(b)) + b for b in batch], device=device)
        mask = torch.tensor([[0] * (width - len(b)) + [1] * len(b) for b in batch], device=device)
        with torch.no_grad():
            out = model.generate(x, attention_mask=mask, do_sample=False, max_new_tokens=n, pad_token_id=0,
                                 return_dict_in_generate=True, output_logits=logits)
        tokens = out.sequences[:, width:].tolist()
        return (tokens, torch.stack(out.logits, dim=1).double().cpu()) if logits else tokens

    def batch_check(model, n):
        """The left-padded batch against each row alone: the rows' tokens as the batch pads them
        (a row alone stops at EOS, 0s follow it in the batch), how many rows stopped early, and
        the largest max relative difference of a row's step logits to its own alone."""
        batch, batch_logits = greedy(model, rows, n, logits=True)
        padded, stopped, worst = [], 0, 0.0
        for i, row in enumerate(rows):
            (alone,), alone_logits = greedy(model, [row], n, logits=True)
            stopped += len(alone) < n
            padded.append(alone + [0] * (n - len(alone)))
            worst = max(worst, rel_diff(batch_logits[i, : len(alone)], alone_logits[0]))
        return batch, padded, stopped, worst

    def cache_lengths(model):
        with torch.no_grad():
            out = model(torch.tensor([prompt], device=device), use_cache=True)
            cache = out.cache if hasattr(out, "cache") else out.past_key_values  # the name before 5.25
        return [layer.keys.shape[-2] for layer in cache.layers]

    family = {"eab_llama": "LlamaForCausalLM", "eab_mistral": "MistralForCausalLM", "eab_qwen2": "Qwen2ForCausalLM",
              "eab_qwen3": "Qwen3ForCausalLM"}[cfg["model_type"]]
    plain = getattr(transformers, family).from_pretrained(root, dtype=torch.float32).to(device).eval()
    with torch.no_grad():
        plain_f32 = plain(input_ids=ids).logits[0].double().cpu()
        r["plain_max_rel_diff"] = rel_diff(plain_f32, want)
        plain_cache = cache_lengths(plain)
        # What half precision costs transformers' own model on these weights: the yardstick for --half.
        plain_half = {dtype: rel_diff(plain.to(dtype)(input_ids=ids).logits[0].float(), plain_f32)
                      for dtype in ((torch.bfloat16, torch.float16) if args.half else ())}
    del plain
    print(f"plain    {family} by name, slots dropped: max rel diff {r['plain_max_rel_diff']:.3e} (for scale)")

    default, _ = load(None)
    r["default_attn"] = default.config._attn_implementation
    del default
    print(f"default  from_pretrained without attn_implementation runs {r['default_attn']!r}  "
          f"{check('default sdpa', r['default_attn'] == 'sdpa')}")

    n_new = len(gen["ids"])
    r["attn"] = {}
    for impl in impls:
        model, warned = load(impl)
        with torch.no_grad():
            got = model(input_ids=ids).logits[0]
        if got.shape != want.shape:
            die(f"{args.logits_json}: logits of shape {tuple(want.shape)}, transformers gives {tuple(got.shape)}")
        a = {"load_warnings": warned, "logits_max_rel_diff": rel_diff(got, want)}
        a["argmax_agree"] = (got.cpu().argmax(-1) == want.argmax(-1)).double().mean().item()
        a["generate"] = greedy(model, [prompt], n_new)[0]
        a["generate_ok"] = a["generate"] == gen["ids"]
        a["batch"], alone, a["batch_rows_stopped"], a["batch_logits_max_rel_diff"] = batch_check(model, 8)
        a["batch_ok"] = a["batch"] == alone and a["batch_logits_max_rel_diff"] <= args.tol
        a["cache_lengths"] = cache_lengths(model)
        r["attn"][impl] = a
        del model
        print(f"--- {impl}")
        print(f"quiet    from_pretrained(attn_implementation={impl!r}): {warned or 'no warning'}  {check(impl + ' quiet', not warned)}")
        print(f"logits   {len(ref['ids'])} tokens: max rel diff {a['logits_max_rel_diff']:.3e} (argmax agree "
              f"{a['argmax_agree']:.3f})  {check(impl + ' logits', a['logits_max_rel_diff'] <= args.tol)}")
        print(f"generate {n_new} greedy tokens equal eabfit's: {a['generate_ok']}  {check(impl + ' generate', a['generate_ok'])}")
        print(f"batch    rows of {[len(x) for x in rows]} tokens, left padded, 8 greedy tokens equal each row alone "
              f"({a['batch_rows_stopped']} stopped at EOS, padded with 0 in the batch), step logits max rel diff "
              f"{a['batch_logits_max_rel_diff']:.3e}  {check(impl + ' batch', a['batch_ok'])}")
        print(f"cache    keys per layer {a['cache_lengths']} == {family}'s {plain_cache}  "
              f"{check(impl + ' cache', a['cache_lengths'] == plain_cache)}")

    if args.half:
        for dtype in (torch.bfloat16, torch.float16):
            model, _ = load("sdpa", dtype)
            with torch.no_grad():
                got = model(input_ids=ids).logits[0].float()
            d = rel_diff(got, want)
            batch = greedy(model, rows, 4)
            del model
            name = str(dtype).removeprefix("torch.")
            bound = 3 * plain_half[dtype] + 1e-3
            r[f"sdpa_{name}_max_rel_diff"] = d
            r[f"plain_{name}_max_rel_diff"] = plain_half[dtype]
            ok = bool(torch.isfinite(got).all()) and d <= bound and all(len(b) == 4 for b in batch)
            print(f"{name:<8} sdpa: max rel diff to eabfit's float32 {d:.3e}, within 3x what {name} costs {family} "
                  f"itself ({plain_half[dtype]:.3e}) + 1e-3; a left-padded batch generates  {check(name, ok)}")

    if args.compile:
        model, _ = load("sdpa")
        compiled = torch.compile(model)
        with torch.no_grad():
            d = rel_diff(compiled(input_ids=ids).logits[0], want)
        r["compile_max_rel_diff"] = d
        print(f"compile  torch.compile, sdpa: max rel diff {d:.3e}  {check('compile', d <= args.tol)}")
        del model, compiled

    r["failed"] = failed
    r["pass"] = not failed
    print(f"export   {root} ({r['model_type']}, mask_first_token {r['mask_first_token']}, sliding_window "
          f"{r['sliding_window']}, {device}, transformers {transformers.__version__}, torch {torch.__version__}): "
          + ("pass" if not failed else f"FAIL: {', '.join(failed)}"))
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))
    sys.exit(0 if not failed else 1)


if __name__ == "__main__":
    main()
