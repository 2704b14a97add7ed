//! Perplexity over token windows: exp of the mean next-token negative log-likelihood.

use crate::data::Windows;
use crate::model::Model;
use crate::Result;
use candle_core::{Tensor, D};
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Perplexity {
    pub ppl: f64,
    pub nll: f64,
    /// Predicted tokens: every window position but the first.
    pub tokens: usize,
    pub windows: usize,
    pub seq_len: usize,
    pub bos: bool,
}

/// Sum of next-token NLL over one batch of windows: logits (B, T, V), ids (B, T).
pub fn nll_sum(logits: &Tensor, ids: &Tensor) -> candle_core::Result<Tensor> {
    let t = ids.dim(1)?;
    let logp = candle_nn::ops::log_softmax(
        &logits
            .narrow(1, 0, t - 1)?
            .to_dtype(crate::ops::acc(logits.dtype()))?,
        D::Minus1,
    )?; // (B, T-1, V)
    let targets = ids.narrow(1, 1, t - 1)?.unsqueeze(D::Minus1)?; // (B, T-1, 1)
    logp.gather(&targets.contiguous()?, D::Minus1)?
        .neg()?
        .sum_all()
}

pub fn perplexity(model: &Model, windows: &Windows) -> Result<Perplexity> {
    let mut total = 0f64;
    let mut tokens = 0usize;
    for w in &windows.ids {
        let ids = Tensor::new(w.as_slice(), model.device())?.unsqueeze(0)?; // (1, T)
        let logits = model.logits(&ids)?;
        total += nll_sum(&logits, &ids)?.to_scalar::<f32>()? as f64;
        tokens += w.len() - 1;
    }
    let nll = total / tokens.max(1) as f64;
    Ok(Perplexity {
        ppl: nll.exp(),
        nll,
        tokens,
        windows: windows.len(),
        seq_len: windows.seq_len,
        bos: windows.bos.is_some(),
    })
}
