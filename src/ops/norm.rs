//! RMSNorm `y = x / sqrt(mean(x^2) + eps) * w` with a backward that keeps nothing but x.
//!
//! The composite form keeps four f32 copies of x per norm for the backward pass (the cast, its
//! square, the normalised value and the product): tens of GiB for a 7B model at batch 4. The
//! forward here is candle's fused kernel (f32 accumulation inside); the backward recomputes
//! r = 1/rms(x) (one kernel of `norm.cu` on CUDA for bf16) and, with g = dy * w,
//!
//!   dx = r * (g - x * r^2 * mean(g * x)),   dw = sum over rows of dy * x * r.

use super::{acc, Given};
use candle_core::{CustomOp2, DType, Tensor, D};

type CResult<T> = candle_core::Result<T>;

/// The forward from detached tensors; f64 (no fused kernel) is composed from basic ops.
pub fn forward(x: &Tensor, w: &Tensor, eps: f64) -> CResult<Tensor> {
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
        let train_w = w.track_op();
        let (x, w) = (x.detach(), w.detach());
        let dw = if train_w {
            Some(backward_dw(&x, &w, dy, self.eps)?)
        } else {
            None
        };
        Ok((Some(backward_dx(&x, &w, dy, self.eps)?), dw))
    }
}

/// 1/rms(x) (..., 1) in the accumulation dtype, and x, dy, w cast to it.
fn recompute(x: &Tensor, w: &Tensor, dy: &Tensor, eps: f64) -> CResult<[Tensor; 4]> {
    let ac = acc(x.dtype());
    let (xf, dyf, wf) = (x.to_dtype(ac)?, dy.to_dtype(ac)?, w.to_dtype(ac)?);
    let r = (xf.sqr()?.mean_keepdim(D::Minus1)? + eps)?
        .sqrt()?
        .recip()?; // (..., 1)
    Ok([r, xf, dyf, wf])
}

/// dx of RMSNorm from detached x, w and the output gradient dy: one kernel on CUDA (bf16).
pub fn backward_dx(x: &Tensor, w: &Tensor, dy: &Tensor, eps: f64) -> CResult<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda()
        && x.dtype() == DType::BF16
        && w.dtype() == DType::BF16
        && x.dim(D::Minus1)?.is_multiple_of(2)
    {
        return kernel::backward_dx(x, w, dy, eps);
    }
    let [r, xf, dyf, wf] = recompute(x, w, dy, eps)?;
    let g = dyf.broadcast_mul(&wf)?;
    let proj = (&g * &xf)?.mean_keepdim(D::Minus1)?; // (..., 1)
    let dx = (g - xf.broadcast_mul(&(r.sqr()? * proj)?)?)?.broadcast_mul(&r)?;
    dx.to_dtype(x.dtype())
}

/// dw of RMSNorm (pretraining trains the norms): the sum over rows of dy * x / rms(x).
/// One kernel on CUDA (bf16). Composed, its f32 copies, product and column sum over (B T)
/// rows were most of the `cast`, `bmul` and `fast_sum` kernels in an ncu profile of a 143 ms
/// pretraining step (about 40 ms); with the kernel the step's wall time fell by 38 ms.
pub fn backward_dw(x: &Tensor, w: &Tensor, dy: &Tensor, eps: f64) -> CResult<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && x.dtype() == DType::BF16 && w.dtype() == DType::BF16 {
        return kernel::backward_dw(x, w, dy, eps);
    }
    let [r, xf, dyf, wf] = recompute(x, w, dy, eps)?;
    let d = wf.dim(0)?;
    let dw = (dyf * xf.broadcast_mul(&r)?)?.reshape(((), d))?.sum(0)?;
    dw.to_dtype(w.dtype())
}

