//! Finding massive activations (Sun et al., 2024): per layer, the top-1/2/3 and median of |h|
//! over every (position, dim) of the layer's output, and the entries that pass the rule
//! |h| >= abs and |h| / median >= ratio, grouped across windows.

use crate::checkpoint::Tok;
use crate::data::Windows;
use crate::model::{Model, Output, Taps};
use crate::perplexity::nll_sum;
use crate::Result;
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The flagging rule; `abs = 0` gives the ratio-only rule for small models.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Rule {
    pub abs: f64,
    pub ratio: f64,
}

impl Default for Rule {
    fn default() -> Self {
        Self {
            abs: 100.0,
            ratio: 1000.0,
        }
    }
}

impl Rule {
    pub fn flags(&self, value: f64, median: f64) -> bool {
        value.abs() >= self.abs && value.abs() >= self.ratio * median
    }
}

/// One (dim, position) that was massive in at least one window.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Massive {
    pub dim: usize,
    pub position: usize,
    /// The token at that position in the first window where it was flagged.
    pub token: String,
    /// Mean signed value over the windows where it was flagged.
    pub mean: f64,
    /// Coefficient of variation (std / |mean|) over those windows: small = input-invariant.
    pub cv: f64,
    /// In how many windows it was flagged.
    pub windows: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerScan {
    pub layer: usize,
    /// Means over windows of the three largest |h|.
    pub top: [f64; 3],
    /// Mean over windows of median |h|.
    pub median: f64,
    /// Flagged entries summed over all windows.
    pub massive_count: usize,
    pub massive: Vec<Massive>,
    /// Mean attention probability on position 0 (queries 1..T, all heads).
    pub first_token_attn: f64,
    /// Mean attention probability on the EAB slot, when the model has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot_attn: Option<f64>,
    /// Where each window's largest |h| sits (none in scans written before it was kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top1_at: Option<Top1At>,
    /// Mean over windows of the largest |h| after position 0: a second sink (the paper's first
    /// "." or "\n") shows here under a first-token outlier, and where position 0 is hidden from
    /// every query it is the largest entry attention can see (none in older scans).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top1_after_first: Option<f64>,
}

/// Where a layer's largest |h| sits, window by window. The paper's outlier is one dim on the
/// first token in every window; a stream that grows everywhere puts its top-1 anywhere.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Top1At {
    /// The dim that holds the top-1 in the most windows (the lowest such dim on a tie).
    pub dim: usize,
    /// The fraction of windows whose top-1 is in `dim`.
    pub dim_share: f64,
    /// The fraction of windows whose top-1 is at position 0.
    pub first: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScanReport {
    pub model: String,
    pub seq_len: usize,
    pub num_seqs: usize,
    pub bos: bool,
    pub rule: Rule,
    /// Perplexity of the scanned windows (free: the logits are there anyway).
    #[serde(default)]
    pub ppl: f64,
    pub layers: Vec<LayerScan>,
    /// First layer with a persistent massive (dim, position): flagged in at least half the
    /// windows. Massive activations are input-invariant; a one-window outlier is not one.
    pub first_massive_layer: Option<usize>,
    /// Dims of the persistent massive activations, ascending.
    pub massive_dims: Vec<usize>,
}

impl ScanReport {
    pub fn massive_count(&self) -> usize {
        self.layers.iter().map(|l| l.massive_count).sum()
    }

    /// The layer whose top-1 / median is largest, with that ratio.
    pub fn worst_layer(&self) -> Option<(usize, f64)> {
        self.layers
            .iter()
            .map(|l| (l.layer, l.top[0] / l.median.max(f64::MIN_POSITIVE)))
            .max_by(|a, b| a.1.total_cmp(&b.1))
    }

