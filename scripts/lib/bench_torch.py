#!/usr/bin/env python3
"""The PyTorch reference for `eabfit bench`: the same shapes and the same step in
torch + transformers + PEFT, timed the same way, one JSON line out.

Model: LlamaForCausalLM with random weights (N(0, 0.02), unit norms) built directly on the
device in the chosen dtype, SDPA attention. Trainable: a one-token KV prefix per layer (k, v of
(n_kv_heads, head_dim), fp32, like eabfit's EAB slots and like PEFT prefix tuning with one
virtual token) plus PEFT LoRA (default r16, alpha 16, on layer 1's down_proj; PEFT keeps the
adapter weights in fp32). PEFT cannot hold a prefix-tuning adapter and LoRA in one model, so the
prefix goes in as a DynamicCache of per-layer (k, v) of [B, n_kv, 1, head_dim] with the
attention mask extended by one, which gives the same logits as PEFT's prefix tuning.

train:   teacher logits (no adapters, no grad) + student logits, KL(teacher || student) on full
         fp32 log-softmax (summed over the vocabulary, averaged over positions), backward,
         grad-norm clip 1.0, AdamW (lr 1e-3, betas 0.9/0.999, eps 1e-8, no decay) over the
         trainable tensors.
forward: student forward under inference_mode, full logits cast to fp32.

--device-map auto: the layer split as transformers + accelerate do it for
from_pretrained(device_map="auto"): the model is built on the meta device, accelerate's
get_balanced_memory + infer_auto_device_map place whole decoder layers over the visible GPUs,
each tensor is then made (random) on its device, and dispatch_model hooks move activations
between them. The prefix of each layer lives on that layer's GPU. Peak memory is reported per GPU.

FLOP model as in eabfit's src/bench.rs: N = parameters of every per-token matmul (projections +
lm_head, counted even when tied); train 6N per token (teacher 2N + student forward 2N + backward
2N: frozen weights need activation gradients only), forward 2N; MFU against 989e12 (H200 dense
bf16). Peak memory: torch.cuda.max_memory_allocated over the steps (weights included).

  python scripts/lib/bench_torch.py --shape llama2-7b --mode train --seq 2048 --batch 4
  python scripts/lib/bench_torch.py --shape tiny --device cpu --dtype f32 --steps 2 --warmup 1
  python scripts/lib/bench_torch.py --shape llama2-70b --mode train --seq 2048 --device-map auto

Exit codes: 0 ok, 3 out of memory (so a script can retry smaller), 1 other errors.
"""

import argparse
import json
import statistics
import sys
import time

H200_BF16_PEAK = 989e12

# (hidden, ffn, layers, heads, kv heads, vocab, tied, rope theta): as eabfit's bench::Shape.
SHAPES = {
    "llama2-7b": (4096, 11008, 32, 32, 32, 32000, False, 10000.0),
    "llama2-70b": (8192, 28672, 80, 64, 8, 32000, False, 10000.0),
    "llama-1b": (2048, 8192, 16, 32, 8, 128256, True, 500000.0),
    "smollm2-135m": (576, 1536, 30, 9, 3, 49152, True, 100000.0),
    "tiny": (64, 128, 2, 4, 2, 512, False, 10000.0),
}
TARGETS = {
    "q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
    "gate": "gate_proj", "up": "up_proj", "down": "down_proj",
}


