//! SwiGLU `a = silu(g) * u`, the LLaMA MLP's gate, as one op.
//!
//! Composed from candle ops its backward costs a dozen full passes over (B, T, ffn) tensors
//! (candle's silu backward is five kernels, and every graph edge adds a zero-fill and an add);
//! here it is one kernel each way on CUDA (bf16), with, for s = sigmoid(g),
//!
//!   du = dy silu(g),   dg = dy u s (1 + g (1 - s)).

use super::Given;
use candle_core::{CustomOp2, Tensor};

type CResult<T> = candle_core::Result<T>;

#[cfg(feature = "cuda")]
fn use_kernel(g: &Tensor) -> bool {
    g.device().is_cuda()
        && g.dtype() == candle_core::DType::BF16
        && g.elem_count().is_multiple_of(2)
}

/// The forward from detached, same-shaped g and u.
pub fn forward(g: &Tensor, u: &Tensor) -> CResult<Tensor> {
    #[cfg(feature = "cuda")]
    if use_kernel(g) {
        return g
            .contiguous()?
            .apply_op2_no_bwd(&u.contiguous()?, &kernels::Fwd);
    }
    g.silu()? * u
}

/// (dg, du) from g, u and the output gradient dy.
pub fn backward(g: &Tensor, u: &Tensor, dy: &Tensor) -> CResult<(Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if use_kernel(g) {
        let both = g.contiguous()?.apply_op3_no_bwd(
            &u.contiguous()?,
            &dy.to_dtype(g.dtype())?.contiguous()?,
            &kernels::Bwd,
        )?; // (2, ...g)
        return Ok((both.get(0)?, both.get(1)?));
    }
    let s = candle_nn::ops::sigmoid(g)?;
    let silu = (g * &s)?;
    let du = (dy * &silu)?;
    let dg = ((dy * u)? * (&s * ((g * (1.0 - &s)?)? + 1.0)?)?)?;
    Ok((dg, du))
}

struct SwigluOp {
    out: Given,
}

impl CustomOp2 for SwigluOp {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    super::given_forward!(a: la, b: lb);

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _a: &Tensor,
        dy: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let (dg, du) = backward(&g.detach(), &u.detach(), dy)?;
        Ok((Some(dg), Some(du)))
    }
}

/// silu(g) * u, differentiable in both; g and u of one shape and dtype.
pub fn swiglu(g: &Tensor, u: &Tensor) -> CResult<Tensor> {
    if g.dims() != u.dims() {
        candle_core::bail!("swiglu: gate {:?} and up {:?} differ", g.dims(), u.dims());
    }
    let a = forward(&g.detach(), &u.detach())?;
    if !(g.track_op() || u.track_op()) {
        return Ok(a);
    }
    g.apply_op2(u, SwigluOp { out: Given::new(a) })
}

#[cfg(feature = "cuda")]
mod kernels {
    use crate::ops::cuda;
    use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
    use candle_core::cuda_backend::{CudaStorage, WrapErr};
    use candle_core::{CustomOp2, CustomOp3, Layout, Shape};

    type CResult<T> = candle_core::Result<T>;

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/swiglu.ptx"));

    pub struct Fwd;
    pub struct Bwd;

    impl CustomOp2 for Fwd {
        fn name(&self) -> &'static str {
            "swiglu-fwd-kernel"
        }

        cuda::cuda_only!(a: la, b: lb);

        fn cuda_fwd(
            &self,
            g: &CudaStorage,
            lg: &Layout,
            u: &CudaStorage,
            lu: &Layout,
        ) -> CResult<(CudaStorage, Shape)> {
            let dev = cuda::device_of(g);
            let n = lg.shape().elem_count();
            let (gv, uv) = (
                cuda::view::<half::bf16>(g, lg)?,
                cuda::view::<half::bf16>(u, lu)?,
            );
            let a = cuda::alloc_bf16(&dev, n)?;
            let f = cuda::func(&dev, "eabfit_swiglu", PTX, "eab_swiglu_fwd_bf16")?;
            let stream = dev.cuda_stream();
            let mut l = stream.launch_builder(&f);
            let n64 = n as i64;
            l.arg(&gv).arg(&uv).arg(&a).arg(&n64);
            unsafe { l.launch(cuda::elementwise_cfg(n)) }.w()?;
            Ok((CudaStorage::wrap_cuda_slice(a, dev), lg.shape().clone()))
        }
    }

    impl CustomOp3 for Bwd {
        fn name(&self) -> &'static str {
            "swiglu-bwd-kernel"
        }

        cuda::cuda_only!(a: la, b: lb, c: lc);

        fn cuda_fwd(
            &self,
            g: &CudaStorage,
            lg: &Layout,
            u: &CudaStorage,
            lu: &Layout,
            dy: &CudaStorage,
            ld: &Layout,
        ) -> CResult<(CudaStorage, Shape)> {
            let dev = cuda::device_of(g);
            let n = lg.shape().elem_count();
            let (gv, uv, dv) = (
                cuda::view::<half::bf16>(g, lg)?,
                cuda::view::<half::bf16>(u, lu)?,
                cuda::view::<half::bf16>(dy, ld)?,
            );
            let out = cuda::alloc_bf16(&dev, 2 * n)?; // dg then du
            {
                let (dg, du) = (out.slice(..n), out.slice(n..));
                let f = cuda::func(&dev, "eabfit_swiglu", PTX, "eab_swiglu_bwd_bf16")?;
                let stream = dev.cuda_stream();
                let mut l = stream.launch_builder(&f);
                let n64 = n as i64;
                l.arg(&gv).arg(&uv).arg(&dv).arg(&dg).arg(&du).arg(&n64);
                unsafe { l.launch(cuda::elementwise_cfg(n)) }.w()?;
            }
            let mut dims = vec![2];
            dims.extend_from_slice(lg.dims());
            Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(dims)))
        }
    }
}
