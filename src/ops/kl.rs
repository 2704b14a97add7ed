//! The hold term KL(teacher || student) computed through the LM head in chunks of positions.
//!
//! Done plainly it needs the student's (B, T, V) f32 logits, their log-softmax and the
//! teacher's, all alive for the backward pass: 8.4 GB per copy for a 128k vocabulary at 16k
//! tokens. Here the op takes the final normed hidden states (B, T, D) and the head W (V, D);
//! forward and backward walk chunks of rows, so one chunk's (rows, V) f32 tensors exist at a
//! time. With p = softmax(logits / tau) and the loss scaled by tau^2 / (B T) (Hinton et al.),
//!
//!   d loss / d logits_s = tau / (B T) * (p_s - p_t),   d h_s = (d logits_s) W.
//!
//! On CUDA with bf16 a kernel (`kl.cu`) reads each chunk's two bf16 logit blocks once for the
//! row sums and once for the KL and d logits, and the forward multiplies d logits by W right
//! away: the backward pass then only scales that stored d h_s (no second pass through the head).

use super::{acc, head_chunk_rows, Given};
use candle_core::{CustomOp2, DType, Tensor, D};

type CResult<T> = candle_core::Result<T>;

/// Log-probabilities of rows [r0, r0 + n) of h: (rows, D) x W^T / tau.
fn log_probs(h: &Tensor, w: &Tensor, r0: usize, n: usize, tau: f64) -> CResult<Tensor> {
    let logits = h.narrow(0, r0, n)?.matmul(&w.t()?)?; // (n, V)
    candle_nn::ops::log_softmax(&(logits.to_dtype(acc(h.dtype()))? / tau)?, D::Minus1)
}

struct KlOp {
    out: Given,
    teacher: Tensor,
    tau: f64,
    rows_per_chunk: usize,
}

impl CustomOp2 for KlOp {
    fn name(&self) -> &'static str {
        "kl-through-head"
    }

    super::given_forward!(a: la, b: lb);

    fn bwd(
        &self,
        h: &Tensor,
        w: &Tensor,
        _loss: &Tensor,
        g: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let (h, w) = (h.detach(), w.detach());
        let d = h.dim(D::Minus1)?;
        let hs = h.reshape(((), d))?; // (B*T, D)
        let ht = self.teacher.reshape(((), d))?;
        let rows = hs.dim(0)?;
        // Rounded by the multiply to the gradient's own dtype (f64 in an f64 run).
        let k = g.to_dtype(DType::F64)?.to_scalar::<f64>()? * self.tau / rows as f64;
        let step = self.rows_per_chunk;
        let mut parts = vec![];
        for r0 in (0..rows).step_by(step) {
            let n = step.min(rows - r0);
            let ps = log_probs(&hs, &w, r0, n, self.tau)?.exp()?;
            let pt = log_probs(&ht, &w, r0, n, self.tau)?.exp()?;
            let dlogits = ((ps - pt)? * k)?.to_dtype(h.dtype())?; // (n, V)
            parts.push(dlogits.matmul(&w)?); // (n, D)
        }
        Ok((Some(Tensor::cat(&parts, 0)?.reshape(h.shape())?), None))
    }
}

/// KL(teacher || student) per position, averaged over the B*T positions, with temperature
/// `tau`: h_student, h_teacher (B, T, D) final normed hidden states, w (V, D) the LM head.
/// A scalar in the accumulation dtype, differentiable in h_student.
pub fn kl_through_head(
    h_student: &Tensor,
    h_teacher: &Tensor,
    w: &Tensor,
    tau: f64,
) -> CResult<Tensor> {
    kl_chunked(h_student, h_teacher, w, tau, head_chunk_rows(w.dim(0)?))
}

/// [`kl_through_head`] with an explicit number of rows per chunk.
pub fn kl_chunked(
    h_student: &Tensor,
    h_teacher: &Tensor,
    w: &Tensor,
    tau: f64,
    rows_per_chunk: usize,
) -> CResult<Tensor> {
    let d = h_student.dim(D::Minus1)?;
    if h_teacher.dims() != h_student.dims() || w.dim(1)? != d {
        candle_core::bail!(
            "kl: student {:?}, teacher {:?}, head {:?} do not fit",
            h_student.dims(),
            h_teacher.dims(),
            w.dims()
        );
    }
    let teacher = h_teacher.detach();
    let (hs, ht) = (
        h_student.detach().reshape(((), d))?,
        teacher.reshape(((), d))?,
    );
    let rows = hs.dim(0)?;
    #[cfg(feature = "cuda")]
    if kernel::applies(&hs, w) {
        let track = h_student.track_op();
        let (loss, dh) = kernel::loss_and_grad(&hs, &ht, w, tau, track)?;
        if !track {
            return Ok(loss);
        }
        let dh = dh.map(|g| g.reshape(h_student.shape())).transpose()?;
        return super::formed_loss(h_student, w, loss, dh, None);
    }
    let step = rows_per_chunk.max(1);
    let mut total = Tensor::zeros((), acc(hs.dtype()), hs.device())?;
    for r0 in (0..rows).step_by(step) {
        let n = step.min(rows - r0);
        let ls = log_probs(&hs, w, r0, n, tau)?;
        let lt = log_probs(&ht, w, r0, n, tau)?;
        total = (total + (lt.exp()? * (lt - ls)?)?.sum_all()?)?;
    }
    let loss = (total * (tau * tau / rows as f64))?;
    if !h_student.track_op() {
        return Ok(loss);
    }
    h_student.apply_op2(
        w,
        KlOp {
            out: Given::new(loss),
            teacher,
            tau,
            rows_per_chunk: step,
        },
    )
}

