//! The paper's intervention: at the layer where massive activations appear, set them to zero or
//! to their calibration mean, and measure perplexity each way.

use crate::checkpoint::Tok;
use crate::data::Windows;
use crate::model::{Edit, Model, Taps};
use crate::perplexity::nll_sum;
use crate::scan::{scan, window_layer, Massive, Rule};
use crate::{Error, Result};
use candle_core::Tensor;
use serde::Serialize;
use std::collections::BTreeMap;

#[derive(Debug, Clone, Serialize)]
pub struct Arm {
    pub ppl: f64,
    pub nll: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct InterveneReport {
    pub model: String,
    pub layer: usize,
    pub rule: Rule,
    /// Massive dims at `layer` on the calibration text.
    pub dims: Vec<usize>,
    /// Calibration mean of each dim's massive entries.
    pub means: BTreeMap<usize, f64>,
    /// Where they sit on the calibration text (position, token), as the scan grouped them.
    pub carriers: Vec<Massive>,
    /// Entries edited on the evaluation text, summed over windows.
    pub edited_entries: usize,
    pub tokens: usize,
    pub windows: usize,
    pub original: Arm,
    pub zero: Arm,
    pub mean: Arm,
}

impl InterveneReport {
    pub fn table(&self) -> String {
        let mut s = format!(
            "layer {}  dims {:?}  calibration means {:?}\ncarriers: {}\n",
            self.layer,
            self.dims,
            self.means
                .iter()
                .map(|(d, m)| format!("{d}: {m:.1}"))
                .collect::<Vec<_>>(),
            self.carriers
                .iter()
                .take(8)
                .map(|m| format!("{}@{} {:?}", m.dim, m.position, m.token))
                .collect::<Vec<_>>()
                .join(", ")
        );
        s += &format!("{:<28} {:>12} {:>8}\n", "intervention", "perplexity", "nll");
        for (name, a) in [
            ("original", &self.original),
            ("set to zero", &self.zero),
            ("set to calibration mean", &self.mean),
        ] {
            s += &format!("{:<28} {:>12.3} {:>8.4}\n", name, a.ppl, a.nll);
        }
        s += &format!(
            "{} entries edited over {} windows, {} tokens predicted\n",
            self.edited_entries, self.windows, self.tokens
        );
        s
    }
}

pub fn intervene(
    model: &Model,
    tok: &Tok,
    calib: &Windows,
    eval: &Windows,
    layer: Option<usize>,
    rule: Rule,
    model_name: &str,
) -> Result<InterveneReport> {
    let n_layers = model.config().num_hidden_layers;
    if let Some(l) = layer.filter(|&l| l >= n_layers) {
        return Err(Error::Usage(format!(
            "--layer {l} out of range: the model has layers 0..{}",
            n_layers - 1
        )));
    }
    let calib_scan = scan(model, tok, calib, rule, model_name)?;
    let layer = match layer.or(calib_scan.first_massive_layer) {
        Some(l) => l,
        None => {
            return Err(Error::Usage(format!(
                "no massive activations on the calibration text under |h| >= {} and ratio >= {}: pass --layer, or lower --abs/--ratio",
                rule.abs, rule.ratio
            )))
        }
    };
    let carriers = calib_scan.layers[layer].massive.clone();
    let mut sums: BTreeMap<usize, (f64, usize)> = BTreeMap::new();
    for m in &carriers {
        let e = sums.entry(m.dim).or_default();
        e.0 += m.mean * m.windows as f64;
        e.1 += m.windows;
    }
    if sums.is_empty() {
        return Err(Error::Usage(format!(
            "layer {layer} has no massive activations on the calibration text"
        )));
    }
    let means: BTreeMap<usize, f64> = sums.iter().map(|(&d, &(s, n))| (d, s / n as f64)).collect();
    let (mut nll, mut tokens, mut edited) = ([0f64; 3], 0usize, 0usize);
    for w in &eval.ids {
        let ids = Tensor::new(w.as_slice(), model.device())?.unsqueeze(0)?; // (1, T)
        let base = model.forward(
            &ids,
            &Taps {
                hidden: true,
                ..Default::default()
            },
        )?;
        // The same dims, wherever they are massive in this window.
        let hits: Vec<(usize, usize)> = window_layer(&base.hidden[layer], &rule)?
            .flagged
            .into_iter()
            .filter(|(_, dim, _)| means.contains_key(dim))
            .map(|(position, dim, _)| (position, dim))
            .collect();
        edited += hits.len();
        let edits = |value: &dyn Fn(usize) -> f32| Taps {
            edits: hits
                .iter()
                .map(|&(position, dim)| Edit {
                    layer,
                    position,
                    dim,
                    value: value(dim),
                })
                .collect(),
            ..Default::default()
        };
        nll[0] += nll_sum(&base.logits, &ids)?.to_scalar::<f32>()? as f64;
        let zero = model.forward(&ids, &edits(&|_| 0.0))?;
        nll[1] += nll_sum(&zero.logits, &ids)?.to_scalar::<f32>()? as f64;
        let mean = model.forward(&ids, &edits(&|dim| means[&dim] as f32))?;
        nll[2] += nll_sum(&mean.logits, &ids)?.to_scalar::<f32>()? as f64;
        tokens += w.len() - 1;
    }
    let arm = |s: f64| {
        let nll = s / tokens.max(1) as f64;
        Arm {
            ppl: nll.exp(),
            nll,
        }
    };
    Ok(InterveneReport {
        model: model_name.to_string(),
        layer,
        rule,
        dims: means.keys().copied().collect(),
        means,
        carriers,
        edited_entries: edited,
        tokens,
        windows: eval.len(),
        original: arm(nll[0]),
        zero: arm(nll[1]),
        mean: arm(nll[2]),
    })
}
