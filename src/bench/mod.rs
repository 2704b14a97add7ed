//! `eabfit bench`: time one training step (or one forward pass) of a randomly initialised
//! LLaMA-shaped model with EAB slots in every layer plus LoRA, on any device, without a
//! checkpoint. The train step is the one `train.rs` takes: student forward, frozen-teacher
//! forward (no adapters), KL(teacher || student) on full fp32 log-softmax, backward, gradients
//! by var, global-norm clipping, AdamW.
//!
//! Reported: median ms/step over the timed steps (each closed by a device synchronisation),
//! tokens/s, model FLOP utilisation against the H200's dense bf16 peak, and on CUDA the peak of
//! bytes allocated from the CUDA memory pool (the counterpart of torch.cuda.max_memory_allocated).
//!
//! FLOP model (`N` = parameters of the base that take part in a matmul per token: every
//! q/k/v/o/gate/up/down projection plus the lm_head, which is counted even when tied to the
//! embedding; the embedding lookup, norms, attention scores, EAB slots and LoRA are left out):
//!   train:   6 N per token = teacher forward 2N + student forward 2N + student backward 2N
//!            (the base is frozen, so only activation gradients are needed: dX = dY W, 2N;
//!            weight gradients dW would be another 2N that useful work does not need; candle's
//!            matmul backward computes them anyway, so candle executes ~8N, see the JSON's
//!            `executed_flops_per_step`).
//!   forward: 2 N per token.
//! MFU = flops_per_step / (step seconds * 989e12), the H200's dense bf16 tensor-core peak
//! (also used, as a reference point only, for f32 runs).

use crate::adapters::{AdapterMeta, AdapterSet, Adapters, SlotInit, TARGETS};
use crate::fsio::write_atomic;
use crate::memory::Pools;
use crate::model::{Config, Model, Taps};
use crate::ops::kl::kl_through_head;
use crate::optim::{clip_grad_norm, AdamW, AdamWConfig};
use crate::{Error, Result};

mod random;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
pub use random::{param_counts, random_weights, Shape};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

/// Dense bf16 peak of one H200 (SXM), FLOP/s.
pub const H200_BF16_PEAK: f64 = 989e12;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// One full training step (teacher + student forward, KL, backward, clip, AdamW)
    Train,
    /// Student forward only (adapters detached, no graph), full f32 logits
    Forward,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Train => "train",
            Mode::Forward => "forward",
        }
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Model shape (random weights, no checkpoint)
    #[arg(long, value_enum, default_value = "tiny")]
    pub shape: Shape,
    /// cpu, cuda or cuda:N
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Layers over several devices (`cuda:0=0-39,cuda:1=40-79` or `auto`); replaces --device
    #[arg(long)]
    pub device_map: Option<String>,
    /// f32, bf16 or f16 [default: f32 on CPU, bf16 on CUDA]
    #[arg(long)]
    pub dtype: Option<String>,
    /// Tokens per sequence [default: 2048; 32 for tiny]
    #[arg(long)]
    pub seq: Option<usize>,
    /// Sequences per step
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Timed steps (the median is reported)
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Untimed steps first (kernel loading, allocator warm-up); the last one is timed by phase
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    #[arg(long, value_enum, default_value = "train")]
    pub mode: Mode,
    /// LoRA rank (0 = no LoRA)
    #[arg(long, default_value_t = 16)]
    pub lora_rank: usize,
    #[arg(long, default_value_t = 16.0)]
    pub lora_alpha: f64,
    /// Comma-separated layers that get LoRA, or `all`
    #[arg(long, default_value = "1")]
    pub lora_layers: String,
    /// Comma-separated LoRA targets: q, k, v, o, gate, up, down
    #[arg(long, default_value = "down")]
    pub lora_targets: String,
    /// No EAB slots (LoRA only)
    #[arg(long)]
    pub no_eab: bool,
    /// Recompute each decoder block in the backward pass (train.recompute)
    #[arg(long)]
    pub recompute: bool,
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// CUDA: hand freed memory back to the driver at every synchronisation (candle's default;
    /// eabfit keeps it in the pool, as PyTorch's caching allocator does)
    #[arg(long)]
    pub release_pool: bool,
    /// CUDA: keep cudarc's per-tensor event tracking on (candle's default; eabfit turns it off)
    #[arg(long)]
    pub event_tracking: bool,
    /// Attention on CUDA: the fused bf16 kernel, or the blocked composite it replaced
    #[arg(long, value_enum, default_value = "kernel")]
    pub attention: AttentionPath,
    /// Also write the result as one JSON object here
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttentionPath {
    Kernel,
    Blocked,
}

