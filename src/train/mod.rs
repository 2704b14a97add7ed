//! `eabfit train`: fit EAB slots (and LoRA) on a frozen checkpoint so that its massive
//! activations go while its outputs stay.
//!
//! A run folder (`train.out_dir`) holds `recipe.yaml` (resolved), `checkpoints/step-NNNNNN/`
//! (adapters, optimizer moments, state, recipe; each written to a temporary folder and renamed),
//! `best/` (adapters of the best eval so far, step 0 included), `final/` and `summary.json`.
//! Data order is a pure function of (seed, step), so a checkpoint's step is its RNG state.

use crate::adapters::{AdapterMeta, AdapterSet, Adapters, SlotInit};
use crate::checkpoint::{Base, Checkpoint};
use crate::data::Windows;
use crate::device::parse_dtype;
use crate::fsio::replace_dir;
use crate::fsio::write_atomic;
use crate::loss::{lm_loss, ma_penalty, MaTarget};
use crate::memory::{peak_suffix, per_device, Pools};
use crate::metrics::{LogMark, RunLogger};
use crate::model::{Model, Taps};
use crate::ops::kl::kl_through_head;
use crate::optim::{clip_grad_norm, lr_at, AdamW, AdamWConfig};
use crate::parallel::{self, Rank};
use crate::recipe::{self, Recipe};
use crate::resume::{latest_checkpoint, prune_checkpoints, read_state};
use crate::scan::{scan_taps, Rule, ScanReport, Scanner};
use crate::{Error, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

mod eval;
use eval::{evaluate, log_eval};
pub use eval::{one_line, EvalFigures};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub base: EvalFigures,
    pub step0: EvalFigures,
    pub last: EvalFigures,
    pub best: EvalFigures,
    /// Layers whose MLP first writes the massive activations (from the base scan).
    pub birth_layers: Vec<usize>,
    pub massive_dims: Vec<usize>,
    pub rule: Rule,
    pub tokens_per_s: f64,
    /// CUDA: high-water mark of the device memory pool over the run, GiB (the largest over
    /// the GPUs of a split model).
    #[serde(default)]
    pub peak_gib: Option<f64>,
    /// CUDA: each GPU's high-water mark, GiB, by device name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub peak_gib_per_device: BTreeMap<String, f64>,
    pub wall_s: f64,
    pub final_losses: BTreeMap<String, f64>,
}

#[derive(Debug, Serialize, Deserialize)]
struct State {
    step: usize,
    seed: u64,
    /// Devices of the run that wrote it (data parallel); older checkpoints: 1.
    #[serde(default = "one")]
    world: usize,
    best: Option<EvalFigures>,
    step0: Option<EvalFigures>,
    // What the summary needs from before a resume, and how far the logs had got: a resumed
    // run cuts them back to here. Absent in checkpoints of older eabfit versions.
    #[serde(default)]
    last: Option<EvalFigures>,
    #[serde(default)]
    final_losses: BTreeMap<String, f64>,
    #[serde(default)]
    log: Option<LogMark>,
}

fn one() -> usize {
    1
}

/// Everything a run needs, resolved from the recipe.
struct Setup {
    ckpt: Checkpoint,
    base: Base,
    teacher: Model,
    train: Windows,
    /// `data.long`'s windows, one per every `data.long.every`-th micro-batch.
    long: Option<Windows>,
    eval: Windows,
    base_scan: ScanReport,
    teacher_eval_logits: Vec<Tensor>,
    ma_layers: Vec<usize>,
    ma_target: MaTarget,
    birth: Vec<usize>,
}

