//! CPU vs CUDA on tiny random checkpoints with EAB slots in every layer (position 0 masked) and
//! LoRA: logits, the gradient of every adapter tensor, three AdamW steps, bf16 logits, and the
//! `bench` command's CUDA paths; and every op of `eabfit::ops` on CUDA against the CPU (forward
//! and the gradient of every input, f32 within 1e-4 relative, bf16 within 3%; the head
//! split/merge kernels, forward only, within 1%). Built only with `--features cuda`; needs a CUDA device 0 (run
//! on the GPU machine through `scripts/gpu.sh test`).
#![cfg(feature = "cuda")]

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{tiny, Arch};
use eabfit::adapters::{AdapterMeta, AdapterSet, Adapters, SlotInit};
use eabfit::checkpoint::{Base, Checkpoint};
use eabfit::loss::kl_to_teacher;
use eabfit::model::Model;
use eabfit::optim::{clip_grad_norm, AdamW, AdamWConfig};
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::collections::BTreeMap;

fn gpu() -> Device {
    Device::new_cuda(0).expect("a CUDA device 0")
}

/// Two rows of token ids inside the tiny vocabulary (61 ids), position 0 = BOS.
fn ids(dev: &Device) -> Tensor {
    let rows: [[u32; 12]; 2] = [
        [1, 5, 9, 3, 17, 22, 40, 8, 8, 31, 12, 6],
        [1, 50, 2, 44, 7, 7, 19, 33, 58, 4, 11, 27],
    ];
    Tensor::new(&rows, dev).unwrap()
}