/// What one bench run measured; also its JSON line.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub tool: &'static str,
    pub shape: &'static str,
    pub mode: Mode,
    pub device: String,
    /// The layer split, in `--device-map` syntax, when the model is spread over devices.
    pub device_map: Option<String>,
    pub dtype: String,
    pub batch: usize,
    pub seq: usize,
    pub tokens_per_step: usize,
    pub steps: usize,
    pub warmup: usize,
    pub eab: bool,
    pub lora_rank: usize,
    pub lora_layers: Vec<usize>,
    pub lora_targets: Vec<String>,
    /// All base parameters (a tied head counted once).
    pub params: usize,
    /// N of the FLOP model: base parameters in a per-token matmul (lm_head always counted).
    pub matmul_params: usize,
    pub trainable_params: usize,
    pub ms_per_step: f64,
    pub ms_per_step_min: f64,
    pub ms_per_step_max: f64,
    pub step_ms: Vec<f64>,
    pub tokens_per_s: f64,
    /// 6 N tokens (train) or 2 N tokens (forward).
    pub flops_per_step: f64,
    /// What candle runs in train mode, weight gradients of the frozen base included: 8 N tokens.
    pub executed_flops_per_step: f64,
    pub mfu: f64,
    pub peak_flops: f64,
    /// CUDA only: high-water mark of bytes in use in the device's memory pool over the steps
    /// (weights included), GiB; the largest over the devices of a split.
    pub peak_alloc_gib: Option<f64>,
    /// CUDA, split models: each device's high-water mark, GiB.
    pub peak_alloc_gib_per_device: BTreeMap<String, f64>,
    /// Memory in use by the model weights and adapters before the first step, GiB (CUDA only).
    pub weights_alloc_gib: Option<f64>,
    /// KL of the last timed step (train mode).
    pub loss: Option<f64>,
    /// Per-phase times of the last warm-up step, each closed by a synchronisation (ms).
    pub phases_ms: BTreeMap<String, f64>,
    pub keep_pool: bool,
    /// Blocks recomputed in the backward pass (`--recompute`).
    pub recompute: bool,
    pub event_tracking: bool,
    pub attention: AttentionPath,
    pub setup_s: f64,
}

fn parse_layers(spec: &str, n_layers: usize) -> Result<Vec<usize>> {
    if spec.trim() == "all" {
        return Ok((0..n_layers).collect());
    }
    let mut v = vec![];
    for part in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let l: usize = part.parse().map_err(|_| {
            Error::Usage(format!(
                "--lora-layers: `{part}` is not a layer number or `all`"
            ))
        })?;
        if l >= n_layers {
            return Err(Error::Usage(format!(
                "--lora-layers: layer {l} out of range (the model has {n_layers})"
            )));
        }
        v.push(l);
    }
    Ok(v)
}

fn parse_targets(spec: &str) -> Result<Vec<String>> {
    let v: Vec<String> = spec
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    for t in &v {
        if !TARGETS.iter().any(|(s, _)| s == t) {
            return Err(Error::Usage(format!(
                "--lora-targets: unknown target `{t}` (q, k, v, o, gate, up, down)"
            )));
        }
    }
    Ok(v)
}

/// Phase timer: when on, each mark synchronises the device and records the time since the
/// previous mark.
struct Phases {
    on: bool,
    last: Instant,
    times: BTreeMap<String, f64>,
}

