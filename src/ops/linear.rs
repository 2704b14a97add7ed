//! `y = x W^T` for a frozen `W`: the backward returns the input gradient only.
//!
//! candle's matmul backward also computes `x^T dy`, a weight-sized gradient nobody reads: 2N
//! FLOPs per token and one weight-sized buffer per projection until the step ends. This op runs
//! the same GEMM forward (cuBLAS on CUDA) and skips that half of the backward, unless the weight
//! itself is being trained (pretraining), which it detects from the weight tensor.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};

type CResult<T> = candle_core::Result<T>;

struct FrozenLinear;

/// (M, K) x (N, K) -> the matmul's (b, m, n, k) and the layout of W^T.
fn plan(lx: &Layout, lw: &Layout) -> CResult<((usize, usize, usize, usize), Layout)> {
    let (m, k) = lx.shape().dims2()?;
    let (n, kw) = lw.shape().dims2()?;
    if k != kw {
        candle_core::bail!("linear: input has {k} features, weight expects {kw}");
    }
    Ok(((1, m, n, k), lw.transpose(0, 1)?))
}

impl CustomOp2 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (bmnk, lwt) = plan(lx, lw)?;
        Ok((x.matmul(w, bmnk, lx, &lwt)?, Shape::from((bmnk.1, bmnk.2))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        lx: &Layout,
        w: &candle_core::CudaStorage,
        lw: &Layout,
    ) -> CResult<(candle_core::CudaStorage, Shape)> {
        let (bmnk, lwt) = plan(lx, lw)?;
        Ok((x.matmul(w, bmnk, lx, &lwt)?, Shape::from((bmnk.1, bmnk.2))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let dx = dy.matmul(w)?; // (M, N) x (N, K) -> (M, K)
        let dw = if w.track_op() {
            Some(dy.t()?.matmul(x)?) // (N, M) x (M, K) -> (N, K)
        } else {
            None
        };
        Ok((Some(dx), dw))
    }
}

/// x: (M, K), w: (N, K) -> (M, N). Both of one dtype; x contiguous for the GEMM.
pub fn linear(x: &Tensor, w: &Tensor) -> CResult<Tensor> {
    if !x.track_op() {
        // Nothing upstream is trained: a plain GEMM records no graph either.
        return x.matmul(&w.t()?);
    }
    x.contiguous()?.apply_op2(w, FrozenLinear)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn forward_and_input_gradient_match_matmul() -> CResult<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, (5, 7), &dev)?)?;
        let w = Tensor::randn(0f64, 1.0, (3, 7), &dev)?;
        let dy = Tensor::randn(0f64, 1.0, (5, 3), &dev)?;
        let y = linear(x.as_tensor(), &w)?;
        let y_ref = x.as_tensor().matmul(&w.t()?)?;
        let diff = (&y - &y_ref)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(diff < 1e-12, "forward differs by {diff}");
        let g = (y * &dy)?.sum_all()?.backward()?;
        let g_ref = (y_ref * &dy)?.sum_all()?.backward()?;
        let gx = g.get(x.as_tensor()).expect("x gradient");
        let gx_ref = g_ref.get(x.as_tensor()).expect("x gradient");
        let diff = (gx - gx_ref)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(diff < 1e-12, "input gradient differs by {diff}");
        assert!(g.get(&w).is_none());
        Ok(())
    }
}