/// `rank_device`: a data-parallel rank's device; `None` alone, where `model.device` and
/// `model.device_map` place the model.
fn setup(r: &Recipe, rank_device: Option<&candle_core::Device>) -> Result<Setup> {
    let ckpt = Checkpoint::open(&r.model.path)?;
    let base = match rank_device {
        // A data-parallel rank: the whole model on its own device.
        Some(d) => ckpt.base(parse_dtype(r.model.dtype.map(|d| d.name()), d)?, d)?,
        None => {
            let (placement, dtype) = crate::model_args::placement(
                "model.device_map",
                &r.model.device,
                r.model.device_map.as_deref(),
                r.model.dtype.map(|d| d.name()),
                &ckpt.config,
            )?;
            // The teacher and the student share these weights; inputs, outputs and the
            // adapters live on the head's device.
            ckpt.base_placed(dtype, &placement)?
        }
    };
    let device = base.device.clone();
    let teacher = base.model(&Adapters::none())?;
    let train = Windows::of_texts(
        &ckpt.tokenizer,
        r.data.train.paths(),
        r.data.seq_len,
        r.data.max_train_windows,
    )?;
    let long = match &r.data.long {
        Some(l) => Some(Windows::of_texts(
            &ckpt.tokenizer,
            r.data.train.paths(),
            l.seq_len,
            Some(l.windows),
        )?),
        None => None,
    };
    let eval = Windows::of_texts(
        &ckpt.tokenizer,
        r.data.eval.paths(),
        r.data.seq_len,
        Some(r.data.eval_windows),
    )?;
    let rule = Rule {
        abs: r.eval.abs,
        ratio: r.eval.ratio,
    };
    let mut scanner = Scanner::new(ckpt.config.num_hidden_layers, rule);
    let mut teacher_eval_logits = vec![];
    for w in &eval.ids {
        let ids = Tensor::new(w.as_slice(), &device)?.unsqueeze(0)?;
        let out = teacher.forward(&ids, &scan_taps())?;
        scanner.add(&out, w)?;
        teacher_eval_logits.push(out.logits);
    }
    let base_scan = scanner.finish(
        &ckpt.tokenizer,
        &r.model.path,
        eval.seq_len,
        eval.bos.is_some(),
    );
    let n_layers = ckpt.config.num_hidden_layers;
    let birth: Vec<usize> = base_scan.first_massive_layer.into_iter().collect();
    let ma_layers = match &r.loss.ma.layers {
        recipe::MaLayers::All => (0..n_layers).collect(),
        recipe::MaLayers::List(v) => v.clone(),
    };
    if let Some(&bad) = ma_layers.iter().find(|&&l| l >= n_layers) {
        return Err(Error::Usage(format!(
            "loss.ma.layers: layer {bad} out of range (0..{})",
            n_layers - 1
        )));
    }
    let ma_target = match r.loss.ma.target {
        recipe::MaTarget::All => MaTarget::All,
        recipe::MaTarget::Flagged => MaTarget::Dims(base_scan.massive_dims.clone()),
        recipe::MaTarget::Ratio => MaTarget::Ratio(r.loss.ma.ratio.unwrap_or(r.eval.ratio)),
    };
    Ok(Setup {
        ckpt,
        base,
        teacher,
        train,
        long,
        eval,
        base_scan,
        teacher_eval_logits,
        ma_layers,
        ma_target,
        birth,
    })
}

/// Adapter shapes from the recipe and the base scan (LoRA `birth` layers need the scan).
fn adapter_meta(r: &Recipe, s: &Setup) -> Result<AdapterMeta> {
    let cfg = &s.ckpt.config;
    let mut meta = AdapterMeta::for_config(cfg, &r.model.path);
    let eab = &r.adapters.eab;
    if eab.enabled {
        meta.eab_layers = (0..cfg.num_hidden_layers).collect();
        meta.mask_first_token = eab.mask_first_token;
    }
    let lora = &r.adapters.lora;
    if lora.rank > 0 {
        meta.lora_rank = lora.rank;
        meta.lora_alpha = lora.alpha;
        meta.lora_targets = lora.targets.iter().map(|t| t.name().to_string()).collect();
        meta.lora_layers = match &lora.layers {
            recipe::LoraLayers::All => (0..cfg.num_hidden_layers).collect(),
            recipe::LoraLayers::List(v) => v.clone(),
            recipe::LoraLayers::Birth => {
                if s.birth.is_empty() {
                    return Err(Error::Usage(
                        "adapters.lora.layers: `birth` needs massive activations in the base model, and its scan found none (lower eval.abs/eval.ratio or list the layers)".into(),
                    ));
                }
                s.birth.clone()
            }
        };
        if let Some(&bad) = meta
            .lora_layers
            .iter()
            .find(|&&l| l >= cfg.num_hidden_layers)
        {
            return Err(Error::Usage(format!(
                "adapters.lora.layers: layer {bad} out of range (0..{})",
                cfg.num_hidden_layers - 1
            )));
        }
    }
    Ok(meta)
}