def param_counts(shape):
    """(all base parameters, tied head once; N of the FLOP model)."""
    d, f, layers, h, kv, v, tied, _ = SHAPES[shape]
    hd = d // h
    per_layer = d * hd * (2 * h + 2 * kv) + 3 * d * f
    matmul = layers * per_layer + v * d
    total = layers * per_layer + (2 * layers + 1) * d + v * d + (0 if tied else v * d)
    return total, matmul


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--mode", choices=["train", "forward"], default="train")
    p.add_argument("--device", default="cuda")
    p.add_argument("--device-map", default=None, choices=["auto"],
                   help="split the layers over every visible GPU (accelerate); replaces --device")
    p.add_argument("--dtype", choices=["bf16", "f16", "f32"], default=None,
                   help="default bf16 on cuda, f32 on cpu")
    p.add_argument("--seq", type=int, default=None, help="default 2048 (32 for tiny)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--lora-layers", default="1", help="comma-separated, or all")
    p.add_argument("--lora-targets", default="down", help="comma-separated: q,k,v,o,gate,up,down")
    p.add_argument("--no-prefix", action="store_true", help="LoRA only (no one-token prefix)")
    p.add_argument("--attn", default="sdpa", help="attn_implementation (sdpa, eager, ...)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each decoder layer (regional compilation, as transformers "
                        "recommends for training) and the KL loss")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the JSON line here")
    a = p.parse_args(argv)
    if a.seq is None:
        a.seq = 32 if a.shape == "tiny" else 2048
    if a.device_map:
        a.device = "cuda"
    if a.dtype is None:
        a.dtype = "bf16" if a.device.startswith("cuda") else "f32"
    return a


def build(a, torch):
    from transformers import LlamaConfig, LlamaForCausalLM

    d, f, layers, h, kv, v, tied, theta = SHAPES[a.shape]
    dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[a.dtype]
    cfg = LlamaConfig(
        hidden_size=d, intermediate_size=f, num_hidden_layers=layers,
        num_attention_heads=h, num_key_value_heads=kv, vocab_size=v,
        max_position_embeddings=max(a.seq + 1, 4096), rms_norm_eps=1e-5,
        rope_theta=theta, tie_word_embeddings=tied, initializer_range=0.02,
        attention_bias=False, mlp_bias=False, use_cache=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=None,
    )
    cfg._attn_implementation = a.attn
    if a.device_map:
        return cfg, split_model(cfg, dtype, torch), dtype, None
    device = torch.device(a.device)
    # Built directly on the device in the target dtype: no fp32 copy, no host round trip.
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    model.to(device)  # no-op when the device context took (it does in transformers 5.17)
    assert model.config._attn_implementation == a.attn, model.config._attn_implementation
    model.requires_grad_(False)
    model.train()  # no dropout in Llama; train() as a training run would have it
    return cfg, model, dtype, device


def split_model(cfg, dtype, torch):
    """LlamaForCausalLM over every visible GPU, placed as from_pretrained(device_map="auto")
    places it, with random weights made on each tensor's own GPU."""
    from accelerate import dispatch_model, infer_auto_device_map, init_empty_weights
    from accelerate.utils import get_balanced_memory, set_module_tensor_to_device
    from transformers import LlamaForCausalLM

    with init_empty_weights():
        model = LlamaForCausalLM(cfg)
    no_split = ["LlamaDecoderLayer"]
    max_memory = get_balanced_memory(model, dtype=dtype, no_split_module_classes=no_split)
    device_map = infer_auto_device_map(model, max_memory=max_memory, dtype=dtype,
                                       no_split_module_classes=no_split)
    if any(d in ("cpu", "disk") for d in device_map.values()):
        raise SystemExit(f"error: out of memory: accelerate offloads to the host ({device_map})")

    def device_of(name):
        while name not in device_map:
            name = name.rpartition(".")[0]  # "" (the whole model) is the last resort
        return device_map[name]

    for name, p in model.named_parameters():
        dev = device_of(name)
        if name.endswith("norm.weight"):
            value = torch.ones(p.shape, dtype=dtype, device=dev)
        else:
            value = (torch.randn(p.shape, dtype=torch.float32, device=dev) * 0.02).to(dtype)
        set_module_tensor_to_device(model, name, dev, value=value)
    # Buffers (RoPE's inv_freq) were built for real on the host: moved, values kept.
    for name, b in model.named_buffers():
        set_module_tensor_to_device(model, name, device_of(name), value=b)
    model = dispatch_model(model, device_map=device_map)
    model.requires_grad_(False)
    model.train()
    layers = [device_of(f"model.layers.{i}") for i in range(cfg.num_hidden_layers)]
    print(f"torch device map: embed {device_of('model.embed_tokens')}, layers "
          + ", ".join(f"{d}: {layers.index(d)}-{len(layers) - 1 - layers[::-1].index(d)}"
                      for d in dict.fromkeys(layers))
          + f", head {device_of('lm_head')}", file=sys.stderr)
    model.layer_devices = [torch.device("cuda", d) if isinstance(d, int) else torch.device(d)
                           for d in layers]
    return model


