//! `eabfit quant`: perplexity under fake quantization (see [`crate::quant`]), the base model and
//! the adapted one side by side on the same windows, with the statistics of the projection
//! inputs that decide how well a per-tensor activation scale works.

use crate::adapters::{AdapterSet, Adapters};
use crate::assets::text_path;
use crate::checkpoint::{Base, Tok};
use crate::data::{read_text, Windows};
use crate::fsio::write_atomic;
use crate::model::{ActHook, LinearInput, Model, Taps};
use crate::model_args::ModelArgs;
use crate::perplexity::nll_sum;
use crate::quant::{
    default_grid, quantized_model, ActScale, FakeQuant, InputObserver, InputStats, Setting,
};
use crate::{Error, Result};
use candle_core::Tensor;
use serde::Serialize;
use std::path::PathBuf;
use std::sync::Arc;

/// Sum of next-token NLL over the windows, exp'ed: `perplexity()`'s arithmetic, with a hook.
pub fn ppl_with(model: &Model, windows: &Windows, hook: Option<Arc<dyn ActHook>>) -> Result<f64> {
    let taps = Taps {
        hook,
        ..Default::default()
    };
    let (mut total, mut tokens) = (0f64, 0usize);
    for w in &windows.ids {
        let ids = Tensor::new(w.as_slice(), model.device())?.unsqueeze(0)?; // (1, T)
        let logits = model.forward(&ids, &taps)?.logits;
        total += nll_sum(&logits, &ids)?.to_scalar::<f32>()? as f64;
        tokens += w.len() - 1;
    }
    Ok((total / tokens.max(1) as f64).exp())
}

/// Perplexity of `base` + `adapters` fake-quantized as `s` says.
pub fn quant_ppl(base: &Base, adapters: &Adapters, windows: &Windows, s: &Setting) -> Result<f64> {
    let model = quantized_model(base, adapters, s.w)?;
    let hook = FakeQuant::of(s).map(|h| Arc::new(h) as Arc<dyn ActHook>);
    ppl_with(&model, windows, hook)
}

/// Per layer: the input with the largest max |x|, and all four.
#[derive(Debug, Clone, Serialize)]
pub struct LayerInputs {
    pub layer: usize,
    /// Which input has the largest max |x| in this layer; the three figures are its own.
    pub input: LinearInput,
    pub max_abs: f64,
    pub median_abs: f64,
    pub kurtosis: f64,
    pub inputs: Vec<InputStats>,
}

fn layer_inputs(per_layer: Vec<Vec<InputStats>>) -> Vec<LayerInputs> {
    per_layer
        .into_iter()
        .enumerate()
        .filter_map(|(layer, inputs)| {
            let top = inputs
                .iter()
                .max_by(|a, b| a.max_abs.total_cmp(&b.max_abs))?
                .clone();
            Some(LayerInputs {
                layer,
                input: top.input,
                max_abs: top.max_abs,
                median_abs: top.median_abs,
                kurtosis: top.kurtosis,
                inputs,
            })
        })
        .collect()
}

/// One model (base or adapted) under one setting.
#[derive(Debug, Clone, Serialize)]
pub struct Side {
    pub float_ppl: f64,
    pub quant_ppl: f64,
    /// quant_ppl / float_ppl - 1.
    pub gap: f64,
    pub layers: Vec<LayerInputs>,
}

/// A model's float figures, measured once and reused by every setting.
pub struct Measured<'a> {
    base: &'a Base,
    adapters: Adapters,
    pub float_ppl: f64,
    pub layers: Vec<LayerInputs>,
}

impl<'a> Measured<'a> {
    /// Float perplexity and projection-input statistics in one pass (the observer changes
    /// nothing, so this is the float path).
    pub fn new(base: &'a Base, adapters: &Adapters, windows: &Windows) -> Result<Self> {
        let model = base.model(adapters)?;
        let obs = Arc::new(InputObserver::default());
        let float_ppl = ppl_with(&model, windows, Some(obs.clone()))?;
        Ok(Self {
            base,
            adapters: adapters.clone(),
            float_ppl,
            layers: layer_inputs(obs.finish(base.config.num_hidden_layers)),
        })
    }

    pub fn side(&self, s: &Setting, windows: &Windows) -> Result<Side> {
        let quant_ppl = quant_ppl(self.base, &self.adapters, windows, s)?;
        Ok(Side {
            float_ppl: self.float_ppl,
            quant_ppl,
            gap: quant_ppl / self.float_ppl - 1.0,
            layers: self.layers.clone(),
        })
    }
}