/// Slot init `first_token`: each layer's post-RoPE key and value of position 0, averaged over
/// the first `calib_windows` training windows.
fn first_token_kv(s: &Setup, n: usize) -> Result<Vec<(Tensor, Tensor)>> {
    let n = n.clamp(1, s.train.len());
    let mut sums: Vec<(Tensor, Tensor)> = vec![];
    for w in s.train.ids.iter().take(n) {
        let ids = Tensor::new(w.as_slice(), &s.base.device)?.unsqueeze(0)?;
        let out = s.teacher.forward(
            &ids,
            &Taps {
                first_kv: true,
                ..Default::default()
            },
        )?;
        for (i, (k, v)) in out.first_kv.iter().enumerate() {
            let (k, v) = (
                k.squeeze(0)?.to_dtype(candle_core::DType::F32)?,
                v.squeeze(0)?.to_dtype(candle_core::DType::F32)?,
            );
            if sums.len() <= i {
                sums.push((k, v));
            } else {
                sums[i] = ((&sums[i].0 + k)?, (&sums[i].1 + v)?);
            }
        }
    }
    sums.into_iter()
        .map(|(k, v)| Ok(((k / n as f64)?, (v / n as f64)?)))
        .collect()
}

/// This rank's training windows of micro-batch `g` (global index over steps x accumulation):
/// its share of the `world x batch` windows one device would take with the whole batch.
fn batch_ids<'a>(
    windows: &'a Windows,
    seed: u64,
    g: usize,
    batch: usize,
    rank: &Rank,
) -> Vec<&'a Vec<u32>> {
    let global = crate::data::batch_indices(windows.len(), seed, g, batch * rank.world);
    rank.share(&global)
        .iter()
        .map(|&i| &windows.ids[i])
        .collect()
}

/// Loss terms of one micro-batch: (total, hold, ma) as scalar tensors.
fn losses(
    r: &Recipe,
    s: &Setup,
    student: &Model,
    ids: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let ma_on = r.loss.ma.weight > 0.0 && !s.ma_layers.is_empty();
    let (last, out) = student.forward_trunk(
        ids,
        &Taps {
            hidden: ma_on,
            recompute: r.train.recompute,
            ..Default::default()
        },
    )?;
    let hold = match r.loss.hold.kind {
        recipe::HoldKind::Kl => {
            // The teacher builds no graph: nothing in it is trained.
            let (teacher, _) = s.teacher.forward_trunk(ids, &Taps::default())?;
            kl_through_head(&last, &teacher, student.lm_head(), r.loss.hold.temperature)?
        }
        recipe::HoldKind::Lm => lm_loss(&student.head(&last)?, ids)?,
    };
    let ma = if ma_on {
        let hs: Vec<&Tensor> = s.ma_layers.iter().map(|&l| &out.hidden[l]).collect();
        ma_penalty(&hs, r.loss.ma.threshold, &s.ma_target)?
    } else {
        Tensor::zeros((), hold.dtype(), ids.device())?
    };
    let total = ((&hold * r.loss.hold.weight)? + (&ma * r.loss.ma.weight)?)?;
    Ok((total, hold, ma))
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?)
}

/// Writes a checkpoint folder whole or not at all (an existing one stays until the new one
/// is complete).
fn save_checkpoint(
    dir: &Path,
    set: &AdapterSet,
    opt: &AdamW,
    state: &State,
    recipe_yaml: &str,
    rank: &Rank,
) -> Result<()> {
    replace_dir(dir, |tmp| {
        set.save(tmp)?;
        rank.point("checkpoint")?;
        opt.save(&tmp.join("optim.safetensors"))?;
        let st = serde_json::to_string_pretty(state).map_err(|e| Error::file(dir, e))?;
        write_atomic(&tmp.join("state.json"), st.as_bytes())?;
        write_atomic(&tmp.join("recipe.yaml"), recipe_yaml.as_bytes())
    })
}