impl Phases {
    fn new(on: bool) -> Self {
        Self {
            on,
            last: Instant::now(),
            times: BTreeMap::new(),
        }
    }
    fn mark(&mut self, name: &str, dev: &Device) -> Result<()> {
        if self.on {
            dev.synchronize()?;
            let now = Instant::now();
            *self.times.entry(name.to_string()).or_default() +=
                (now - self.last).as_secs_f64() * 1e3;
            self.last = now;
        }
        Ok(())
    }
}

struct Bench {
    /// Where inputs and outputs live (the head's device).
    device: Device,
    cfg: Config,
    batch: usize,
    seq: usize,
    seed: u64,
    lr: f64,
    recompute: bool,
    set: AdapterSet,
    /// Train mode: the frozen base with no adapters.
    teacher: Option<Model>,
    /// Train: adapters as Vars; forward: detached.
    student: Model,
    opt: AdamW,
}

impl Bench {
    /// Random token ids of step `step`, on the device: (B, T) u32.
    fn ids(&self, step: usize) -> Result<Tensor> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(
            self.seed ^ (step as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        let v = self.cfg.vocab_size as u32;
        let ids: Vec<u32> = (0..self.batch * self.seq)
            .map(|_| rng.gen_range(0..v))
            .collect();
        Ok(Tensor::from_vec(ids, (self.batch, self.seq), &self.device)?)
    }

    /// One training step as `train.rs` takes it (one micro-batch, hold = KL, weight 1, no
    /// suppression term); returns the loss.
    fn train_step(&mut self, step: usize, ph: &mut Phases) -> Result<f64> {
        let dev = self.device.clone();
        let teacher = self
            .teacher
            .as_ref()
            .ok_or_else(|| Error::Msg("train step without a teacher".into()))?;
        let ids = self.ids(step)?;
        let mut grads: BTreeMap<String, Tensor> = BTreeMap::new();
        let loss = {
            let taps = Taps {
                recompute: self.recompute,
                ..Default::default()
            };
            let (last, _) = self.student.forward_trunk(&ids, &taps)?;
            ph.mark("student_forward", &dev)?;
            let (t_last, _) = teacher.forward_trunk(&ids, &Taps::default())?;
            ph.mark("teacher_forward", &dev)?;
            let hold = kl_through_head(&last, &t_last, self.student.lm_head(), 1.0)?;
            ph.mark("kl", &dev)?;
            let gs = hold.backward()?;
            ph.mark("backward", &dev)?;
            for (name, var) in &self.set.vars {
                if let Some(g) = gs.get(var.as_tensor()) {
                    grads.insert(name.clone(), g.clone());
                }
            }
            hold.to_dtype(DType::F64)?.to_scalar::<f64>()?
            // the graph and the gradient store go here, before the update, as in train.rs
        };
        ph.mark("free_graph", &dev)?;
        clip_grad_norm(&mut grads, 1.0)?;
        ph.mark("clip", &dev)?;
        self.opt.step(&self.set.vars, &grads, self.lr)?;
        ph.mark("adamw", &dev)?;
        Ok(loss)
    }

    fn forward_step(&mut self, step: usize, ph: &mut Phases) -> Result<()> {
        let ids = self.ids(step)?;
        let logits = self.student.logits(&ids)?;
        ph.mark("forward", &self.device)?;
        drop(logits);
        Ok(())
    }
}

/// Runs the benchmark described by `args` and returns its report (prints nothing).
pub fn run(args: &BenchArgs) -> Result<BenchReport> {
    let setup_start = Instant::now();
    let seq = args.seq.unwrap_or(args.shape.default_seq());
    if seq < 2 || args.batch == 0 || args.steps == 0 {
        return Err(Error::Usage(
            "--seq must be >= 2, --batch and --steps >= 1".into(),
        ));
    }
    let cfg = args.shape.config(seq);
    cfg.validate().map_err(Error::Usage)?;
    let (placement, dtype) = crate::model_args::placement(
        "--device-map",
        &args.device,
        args.device_map.as_deref(),
        args.dtype.as_deref(),
        &cfg,
    )?;
    let device = placement.home().clone();
    let devices = placement.named_devices();
    let sync = || -> Result<()> {
        for (_, d) in &devices {
            d.synchronize()?;
        }
        Ok(())
    };
    let lora_layers = if args.lora_rank > 0 {
        parse_layers(&args.lora_layers, cfg.num_hidden_layers)?
    } else {
        vec![]
    };
    let lora_targets = parse_targets(&args.lora_targets)?;
    for (_, d) in &devices {
        crate::memory::configure(d, args.release_pool, args.event_tracking)?;
    }
    let pools = Pools::of(&devices);
    crate::ops::attention::force_blocked(args.attention == AttentionPath::Blocked);
    let _ = device.set_seed(args.seed); // CUDA only; the CPU generator cannot be seeded

    let weights = random_weights(&cfg, dtype, &placement)?;
    let mut meta = AdapterMeta::for_config(&cfg, &format!("random:{}", args.shape.name()));
    if !args.no_eab {
        meta.eab_layers = (0..cfg.num_hidden_layers).collect();
        meta.mask_first_token = true;
    }
    if args.lora_rank > 0 {
        meta.lora_rank = args.lora_rank;
        meta.lora_alpha = args.lora_alpha;
        meta.lora_targets = lora_targets.clone();
        meta.lora_layers = lora_layers.clone();
    }
    let set = AdapterSet::new(
        meta,
        SlotInit::Normal {
            std: 0.02,
            seed: args.seed,
        },
        0.01,
        args.seed,
        &device,
    )?;
    let trainable_params: usize = set.vars.values().map(|v| v.elem_count()).sum();
    let load = |adapters: &Adapters| -> Result<Model> {
        let vb = VarBuilder::from_tensors(weights.clone(), dtype, &device);
        Ok(Model::load_placed(vb, &cfg, adapters, &placement)?)
    };
    let (teacher, student) = match args.mode {
        Mode::Train => (Some(load(&Adapters::none())?), load(&set.adapters())?),
        Mode::Forward => (None, load(&set.adapters().detached())?),
    };
    drop(weights);
    let opt = AdamW::new(
        AdamWConfig {
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.0,
        },
        &set.vars,
    )?;
    let mut b = Bench {
        device: device.clone(),
        cfg: cfg.clone(),
        batch: args.batch,
        seq,
        seed: args.seed,
        lr: args.lr,
        recompute: args.recompute,
        set,
        teacher,
        student,
        opt,
    };
    sync()?;
    let weights_alloc = pools.used_now();
    pools.reset_peak();
    let setup_s = setup_start.elapsed().as_secs_f64();

    let mut phases = BTreeMap::new();
    let mut loss = None;
    let mut step_ms = vec![];
    for step in 0..args.warmup + args.steps {
        let warm = step < args.warmup;
        // The last warm-up step is timed phase by phase (a synchronisation after each).
        let mut ph = Phases::new(warm && step + 1 == args.warmup);
        sync()?;
        let start = Instant::now();
        match args.mode {
            Mode::Train => {
                let l = b.train_step(step, &mut ph)?;
                if !l.is_finite() {
                    return Err(Error::Msg(format!("step {step}: loss is {l}")));
                }
                loss = Some(l);
            }
            Mode::Forward => b.forward_step(step, &mut ph)?,
        }
        sync()?;
        let ms = start.elapsed().as_secs_f64() * 1e3;
        if warm {
            if ph.on {
                phases = ph.times;
            }
        } else {
            step_ms.push(ms);
        }
    }
    let peaks = pools.peak_gib();
    let peak_alloc = peaks.values().copied().reduce(f64::max);

    let mut sorted = step_ms.clone();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let median = if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    };
    let tokens = args.batch * seq;
    let (params, matmul_params) = param_counts(&cfg);
    let per_token = match args.mode {
        Mode::Train => 6.0,
        Mode::Forward => 2.0,
    };
    let flops = per_token * matmul_params as f64 * tokens as f64;
    let executed = match args.mode {
        Mode::Train => 8.0 * matmul_params as f64 * tokens as f64,
        Mode::Forward => flops,
    };
    let secs = median / 1e3;
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    Ok(BenchReport {
        tool: "eabfit",
        shape: args.shape.name(),
        mode: args.mode,
        device: match &args.device_map {
            Some(_) => {
                let names: Vec<&str> = devices.iter().map(|(n, _)| n.as_str()).collect();
                names.join("+")
            }
            None => args.device.clone(),
        },
        device_map: placement
            .is_split()
            .then(|| placement.map(cfg.num_hidden_layers).to_spec()),
        dtype: format!("{dtype:?}").to_lowercase(),
        batch: args.batch,
        seq,
        tokens_per_step: tokens,
        steps: args.steps,
        warmup: args.warmup,
        eab: !args.no_eab,
        lora_rank: args.lora_rank,
        lora_layers,
        lora_targets: if args.lora_rank > 0 {
            lora_targets
        } else {
            vec![]
        },
        params,
        matmul_params,
        trainable_params,
        ms_per_step: median,
        ms_per_step_min: sorted[0],
        ms_per_step_max: sorted[n - 1],
        step_ms,
        tokens_per_s: tokens as f64 / secs,
        flops_per_step: flops,
        executed_flops_per_step: executed,
        mfu: flops / secs / H200_BF16_PEAK,
        peak_flops: H200_BF16_PEAK,
        peak_alloc_gib: peak_alloc,
        peak_alloc_gib_per_device: if peaks.len() > 1 {
            peaks
        } else {
            BTreeMap::new()
        },
        weights_alloc_gib: weights_alloc.map(gib),
        loss,
        phases_ms: phases,
        keep_pool: !args.release_pool,
        attention: args.attention,
        event_tracking: pools.event_tracking(),
        recompute: args.recompute,
        setup_s,
    })
}

