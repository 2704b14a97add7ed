//! Next-token cross-entropy through the LM head in chunks of positions: pretraining's loss.
//!
//! Done plainly it needs the (B, T, V) logits in f32 and their log-softmax alive for the
//! backward pass: 6.4 GB each for SmolLM2's 49k vocabulary at 32 x 1024 tokens. Here the op
//! takes the final normed hidden states and the head W (V, D), which trains in pretraining (tied
//! to the embedding there), and walks chunks of rows, so one chunk's (rows, V) tensors exist at
//! a time. Over the N = B (T - 1) positions that have a next token,
//!
//!   loss = mean of -log softmax(h W^T)[next],   d logits = (softmax(h W^T) - onehot(next)) / N,
//!   dh = (d logits) W,   dW = sum over chunks of (d logits)^T h.
//!
//! A tracked loss is always differentiated (it is the training loss), so the forward forms dh
//! and dW from each chunk's softmax while it has it; the backward only scales them.

use super::{acc, formed_loss, head_chunk_rows};
use candle_core::{Tensor, D};

type CResult<T> = candle_core::Result<T>;

/// Mean next-token cross-entropy of the logits `x W^T`: x (B, T, D) the final normed hidden
/// states, w (V, D) the LM head, ids (B, T). A scalar in the accumulation dtype, differentiable
/// in x and w; equal to [`crate::loss::lm_loss`] of the full logits.
pub fn ce_through_head(x: &Tensor, w: &Tensor, ids: &Tensor) -> CResult<Tensor> {
    ce_chunked(x, w, ids, head_chunk_rows(w.dim(0)?))
}

/// [`ce_through_head`] with an explicit number of rows per chunk.
pub fn ce_chunked(x: &Tensor, w: &Tensor, ids: &Tensor, rows_per_chunk: usize) -> CResult<Tensor> {
    let (b, t, d) = x.dims3()?;
    if ids.dims() != [b, t] || w.dim(1)? != d || t < 2 {
        candle_core::bail!(
            "cross-entropy: hidden {:?}, head {:?}, ids {:?} do not fit",
            x.dims(),
            w.dims(),
            ids.dims()
        );
    }
    // Positions 0..T-1 predict ids 1..T.
    let h = x
        .narrow(1, 0, t - 1)?
        .contiguous()?
        .reshape((b * (t - 1), d))?; // (N, D)
    let targets = ids.narrow(1, 1, t - 1)?.contiguous()?.flatten_all()?; // (N,)
    let (hd, wd) = (h.detach(), w.detach());
    let (rows, dev) = (hd.dim(0)?, hd.device());
    let ac = acc(hd.dtype());
    let (tracked, train_w) = (h.track_op() || w.track_op(), w.track_op());
    let step = rows_per_chunk.max(1);
    let (mut nll, mut dh, mut dw) = (vec![], vec![], None::<Tensor>);
    for r0 in (0..rows).step_by(step) {
        let n = step.min(rows - r0);
        let hc = hd.narrow(0, r0, n)?; // (n, D)
        let logits = hc.matmul(&wd.t()?)?.to_dtype(ac)?; // (n, V)
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let next = targets.narrow(0, r0, n)?.unsqueeze(1)?; // (n, 1)
        nll.push(logp.gather(&next, 1)?.neg()?.sum_all()?);
        if !tracked {
            continue;
        }
        let onehot = logp
            .zeros_like()?
            .scatter_add(&next, &Tensor::ones((n, 1), ac, dev)?, 1)?;
        let dlogits = ((logp.exp()? - onehot)? / rows as f64)?.to_dtype(hd.dtype())?; // (n, V)
        dh.push(dlogits.matmul(&wd)?); // (n, D)
        if train_w {
            let part = dlogits.t()?.matmul(&hc)?.to_dtype(ac)?; // (V, D)
            dw = Some(match dw {
                Some(sum) => (sum + part)?,
                None => part,
            });
        }
    }
    let loss = (Tensor::stack(&nll, 0)?.sum_all()? / rows as f64)?;
    if !tracked {
        return Ok(loss);
    }
    formed_loss(&h, w, loss, Some(Tensor::cat(&dh, 0)?), dw)
}