def _decoder_layers(model):
    """The LlamaDecoderLayer modules, under PEFT's wrapper or not."""
    return [m for m in model.modules() if type(m).__name__ == "LlamaDecoderLayer"]


def main(argv=None):
    a = parse_args(argv)
    import torch
    import torch.nn.functional as F

    torch.manual_seed(a.seed)
    cuda = a.device.startswith("cuda")
    t_setup = time.perf_counter()
    cfg, model, dtype, device = build(a, torch)
    n_layers, kv, hd = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    if a.device_map:
        # Inputs go to the embedding's GPU; each prefix to its layer's; every GPU is timed.
        layer_devices = model.layer_devices
        device = model.get_input_embeddings().weight.device
        devices = list(dict.fromkeys([device, *layer_devices, model.lm_head.weight.device]))
    else:
        layer_devices = [device] * n_layers
        devices = [device]

    lora_layers = list(range(n_layers)) if a.lora_layers.strip() == "all" else [
        int(x) for x in a.lora_layers.split(",") if x.strip()]
    targets = [TARGETS[t.strip()] for t in a.lora_targets.split(",") if t.strip()]
    trainable = []
    if a.lora_rank > 0:
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(r=a.lora_rank, lora_alpha=a.lora_alpha, lora_dropout=0.0,
                          target_modules=targets, layers_to_transform=lora_layers, bias="none")
        model = get_peft_model(model, lcfg)  # autocast_adapter_dtype: LoRA weights in fp32
        trainable += [p for p in model.parameters() if p.requires_grad]
    prefix = []
    if not a.no_prefix:
        g = torch.Generator(device="cpu").manual_seed(a.seed)
        for i in range(n_layers):
            k = torch.nn.Parameter((torch.randn(kv, hd, generator=g) * 0.02).to(layer_devices[i]))
            v = torch.nn.Parameter((torch.randn(kv, hd, generator=g) * 0.02).to(layer_devices[i]))
            prefix.append((k, v))
            trainable += [k, v]
    if a.compile:
        # Regional compilation: one compiled graph per decoder layer (all layers share it), the
        # form transformers and accelerate recommend for training; the whole-model graph would
        # break at the prefix cache and the adapter toggle anyway.
        for layer in _decoder_layers(model):
            layer.compile()
    opt = torch.optim.AdamW(trainable, lr=a.lr, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=0.0) if a.mode == "train" else None

    from transformers import DynamicCache

    def student_inputs(ids):
        """Kwargs of a student forward: the prefix as a fresh cache (the forward appends the
        sequence's keys to it) and a mask one longer than the sequence."""
        if not prefix:
            return {"input_ids": ids}
        b = ids.shape[0]
        cache = DynamicCache()
        for i, (k, v) in enumerate(prefix):
            cache.update(k.to(dtype)[None, :, None, :].expand(b, -1, -1, -1),
                         v.to(dtype)[None, :, None, :].expand(b, -1, -1, -1), i)
        mask = torch.ones(b, ids.shape[1] + 1, dtype=torch.long, device=ids.device)
        return {"input_ids": ids, "past_key_values": cache, "attention_mask": mask}

    def teacher_logits(ids):
        if a.lora_rank > 0:
            with model.disable_adapter():
                return model(input_ids=ids).logits
        return model(input_ids=ids).logits

    gen = torch.Generator(device=device).manual_seed(a.seed + 1)

    def ids_for_step():
        return torch.randint(0, cfg.vocab_size, (a.batch, a.seq), device=device, generator=gen)

    def sync():
        if cuda:
            for d in devices:
                torch.cuda.synchronize(d)

    def kl(out, lt):
        ls = F.log_softmax(out.float(), dim=-1)
        lt = F.log_softmax(lt.float(), dim=-1)
        return F.kl_div(ls, lt, log_target=True, reduction="sum") / (a.batch * a.seq)

    kl_fn = torch.compile(kl) if a.compile else kl

    def train_step():
        ids = ids_for_step()
        with torch.no_grad():
            lt = teacher_logits(ids)
        out = model(**student_inputs(ids)).logits
        loss = kl_fn(out, lt)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    def forward_step():
        with torch.inference_mode():
            ids = ids_for_step()
            logits = model(**student_inputs(ids)).logits.float()
            del logits
        return None

    step_fn = train_step if a.mode == "train" else forward_step
    sync()
    weights_alloc = sum(torch.cuda.memory_allocated(d) for d in devices) if cuda else None
    if cuda:
        for d in devices:
            torch.cuda.reset_peak_memory_stats(d)
    setup_s = time.perf_counter() - t_setup
    step_ms, loss = [], None
    for step in range(a.warmup + a.steps):
        sync()
        t0 = time.perf_counter()
        loss = step_fn()
        sync()
        ms = (time.perf_counter() - t0) * 1e3
        if step >= a.warmup:
            step_ms.append(ms)
    peaks = {str(d): torch.cuda.max_memory_allocated(d) for d in devices} if cuda else {}
    peak = max(peaks.values()) if peaks else None

    median = statistics.median(step_ms)
    tokens = a.batch * a.seq
    params, matmul = param_counts(a.shape)
    flops = (6.0 if a.mode == "train" else 2.0) * matmul * tokens
    import transformers

    try:
        import peft
        peft_version = peft.__version__
    except ImportError:
        peft_version = None
    gib = lambda b: None if b is None else b / 2**30  # noqa: E731
    report = {
        "tool": "torch", "shape": a.shape, "mode": a.mode, "device": a.device, "dtype": a.dtype,
        "batch": a.batch, "seq": a.seq, "tokens_per_step": tokens, "steps": a.steps,
        "warmup": a.warmup, "eab": not a.no_prefix, "lora_rank": a.lora_rank,
        "lora_layers": lora_layers if a.lora_rank > 0 else [],
        "lora_targets": [t.strip() for t in a.lora_targets.split(",")] if a.lora_rank > 0 else [],
        "params": params, "matmul_params": matmul,
        "trainable_params": sum(p.numel() for p in trainable),
        "ms_per_step": median, "ms_per_step_min": min(step_ms), "ms_per_step_max": max(step_ms),
        "step_ms": step_ms, "tokens_per_s": tokens / (median / 1e3),
        "flops_per_step": flops, "mfu": flops / (median / 1e3) / H200_BF16_PEAK,
        "peak_flops": H200_BF16_PEAK, "peak_alloc_gib": gib(peak),
        "peak_alloc_gib_per_device": {k: gib(v) for k, v in peaks.items()} if len(peaks) > 1 else {},
        "device_map": a.device_map,
        "weights_alloc_gib": gib(weights_alloc), "loss": loss, "setup_s": setup_s,
        "attn": a.attn, "compiled": a.compile, "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": peft_version,
    }
    line = json.dumps(report)
    mem = f"  peak {report['peak_alloc_gib']:.1f} GiB" if peak is not None else ""
    if len(peaks) > 1:
        mem = "  peak " + ", ".join(f"{k} {gib(v):.1f}" for k, v in peaks.items()) + " GiB"
    lo = f"  loss {loss:.4f}" if loss is not None else ""
    where = "+".join(str(d) for d in devices) if a.device_map else a.device
    print(f"torch{' compiled' if a.compile else ''} {a.shape} {a.mode} {where} {a.dtype} b{a.batch} x t{a.seq}: "
          f"{median:.1f} ms/step (min {min(step_ms):.1f}, max {max(step_ms):.1f}), "
          f"{report['tokens_per_s']:.0f} tokens/s, MFU {report['mfu'] * 100:.1f}%{mem}{lo}")
    print(line, flush=True)
    if a.json:
        with open(a.json, "w") as fh:
            fh.write(line + "\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as e:  # noqa: BLE001
        import traceback

        oom = type(e).__name__ == "OutOfMemoryError" or "out of memory" in str(e).lower()
        if oom:
            print(f"error: out of memory: {str(e).splitlines()[0]}", file=sys.stderr)
            sys.exit(3)
        traceback.print_exc()
        sys.exit(1)
