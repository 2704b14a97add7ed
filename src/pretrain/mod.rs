//! `eabfit pretrain`: a LLaMA/Mistral-family model trained from scratch on a token corpus,
//! with or without an EAB slot in every layer (the paper's from-scratch experiment).
//!
//! A run folder (`train.out_dir`) holds `recipe.yaml` (resolved), `checkpoints/step-NNNNNN/`
//! and `final/`, each a Hugging Face folder every other command loads as `--model`
//! (checkpoints add the optimizer moments, `state.json` and the recipe, and are written to a
//! temporary folder and renamed), and `summary.json`. Exact resume: the weights, moments and
//! step are all the state there is, since the data order is a pure function of (seed, step).

mod params;
pub mod recipe;

pub use params::{Group, Params};
pub use recipe::PretrainRecipe;

use crate::corpus::{Corpus, Split, TokenWindows};
use crate::device::parse_dtype;
use crate::fsio::{replace_dir, write_atomic};
use crate::memory::{peak_suffix, CudaMemory};
use crate::metrics::{log_layers, LogMark, RunLogger};
use crate::model::{Model, Taps};
use crate::ops::block::WeightGrads;
use crate::ops::ce::ce_through_head;
use crate::optim::{clip_grad_norm, lr_at, AdamW, AdamWConfig};
use crate::parallel::{self, Rank};
use crate::resume::{latest_checkpoint, prune_checkpoints, read_state};
use crate::scan::{scan_taps, Rule, ScanReport, Scanner};
use crate::{Error, Result};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, clap::Args)]
pub struct PretrainArgs {
    /// Recipe YAML [default with --resume: the checkpoint's own resolved recipe]
    pub recipe: Option<PathBuf>,
    /// Overrides `key.sub=value`, e.g. `optim.lr=3e-3 eab.enabled=true`
    pub overrides: Vec<String>,
    /// Continue a run from its newest checkpoint (a run folder or one checkpoint folder)
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Stop after the first step that ends past this many seconds of training, with a
    /// checkpoint to `--resume` from (no final/ folder): for runs longer than one sitting
    #[arg(long, value_name = "S")]
    pub max_seconds: Option<f64>,
    /// Data parallel over these devices (`cpu*2`, `cuda:0,cuda:1`, `cuda*4`): sets
    /// train.devices; data.batch_size is per device
    #[arg(long, value_name = "LIST")]
    pub devices: Option<String>,
}

pub fn pretrain_cmd(args: &PretrainArgs) -> Result<()> {
    let recipe_path = match (&args.recipe, &args.resume) {
        (Some(p), _) => p.clone(),
        (None, Some(dir)) => latest_checkpoint(dir)?.join("recipe.yaml"),
        (None, None) => {
            return Err(Error::Usage(
                "pretrain needs a RECIPE (or --resume DIR)".into(),
            ))
        }
    };
    let mut overrides = args.overrides.clone();
    if let Some(d) = &args.devices {
        overrides.push(format!("train.devices={d}"));
    }
    let r: PretrainRecipe = crate::recipe::load_typed(&recipe_path, &overrides)?;
    if let Some(limit) = args.max_seconds {
        if !(limit > 0.0 && limit.is_finite()) {
            return Err(Error::Usage(format!(
                "--max-seconds must be a positive number of seconds, not {limit}"
            )));
        }
    }
    let limit = args.max_seconds.map(std::time::Duration::from_secs_f64);
    let (dir, s) = pretrain(&r, args.resume.as_deref(), limit)?;
    if s.steps < r.train.steps {
        println!(
            "stopped at the time limit after step {} of {}: continue with --resume {}",
            s.steps,
            r.train.steps,
            dir.display()
        );
    }
    println!(
        "{} parameters, {} steps, {} tokens; final loss {:.4}",
        s.parameters,
        s.steps,
        s.tokens,
        s.final_loss.unwrap_or(f64::NAN)
    );
    if let Some(e) = &s.last {
        println!("last eval {}", one_line(e));
    }
    println!(
        "{:.0} tokens/s, {:.1} s{}",
        s.tokens_per_s,
        s.wall_s,
        peak_suffix(s.peak_gib)
    );
    if s.steps == r.train.steps {
        println!(
            "run folder {} (final/ is a Hugging Face folder: eabfit scan --model {})",
            dir.display(),
            dir.join("final").display()
        );
    }
    Ok(())
}