    pub fn table(&self) -> String {
        let mut s = format!(
            "{:>5} {:>10} {:>10} {:>10} {:>10} {:>9} {:>9} {:>7} {:>8}{}  {:<18}  massive (dim@pos token: mean)\n",
            "layer",
            "top-1",
            "top-2",
            "top-3",
            "top-1 t>0",
            "median",
            "top1/med",
            "count",
            "attn@0",
            if self.layers.iter().any(|l| l.slot_attn.is_some()) {
                format!(" {:>8}", "attn@eab")
            } else {
                String::new()
            },
            "top-1 at (dim, pos 0)"
        );
        for l in &self.layers {
            let groups: Vec<String> = l
                .massive
                .iter()
                .take(4)
                .map(|m| format!("{}@{} {:?}: {:.1}", m.dim, m.position, m.token, m.mean))
                .collect();
            let more = if l.massive.len() > 4 {
                format!(" (+{})", l.massive.len() - 4)
            } else {
                String::new()
            };
            let at = l.top1_at.map_or(String::new(), |a| {
                format!(
                    "d{} {:.0}%, {:.0}%",
                    a.dim,
                    100.0 * a.dim_share,
                    100.0 * a.first
                )
            });
            s += &format!(
                "{:>5} {:>10.2} {:>10.2} {:>10.2} {:>10} {:>9.4} {:>9.0} {:>7} {:>8.3}{}  {:<18}  {}{}\n",
                l.layer,
                l.top[0],
                l.top[1],
                l.top[2],
                l.top1_after_first.map_or("-".into(), |t| format!("{t:.2}")),
                l.median,
                l.top[0] / l.median.max(f64::MIN_POSITIVE),
                l.massive_count,
                l.first_token_attn,
                l.slot_attn.map_or(String::new(), |a| format!(" {a:>8.3}")),
                at,
                groups.join(", "),
                more
            );
        }
        s += &format!(
            "rule |h| >= {} and |h|/median >= {}: {} entries; first massive layer {}; persistent dims {:?}; perplexity {:.3}\n",
            self.rule.abs, self.rule.ratio, self.massive_count(),
            self.first_massive_layer.map_or("none".into(), |l| l.to_string()), self.massive_dims, self.ppl
        );
        s
    }
}

/// Statistics of one layer output (1, T, D) of one window.
pub(crate) struct WindowLayer {
    pub top: [f64; 3],
    /// (position, dim) of the largest |h| (the first in row-major order on a tie).
    pub top1_at: (usize, usize),
    /// The largest |h| at positions 1.. (0 for a one-token window).
    pub top_after_first: f64,
    pub median: f64,
    pub flagged: Vec<(usize, usize, f64)>, // (position, dim, value)
}

/// The upper median of `mags` (the element at len/2 in sorted order), reordering it in place so
/// that everything from len/2 on is at least the median: the one definition of "median |h|".
pub(crate) fn upper_median(mags: &mut [f32]) -> f64 {
    let mid = mags.len() / 2;
    *mags.select_nth_unstable_by(mid, f32::total_cmp).1 as f64
}

pub(crate) fn window_layer(h: &Tensor, rule: &Rule) -> Result<WindowLayer> {
    let d = h.dim(2)?; // (1, T, D)
    let vals: Vec<f32> = h
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    let mut mags: Vec<f32> = vals.iter().map(|v| v.abs()).collect();
    let median = upper_median(&mut mags);
    let mut top = [0f64; 3];
    for &m in &mags[mags.len() / 2..] {
        let m = m as f64;
        if m > top[0] {
            top = [m, top[0], top[1]];
        } else if m > top[1] {
            top = [top[0], m, top[1]];
        } else if m > top[2] {
            top[2] = m;
        }
    }
    // One pass in position order for all three: the flagged entries, the top-1's place and
    // the largest |h| past position 0 (the first d values).
    let (mut flagged, mut arg, mut top_after_first) = (vec![], 0, 0f64);
    for (i, &v) in vals.iter().enumerate() {
        if rule.flags(v as f64, median) {
            flagged.push((i / d, i % d, v as f64));
        }
        if v.abs() > vals[arg].abs() {
            arg = i;
        }
        if i >= d {
            top_after_first = top_after_first.max(v.abs() as f64);
        }
    }
    Ok(WindowLayer {
        top,
        top1_at: (arg / d, arg % d),
        top_after_first,
        median,
        flagged,
    })
}