/// One setting: the model under test at the top level (the adapted one when there is an
/// adapter), the base beside it.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub setting: String,
    pub w: u32,
    pub a: u32,
    pub kv: u32,
    pub act_scale: ActScale,
    #[serde(flatten)]
    pub model: Side,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base: Option<Side>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub model: String,
    pub adapter: Option<String>,
    pub text: String,
    pub seq_len: usize,
    pub num_seqs: usize,
    pub bos: bool,
    pub rows: Vec<Row>,
}

fn pct(x: f64) -> String {
    format!("{:+.2}%", 100.0 * x)
}

impl Report {
    pub fn table(&self) -> String {
        let mut s = format!(
            "eabfit quant: {}{} on {}, {} windows x {} tokens (bos {})\n\n",
            self.model,
            self.adapter
                .as_ref()
                .map_or(String::new(), |a| format!(" + {a}")),
            self.text,
            self.num_seqs,
            self.seq_len,
            self.bos
        );
        let adapted = self.adapter.is_some();
        if adapted {
            s += "| setting | float base | quant base | gap base | float eab | quant eab | gap eab | gap base / eab |\n|---|---|---|---|---|---|---|---|\n";
        } else {
            s += "| setting | float | quant | gap |\n|---|---|---|---|\n";
        }
        for r in &self.rows {
            let m = &r.model;
            match &r.base {
                Some(b) => {
                    s += &format!(
                        "| {} | {:.3} | {:.3} | {} | {:.3} | {:.3} | {} | {:.1}x |\n",
                        r.setting,
                        b.float_ppl,
                        b.quant_ppl,
                        pct(b.gap),
                        m.float_ppl,
                        m.quant_ppl,
                        pct(m.gap),
                        b.gap / m.gap
                    )
                }
                None => {
                    s += &format!(
                        "| {} | {:.3} | {:.3} | {} |\n",
                        r.setting,
                        m.float_ppl,
                        m.quant_ppl,
                        pct(m.gap)
                    )
                }
            }
        }
        let Some(first) = self.rows.first() else {
            return s;
        };
        s += "\nProjection inputs (float), per layer the input with the largest max |x|: max |x| (input @ position, channel), median |x|, kurtosis\n\n";
        let cell = |l: &LayerInputs| {
            let at = l
                .inputs
                .iter()
                .find(|i| i.input == l.input)
                .map_or([0, 0], |i| i.max_at);
            format!(
                "{:.1} ({} @ {},{}) | {:.3} | {:.1}",
                l.max_abs,
                input_name(l.input),
                at[0],
                at[1],
                l.median_abs,
                l.kurtosis
            )
        };
        match &first.base {
            Some(b) => {
                s += "| layer | max base | median base | kurt base | max eab | median eab | kurt eab |\n|---|---|---|---|---|---|---|\n";
                for (lb, la) in b.layers.iter().zip(&first.model.layers) {
                    s += &format!("| {} | {} | {} |\n", lb.layer, cell(lb), cell(la));
                }
            }
            None => {
                s += "| layer | max | median | kurtosis |\n|---|---|---|---|\n";
                for l in &first.model.layers {
                    s += &format!("| {} | {} |\n", l.layer, cell(l));
                }
            }
        }
        s
    }
}

pub fn input_name(i: LinearInput) -> &'static str {
    match i {
        LinearInput::Qkv => "qkv",
        LinearInput::O => "o",
        LinearInput::GateUp => "gate_up",
        LinearInput::Down => "down",
    }
}

/// Runs every setting on the base and (when given) the adapted model over the same windows.
pub fn evaluate(
    base: &Base,
    adapters: Option<&Adapters>,
    windows: &Windows,
    settings: &[Setting],
    mut progress: impl FnMut(&str),
) -> Result<Vec<Row>> {
    let b = Measured::new(base, &Adapters::none(), windows)?;
    let a = match adapters {
        Some(ad) => Some(Measured::new(base, ad, windows)?),
        None => None,
    };
    settings
        .iter()
        .map(|s| {
            progress(&s.label());
            let base_side = b.side(s, windows)?;
            let (model, base) = match &a {
                Some(a) => (a.side(s, windows)?, Some(base_side)),
                None => (base_side, None),
            };
            Ok(Row {
                setting: s.label(),
                w: s.w,
                a: s.a,
                kv: s.kv,
                act_scale: s.act_scale,
                model,
                base,
            })
        })
        .collect()
}