/// Held-out figures at one step: perplexity and the scan's per-layer figures.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Eval {
    pub step: usize,
    pub tokens: usize,
    pub val_ppl: f64,
    pub massive_count: usize,
    pub top1: Vec<f64>,
    pub top1_over_median: Vec<f64>,
    pub first_token_attn: Vec<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot_attn: Option<Vec<f64>>,
    /// Per layer, the fraction of windows whose largest |h| is on the first token.
    #[serde(default)]
    pub top1_first: Vec<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub parameters: usize,
    pub steps: usize,
    pub tokens: usize,
    /// Training loss of the last step (none before the first).
    pub final_loss: Option<f64>,
    pub last: Option<Eval>,
    pub rule: Rule,
    pub tokens_per_s: f64,
    #[serde(default)]
    pub peak_gib: Option<f64>,
    pub wall_s: f64,
}

#[derive(Debug, Serialize, Deserialize)]
struct State {
    step: usize,
    seed: u64,
    /// Devices of the run that wrote it (data parallel); older checkpoints: 1.
    #[serde(default = "one")]
    world: usize,
    final_loss: Option<f64>,
    last: Option<Eval>,
    log: Option<LogMark>,
}

pub fn one_line(e: &Eval) -> String {
    let (at, worst) = e
        .top1_over_median
        .iter()
        .cloned()
        .enumerate()
        .fold((0, 0f64), |a, b| if b.1 > a.1 { b } else { a });
    let attn0 = e.first_token_attn.iter().sum::<f64>() / e.first_token_attn.len().max(1) as f64;
    let first = e.top1_first.get(at).map_or(String::new(), |f| {
        format!(" (layer {at}, on token 0 in {:.0}%)", 100.0 * f)
    });
    format!(
        "step {}  val ppl {:.3}  massive {}  max top-1/median {:.1}{first}  attn@0 {:.3}{}",
        e.step,
        e.val_ppl,
        e.massive_count,
        worst,
        attn0,
        e.slot_attn.as_ref().map_or(String::new(), |s| format!(
            "  attn@slot {:.3}",
            s.iter().sum::<f64>() / s.len().max(1) as f64
        ))
    )
}

fn one() -> usize {
    1
}

/// Everything a run reads before its first step.
struct Setup {
    corpus: Corpus,
    tok: crate::checkpoint::Tok,
    train: TokenWindows,
    val: Vec<Vec<u32>>,
    params: Params,
    dtype: DType,
    rule: Rule,
}

fn setup(r: &PretrainRecipe, device: &candle_core::Device) -> Result<Setup> {
    let corpus = Corpus::open(&r.data.corpus)?;
    let tok = corpus.tokenizer()?;
    let m = &corpus.meta;
    let width = r.data.seq_len;
    let train = TokenWindows::new(
        corpus.tokens(Split::Train)?,
        m.bos_id,
        width,
        &corpus.dir.join(Split::Train.file()),
    )?;
    let val_all = TokenWindows::new(
        corpus.tokens(Split::Val)?,
        m.bos_id,
        width,
        &corpus.dir.join(Split::Val.file()),
    )?;
    let val = (0..val_all.len().min(r.data.eval_windows))
        .map(|i| val_all.window(i))
        .collect();
    let dtype = parse_dtype(r.model.dtype.map(|d| d.name()), device)?;
    let config = r.config(m.vocab_size, m.bos_id, m.sep_id);
    config
        .validate()
        .map_err(|e| Error::Usage(format!("model.arch: {e}")))?;
    let params = Params::init(&config, r, device)?;
    Ok(Setup {
        corpus,
        tok,
        train,
        val,
        params,
        dtype,
        rule: Rule {
            abs: r.eval.abs,
            ratio: r.eval.ratio,
        },
    })
}

/// One optimizer per [`Group`], each over its own vars: AdamW here takes one learning rate
/// and one weight decay per instance.
struct Optimizers {
    groups: BTreeMap<Group, (AdamW, BTreeMap<String, candle_core::Var>, f64)>,
}

