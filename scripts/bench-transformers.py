#!/usr/bin/env python3
"""Forward speed and memory of an `eabfit export --format hf` folder in transformers, per attention
implementation, against the same weights loaded as transformers' own family class (slots dropped).

    python scripts/bench-transformers.py EXPORT [--lengths 512,4096] [--repeats 2] [--threads 2] [--json out.json]

Per sequence length T, one batch of T random token ids, float32, no gradient, no cache; each
configuration runs in a fresh subprocess, one after another:

  plain/sdpa   transformers' LlamaForCausalLM / MistralForCausalLM on the folder, sdpa
  eab/sdpa     the export with its remote code, sdpa (the default)
  eab/eager    the export with its remote code, eager

tokens/s is T over the best of --repeats timed forwards (after one untimed warm-up forward).
Memory: the peak resident set size (sampled every millisecond from /proc/self/statm by a thread)
during the timed forwards, minus the resident size just before them: what the forward itself
allocates on top of the loaded weights (glibc's mmap threshold is fixed at 64 KiB in the
subprocess, so freed tensors leave the resident set). On a CUDA device (--device cuda) the peak comes from
torch.cuda.max_memory_allocated instead. Prints one table; exits 1 when eab/sdpa is more than
10% slower than plain/sdpa, or uses more than 10% more forward memory, at any T.
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

CONFIGS = [("plain", "sdpa"), ("eab", "sdpa"), ("eab", "eager")]


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(args):
    """One configuration in this process: prints a JSON line with its figures."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = json.loads((Path(args.export) / "config.json").read_text())
    if args.kind == "plain":
        family = {"eab_llama": "LlamaForCausalLM", "eab_mistral": "MistralForCausalLM"}[cfg["model_type"]]
        transformers.logging.set_verbosity_error()  # the dropped slots' "unexpected keys" report
        model = getattr(transformers, family).from_pretrained(args.export, dtype=torch.float32, attn_implementation=args.attn)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            args.export, trust_remote_code=True, dtype=torch.float32, attn_implementation=args.attn
        )
    model = model.to(device).eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, cfg["vocab_size"], (1, args.length), generator=gen).to(device)

    def forward():
        with torch.no_grad():
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
        if device.type == "cuda":
            torch.cuda.synchronize()

    forward()  # warm-up
    peak, stop = [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.001)

    base = rss_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        forward()
        times.append(time.perf_counter() - t0)
    stop.set()
    sampler.join()
    top = torch.cuda.max_memory_allocated() if device.type == "cuda" else peak[0]
    print(json.dumps({
        "kind": args.kind, "attn": args.attn, "length": args.length, "seconds": min(times),
        "tokens_per_s": args.length / min(times), "forward_mib": (top - base) / 2**20,
        "class": type(model).__name__, "impl": model.config._attn_implementation,
    }))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("export", help="folder written by `eabfit export --format hf` (with EAB slots)")
    ap.add_argument("--lengths", default="512,4096", help="sequence lengths, comma-separated (default 512,4096)")
    ap.add_argument("--repeats", type=int, default=2, help="timed forwards per configuration (default 2)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--device", default="cpu", help="torch device (default cpu)")
    ap.add_argument("--json", default=None, help="write the figures here")
    ap.add_argument("--kind", help=argparse.SUPPRESS)
    ap.add_argument("--attn", help=argparse.SUPPRESS)
    ap.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.kind:
        return child(args)

    root = Path(args.export)
    try:
        cfg = json.loads((root / "config.json").read_text())
    except (OSError, ValueError) as e:
        sys.exit(f"error: {root}/config.json: {e}")
    if "eab" not in cfg or "auto_map" not in cfg:
        sys.exit(f"error: {root}: not an `eabfit export --format hf` with slots (config.json has no eab/auto_map)")
    try:
        lengths = [int(x) for x in args.lengths.split(",")]
    except ValueError:
        sys.exit(f"error: --lengths {args.lengths!r}: comma-separated integers")

    import torch
    import transformers

    print(f"export {root}: {cfg['model_type']}, {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, "
          f"{cfg['num_attention_heads']} heads / {cfg['num_key_value_heads']} KV, slots in {len(cfg['eab']['layers'])} layers, "
          f"mask_first_token {cfg['eab']['mask_first_token']}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, device {args.device}, "
          f"{args.threads} threads, float32, batch 1, best of {args.repeats}")
    rows = []
    for t in lengths:
        for kind, attn in CONFIGS:
            cmd = [sys.executable, __file__, str(root), "--kind", kind, "--attn", attn, "--length", str(t),
                   "--repeats", str(args.repeats), "--threads", str(args.threads), "--device", args.device]
            # A fixed mmap threshold makes glibc hand every tensor above 64 KiB back on free, so the
            # resident size follows the live tensors instead of the allocator's cache.
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
            out = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, env=env)
            if out.returncode != 0:
                sys.exit(f"error: {kind}/{attn} at T={t} failed:\n{out.stderr[-2000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  T={t:<5} {kind}/{attn:<6} {rows[-1]['tokens_per_s']:9.1f} tokens/s  "
                  f"{rows[-1]['forward_mib']:8.1f} MiB", flush=True)

    print()
    print("| T | configuration | forward tokens/s | vs plain/sdpa | forward peak memory (MiB) | vs plain/sdpa |")
    print("|---|---|---|---|---|---|")
    failed = []
    for t in lengths:
        by = {(r["kind"], r["attn"]): r for r in rows if r["length"] == t}
        ref = by[("plain", "sdpa")]
        for kind, attn in CONFIGS:
            r = by[(kind, attn)]
            speed = r["tokens_per_s"] / ref["tokens_per_s"]
            mem = r["forward_mib"] / max(ref["forward_mib"], 1e-9)
            print(f"| {t} | {kind}/{attn} | {r['tokens_per_s']:.1f} | {speed:.3f}x | {r['forward_mib']:.1f} | {mem:.2f}x |")
            if (kind, attn) == ("eab", "sdpa") and (speed < 0.9 or mem > 1.1):
                failed.append(f"T={t}: eab/sdpa at {speed:.3f}x the speed and {mem:.2f}x the memory of plain/sdpa")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print()
    print("eab/sdpa within 10% of plain/sdpa at every T" if not failed else "FAIL: " + "; ".join(failed))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
