//! The hold term KL(teacher || student) computed through the LM head in chunks of positions.
//!
//! Done plainly it needs the student's (B, T, V) f32 logits, their log-softmax and the
//! teacher's, all alive for the backward pass: 8.4 GB per copy for a 128k vocabulary at 16k
//! tokens. Here the op takes the final normed hidden states (B, T, D) and the head W (V, D);
//! forward and backward walk chunks of rows, so one chunk's (rows, V) f32 tensors exist at a
//! time. With p = softmax(logits / tau) and the loss scaled by tau^2 / (B T) (Hinton et al.),
//!
//!   d loss / d logits_s = tau / (B T) * (p_s - p_t),   d h_s = (d logits_s) W.

use super::{acc, Given};
use candle_core::{CustomOp2, DType, Tensor, D};

type CResult<T> = candle_core::Result<T>;

/// Rows per chunk so that one chunk's f32 logits stay near 256 MiB.
fn chunk_rows(vocab: usize) -> usize {
    ((64usize << 20) / vocab.max(1)).max(16)
}

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
        let k = (g.to_dtype(DType::F64)?.to_scalar::<f64>()? * self.tau / rows as f64) as f32;
        let step = self.rows_per_chunk;
        let mut parts = vec![];
        for r0 in (0..rows).step_by(step) {
            let n = step.min(rows - r0);
            let ps = log_probs(&hs, &w, r0, n, self.tau)?.exp()?;
            let pt = log_probs(&ht, &w, r0, n, self.tau)?.exp()?;
            let dlogits = ((ps - pt)? * k as f64)?.to_dtype(h.dtype())?; // (n, V)
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
    kl_chunked(h_student, h_teacher, w, tau, chunk_rows(w.dim(0)?))
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
