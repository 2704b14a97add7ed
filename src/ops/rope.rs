//! Rotate-half rotary embedding (the Hugging Face layout): `y = x cos + rotate_half(x) sin`.
//!
//! A rotation's adjoint is its inverse, the rotation by the negative angle, so the backward is
//! the forward kernel again with `-sin`: `dx = dy cos - rotate_half(dy sin)` (the two halves of
//! a head share their frequencies). Both directions run candle's fused kernel, which has no
//! backward of its own.

use super::Given;
use candle_core::{CustomOp1, Tensor};

type CResult<T> = candle_core::Result<T>;

struct RopeOp {
    out: Given,
    cos: Tensor,
    sin: Tensor,
}

impl CustomOp1 for RopeOp {
    fn name(&self) -> &'static str {
        "rope"
    }

    super::given_forward!(x: lx);

    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> CResult<Option<Tensor>> {
        Ok(Some(backward(dy, &self.cos, &self.sin)?))
    }
}

/// The input gradient of [`rope`] from the output gradient dy (B, H, T, hd): the inverse
/// rotation.
pub fn backward(dy: &Tensor, cos: &Tensor, sin: &Tensor) -> CResult<Tensor> {
    candle_nn::rotary_emb::rope(&dy.contiguous()?, cos, &sin.neg()?)
}

/// x: (B, H, T, hd); cos, sin: (T, hd/2) of x's dtype, the angles of positions 0..T.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> CResult<Tensor> {
    let y = candle_nn::rotary_emb::rope(&x.detach().contiguous()?, cos, sin)?;
    if !x.track_op() {
        return Ok(y);
    }
    x.apply_op1(RopeOp {
        out: Given::new(y),
        cos: cos.clone(),
        sin: sin.clone(),
    })
}