/// One human line for a report.
pub fn summary_line(r: &BenchReport) -> String {
    let mem = match r.peak_alloc_gib_per_device.is_empty() {
        true => r
            .peak_alloc_gib
            .map_or(String::new(), |g| format!("  peak {g:.1} GiB")),
        false => {
            let each: Vec<String> = r
                .peak_alloc_gib_per_device
                .iter()
                .map(|(n, g)| format!("{n} {g:.1}"))
                .collect();
            format!("  peak {} GiB", each.join(", "))
        }
    };
    let loss = r.loss.map_or(String::new(), |l| format!("  loss {l:.4}"));
    format!(
        "bench {} {} {} {} b{} x t{}: {:.1} ms/step (min {:.1}, max {:.1}), {:.0} tokens/s, MFU {:.1}%{mem}{loss}",
        r.shape,
        r.mode.name(),
        r.device,
        r.dtype,
        r.batch,
        r.seq,
        r.ms_per_step,
        r.ms_per_step_min,
        r.ms_per_step_max,
        r.tokens_per_s,
        r.mfu * 100.0,
    )
}

/// `eabfit bench`: prints one summary line and the JSON object (one line); writes the JSON to
/// `--json` too. A CUDA out-of-memory error exits with code 3 so that scripts can retry with a
/// smaller batch.
pub fn bench_cmd(args: &BenchArgs) -> Result<()> {
    let report = match run(args) {
        Ok(r) => r,
        Err(e) => {
            if crate::error::is_out_of_memory(&e) {
                let what = format!("bench {} {}", args.shape.name(), args.mode.name());
                let seq = args.seq.unwrap_or(args.shape.default_seq());
                let e = crate::error::explain_oom(e, &what, args.batch, seq, "--batch or --seq");
                eprintln!("error: {e}");
                std::process::exit(3);
            }
            return Err(e);
        }
    };
    let line = serde_json::to_string(&report).map_err(|e| Error::Msg(e.to_string()))?;
    println!("{}", summary_line(&report));
    println!("{line}");
    if let Some(p) = &args.json {
        write_atomic(p, format!("{line}\n").as_bytes())?;
    }
    Ok(())
}
