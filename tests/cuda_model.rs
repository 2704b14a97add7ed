//! CPU vs CUDA on tiny random checkpoints with EAB slots in every layer (position 0 masked) and
//! LoRA: logits, the gradient of every adapter tensor, three AdamW steps, bf16 logits, the
//! `bench` command's CUDA paths, and the training step's bf16 path through the block op and the
//! fused kernels. Built only with `--features cuda`; needs a CUDA device 0 (run on the GPU
//! machine through `scripts/gpu.sh test`).
#![cfg(feature = "cuda")]

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{gpu, tiny, Arch};
use eabfit::adapters::{AdapterMeta, AdapterSet, Adapters, SlotInit};
use eabfit::checkpoint::{Base, Checkpoint};
use eabfit::loss::kl_to_teacher;
use eabfit::model::Model;
use eabfit::optim::{clip_grad_norm, AdamW, AdamWConfig};
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::collections::BTreeMap;

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
    let json = common::config_hd64(arch);
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
