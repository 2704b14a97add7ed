//! RMSNorm `y = x / sqrt(mean(x^2) + eps) * w` with a backward that keeps nothing but x.
//!
//! The composite form keeps four f32 copies of x per norm for the backward pass (the cast, its
//! square, the normalised value and the product): tens of GiB for a 7B model at batch 4. The
//! forward here is candle's fused kernel (f32 accumulation inside); the backward recomputes
//! r = 1/rms(x) and, with g = dy * w,
//!
//!   dx = r * (g - x * r^2 * mean(g * x)),   dw = sum over rows of dy * x * r.

use super::{acc, Given};
use candle_core::{CustomOp2, DType, Tensor, D};

type CResult<T> = candle_core::Result<T>;

/// The forward from detached tensors; f64 (no fused kernel) is composed from basic ops.
fn forward(x: &Tensor, w: &Tensor, eps: f64) -> CResult<Tensor> {
    if x.dtype() == DType::F64 {
        let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
        return x.broadcast_mul(&r)?.broadcast_mul(w);
    }
    candle_nn::ops::rms_norm(&x.contiguous()?, w, eps as f32)
}

struct RmsNormOp {
    out: Given,
    eps: f64,
}

impl CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    super::given_forward!(a: la, b: lb);

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let ac = acc(x.dtype());
        let (xf, dyf, wf) = (
            x.detach().to_dtype(ac)?,
            dy.to_dtype(ac)?,
            w.detach().to_dtype(ac)?,
        );
        let r = (xf.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?
            .sqrt()?
            .recip()?; // (..., 1)
        let g = dyf.broadcast_mul(&wf)?;
        let proj = (&g * &xf)?.mean_keepdim(D::Minus1)?; // (..., 1)
        let dx = (g - xf.broadcast_mul(&(r.sqr()? * proj)?)?)?.broadcast_mul(&r)?;
        let dw = if w.track_op() {
            let d = wf.dim(0)?;
            let dw = (dyf * xf.broadcast_mul(&r)?)?.reshape(((), d))?.sum(0)?;
            Some(dw.to_dtype(w.dtype())?)
        } else {
            None
        };
        Ok((Some(dx.to_dtype(x.dtype())?), dw))
    }
}

/// x: (..., D), w: (D) of x's dtype -> (..., D).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> CResult<Tensor> {
    let y = forward(&x.detach(), &w.detach(), eps)?;
    if !(x.track_op() || w.track_op()) {
        return Ok(y);
    }
    x.apply_op2(
        w,
        RmsNormOp {
            out: Given::new(y),
            eps,
        },
    )
}