/// Adapters alone (`best/`, `final/`), replaced whole.
fn save_adapters(dir: &Path, set: &AdapterSet) -> Result<()> {
    replace_dir(dir, |tmp| set.save(tmp))
}

/// Runs (or resumes) training; returns the run folder and its summary. Out of device memory
/// is reported with the batch and sequence length that caused it.
pub fn train(recipe: &Recipe, resume: Option<&Path>) -> Result<(PathBuf, Summary)> {
    let devices = parallel::run_devices(&recipe.model.device, recipe.train.devices.as_deref())?;
    let (r, resume) = (recipe.clone(), resume.map(Path::to_path_buf));
    let out = parallel::launch(devices, move |rank| run(&r, resume.as_deref(), rank));
    let out = out.and_then(|o| o.ok_or_else(|| Error::Msg("rank 0 wrote no summary".into())));
    out.map_err(|e| {
        let lower = if recipe.train.recompute {
            "data.batch_size (raise optim.grad_accum to keep the effective batch) or data.seq_len"
        } else {
            "data.batch_size (raise optim.grad_accum to keep the effective batch) or data.seq_len, or set train.recompute: true"
        };
        crate::error::explain_oom(
            e,
            "train",
            recipe.data.batch_size,
            recipe.data.seq_len,
            lower,
        )
    })
}