impl Optimizers {
    fn new(r: &PretrainRecipe, params: &Params) -> Result<Self> {
        let o = &r.optim;
        let mut by_group: BTreeMap<Group, BTreeMap<String, candle_core::Var>> = BTreeMap::new();
        for (name, var) in params.vars()? {
            by_group
                .entry(Params::group(&name))
                .or_default()
                .insert(name, var);
        }
        let mut groups = BTreeMap::new();
        for (g, vars) in by_group {
            let (decay, lr_scale) = match g {
                Group::Decay => (o.weight_decay, 1.0),
                Group::NoDecay => (0.0, 1.0),
                Group::Slot => (r.eab.weight_decay, r.eab.lr_scale),
            };
            let cfg = AdamWConfig {
                betas: (o.betas[0], o.betas[1]),
                eps: o.eps,
                weight_decay: decay,
            };
            groups.insert(g, (AdamW::new(cfg, &vars)?, vars, lr_scale));
        }
        Ok(Self { groups })
    }

    fn step(&mut self, grads: &BTreeMap<String, Tensor>, lr: f64) -> Result<()> {
        for (opt, vars, scale) in self.groups.values_mut() {
            opt.step(vars, grads, lr * *scale)?;
        }
        Ok(())
    }

    fn file(g: Group) -> String {
        format!("optim-{}.safetensors", format!("{g:?}").to_lowercase())
    }

    fn save(&self, dir: &Path) -> Result<()> {
        for (g, (opt, _, _)) in &self.groups {
            opt.save(&dir.join(Self::file(*g)))?;
        }
        Ok(())
    }