/// Slots in every layer with position 0 hidden, LoRA r4 on q and down of layers 0 and 2; slots
/// ~N(0, 0.3), LoRA A ~N(0, 0.2) and B set nonzero (B = 0 would leave A without gradient).
fn adapters_cpu(base: &Base, seed: u64) -> AdapterSet {
    let cfg = &base.config;
    let mut meta = AdapterMeta::for_config(cfg, "tiny");
    meta.eab_layers = (0..cfg.num_hidden_layers).collect();
    meta.mask_first_token = true;
    meta.lora_rank = 4;
    meta.lora_alpha = 8.0;
    meta.lora_targets = vec!["q".into(), "down".into()];
    meta.lora_layers = vec![0, 2];
    let set = AdapterSet::new(
        meta,
        SlotInit::Normal { std: 0.3, seed },
        0.2,
        seed,
        &Device::Cpu,
    )
    .unwrap();
    let mut rng = StdRng::seed_from_u64(seed + 7);
    for (name, var) in &set.vars {
        if name.contains("lora_B") {
            let n = var.elem_count();
            let data: Vec<f32> = (0..n).map(|_| (rng.gen::<f32>() - 0.5) * 0.4).collect();
            var.set(&Tensor::from_vec(data, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    set
}

/// An independent copy of `set` (new Vars) on `dev`.
fn copy_to(set: &AdapterSet, dev: &Device) -> AdapterSet {
    let vars = set
        .vars
        .iter()
        .map(|(k, v)| {
            let t = v.as_tensor().to_device(dev).unwrap().copy().unwrap();
            (k.clone(), Var::from_tensor(&t).unwrap())
        })
        .collect();
    AdapterSet {
        meta: set.meta.clone(),
        vars,
    }
}

struct Side {
    teacher: Model,
    student: Model,
    set: AdapterSet,
    dev: Device,
}

fn side(ckpt: &Checkpoint, set: AdapterSet, dtype: DType, dev: &Device) -> Side {
    let base = ckpt.base(dtype, dev).unwrap();
    Side {
        teacher: base.model(&Adapters::none()).unwrap(),
        student: base.model(&set.adapters()).unwrap(),
        set,
        dev: dev.clone(),
    }
}

/// Both sides of one tiny checkpoint: f32 CPU and f32 CUDA with equal adapters.
fn sides(arch: Arch, seed: u64) -> (common::Tiny, Side, Side) {
    let t = tiny(arch, seed);
    let ckpt = Checkpoint::open(&t.spec()).unwrap();
    let base = ckpt.base(DType::F32, &Device::Cpu).unwrap();
    let set = adapters_cpu(&base, seed);
    let gpu_set = copy_to(&set, &gpu());
    let cpu = side(&ckpt, set, DType::F32, &Device::Cpu);
    let cuda = side(&ckpt, gpu_set, DType::F32, &gpu());
    (t, cpu, cuda)
}

impl Side {
    /// KL(teacher || student) and the gradient of every adapter var, by name.
    fn loss_and_grads(&self) -> (f32, BTreeMap<String, Tensor>) {
        let ids = ids(&self.dev);
        let s = self.student.logits(&ids).unwrap();
        let t = self.teacher.logits(&ids).unwrap();
        let loss = kl_to_teacher(&s, &t, 1.0).unwrap();
        let gs = loss.backward().unwrap();
        let grads = self
            .set
            .vars
            .iter()
            .map(|(name, var)| {
                let g = gs
                    .get(var.as_tensor())
                    .unwrap_or_else(|| panic!("no gradient for {name}"));
                (name.clone(), g.clone())
            })
            .collect();
        (loss.to_scalar::<f32>().unwrap(), grads)
    }

    /// One training step as train.rs takes it (clip 1.0, AdamW); returns the loss.
    fn train_step(&self, opt: &mut AdamW) -> f32 {
        let (loss, mut grads) = self.loss_and_grads();
        clip_grad_norm(&mut grads, 1.0).unwrap();
        opt.step(&self.set.vars, &grads, 1e-2).unwrap();
        loss
    }
}

#[test]
fn f32_logits_match_cpu() {
    for (arch, seed) in [(Arch::Llama, 11), (Arch::Llama3, 12), (Arch::Mistral, 13)] {
        let (_t, cpu, cuda) = sides(arch, seed);
        for (what, c, g) in [
            ("student", &cpu.student, &cuda.student),
            ("teacher", &cpu.teacher, &cuda.teacher),
        ] {
            let lc = c.logits(&ids(&Device::Cpu)).unwrap();
            let lg = g.logits(&ids(&cuda.dev)).unwrap();
            assert_eq!(lc.dims(), lg.dims());
            let d = common::max_abs_diff(&lc, &lg);
            let scale = common::max_abs(&lc).max(1.0);
            eprintln!("{arch:?} {what}: max |cpu - cuda| {d:.3e} (max |logit| {scale:.2})");
            assert!(
                d <= 1e-4 * scale,
                "{arch:?} {what}: max |diff| {d} > 1e-4 x {scale}"
            );
        }
    }
}

#[test]
fn f32_gradients_of_every_adapter_match_cpu() {
    for (arch, seed) in [(Arch::Llama, 21), (Arch::Mistral, 22)] {
        let (_t, cpu, cuda) = sides(arch, seed);
        let (lc, gc) = cpu.loss_and_grads();
        let (lg, gg) = cuda.loss_and_grads();
        assert!(lc > 1e-4, "the adapters change nothing: KL {lc}");
        assert!((lc - lg).abs() <= 1e-5 * lc.max(1.0), "loss {lc} vs {lg}");
        assert_eq!(gc.len(), cpu.set.vars.len());
        for (name, g) in &gc {
            let scale = common::max_abs(g);
            assert!(scale > 0.0, "{arch:?} {name}: zero gradient");
            let d = common::max_abs_diff(g, &gg[name]);
            eprintln!("{arch:?} {name}: max |g| {scale:.3e}, max |cpu - cuda| {d:.3e}");
            assert!(
                d <= 1e-3 * scale,
                "{arch:?} {name}: relative gradient error {} > 1e-3",
                d / scale
            );
        }
    }
}

#[test]
fn three_adamw_steps_give_the_same_adapters() {
    let (_t, cpu, cuda) = sides(Arch::Llama, 31);
    let before: BTreeMap<String, Tensor> = cpu
        .set
        .vars
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().copy().unwrap()))
        .collect();
    let cfg = AdamWConfig {
        betas: (0.9, 0.999),
        eps: 1e-8,
        weight_decay: 0.01,
    };
    let mut opt_c = AdamW::new(cfg, &cpu.set.vars).unwrap();
    let mut opt_g = AdamW::new(cfg, &cuda.set.vars).unwrap();
    for step in 0..3 {
        let lc = cpu.train_step(&mut opt_c);
        let lg = cuda.train_step(&mut opt_g);
        eprintln!("step {step}: loss cpu {lc:.6} cuda {lg:.6}");
        assert!(
            (lc - lg).abs() <= 1e-5 * lc.max(1.0),
            "step {step}: {lc} vs {lg}"
        );
    }
    for (name, v) in &cpu.set.vars {
        let moved = common::max_abs_diff(v.as_tensor(), &before[name]);
        assert!(moved > 1e-3, "{name} did not move ({moved})");
        let d = common::max_abs_diff(v.as_tensor(), cuda.set.vars[name].as_tensor());
        eprintln!("{name}: moved {moved:.3e}, max |cpu - cuda| {d:.3e}");
        assert!(d <= 1e-4, "{name}: max |cpu - cuda| {d} after 3 steps");
    }
}

fn rms(t: &Tensor) -> f32 {
    t.to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap()
        .sqrt()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// bf16 on CUDA against f32 on the CPU, within what bf16 allows on these tiny models: their
/// weights are large (attention scores of tens, written by a bf16 matmul before the f32
/// softmax), so bf16 on the CPU itself lands at 2-4% RMS and 3-7.5% max relative to the
/// largest logit over seeds 41-55 (seed 41: 2.7% / 3.4%). Bounds: RMS 5%, max 10%. A broken
/// kernel gives errors of order one. The bf16 CPU vs bf16 CUDA gap is printed for reference.
#[test]
fn bf16_logits_are_within_bf16_precision_of_f32_cpu() {
    let t = tiny(Arch::Llama, 41);
    let ckpt = Checkpoint::open(&t.spec()).unwrap();
    let base = ckpt.base(DType::F32, &Device::Cpu).unwrap();
    let set = adapters_cpu(&base, 41);
    let gpu_set = copy_to(&set, &gpu());
    let cpu_bf_set = copy_to(&set, &Device::Cpu);
    let cpu = side(&ckpt, set, DType::F32, &Device::Cpu);
    let bf = side(&ckpt, gpu_set, DType::BF16, &gpu());
    let cpu_bf = side(&ckpt, cpu_bf_set, DType::BF16, &Device::Cpu);
    for (what, c, b, cb) in [
        ("student", &cpu.student, &bf.student, &cpu_bf.student),
        ("teacher", &cpu.teacher, &bf.teacher, &cpu_bf.teacher),
    ] {
        let lc = c.logits(&ids(&Device::Cpu)).unwrap();
        let lb = b.logits(&ids(&bf.dev)).unwrap();
        let lcb = cb.logits(&ids(&Device::Cpu)).unwrap();
        assert_eq!(lb.dtype(), DType::F32, "logits come back in f32");
        let scale = common::max_abs(&lc);
        let rel_max = common::max_abs_diff(&lc, &lb) / scale;
        let diff = (&lc - &lb.to_device(&Device::Cpu).unwrap()).unwrap();
        let rel_rms = rms(&diff) / rms(&lc);
        let cpu_rel_max = common::max_abs_diff(&lc, &lcb) / scale;
        let gap = common::max_abs_diff(&lb, &lcb) / scale;
        eprintln!(
            "{what}: bf16 cuda vs f32 cpu: max {rel_max:.4}, rms {rel_rms:.4} (relative); \
             bf16 cpu vs f32 cpu: max {cpu_rel_max:.4}; bf16 cuda vs bf16 cpu: max {gap:.4}"
        );
        assert!(
            rel_rms <= 5e-2,
            "{what}: relative RMS error {rel_rms} > 5e-2"
        );
        assert!(
            rel_max <= 1e-1,
            "{what}: max error {rel_max} x max |logit| > 1e-1"
        );
    }
    // bf16 training gives a finite, nonzero gradient for every adapter.
    let (loss, grads) = bf.loss_and_grads();
    assert!(loss.is_finite());
    for (name, g) in grads {
        let m = common::max_abs(&g);
        assert!(m.is_finite() && m > 0.0, "{name}: gradient max {m}");
    }
}

#[test]
fn bench_runs_on_cuda_and_reports_memory() {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        b: eabfit::bench::BenchArgs,
    }
    // Forward with candle's allocator defaults, train with eabfit's.
    for (mode, knobs) in [
        ("train", &[][..]),
        ("forward", &["--release-pool", "--event-tracking"][..]),
    ] {
        let mut args = vec![
            "bench", "--shape", "tiny", "--device", "cuda", "--mode", mode, "--steps", "2",
            "--warmup", "1", "--batch", "2",
        ];
        args.extend_from_slice(knobs);
        let cli = Cli::parse_from(args);
        let r = eabfit::bench::run(&cli.b).unwrap();
        eprintln!("{}", eabfit::bench::summary_line(&r));
        assert_eq!(r.dtype, "bf16");
        assert!(r.tokens_per_s > 0.0 && r.ms_per_step > 0.0);
        let peak = r.peak_alloc_gib.expect("pool statistics on CUDA");
        let weights = r.weights_alloc_gib.expect("pool statistics on CUDA");
        // Pool statistics are per device: with tests in parallel they include other tests'.
        assert!(
            peak > 0.0 && weights > 0.0,
            "peak {peak}, weights {weights}"
        );
        if mode == "train" {
            assert!(r.loss.is_some_and(f64::is_finite));
            assert!(r.phases_ms.contains_key("backward"));
        }
    }
}

/// Random uniform(-1, 1) tensor on the CPU.
fn rnd(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Runs `f` on copies of `inputs` (as Vars of `dtype`) on `dev`; returns the output and the
/// gradient of every input under the loss sum(out * r), all on the CPU in f32.
fn run_op(
    inputs: &[Tensor],
    dev: &Device,
    dtype: DType,
    f: &dyn Fn(&[Tensor]) -> Tensor,
) -> (Tensor, Vec<Tensor>) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(&t.to_dtype(dtype).unwrap().to_device(dev).unwrap()).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = f(&ts);
    let r = rnd(out.dims(), 99)
        .to_dtype(out.dtype())
        .unwrap()
        .to_device(dev)
        .unwrap();
    let g = (&out * r).unwrap().sum_all().unwrap().backward().unwrap();
    let back = |t: &Tensor| {
        t.to_device(&Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    };
    let grads = ts
        .iter()
        .map(|t| back(g.get(t).expect("gradient")))
        .collect();
    (back(&out), grads)
}

fn compare_op(name: &str, inputs: &[Tensor], f: &dyn Fn(&[Tensor]) -> Tensor) {
    let dev = gpu();
    let (oc, gc) = run_op(inputs, &Device::Cpu, DType::F32, f);
    for (dtype, tol) in [(DType::F32, 1e-4), (DType::BF16, 3e-2)] {
        let (og, gg) = run_op(inputs, &dev, dtype, f);
        let rel =
            |a: &Tensor, b: &Tensor| common::max_abs_diff(a, b) / common::max_abs(b).max(1e-6);
        let e = rel(&og, &oc);
        eprintln!("{name} {dtype:?}: output rel {e:.2e}");
        assert!(e < tol, "{name} {dtype:?}: output rel {e}");
        for (i, (a, b)) in gg.iter().zip(&gc).enumerate() {
            let e = rel(a, b);
            eprintln!("{name} {dtype:?}: input {i} gradient rel {e:.2e}");
            assert!(
                e < tol * 2.0,
                "{name} {dtype:?}: input {i} gradient rel {e}"
            );
        }
    }
}

/// The fused bf16 kernel of `ops::attention` (head_dim 64 and 128) against the f32 CPU
/// composite: several 64-query and 64-key tiles, T not a multiple of them, T = 1, queries after
/// cached positions (`past`), slot on and off, GQA, window, hidden first token.
#[test]
fn fused_attention_matches_cpu() {
    use eabfit::ops::attention::{attention, mask, Spec};
    let cases = [
        // (b, h, kv, t, past, hd, slots, window, hide_first)
        (2, 4, 2, 150, 0, 128, 1, None, false),
        (1, 8, 2, 200, 0, 64, 1, None, true),
        (1, 4, 4, 129, 0, 128, 0, None, false),
        (2, 6, 3, 97, 0, 64, 1, Some(40), false),
        (1, 4, 1, 1, 0, 128, 1, None, false),
        (1, 4, 2, 3, 70, 128, 1, None, false),
        (1, 4, 2, 70, 5, 64, 0, Some(16), false),
    ];
    for (b, h, kv, t, past, hd, slots, window, hide_first) in cases {
        let s = slots + past + t;
        let spec = Spec {
            slots,
            window,
            hide_first,
            block: 0,
        };
        let f = move |x: &[Tensor]| {
            let m = mask(t, s, &spec, x[0].dtype(), x[0].device()).unwrap();
            attention(&x[0], &x[1], &x[2], &m, false).unwrap().0
        };
        let inputs = [
            rnd(&[b, h, t, hd], 21),
            rnd(&[b, kv, s, hd], 22),
            rnd(&[b, kv, s, hd], 23),
        ];
        compare_op(
            &format!(
                "fused attention b {b} h {h}/{kv} t {t} past {past} hd {hd} slots {slots} window {window:?} hide {hide_first}"
            ),
            &inputs,
            &f,
        );
    }
}

#[test]
fn ops_on_cuda_match_cpu() {
    use eabfit::ops::attention::{attention, mask, Spec};
    use eabfit::ops::{ce, embedding, kl, linear, norm, rope};
    // attention: slot as key 0, GQA 8/2, window, first token hidden, 37 queries in blocks of 16
    let (b, h, kv, t, hd) = (2, 8, 2, 37, 64);
    for (slots, window, hide_first) in [(1, None, true), (1, Some(9), false), (0, Some(5), false)] {
        let s = t + slots;
        let spec = Spec {
            slots,
            window,
            hide_first,
            block: 16,
        };
        let f = move |x: &[Tensor]| {
            let m = mask(t, s, &spec, x[0].dtype(), x[0].device()).unwrap();
            attention(&x[0], &x[1], &x[2], &m, false).unwrap().0
        };
        let inputs = [
            rnd(&[b, h, t, hd], 1),
            rnd(&[b, kv, s, hd], 2),
            rnd(&[b, kv, s, hd], 3),
        ];
        compare_op(
            &format!("attention slots {slots} window {window:?} hide {hide_first}"),
            &inputs,
            &f,
        );
    }
    compare_op("rms_norm", &[rnd(&[3, 5, 96], 4), rnd(&[96], 5)], &|x| {
        norm::rms_norm(&x[0], &x[1], 1e-5).unwrap()
    });
    let ang = rnd(&[t, hd / 2], 6);
    compare_op("rope", &[rnd(&[b, h, t, hd], 7)], &move |x| {
        let dt = x[0].dtype();
        let dev = x[0].device();
        let c = ang
            .cos()
            .unwrap()
            .to_dtype(dt)
            .unwrap()
            .to_device(dev)
            .unwrap();
        let sn = ang
            .sin()
            .unwrap()
            .to_dtype(dt)
            .unwrap()
            .to_device(dev)
            .unwrap();
        rope::rope(&x[0], &c, &sn).unwrap()
    });
    compare_op("linear", &[rnd(&[40, 96], 8)], &|x| {
        let w = rnd(&[24, 96], 9)
            .to_dtype(x[0].dtype())
            .unwrap()
            .to_device(x[0].device())
            .unwrap();
        linear::linear(&x[0], &w).unwrap()
    });
    compare_op("kl", &[rnd(&[2, 9, 32], 10)], &|x| {
        let dev = x[0].device();
        let dt = x[0].dtype();
        let ht = rnd(&[2, 9, 32], 11)
            .to_dtype(dt)
            .unwrap()
            .to_device(dev)
            .unwrap();
        let w = (rnd(&[300, 32], 12) * 3.0)
            .unwrap()
            .to_dtype(dt)
            .unwrap()
            .to_device(dev)
            .unwrap();
        kl::kl_chunked(&x[0], &ht, &w, 1.0, 5)
            .unwrap()
            .unsqueeze(0)
            .unwrap()
    });
    // Token ids drawn so that some repeat many times (the embedding's atomics) and the
    // cross-entropy's targets cover the vocabulary.
    let tok = |n: usize, vocab: u32, dev: &Device| {
        let v: Vec<u32> = (0..n as u32)
            .map(|i| (i * i * 7 + 3) % vocab % 97)
            .collect();
        Tensor::from_vec(v, n, dev).unwrap()
    };
    compare_op(
        "cross-entropy through the head",
        &[rnd(&[2, 40, 32], 13), (rnd(&[300, 32], 14) * 3.0).unwrap()],
        &move |x| {
            let ids = tok(80, 300, x[0].device()).reshape((2, 40)).unwrap();
            ce::ce_chunked(&x[0], &x[1], &ids, 7)
                .unwrap()
                .unsqueeze(0)
                .unwrap()
        },
    );
    compare_op("embedding", &[rnd(&[300, 32], 15)], &move |x| {
        let ids = tok(400, 300, x[0].device()).reshape((4, 100)).unwrap();
        embedding::embed(&x[0], &ids).unwrap()
    });
}

/// `ops::heads` on CUDA bf16 (its kernels) against the CPU f32 composite (reshape, transpose,
/// candle's RoPE, cat): split with and without RoPE and slot, merge with and without both,
/// and Qwen's steps before RoPE (a bias; a per-head RMSNorm, with merge running its backward),
/// head_dim 64 and 128, T odd; bf16 within 1% relative.
#[test]
fn heads_kernels_match_the_composite() {
    use eabfit::ops::heads::{merge, split, Pre};
    let dev = gpu();
    for (b, t, n, hd) in [(2, 37, 3, 64), (1, 130, 2, 128)] {
        let x = rnd(&[b * t, n * hd], 1);
        let g = rnd(&[b, n, t + 1, hd], 2);
        let slot = rnd(&[n, hd], 3);
        let ang = (rnd(&[t, hd / 2], 4) * 3.0).unwrap();
        let (cos, sin) = (ang.cos().unwrap(), ang.sin().unwrap());
        let bias = rnd(&[n * hd], 5);
        let nw = (rnd(&[hd], 6) * 0.3 + 1.0).unwrap();
        let on = |x: &Tensor| x.to_dtype(DType::BF16).unwrap().to_device(&dev).unwrap();
        let (xg, gg, sg, cg, ng) = (on(&x), on(&g), on(&slot), on(&cos), on(&sin));
        let (bg, nwg) = (on(&bias), on(&nw));
        let check = |what: &str, gpu: Tensor, cpu: Tensor| {
            assert_eq!(gpu.dims(), cpu.dims(), "{what}");
            let gpu = gpu
                .to_device(&Device::Cpu)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            let e = common::max_abs_diff(&gpu, &cpu) / common::max_abs(&cpu);
            eprintln!("heads hd {hd} {what}: rel {e:.2e}");
            assert!(e < 1e-2, "heads hd {hd} {what}: rel {e}");
        };
        for (rope, with_slot) in [(false, false), (true, false), (true, true), (false, true)] {
            let r_cpu = rope.then_some((&cos, &sin));
            let r_gpu = rope.then_some((&cg, &ng));
            for (with_bias, normed) in [(false, false), (true, false), (false, true), (true, true)]
            {
                let what =
                    format!("split rope {rope} slot {with_slot} bias {with_bias} norm {normed}");
                let pre_cpu = Pre {
                    bias: with_bias.then_some(&bias),
                    norm: normed.then_some((&nw, 1e-6)),
                };
                let pre_gpu = Pre {
                    bias: with_bias.then_some(&bg),
                    norm: normed.then_some((&nwg, 1e-6)),
                };
                check(
                    &what,
                    split(&xg, b, n, r_gpu, with_slot.then_some(&sg), pre_gpu).unwrap(),
                    split(&x, b, n, r_cpu, with_slot.then_some(&slot), pre_cpu).unwrap(),
                );
            }
            let slots = with_slot as usize;
            let gs = g.narrow(2, 1 - slots, t + slots).unwrap();
            let gsg = gg
                .narrow(2, 1 - slots, t + slots)
                .unwrap()
                .contiguous()
                .unwrap();
            check(
                &format!("merge rope {rope} slots {slots}"),
                merge(&gsg, slots, r_gpu, None).unwrap(),
                merge(&gs, slots, r_cpu, None).unwrap(),
            );
            // The norm's backward reads the pre-norm rows: x with its bias, as the block op keeps them.
            let u = x.broadcast_add(&bias).unwrap();
            check(
                &format!("merge rope {rope} slots {slots} norm"),
                merge(&gsg, slots, r_gpu, Some((&on(&u), &nwg, 1e-6))).unwrap(),
                merge(&gs, slots, r_cpu, Some((&u, &nw, 1e-6))).unwrap(),
            );
        }
    }
}

/// The training step's CUDA bf16 path on a model whose head_dim (64) takes the fused kernels
/// (the decoder block op, head split/merge, attention, SwiGLU, RMSNorm backward, the KL through
/// the head) against the CPU's f32 per-op path, within what bf16 alone costs there: the hold
/// loss plus a hidden-state term, and the gradient of every adapter tensor (slots in every layer
/// with position 0 hidden; LoRA on layer 1, which stays on the per-op path between two block
/// ops). LLaMA, Qwen2 (q/k/v biases in the split kernel) and Qwen3 (head norms: the _norm
/// split and merge kernels).
#[test]
fn block_op_and_kernels_on_cuda_match_cpu() {
    for arch in [Arch::Llama, Arch::Qwen2, Arch::Qwen3] {
        eprintln!("{arch:?}");
        block_op_on_cuda_matches_cpu(arch);
    }
}

fn block_op_on_cuda_matches_cpu(arch: Arch) {
    use candle_nn::VarBuilder;
    use eabfit::model::{Config, Taps};
    use eabfit::ops::kl::kl_through_head;
    let mut json = common::config(arch);
    if arch == Arch::Qwen3 {
        json["head_dim"] = 64.into();
    }
    json["hidden_size"] = 128.into();
    json["intermediate_size"] = 256.into();
    json["num_attention_heads"] = 2.into();
    json["num_key_value_heads"] = 1.into();
    json["max_position_embeddings"] = 256.into();
    let cfg: Config = serde_json::from_value(json.clone()).unwrap();
    assert_eq!(cfg.head_dim(), 64);
    let weights = common::weights(&json, 5);
    let mut meta = AdapterMeta::for_config(&cfg, "tiny-hd64");
    meta.eab_layers = (0..cfg.num_hidden_layers).collect();
    meta.mask_first_token = true;
    meta.lora_rank = 4;
    meta.lora_alpha = 8.0;
    meta.lora_targets = vec!["down".into()];
    meta.lora_layers = vec![1];
    let set = AdapterSet::new(
        meta,
        SlotInit::Normal { std: 0.3, seed: 5 },
        0.2,
        5,
        &Device::Cpu,
    )
    .unwrap();
    let mut rng = StdRng::seed_from_u64(5);
    let ids: Vec<u32> = (0..2 * 150)
        .map(|i| {
            if i % 150 == 0 {
                1
            } else {
                rng.gen_range(3..61)
            }
        })
        .collect();
    let run = |dev: &Device, dtype: DType| {
        let set = copy_to(&set, dev);
        let ts = weights
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.to_dtype(dtype).unwrap().to_device(dev).unwrap(),
                )
            })
            .collect();
        let vb = VarBuilder::from_tensors(ts, dtype, dev);
        let teacher = Model::load(vb.clone(), &cfg, &Adapters::none()).unwrap();
        let student = Model::load(vb, &cfg, &set.adapters()).unwrap();
        let x = Tensor::from_vec(ids.clone(), (2, 150), dev).unwrap();
        let taps = Taps {
            hidden: true,
            ..Default::default()
        };
        let (hs, out) = student.forward_trunk(&x, &taps).unwrap();
        let (ht, _) = teacher.forward_trunk(&x, &Taps::default()).unwrap();
        let mut loss = kl_through_head(&hs, &ht, student.lm_head(), 1.0).unwrap();
        for h in &out.hidden {
            let m = h
                .to_dtype(DType::F32)
                .unwrap()
                .sqr()
                .unwrap()
                .mean_all()
                .unwrap();
            loss = (loss + (m * 1e-3).unwrap()).unwrap();
        }
        let gs = loss.backward().unwrap();
        let grads: BTreeMap<String, Tensor> = set
            .vars
            .iter()
            .map(|(n, v)| {
                let g = gs
                    .get(v.as_tensor())
                    .unwrap_or_else(|| panic!("no gradient for {n}"));
                (
                    n.clone(),
                    g.to_device(&Device::Cpu)
                        .unwrap()
                        .to_dtype(DType::F32)
                        .unwrap(),
                )
            })
            .collect();
        (loss.to_scalar::<f32>().unwrap(), grads)
    };
    // The reference is f32 on the CPU; how far bf16 rounding alone moves these gradients is
    // measured by the CPU's own bf16 run (the per-op composite): on this tiny random model, up
    // to ~100% for a slot key, whose gradient is a sum over all queries that nearly cancels.
    // The kernels must stay within 1.5x of that, plus 2% of the gradient's size.
    let (l_cpu, g_cpu) = run(&Device::Cpu, DType::F32);
    let (l_c16, g_c16) = run(&Device::Cpu, DType::BF16);
    let (l_gpu, g_gpu) = run(&gpu(), DType::BF16);
    let rel_loss = |l: f32| ((l - l_cpu) / l_cpu).abs();
    let (e, e16) = (rel_loss(l_gpu), rel_loss(l_c16));
    eprintln!("block op: loss cpu f32 {l_cpu:.6}, cuda bf16 {l_gpu:.6} (rel {e:.2e}), cpu bf16 rel {e16:.2e}");
    assert!(e < 1.5 * e16 + 1e-2, "loss rel {e} (cpu bf16 {e16})");
    for (name, a) in &g_cpu {
        let scale = common::max_abs(a).max(1e-12);
        let e = common::max_abs_diff(&g_gpu[name], a) / scale;
        let e16 = common::max_abs_diff(&g_c16[name], a) / scale;
        eprintln!("block op: {name} gradient rel {e:.2e} (cpu bf16 {e16:.2e})");
        assert!(
            e < 1.5 * e16 + 2e-2,
            "{name}: gradient rel {e}, cpu bf16 {e16}"
        );
    }
}