#[cfg(feature = "cuda")]
mod kernel {
    use crate::ops::cuda;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaStorage, WrapErr};
    use candle_core::{CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, D};

    type CResult<T> = candle_core::Result<T>;

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/norm.ptx"));

    struct Bwd {
        eps: f32,
    }

    impl CustomOp3 for Bwd {
        fn name(&self) -> &'static str {
            "rms-norm-bwd-kernel"
        }

        cuda::cuda_only!(a: la, b: lb, c: lc);

        fn cuda_fwd(
            &self,
            x: &CudaStorage,
            lx: &Layout,
            w: &CudaStorage,
            lw: &Layout,
            dy: &CudaStorage,
            ld: &Layout,
        ) -> CResult<(CudaStorage, Shape)> {
            let dev = cuda::device_of(x);
            let n = lx.shape().elem_count();
            let d = lw.shape().elem_count();
            let (xv, wv, dv) = (
                cuda::view::<half::bf16>(x, lx)?,
                cuda::view::<half::bf16>(w, lw)?,
                cuda::view::<half::bf16>(dy, ld)?,
            );
            let dx = cuda::alloc_bf16(&dev, n)?;
            let f = cuda::func(&dev, "eabfit_norm", PTX, "eab_rmsnorm_bwd_bf16")?;
            let stream = dev.cuda_stream();
            let mut l = stream.launch_builder(&f);
            let d32 = d as i32;
            l.arg(&xv)
                .arg(&wv)
                .arg(&dv)
                .arg(&dx)
                .arg(&d32)
                .arg(&self.eps);
            let cfg = LaunchConfig {
                grid_dim: ((n / d) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            unsafe { l.launch(cfg) }.w()?;
            Ok((CudaStorage::wrap_cuda_slice(dx, dev), lx.shape().clone()))
        }
    }

    struct Dw {
        eps: f32,
    }

    impl CustomOp2 for Dw {
        fn name(&self) -> &'static str {
            "rms-norm-dw-kernel"
        }

        cuda::cuda_only!(a: la, b: lb);

        fn cuda_fwd(
            &self,
            x: &CudaStorage,
            lx: &Layout,
            dy: &CudaStorage,
            ld: &Layout,
        ) -> CResult<(CudaStorage, Shape)> {
            let dev = cuda::device_of(x);
            let d = lx.dims()[lx.dims().len() - 1];
            let rows = lx.shape().elem_count() / d;
            let (xv, dv) = (
                cuda::view::<half::bf16>(x, lx)?,
                cuda::view::<half::bf16>(dy, ld)?,
            );
            let dw = dev.alloc_zeros::<f32>(d)?;
            let f = cuda::func(&dev, "eabfit_norm", PTX, "eab_rmsnorm_dw_bf16")?;
            let stream = dev.cuda_stream();
            let mut l = stream.launch_builder(&f);
            let (rows64, d32) = (rows as i64, d as i32);
            l.arg(&xv)
                .arg(&dv)
                .arg(&dw)
                .arg(&rows64)
                .arg(&d32)
                .arg(&self.eps);
            // 32 rows a block, as DW_ROWS in norm.cu.
            let cfg = LaunchConfig {
                grid_dim: (rows.div_ceil(32) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            unsafe { l.launch(cfg) }.w()?;
            Ok((CudaStorage::wrap_cuda_slice(dw, dev), Shape::from(d)))
        }
    }

    pub fn backward_dw(x: &Tensor, w: &Tensor, dy: &Tensor, eps: f64) -> CResult<Tensor> {
        if x.dim(D::Minus1)? != w.elem_count() || dy.dims() != x.dims() {
            candle_core::bail!(
                "rms-norm: x {:?}, weight {:?}, dy {:?} do not fit",
                x.dims(),
                w.dims(),
                dy.dims()
            );
        }
        x.contiguous()?
            .apply_op2_no_bwd(
                &dy.to_dtype(DType::BF16)?.contiguous()?,
                &Dw { eps: eps as f32 },
            )?
            .to_dtype(w.dtype())
    }

    pub fn backward_dx(x: &Tensor, w: &Tensor, dy: &Tensor, eps: f64) -> CResult<Tensor> {
        if x.dim(D::Minus1)? != w.elem_count() {
            candle_core::bail!(
                "rms-norm: x {:?} and weight {:?} differ",
                x.dims(),
                w.dims()
            );
        }
        x.contiguous()?.apply_op3_no_bwd(
            &w.contiguous()?,
            &dy.to_dtype(DType::BF16)?.contiguous()?,
            &Bwd { eps: eps as f32 },
        )
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