#[derive(Default)]
struct Acc {
    top: [f64; 3],
    top1_dims: BTreeMap<usize, usize>, // dim -> windows whose top-1 is there
    top1_first: usize,
    top_after_first: f64,
    median: f64,
    count: usize,
    first_attn: f64,
    slot_attn: Option<f64>,
    groups: BTreeMap<(usize, usize), (Vec<f64>, u32)>, // (dim, position) -> values, token id
}

/// Accumulates scan figures window by window, so that callers running their own forward passes
/// (training's eval) get the same figures as `eabfit scan`.
pub struct Scanner {
    rule: Rule,
    layers: Vec<Acc>,
    windows: usize,
    nll: f64,
    tokens: usize,
}

/// What a forward pass must keep for [`Scanner::add`].
pub fn scan_taps() -> Taps {
    Taps {
        hidden: true,
        attn: true,
        ..Default::default()
    }
}

impl Scanner {
    pub fn new(n_layers: usize, rule: Rule) -> Self {
        Self {
            rule,
            layers: (0..n_layers).map(|_| Acc::default()).collect(),
            windows: 0,
            nll: 0.0,
            tokens: 0,
        }
    }

    /// One window's forward output (batch of 1, taken with [`scan_taps`]) and its token ids.
    pub fn add(&mut self, out: &Output, ids: &[u32]) -> Result<()> {
        let f64_of =
            |t: &Tensor| -> Result<f64> { Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?) };
        for (i, (h, a)) in out.hidden.iter().zip(&out.attn).enumerate() {
            let s = window_layer(h, &self.rule)?;
            let l = &mut self.layers[i];
            for k in 0..3 {
                l.top[k] += s.top[k];
            }
            *l.top1_dims.entry(s.top1_at.1).or_default() += 1;
            l.top1_first += usize::from(s.top1_at.0 == 0);
            l.top_after_first += s.top_after_first;
            l.median += s.median;
            l.count += s.flagged.len();
            l.first_attn += f64_of(&a.first_token)?;
            if let Some(sl) = &a.slot {
                *l.slot_attn.get_or_insert(0.0) += f64_of(sl)?;
            }
            for (pos, dim, v) in s.flagged {
                l.groups
                    .entry((dim, pos))
                    .or_insert_with(|| (vec![], ids[pos]))
                    .0
                    .push(v);
            }
        }
        let t = Tensor::new(ids, out.logits.device())?.unsqueeze(0)?;
        self.nll += f64_of(&nll_sum(&out.logits, &t)?)?;
        self.tokens += ids.len() - 1;
        self.windows += 1;
        Ok(())
    }

    pub fn finish(self, tok: &Tok, model_name: &str, seq_len: usize, bos: bool) -> ScanReport {
        let n = self.windows.max(1) as f64;
        let layers: Vec<LayerScan> = self
            .layers
            .into_iter()
            .enumerate()
            .map(|(layer, a)| {
                let mut massive: Vec<Massive> = a
                    .groups
                    .into_iter()
                    .map(|((dim, position), (vals, tok_id))| {
                        let mean = vals.iter().sum::<f64>() / vals.len() as f64;
                        let var = vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>()
                            / vals.len() as f64;
                        Massive {
                            dim,
                            position,
                            token: tok.token_text(tok_id),
                            mean,
                            cv: var.sqrt() / mean.abs(),
                            windows: vals.len(),
                        }
                    })
                    .collect();
                massive.sort_by(|x, y| y.mean.abs().total_cmp(&x.mean.abs()));
                // max_by_key keeps the last maximum: reversed, the lowest dim wins a tie.
                let top1_at = a
                    .top1_dims
                    .iter()
                    .rev()
                    .max_by_key(|(_, &k)| k)
                    .map(|(&dim, &k)| Top1At {
                        dim,
                        dim_share: k as f64 / n,
                        first: a.top1_first as f64 / n,
                    });
                LayerScan {
                    layer,
                    top: a.top.map(|t| t / n),
                    median: a.median / n,
                    massive_count: a.count,
                    massive,
                    first_token_attn: a.first_attn / n,
                    slot_attn: a.slot_attn.map(|s| s / n),
                    top1_at,
                    top1_after_first: Some(a.top_after_first / n),
                }
            })
            .collect();
        let persistent = |m: &&Massive| 2 * m.windows >= self.windows;
        let first_massive_layer = layers
            .iter()
            .find(|l| l.massive.iter().any(|m| persistent(&m)))
            .map(|l| l.layer);
        let mut massive_dims: Vec<usize> = layers
            .iter()
            .flat_map(|l| l.massive.iter().filter(persistent).map(|m| m.dim))
            .collect();
        massive_dims.sort_unstable();
        massive_dims.dedup();
        let nll = self.nll / self.tokens.max(1) as f64;
        ScanReport {
            model: model_name.to_string(),
            seq_len,
            num_seqs: self.windows,
            bos,
            rule: self.rule,
            ppl: nll.exp(),
            layers,
            first_massive_layer,
            massive_dims,
        }
    }
}

