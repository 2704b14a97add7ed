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
//!
//! On CUDA with bf16 a kernel (`ce.cu`) reads each chunk's bf16 logits twice, once for the row's
//! log-sum-exp and once to write d logits, in place of the composite's f32 copy, log-softmax,
//! one-hot and exp (about 150 of a 280 ms pretraining step at 32 x 1024 tokens, by ncu).

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
    #[cfg(feature = "cuda")]
    if kernel::applies(&hd, &wd) {
        let (loss, dh, dw) = kernel::loss_and_grads(&hd, &wd, &targets, tracked, train_w)?;
        if !tracked {
            return Ok(loss);
        }
        return formed_loss(&h, w, loss, dh, dw);
    }
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

#[cfg(feature = "cuda")]
mod kernel {
    use crate::ops::cuda;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaStorage, WrapErr};
    use candle_core::{CustomOp2, DType, Layout, Shape, Tensor};

    type CResult<T> = candle_core::Result<T>;

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/ce.ptx"));

    pub fn applies(h: &Tensor, w: &Tensor) -> bool {
        h.device().is_cuda() && h.dtype() == DType::BF16 && w.dtype() == DType::BF16
    }

    /// Per-row negative log-likelihood of an (n, V) bf16 logit block against (n,) u32 targets;
    /// fills `dlogits` when given.
    struct Rows {
        scale: f32,
        dlogits: Option<Tensor>,
    }

    impl CustomOp2 for Rows {
        fn name(&self) -> &'static str {
            "ce-rows-kernel"
        }

        cuda::cuda_only!(a: la, b: lb);

        fn cuda_fwd(
            &self,
            x: &CudaStorage,
            lx: &Layout,
            t: &CudaStorage,
            lt: &Layout,
        ) -> CResult<(CudaStorage, Shape)> {
            let dev = cuda::device_of(x);
            let (n, v) = lx.shape().dims2()?;
            if lt.shape().elem_count() != n {
                candle_core::bail!("ce kernel: {n} rows of logits, {:?} targets", lt.dims());
            }
            let (xv, tv) = (cuda::view::<half::bf16>(x, lx)?, cuda::view::<u32>(t, lt)?);
            // Safety: the kernel writes one value per row.
            let nll = unsafe { dev.alloc::<f32>(n)? };
            let guard = self.dlogits.as_ref().map(|d| d.storage_and_layout());
            let f = cuda::func(&dev, "eabfit_ce", PTX, "eab_ce_rows_bf16")?;
            let stream = dev.cuda_stream();
            let mut l = stream.launch_builder(&f);
            l.arg(&xv).arg(&tv).arg(&nll);
            let null = 0u64;
            let dview = match &guard {
                Some((st, lay)) => Some(cuda::view::<half::bf16>(cuda::storage(st)?, lay)?),
                None => None,
            };
            match &dview {
                Some(d) => l.arg(d),
                None => l.arg(&null),
            };
            let v32 = v as i32;
            l.arg(&v32).arg(&self.scale);
            let cfg = LaunchConfig {
                grid_dim: (n as u32, 1, 1),
                block_dim: (512, 1, 1),
                shared_mem_bytes: 0,
            };
            unsafe { l.launch(cfg) }.w()?;
            Ok((CudaStorage::wrap_cuda_slice(nll, dev), Shape::from(n)))
        }
    }

    /// The mean loss over h's rows and, when `grad`, dh (rows, D) and, when also `train_w`,
    /// dW (V, D) in f32: chunks of rows through the head.
    pub fn loss_and_grads(
        h: &Tensor,
        w: &Tensor,
        targets: &Tensor,
        grad: bool,
        train_w: bool,
    ) -> CResult<(Tensor, Option<Tensor>, Option<Tensor>)> {
        let (rows, vocab) = (h.dim(0)?, w.dim(0)?);
        // bf16 logits only, no f32 copies: larger chunks than the composite path.
        let step = ((256usize << 20) / vocab.max(1)).max(16);
        let mut total = Tensor::zeros((), DType::F32, h.device())?;
        let (mut dh, mut dw) = (vec![], None::<Tensor>);
        for r0 in (0..rows).step_by(step) {
            let n = step.min(rows - r0);
            let hc = h.narrow(0, r0, n)?; // (n, D)
            let logits = hc.matmul(&w.t()?)?; // (n, V)
            let dlogits = if grad {
                Some(Tensor::zeros((n, vocab), DType::BF16, h.device())?)
            } else {
                None
            };
            let op = Rows {
                scale: (1.0 / rows as f64) as f32,
                dlogits: dlogits.clone(),
            };
            let next = targets.narrow(0, r0, n)?; // (n,)
            total = (total + logits.apply_op2_no_bwd(&next, &op)?.sum_all()?)?;
            if let Some(d) = dlogits {
                dh.push(d.matmul(w)?); // (n, D)
                if train_w {
                    let part = d.t()?.matmul(&hc)?.to_dtype(DType::F32)?; // (V, D)
                    dw = Some(match dw {
                        Some(sum) => (sum + part)?,
                        None => part,
                    });
                }
            }
        }
        let loss = (total / rows as f64)?;
        let dh = if grad {
            Some(Tensor::cat(&dh, 0)?)
        } else {
            None
        };
        Ok((loss, dh, dw))
    }
}