#[derive(Debug, clap::Args)]
pub struct QuantArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Adapter folder: the adapted model runs beside the base on the same windows
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Text file, or folder of *.txt [default: the fetched Hamlet]
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// Weight bits (per output channel; 16 = float)
    #[arg(long, default_value_t = 8)]
    pub w: u32,
    /// Activation bits (projection inputs; 16 = float)
    #[arg(long, default_value_t = 8)]
    pub a: u32,
    /// KV-cache bits (post-RoPE keys and values, per token per head; 16 = float)
    #[arg(long, default_value_t = 16)]
    pub kv: u32,
    /// One activation scale per window (tensor) or per token
    #[arg(long, value_enum, default_value_t = ActScale::Tensor)]
    pub act_scale: ActScale,
    /// Run a list of settings instead (e.g. `w8a8,w4a4:token,w4a4kv4`); alone, the default grid:
    /// W8A16, W16A8, then W8A8, W6A6, W4A8, W4A4 each per tensor and per token
    #[arg(long, num_args = 0..=1, default_missing_value = "default", value_name = "LIST")]
    pub grid: Option<String>,
    #[arg(long, default_value_t = 512)]
    pub seq_len: usize,
    #[arg(long, default_value_t = 10)]
    pub num_seqs: usize,
    /// Write the report as JSON here (one setting: its fields at the top level; a grid: `rows`)
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Bar chart of quantized / float perplexity per setting, base against adapted (.png or .svg)
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

impl QuantArgs {
    fn settings(&self) -> Result<Vec<Setting>> {
        match self.grid.as_deref() {
            Some("default") => Ok(default_grid()),
            Some(list) => list.split(',').map(Setting::parse).collect(),
            None => {
                let s = Setting {
                    w: self.w,
                    a: self.a,
                    kv: self.kv,
                    act_scale: self.act_scale,
                };
                s.validate()?;
                Ok(vec![s])
            }
        }
    }
}

fn windows_of(
    tok: &Tok,
    path: &Option<PathBuf>,
    seq_len: usize,
    n: usize,
) -> Result<(PathBuf, Windows)> {
    let file = text_path(path)?;
    if n == 0 {
        return Err(Error::Usage("--num-seqs must be at least 1".into()));
    }
    let w = Windows::new(tok, &read_text(&file)?, seq_len, Some(n), &file)?;
    Ok((file, w))
}

pub fn quant_cmd(args: &QuantArgs) -> Result<()> {
    let settings = args.settings()?;
    let ckpt = args.model.open()?;
    let base = args.model.base(&ckpt)?;
    let device = base.device.clone();
    let adapters = match &args.adapter {
        Some(dir) => Some(AdapterSet::load(dir, &ckpt.config, &device)?.adapters()),
        None => None,
    };
    let (text, windows) = windows_of(&ckpt.tokenizer, &args.text, args.seq_len, args.num_seqs)?;
    let start = std::time::Instant::now();
    let rows = evaluate(&base, adapters.as_ref(), &windows, &settings, |l| {
        eprintln!("[{:>6.1} s] {l}", start.elapsed().as_secs_f64())
    })?;
    let report = Report {
        model: ckpt.source.display().to_string(),
        adapter: args.adapter.as_ref().map(|a| a.display().to_string()),
        text: text.display().to_string(),
        seq_len: args.seq_len,
        num_seqs: windows.len(),
        bos: windows.bos.is_some(),
        rows,
    };
    print!("{}", report.table());
    println!(
        "{} settings in {:.1} s",
        report.rows.len(),
        start.elapsed().as_secs_f64()
    );
    if let Some(out) = &args.json {
        let mut v = serde_json::to_value(&report).map_err(|e| Error::file(out, e))?;
        if args.grid.is_none() {
            // One setting: its fields at the top level, beside the run's facts.
            let row = v["rows"][0].clone();
            if let (Some(obj), Some(r)) = (v.as_object_mut(), row.as_object()) {
                obj.remove("rows");
                obj.extend(r.clone());
            }
        }
        let body = serde_json::to_string_pretty(&v).map_err(|e| Error::file(out, e))?;
        write_atomic(out, body.as_bytes())?;
    }
    if let Some(out) = &args.plot {
        let bars: Vec<crate::plot_gaps::GapBar> = report
            .rows
            .iter()
            .map(|r| crate::plot_gaps::GapBar {
                label: r.setting.clone(),
                base: r
                    .base
                    .as_ref()
                    .map_or(r.model.quant_ppl / r.model.float_ppl, |b| {
                        b.quant_ppl / b.float_ppl
                    }),
                adapted: r
                    .base
                    .as_ref()
                    .map(|_| r.model.quant_ppl / r.model.float_ppl),
            })
            .collect();
        let title = std::path::Path::new(&report.model)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        for w in crate::plot_gaps::draw_gaps(&bars, &title, out)? {
            eprintln!("warning: {w}");
        }
    }
    Ok(())
}