#[cfg(feature = "cuda")]
mod kernel {
    use crate::ops::cuda;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaStorage, WrapErr};
    use candle_core::{CustomOp2, DType, Layout, Shape, Tensor};

    type CResult<T> = candle_core::Result<T>;

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/kl.ptx"));

    pub fn applies(h: &Tensor, w: &Tensor) -> bool {
        h.device().is_cuda() && h.dtype() == DType::BF16 && w.dtype() == DType::BF16
    }

    /// Per-row KL of two (n, V) bf16 logit blocks; fills `dlogits` when given.
    struct Rows {
        inv_tau: f32,
        scale: f32,
        dlogits: Option<Tensor>,
    }

    impl CustomOp2 for Rows {
        fn name(&self) -> &'static str {
            "kl-rows-kernel"
        }

        cuda::cuda_only!(a: la, b: lb);

        fn cuda_fwd(
            &self,
            s: &CudaStorage,
            ls: &Layout,
            t: &CudaStorage,
            lt: &Layout,
        ) -> CResult<(CudaStorage, Shape)> {
            let dev = cuda::device_of(s);
            let (n, v) = ls.shape().dims2()?;
            let (sv, tv) = (
                cuda::view::<half::bf16>(s, ls)?,
                cuda::view::<half::bf16>(t, lt)?,
            );
            // Safety: the kernel writes one value per row.
            let kl = unsafe { dev.alloc::<f32>(n)? };
            let guard = self.dlogits.as_ref().map(|d| d.storage_and_layout());
            let f = cuda::func(&dev, "eabfit_kl", PTX, "eab_kl_rows_bf16")?;
            let stream = dev.cuda_stream();
            let mut l = stream.launch_builder(&f);
            l.arg(&sv).arg(&tv).arg(&kl);
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
            l.arg(&v32).arg(&self.inv_tau).arg(&self.scale);
            let cfg = LaunchConfig {
                grid_dim: (n as u32, 1, 1),
                block_dim: (512, 1, 1),
                shared_mem_bytes: 0,
            };
            unsafe { l.launch(cfg) }.w()?;
            Ok((CudaStorage::wrap_cuda_slice(kl, dev), Shape::from(n)))
        }
    }

    /// The loss and, when `grad`, d loss / d h_s (rows, D): chunks of rows through the head.
    pub fn loss_and_grad(
        hs: &Tensor,
        ht: &Tensor,
        w: &Tensor,
        tau: f64,
        grad: bool,
    ) -> CResult<(Tensor, Option<Tensor>)> {
        let (rows, vocab) = (hs.dim(0)?, w.dim(0)?);
        // bf16 logits only, no f32 copies: larger chunks than the composite path.
        let step = ((256usize << 20) / vocab.max(1)).max(16);
        let mut total = Tensor::zeros((), DType::F32, hs.device())?;
        let mut parts = vec![];
        for r0 in (0..rows).step_by(step) {
            let n = step.min(rows - r0);
            let s = hs.narrow(0, r0, n)?.matmul(&w.t()?)?; // (n, V)
            let t = ht.narrow(0, r0, n)?.matmul(&w.t()?)?;
            let dlogits = if grad {
                Some(Tensor::zeros((n, vocab), DType::BF16, hs.device())?)
            } else {
                None
            };
            let op = Rows {
                inv_tau: (1.0 / tau) as f32,
                scale: (tau / rows as f64) as f32,
                dlogits: dlogits.clone(),
            };
            total = (total + s.apply_op2_no_bwd(&t, &op)?.sum_all()?)?;
            if let Some(d) = dlogits {
                parts.push(d.matmul(w)?); // (n, D)
            }
        }
        let loss = (total * (tau * tau / rows as f64))?;
        let dh = if grad {
            Some(Tensor::cat(&parts, 0)?)
        } else {
            None
        };
        Ok((loss, dh))
    }
}