pub fn scan(
    model: &Model,
    tok: &Tok,
    windows: &Windows,
    rule: Rule,
    model_name: &str,
) -> Result<ScanReport> {
    let mut scanner = Scanner::new(model.config().num_hidden_layers, rule);
    for w in &windows.ids {
        let ids = Tensor::new(w.as_slice(), model.device())?.unsqueeze(0)?; // (1, T)
        scanner.add(&model.forward(&ids, &scan_taps())?, w)?;
    }
    Ok(scanner.finish(tok, model_name, windows.seq_len, windows.bos.is_some()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn window_stats_match_a_sorted_reference() {
        let vals: Vec<f32> = (0..60)
            .map(|i| ((i * 37 % 61) as f32 - 30.0) / 7.0)
            .chain([900.0, -1200.0])
            .collect();
        let h = Tensor::from_vec(vals.clone(), (1, 2, 31), &Device::Cpu).unwrap();
        let s = window_layer(
            &h,
            &Rule {
                abs: 100.0,
                ratio: 50.0,
            },
        )
        .unwrap();
        let mut sorted: Vec<f64> = vals.iter().map(|v| v.abs() as f64).collect();
        sorted.sort_by(f64::total_cmp);
        assert_eq!(s.top, [sorted[61], sorted[60], sorted[59]]);
        assert_eq!(s.median, sorted[31]);
        assert_eq!(s.flagged, vec![(1, 29, 900.0), (1, 30, -1200.0)]);
        assert_eq!(s.top1_at, (1, 30));
        // Position 0 holds the first 31 values: the largest of the rest is the 1200.
        assert_eq!(s.top_after_first, 1200.0);
        let first_row_max = vals[..31].iter().fold(0f64, |m, v| m.max(v.abs() as f64));
        let h0 = Tensor::from_vec(
            vals[..31]
                .iter()
                .chain(&[0.5f32; 31])
                .copied()
                .collect::<Vec<f32>>(),
            (1, 2, 31),
            &Device::Cpu,
        )
        .unwrap();
        let s0 = window_layer(&h0, &Rule::default()).unwrap();
        assert_eq!(s0.top[0], first_row_max);
        assert_eq!(s0.top_after_first, 0.5);
    }

    #[test]
    fn rule_needs_both_thresholds() {
        let r = Rule::default();
        assert!(r.flags(-150.0, 0.1));
        assert!(!r.flags(99.0, 0.01));
        assert!(!r.flags(150.0, 0.2));
    }
}
