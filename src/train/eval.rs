//! The evaluation a fine-tuning run does every `eval.every` steps: perplexity, KL to the base,
//! the suppression term and the scan figures on the eval windows, and how they are logged.

use super::{scalar, Setup};
use crate::killpoint::point;
use crate::loss::{kl_to_teacher, ma_penalty};
use crate::metrics::{log_layers, RunLogger};
use crate::model::Model;
use crate::recipe::Recipe;
use crate::scan::{scan_taps, ScanReport, Scanner};
use crate::Result;
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

/// Figures of one evaluation on the eval windows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalFigures {
    pub step: usize,
    pub ppl: f64,
    /// KL(base || adapted) per position.
    pub kl: f64,
    /// The suppression term on the eval windows.
    pub ma: f64,
    /// kl + loss.ma.weight * ma: what "best" minimises.
    pub score: f64,
    pub massive_count: usize,
    pub top1: Vec<f64>,
    pub top1_over_median: Vec<f64>,
}

/// Perplexity, KL to the base, suppression term and scan figures on the eval windows.
pub(super) fn evaluate(
    r: &Recipe,
    s: &Setup,
    model: &Model,
    step: usize,
) -> Result<(EvalFigures, ScanReport)> {
    let mut scanner = Scanner::new(s.ckpt.config.num_hidden_layers, s.base_scan.rule);
    let (mut kl, mut ma) = (0f64, 0f64);
    for (w, teacher) in s.eval.ids.iter().zip(&s.teacher_eval_logits) {
        let ids = Tensor::new(w.as_slice(), &s.base.device)?.unsqueeze(0)?;
        let out = model.forward(&ids, &scan_taps())?;
        point("eval");
        kl += scalar(&kl_to_teacher(&out.logits, teacher, 1.0)?)?;
        if !s.ma_layers.is_empty() {
            let hs: Vec<&Tensor> = s.ma_layers.iter().map(|&l| &out.hidden[l]).collect();
            ma += scalar(&ma_penalty(&hs, r.loss.ma.threshold, &s.ma_target)?)?;
        }
        scanner.add(&out, w)?;
    }
    let n = s.eval.len() as f64;
    let report = scanner.finish(
        &s.ckpt.tokenizer,
        &r.model.path,
        s.eval.seq_len,
        s.eval.bos.is_some(),
    );
    let (kl, ma) = (kl / n, ma / n);
    let figures = EvalFigures {
        step,
        ppl: report.ppl,
        kl,
        ma,
        score: kl + r.loss.ma.weight * ma,
        massive_count: report.massive_count(),
        top1: report.layers.iter().map(|l| l.top[0]).collect(),
        top1_over_median: report
            .layers
            .iter()
            .map(|l| l.top[0] / l.median.max(f64::MIN_POSITIVE))
            .collect(),
    };
    Ok((figures, report))
}

pub(super) fn log_eval(log: &mut RunLogger, f: &EvalFigures, report: &ScanReport) -> Result<()> {
    let step = f.step;
    log.scalar("eval/ppl", f.ppl, step)?;
    log.scalar("eval/kl", f.kl, step)?;
    log.scalar("eval/ma", f.ma, step)?;
    log.scalar("eval/score", f.score, step)?;
    log.scalar("eval/massive_count", f.massive_count as f64, step)?;
    log_layers(log, report, step)?;
    log.flush()
}

pub fn one_line(f: &EvalFigures) -> String {
    let worst = f.top1.iter().cloned().fold(0f64, f64::max);
    format!(
        "ppl {:.3}  kl {:.5}  ma {:.4}  massive {}  max top-1 {:.1}  score {:.5}",
        f.ppl, f.kl, f.ma, f.massive_count, worst, f.score
    )
}
