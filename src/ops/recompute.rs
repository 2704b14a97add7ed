//! Activation recomputation: a function's forward keeps nothing but its inputs for the backward
//! pass, which runs the function again with a graph and backpropagates through that.
//!
//! Applied per decoder block it trades one more forward of the student (a third more FLOPs per
//! step with a frozen teacher) for memory: only the block inputs (B, T, D) stay alive between
//! the forward and the backward pass. The trainable tensors the function reads (a layer's EAB
//! slot) are passed as inputs so that their gradients leave the op; a function reading other
//! trainable tensors (LoRA) must not be wrapped, its gradients would be lost.

use super::Given;
use candle_core::{CustomOp1, CustomOp3, Tensor, Var};
use std::sync::Arc;

type CResult<T> = candle_core::Result<T>;

pub type BlockFn = Arc<dyn Fn(&Tensor) -> CResult<Tensor> + Send + Sync>;

struct Recompute {
    f: BlockFn,
    out: Given,
}

impl Recompute {
    /// d(sum(f(x) * g)) with respect to x and each of `params`.
    fn grads(&self, x: &Tensor, params: &[&Tensor], g: &Tensor) -> CResult<Vec<Option<Tensor>>> {
        let xv = Var::from_tensor(&x.detach())?;
        let y = (self.f)(xv.as_tensor())?;
        let gs = (y * g.detach())?.sum_all()?.backward()?;
        let mut out = vec![gs.get(xv.as_tensor()).cloned()];
        out.extend(params.iter().map(|p| gs.get(p).cloned()));
        Ok(out)
    }
}

impl CustomOp1 for Recompute {
    fn name(&self) -> &'static str {
        "recompute"
    }
    super::given_forward!(x: lx);
    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> CResult<Option<Tensor>> {
        Ok(self.grads(x, &[], g)?.remove(0))
    }
}

impl CustomOp3 for Recompute {
    fn name(&self) -> &'static str {
        "recompute"
    }
    super::given_forward!(a: la, b: lb, c: lc);
    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let mut v = self.grads(x, &[a, b], g)?.into_iter();
        Ok((v.next().flatten(), v.next().flatten(), v.next().flatten()))
    }
}

/// `f(x)` with recomputation in the backward pass. `params`: none, or the two trainable tensors
/// `f` reads (they must be the very tensors `f` uses, so that their gradients can be found).
pub fn recompute(f: BlockFn, x: &Tensor, params: &[Tensor]) -> CResult<Tensor> {
    let y = f(&x.detach())?.detach();
    let tracked = x.track_op() || params.iter().any(Tensor::track_op);
    if !tracked {
        return Ok(y);
    }
    let op = Recompute {
        f,
        out: Given::new(y),
    };
    match params {
        [] => x.apply_op1(op),
        [a, b] => x.apply_op3(a, b, op),
        _ => candle_core::bail!(
            "recompute takes no or two parameter tensors, got {}",
            params.len()
        ),
    }
}