/// One rank's run; rank 0 returns the folder and summary, the others `None`.
fn run(
    recipe: &Recipe,
    resume: Option<&Path>,
    rank: &mut Rank,
) -> Result<Option<(PathBuf, Summary)>> {
    let r = recipe;
    let main = rank.is_main();
    let out_dir = PathBuf::from(&r.train.out_dir);
    let recipe_yaml = r.to_yaml();
    let s = setup(r, (rank.world > 1).then_some(&rank.device))?;
    let device = s.base.device.clone();
    let meta = adapter_meta(r, &s)?;
    let eab = &r.adapters.eab;
    let init = match eab.init {
        recipe::EabInit::Zeros => SlotInit::Zeros,
        recipe::EabInit::Normal => SlotInit::Normal {
            std: eab.init_std,
            seed: r.train.seed,
        },
        recipe::EabInit::FirstToken => SlotInit::Given(first_token_kv(&s, eab.calib_windows)?),
    };
    let mut set = AdapterSet::new(meta, init, r.adapters.lora.init_std, r.train.seed, &device)?;
    if s.base.dtype == candle_core::DType::F64 {
        // An f64 run keeps its adapters (and so its moments) in f64 too.
        for var in set.vars.values_mut() {
            *var = candle_core::Var::from_tensor(&var.as_tensor().to_dtype(s.base.dtype)?)?;
        }
    }
    let o = &r.optim;
    let mut opt = AdamW::new(
        AdamWConfig {
            betas: (o.betas[0], o.betas[1]),
            eps: o.eps,
            weight_decay: o.weight_decay,
        },
        &set.vars,
    )?;
    let mut state = State {
        step: 0,
        seed: r.train.seed,
        world: rank.world,
        best: None,
        step0: None,
        last: None,
        final_losses: BTreeMap::new(),
        log: None,
    };
    // Rank 0 owns the run folder; the others only read the checkpoint they resume from.
    let _lock = match main {
        true => {
            std::fs::create_dir_all(&out_dir).map_err(|e| Error::file(&out_dir, e))?;
            Some(crate::lock::lock_dir(&out_dir)?)
        }
        false => None,
    };
    if let Some(dir) = resume {
        let ck = latest_checkpoint(dir)?;
        let loaded = AdapterSet::load(&ck, &s.ckpt.config, &device)?;
        for (name, var) in &set.vars {
            var.set(&loaded.vars[name].as_tensor().to_dtype(var.dtype())?)?;
        }
        state = read_state(&ck)?;
        opt.load(&ck.join("optim.safetensors"), state.step)?;
        if main {
            eprintln!("resuming from {} at step {}", ck.display(), state.step);
            parallel::warn_world(state.world, rank.world);
        }
        state.world = rank.world;
    }
    let mut log = match main {
        true => Some(RunLogger::for_main_rank(
            &out_dir,
            &recipe_yaml,
            &r.log.dir,
            r.log.name.as_deref(),
            state.log.as_ref(),
        )?),
        false => None,
    };
    let mut student = s.base.model(&set.adapters())?;
    if let Some(w) = eab.window {
        // The student alone: the teacher's dense predictions are what it must keep.
        student = student.with_sliding_window(w);
    }
    // The base figures need the suppression term, whose target came from the base scan: one
    // more pass over the (few) eval windows.
    let base_figures = match main {
        true => Some(evaluate(r, &s, &s.teacher, 0)?.0),
        false => None,
    };
    if let (Some(log), Some(base), None) = (log.as_mut(), &base_figures, &state.step0) {
        let (f0, rep0) = evaluate(r, &s, &student, 0)?;
        log_eval(log, &f0, &rep0)?;
        save_adapters(&out_dir.join("best"), &set)?;
        println!("base:   {}", one_line(base));
        println!("step 0: {}", one_line(&f0));
        state.best = Some(f0.clone());
        state.step0 = Some(f0);
    }
    let total = r.train.steps;
    let bar = match main {
        true => indicatif::ProgressBar::new(total as u64),
        false => indicatif::ProgressBar::hidden(),
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_position(state.step as u64);
    // One pool per GPU: a split model reports each device's peak.
    let pools = Pools::of(&s.base.placement.named_devices());
    pools.reset_peak();
    let start = std::time::Instant::now();
    let mut tokens_done = 0usize;
    let mut last = state
        .last
        .clone()
        .or(state.step0.clone())
        .or(base_figures.clone());
    while state.step < total {
        let step = state.step;
        let lr = lr_at(step, o.lr, o.warmup_steps, total, o.min_lr_ratio);
        let mut grads: BTreeMap<String, Tensor> = BTreeMap::new();
        let (mut l_tot, mut l_hold, mut l_ma) = (0f64, 0f64, 0f64);
        for micro in 0..o.grad_accum {
            let g = step * o.grad_accum + micro;
            let rows = match (&s.long, &r.data.long) {
                // The same long window on every rank (their mean is that window's gradient).
                (Some(long), Some(l)) if (g + 1).is_multiple_of(l.every) => {
                    vec![&long.ids[(g / l.every) % long.len()]]
                }
                _ => batch_ids(&s.train, state.seed, g, r.data.batch_size, rank),
            };
            let width = rows[0].len();
            let flat: Vec<u32> = rows.iter().flat_map(|w| w.iter().copied()).collect();
            let ids = Tensor::from_vec(flat, (rows.len(), width), &device)?; // (B, T)
            let (total_loss, hold, ma) = losses(r, &s, &student, &ids)?;
            let gs = (total_loss.clone() / o.grad_accum as f64)?.backward()?;
            rank.point("step")?;
            for (name, var) in &set.vars {
                if let Some(g) = gs.get(var.as_tensor()) {
                    let g = match grads.remove(name) {
                        Some(acc) => (acc + g)?,
                        None => g.clone(),
                    };
                    grads.insert(name.clone(), g);
                }
            }
            l_tot += scalar(&total_loss)? / o.grad_accum as f64;
            l_hold += scalar(&hold)? / o.grad_accum as f64;
            l_ma += scalar(&ma)? / o.grad_accum as f64;
            // Every rank's share is as many windows of one width: tokens are world x these.
            tokens_done += rows.len() * width * rank.world;
        }
        // The global batch's mean: every rank has the same number of tokens, so the mean of
        // the ranks' means is the mean over all of them.
        rank.mean_grads(&mut grads)?;
        let [l_tot, l_hold, l_ma] = <[f64; 3]>::try_from(rank.mean(&[l_tot, l_hold, l_ma])?)
            .map_err(|_| Error::Msg("loss reduction lost its terms".into()))?;
        if !l_tot.is_finite() {
            bar.abandon();
            let good = latest_checkpoint(&out_dir)
                .map(|p| p.display().to_string())
                .unwrap_or_else(|_| format!("{} (step 0)", out_dir.join("best").display()));
            return Err(Error::Msg(format!(
                "step {step}: loss is {l_tot} (hold {l_hold}, ma {l_ma}); training stopped. Last good checkpoint: {good}"
            )));
        }
        let grad_norm = clip_grad_norm(&mut grads, o.grad_clip)?;
        opt.step(&set.vars, &grads, lr)?;
        state.step += 1;
        state.final_losses = BTreeMap::from([
            ("loss".to_string(), l_tot),
            ("hold".to_string(), l_hold),
            ("ma".to_string(), l_ma),
        ]);
        let Some(log) = log.as_mut() else { continue };
        let tps = tokens_done as f64 / start.elapsed().as_secs_f64();
        if state.step.is_multiple_of(r.log.every) || state.step == total {
            log.scalar("train/loss", l_tot, state.step)?;
            log.scalar("train/hold", l_hold, state.step)?;
            log.scalar("train/ma", l_ma, state.step)?;
            log.scalar("train/lr", lr, state.step)?;
            log.scalar("train/grad_norm", grad_norm, state.step)?;
            log.scalar("train/tokens_per_s", tps, state.step)?;
        }
        bar.set_message(format!(
            "loss {l_tot:.4} hold {l_hold:.4} ma {l_ma:.4} lr {lr:.2e} {tps:.0} tok/s"
        ));
        bar.set_position(state.step as u64);
        if state.step.is_multiple_of(r.eval.every) || state.step == total {
            let (f, report) = evaluate(r, &s, &student, state.step)?;
            log_eval(log, &f, &report)?;
            bar.suspend(|| eprintln!("step {}: {}", state.step, one_line(&f)));
            if state.best.as_ref().is_none_or(|b| f.score < b.score) {
                save_adapters(&out_dir.join("best"), &set)?;
                state.best = Some(f.clone());
            }
            rank.point("logged")?;
            last = Some(f);
        }
        if state.step.is_multiple_of(r.train.checkpoint_every) || state.step == total {
            let ck = out_dir
                .join("checkpoints")
                .join(format!("step-{:06}", state.step));
            state.last = last.clone();
            state.log = Some(log.mark()?);
            save_checkpoint(&ck, &set, &opt, &state, &recipe_yaml, rank)?;
            prune_checkpoints(&out_dir, r.train.keep_checkpoints)?;
        }
    }
    let (Some(log), Some(base_figures), Some(last)) = (log, base_figures, last) else {
        return Ok(None);
    };
    bar.finish_and_clear();
    log.close()?;
    let peaks = pools.peak_gib();
    let peak_gib = peaks.values().cloned().reduce(f64::max);
    let tps = tokens_done as f64 / start.elapsed().as_secs_f64().max(1e-9);
    println!(
        "trained {tokens_done} tokens in {:.1} s: {tps:.0} tokens/s{}",
        start.elapsed().as_secs_f64(),
        peak_suffix(peak_gib)
    );
    if let Some(each) = per_device(&peaks) {
        println!("peak device memory per GPU: {each}");
    }
    save_adapters(&out_dir.join("final"), &set)?;
    let step0 = state.step0.clone().unwrap_or(base_figures.clone());
    let summary = Summary {
        best: state.best.clone().unwrap_or(step0.clone()),
        base: base_figures,
        step0,
        last,
        birth_layers: s.birth.clone(),
        massive_dims: s.base_scan.massive_dims.clone(),
        rule: s.base_scan.rule,
        tokens_per_s: tps,
        peak_gib,
        peak_gib_per_device: peaks,
        wall_s: start.elapsed().as_secs_f64(),
        final_losses: state.final_losses.clone(),
    };
    let body = serde_json::to_string_pretty(&summary).map_err(|e| Error::file(&out_dir, e))?;
    write_atomic(&out_dir.join("summary.json"), body.as_bytes())?;
    Ok(Some((out_dir, summary)))
}
