//! Next-token cross-entropy through the LM head in chunks of positions: pretraining's loss.
//!
//! Done plainly it needs the (B, T, V) logits in f32 and their log-softmax alive for the
//! backward pass: 6.4 GB each for SmolLM2's 49k vocabulary at 32 x 1024 tokens. Here the op
//! takes the final normed hidden states and the head W (V, D), which trains in pretraining (tied
//! to the embedding there); forward and backward walk chunks of rows, so one chunk's (rows, V)
//! tensors exist at a time. Over the N = B (T - 1) positions that have a next token,
//!
//!   loss = mean of -log softmax(h W^T)[next],   d logits = (softmax(h W^T) - onehot(next)) / N,
//!   dh = (d logits) W,   dW = sum over chunks of (d logits)^T h.

use super::{acc, head_chunk_rows, Given};
use candle_core::{CustomOp2, DType, Tensor, D};

type CResult<T> = candle_core::Result<T>;

/// Logits of rows [r0, r0 + n) of h (rows, D) in the accumulation dtype: (n, V).
fn logits(h: &Tensor, w: &Tensor, r0: usize, n: usize) -> CResult<Tensor> {
    h.narrow(0, r0, n)?
        .matmul(&w.t()?)?
        .to_dtype(acc(h.dtype()))
}

struct CeOp {
    out: Given,
    /// The next token of each row, (N,) u32.
    targets: Tensor,
    rows_per_chunk: usize,
}

impl CustomOp2 for CeOp {
    fn name(&self) -> &'static str {
        "cross-entropy-through-head"
    }

    super::given_forward!(a: la, b: lb);

    fn bwd(
        &self,
        h: &Tensor,
        w: &Tensor,
        _loss: &Tensor,
        g: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let train_w = w.track_op();
        let (h, w) = (h.detach(), w.detach());
        let (rows, dev) = (h.dim(0)?, h.device());
        let ac = acc(h.dtype());
        let k = g.to_dtype(DType::F64)?.to_scalar::<f64>()? / rows as f64;
        let mut dh = vec![];
        let mut dw: Option<Tensor> = None;
        for r0 in (0..rows).step_by(self.rows_per_chunk) {
            let n = self.rows_per_chunk.min(rows - r0);
            let p = candle_nn::ops::softmax_last_dim(&logits(&h, &w, r0, n)?)?; // (n, V)
            let next = self.targets.narrow(0, r0, n)?.unsqueeze(1)?; // (n, 1)
            let onehot = p
                .zeros_like()?
                .scatter_add(&next, &Tensor::ones((n, 1), ac, dev)?, 1)?;
            let dlogits = ((p - onehot)? * k)?.to_dtype(h.dtype())?; // (n, V)
            dh.push(dlogits.matmul(&w)?); // (n, D)
            if train_w {
                let part = dlogits.t()?.matmul(&h.narrow(0, r0, n)?)?.to_dtype(ac)?; // (V, D)
                dw = Some(match dw {
                    Some(acc) => (acc + part)?,
                    None => part,
                });
            }
        }
        let dw = dw.map(|d| d.to_dtype(w.dtype())).transpose()?;
        Ok((Some(Tensor::cat(&dh, 0)?), dw))
    }
}

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
    let rows = hd.dim(0)?;
    let step = rows_per_chunk.max(1);
    let mut total: Option<Tensor> = None;
    for r0 in (0..rows).step_by(step) {
        let n = step.min(rows - r0);
        let logp = candle_nn::ops::log_softmax(&logits(&hd, &wd, r0, n)?, D::Minus1)?; // (n, V)
        let next = targets.narrow(0, r0, n)?.unsqueeze(1)?; // (n, 1)
        let nll = logp.gather(&next, 1)?.neg()?.sum_all()?;
        total = Some(match total {
            Some(acc) => (acc + nll)?,
            None => nll,
        });
    }
    let loss = total
        .ok_or_else(|| candle_core::Error::Msg("cross-entropy: no positions".into()))?
        / rows as f64;
    let loss = loss?;
    if !(h.track_op() || w.track_op()) {
        return Ok(loss);
    }
    h.apply_op2(
        w,
        CeOp {
            out: Given::new(loss),
            targets,
            rows_per_chunk: step,
        },
    )
}