    fn load(&mut self, dir: &Path, step: usize) -> Result<()> {
        for (g, (opt, _, _)) in self.groups.iter_mut() {
            opt.load(&dir.join(Self::file(*g)), step)?;
        }
        Ok(())
    }
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// Perplexity and scan figures on the held-out windows.
fn evaluate(s: &Setup, model: &Model, step: usize, tokens: usize) -> Result<(Eval, ScanReport)> {
    let mut scanner = Scanner::new(s.params.config.num_hidden_layers, s.rule);
    for w in &s.val {
        let ids = Tensor::new(w.as_slice(), &s.params.device)?.unsqueeze(0)?;
        scanner.add(&model.forward(&ids, &scan_taps())?, w)?;
    }
    let width = s.train.width();
    let report = scanner.finish(&s.tok, &s.corpus.dir.display().to_string(), width - 1, true);
    let l = &report.layers;
    let eval = Eval {
        step,
        tokens,
        val_ppl: report.ppl,
        massive_count: report.massive_count(),
        top1: l.iter().map(|l| l.top[0]).collect(),
        top1_over_median: l
            .iter()
            .map(|l| l.top[0] / l.median.max(f64::MIN_POSITIVE))
            .collect(),
        first_token_attn: l.iter().map(|l| l.first_token_attn).collect(),
        slot_attn: l.iter().map(|l| l.slot_attn).collect(),
        top1_first: l
            .iter()
            .map(|l| l.top1_at.map_or(0.0, |a| a.first))
            .collect(),
    };
    Ok((eval, report))
}

fn log_eval(log: &mut RunLogger, e: &Eval, report: &ScanReport) -> Result<()> {
    log.scalar("eval/ppl", e.val_ppl, e.step)?;
    log.scalar("eval/massive_count", e.massive_count as f64, e.step)?;
    let worst = e.top1_over_median.iter().cloned().fold(0f64, f64::max);
    log.scalar("eval/max_top1_over_median", worst, e.step)?;
    for l in &report.layers {
        let name = format!("layers/massive_count/{:02}", l.layer);
        log.scalar(&name, l.massive_count as f64, e.step)?;
    }
    log_layers(log, report, e.step)?;
    log.flush()
}

/// A checkpoint: the Hugging Face folder plus moments, state and recipe, whole or not at all.
fn save_checkpoint(
    dir: &Path,
    s: &Setup,
    opt: &Optimizers,
    state: &State,
    recipe_yaml: &str,
    rank: &Rank,
) -> Result<()> {
    replace_dir(dir, |tmp| {
        s.params.write_hf(tmp, &s.corpus.dir)?;
        rank.point("checkpoint")?;
        opt.save(tmp)?;
        let st = serde_json::to_string_pretty(state).map_err(|e| Error::file(dir, e))?;
        write_atomic(&tmp.join("state.json"), st.as_bytes())?;
        write_atomic(&tmp.join("recipe.yaml"), recipe_yaml.as_bytes())
    })
}

/// Runs (or resumes) a pretraining run; returns its folder and summary. With a `limit` it stops
/// after the first step that ends past it, checkpointed, and writes no final/ folder. Out of
/// device memory is reported with the batch and sequence length that caused it.
pub fn pretrain(
    r: &PretrainRecipe,
    resume: Option<&Path>,
    limit: Option<std::time::Duration>,
) -> Result<(PathBuf, Summary)> {
    let devices = parallel::run_devices(&r.model.device, r.train.devices.as_deref())?;
    let (recipe, resume) = (r.clone(), resume.map(Path::to_path_buf));
    let out = parallel::launch(devices, move |rank| {
        run(&recipe, resume.as_deref(), limit, rank)
    });
    let out = out.and_then(|o| o.ok_or_else(|| Error::Msg("rank 0 wrote no summary".into())));
    out.map_err(|e| {
        let lower =
            "data.batch_size (raise optim.grad_accum to keep the effective batch) or data.seq_len";
        crate::error::explain_oom(e, "pretrain", r.data.batch_size, r.data.seq_len, lower)
    })
}

/// One rank's run; rank 0 returns the folder and summary, the others `None`.
fn run(
    r: &PretrainRecipe,
    resume: Option<&Path>,
    limit: Option<std::time::Duration>,
    rank: &mut Rank,
) -> Result<Option<(PathBuf, Summary)>> {
    let main = rank.is_main();
    let out_dir = r.train.out_dir.clone();
    let recipe_yaml = r.to_yaml();
    let s = setup(r, &rank.device)?;
    let mut opt = Optimizers::new(r, &s.params)?;
    let mut state = State {
        step: 0,
        seed: r.train.seed,
        world: rank.world,
        final_loss: None,
        last: None,
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
        s.params.load(&ck.join("model.safetensors"))?;
        state = read_state(&ck)?;
        opt.load(&ck, state.step)?;
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
    let (o, total) = (&r.optim, r.train.steps);
    let (batch, width) = (r.data.batch_size, s.train.width());
    // Tokens of one step over all ranks.
    let tokens_per_step = o.grad_accum * batch * width * rank.world;
    if let (0, Some(log)) = (state.step, log.as_mut()) {
        let (e, report) = evaluate(&s, &s.params.model(s.dtype)?, 0, 0)?;
        log_eval(log, &e, &report)?;
        eprintln!("{}", one_line(&e));
        state.last = Some(e);
    }
    let mem = CudaMemory::of(&s.params.device);
    mem.reset_peak();
    let start = std::time::Instant::now();
    let mut tokens_done = 0usize;
    while state.step < total {
        let step = state.step;
        let lr = lr_at(step, o.lr, o.warmup_steps, total, o.min_lr_ratio);
        // Built again every step: in bf16 its weights are casts of the masters taken now.
        let model = s.params.model(s.dtype)?;
        let vars = s.params.vars()?;
        let mut grads: BTreeMap<String, Tensor> = BTreeMap::new();
        let mut loss_sum = 0f64;
        for micro in 0..o.grad_accum {
            let g = step * o.grad_accum + micro;
            // This rank's share of the windows one device would take with the whole batch.
            let global =
                crate::data::batch_indices(s.train.len(), state.seed, g, batch * rank.world);
            let idx = rank.share(&global);
            let flat: Vec<u32> = idx.iter().flat_map(|&i| s.train.window(i)).collect();
            let ids = Tensor::from_vec(flat, (batch, width), &s.params.device)?; // (B, T)
                                                                                 // Blocks on the block op (CUDA bf16) hand their weight gradients to `sink`.
            let sink = Arc::new(WeightGrads::default());
            let taps = Taps {
                weight_grads: Some(sink.clone()),
                ..Default::default()
            };
            let (x, _) = model.forward_trunk(&ids, &taps)?;
            // Through the head in chunks: the full f32 logits never exist.
            let loss = ce_through_head(&x, model.lm_head(), &ids)?;
            let gs = (&loss / o.grad_accum as f64)?.backward()?;
            rank.point("step")?;
            let from_sink = sink.take()?;
            for (name, var) in &vars {
                let sunk = from_sink.get(name).map(|g| g.to_dtype(var.dtype()));
                for g in gs
                    .get(var.as_tensor())
                    .cloned()
                    .into_iter()
                    .chain(sunk.transpose()?)
                {
                    let g = match grads.remove(name) {
                        Some(acc) => (acc + g)?,
                        None => g,
                    };
                    grads.insert(name.clone(), g);
                }
            }
            loss_sum += scalar(&loss)? / o.grad_accum as f64;
        }
        // candle has no backward hooks: the reduction starts once the backward pass is over.
        // Every rank has as many tokens, so the mean of their means is the global mean.
        rank.mean_grads(&mut grads)?;
        let loss_sum = rank.mean(&[loss_sum])?[0];
        if !loss_sum.is_finite() {
            let good = latest_checkpoint(&out_dir)
                .map(|p| p.display().to_string())
                .unwrap_or_else(|_| "none".into());
            return Err(Error::Msg(format!(
                "step {step}: loss is {loss_sum}; training stopped (lower optim.lr?). Last good checkpoint: {good}"
            )));
        }
        let grad_norm = clip_grad_norm(&mut grads, o.grad_clip)?;
        opt.step(&grads, lr)?;
        state.step += 1;
        state.final_loss = Some(loss_sum);
        tokens_done += tokens_per_step;
        let tokens = state.step * tokens_per_step;
        let tps = tokens_done as f64 / start.elapsed().as_secs_f64().max(1e-9);
        // The clock is read once per step, before the evaluation, so that a run stopped on time
        // ends with an evaluation of its last step; all ranks stop together.
        let out_of_time = limit.is_some_and(|l| start.elapsed() >= l) && state.step < total;
        let out_of_time = match limit {
            Some(_) => rank.any(out_of_time)?,
            None => false,
        };
        if let Some(log) = log.as_mut() {
            if state.step.is_multiple_of(r.log.every) || state.step == total {
                log.scalar("train/loss", loss_sum, state.step)?;
                log.scalar("train/lr", lr, state.step)?;
                log.scalar("train/grad_norm", grad_norm, state.step)?;
                log.scalar("train/tokens", tokens as f64, state.step)?;
                log.scalar("train/tokens_per_s", tps, state.step)?;
            }
            if state.step.is_multiple_of(r.eval.every) || state.step == total || out_of_time {
                let (e, report) = evaluate(&s, &s.params.model(s.dtype)?, state.step, tokens)?;
                log_eval(log, &e, &report)?;
                eprintln!("{}  loss {loss_sum:.4}  {tps:.0} tokens/s", one_line(&e));
                rank.point("logged")?;
                state.last = Some(e);
            }
            if state.step.is_multiple_of(r.train.checkpoint_every)
                || state.step == total
                || out_of_time
            {
                let ck = out_dir
                    .join("checkpoints")
                    .join(format!("step-{:06}", state.step));
                state.log = Some(log.mark()?);
                save_checkpoint(&ck, &s, &opt, &state, &recipe_yaml, rank)?;
                prune_checkpoints(&out_dir, r.train.keep_checkpoints)?;
            }
        }
        if out_of_time {
            break;
        }
    }
    let Some(log) = log else {
        return Ok(None);
    };
    log.close()?;
    if state.step == total {
        replace_dir(&out_dir.join("final"), |tmp| {
            s.params.write_hf(tmp, &s.corpus.dir)
        })?;
    }
    let wall_s = start.elapsed().as_secs_f64();
    let summary = Summary {
        parameters: s.params.count()?,
        steps: state.step,
        tokens: state.step * tokens_per_step,
        final_loss: state.final_loss,
        last: state.last.clone(),
        rule: s.rule,
        tokens_per_s: tokens_done as f64 / wall_s.max(1e-9),
        peak_gib: mem.peak_gib(),
        wall_s,
    };
    let body = serde_json::to_string_pretty(&summary).map_err(|e| Error::file(&out_dir, e))?;
    write_atomic(&out_dir.join("summary.json"), body.as_bytes())?;
    Ok(Some((out_dir, summary)))
}
