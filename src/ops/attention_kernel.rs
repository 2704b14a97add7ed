//! The fused attention kernels of `attention.cu` launched on candle's CUDA device (bf16,
//! head_dim 64 or 128): the forward keeps the output and the row log-sum-exp, the backward
//! recomputes P tile by tile.

use super::Plan;
use crate::ops::cuda;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, LaunchArgs, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, WrapErr};
use candle_core::{CpuStorage, CustomOp3, DType, InplaceOp1, Layout, Shape, Tensor};
use half::bf16;

type CResult<T> = candle_core::Result<T>;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/attention.ptx"));
/// "No window" for the kernels: larger than any position they will see.
const NO_WINDOW: i32 = 1 << 30;

pub fn supported(q: &Tensor) -> bool {
    q.device().is_cuda() && q.dtype() == DType::BF16 && matches!(q.dims().last(), Some(64 | 128))
}

/// The mask and shape arguments every kernel takes after its tensors.
struct Args {
    h: i32,
    kv: i32,
    t: i32,
    s: i32,
    slots: i32,
    past: i32,
    window: i32,
    hide_first: i32,
    scale_log2: f32,
    scale: f32,
    hd: usize,
    b: usize,
}

impl Args {
    fn new(p: &Plan, spec: &super::Spec) -> CResult<Self> {
        let int = |x: usize| {
            i32::try_from(x)
                .map_err(|_| candle_core::Error::Msg(format!("attention: {x} overflows i32")))
        };
        Ok(Self {
            h: int(p.h)?,
            kv: int(p.kv)?,
            t: int(p.t)?,
            s: int(p.s)?,
            slots: int(p.slots)?,
            past: int(p.past)?,
            window: spec
                .window
                .map_or(Ok(NO_WINDOW), |w| int(w.min(NO_WINDOW as usize)))?,
            hide_first: spec.hide_first as i32,
            scale_log2: (p.scale * std::f64::consts::LOG2_E) as f32,
            scale: p.scale as f32,
            hd: p.hd,
            b: p.b,
        })
    }

    /// Pushes the arguments every kernel takes after its tensors: shapes, mask, log2 scale.
    fn push<'a>(&'a self, l: &mut LaunchArgs<'a>) {
        l.arg(&self.h).arg(&self.kv).arg(&self.t).arg(&self.s);
        l.arg(&self.slots).arg(&self.past).arg(&self.window);
        l.arg(&self.hide_first).arg(&self.scale_log2);
    }

    fn func(&self, dev: &CudaDevice, kind: &str) -> CResult<CudaFunction> {
        cuda::func(
            dev,
            "eabfit_attention",
            PTX,
            &format!("eab_attn_{kind}_{}", self.hd),
        )
    }
}

/// Forward kernel as a custom op over (q, k, v): returns the output and fills `lse`.
struct Fwd {
    args: Args,
    lse: Tensor,
}

impl CustomOp3 for Fwd {
    fn name(&self) -> &'static str {
        "eab-attention-fwd"
    }

    cuda::cuda_only!(a: la, b: lb, c: lc);

    fn cuda_fwd(
        &self,
        q: &CudaStorage,
        lq: &Layout,
        k: &CudaStorage,
        lk: &Layout,
        v: &CudaStorage,
        lv: &Layout,
    ) -> CResult<(CudaStorage, Shape)> {
        let a = &self.args;
        let dev = q.device().clone();
        let (ls, ll) = self.lse.storage_and_layout();
        let lse = cuda::storage(&ls)?
            .as_cuda_slice::<f32>()?
            .slice(ll.start_offset()..);
        let qv = q.as_cuda_slice::<bf16>()?.slice(lq.start_offset()..);
        let kv = k.as_cuda_slice::<bf16>()?.slice(lk.start_offset()..);
        let vv = v.as_cuda_slice::<bf16>()?.slice(lv.start_offset()..);
        let (t, h, hd) = (a.t as usize, a.h as usize, a.hd);
        let shape = Shape::from((a.b, t, h, hd)); // (B, T, H, hd)
                                                  // Every element is written by the kernel.
        let out = unsafe { dev.alloc::<bf16>(shape.elem_count())? };
        let func = a.func(&dev, "fwd")?;
        let stream = dev.cuda_stream();
        let mut l = stream.launch_builder(&func);
        l.arg(&qv).arg(&kv).arg(&vv).arg(&out).arg(&lse);
        a.push(&mut l);
        let cfg = LaunchConfig {
            grid_dim: (t.div_ceil(64) as u32, (a.b * h) as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { l.launch(cfg) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev), shape))
    }
}

/// q: (B, H, T, hd), k, v: (B, KV, S, hd), contiguous bf16 -> (output (B, T, H, hd),
/// base-2 log-sum-exp (B, H, T) f32).
pub fn forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    p: &Plan,
    spec: &super::Spec,
) -> CResult<(Tensor, Tensor)> {
    let lse = Tensor::zeros((p.b, p.h, p.t), DType::F32, q.device())?;
    let op = Fwd {
        args: Args::new(p, spec)?,
        lse: lse.clone(),
    };
    let out = q.apply_op3_no_bwd(k, v, &op)?;
    Ok((out, lse))
}

/// Backward kernels as an in-place op on the f32 dQ buffer, which they fill with
/// atomics; dK and dV are written whole.
struct Bwd {
    args: Args,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    d_out: Tensor,
    lse: Tensor,
    dk: Tensor,
    dv: Tensor,
}

impl InplaceOp1 for Bwd {
    fn name(&self) -> &'static str {
        "eab-attention-bwd"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> CResult<()> {
        candle_core::bail!("attention kernel: CUDA only")
    }

    fn cuda_fwd(&self, dq: &mut CudaStorage, ldq: &Layout) -> CResult<()> {
        let a = &self.args;
        let guards = [
            &self.q,
            &self.k,
            &self.v,
            &self.out,
            &self.d_out,
            &self.dk,
            &self.dv,
        ]
        .map(|t| t.storage_and_layout());
        let mut views = vec![];
        for (s, l) in &guards {
            views.push(
                cuda::storage(s)?
                    .as_cuda_slice::<bf16>()?
                    .slice(l.start_offset()..),
            );
        }
        let [qv, kv, vv, ov, dov, dkv, dvv] = &views[..] else {
            unreachable!("seven tensors in, seven views out")
        };
        let (ls, ll) = self.lse.storage_and_layout();
        let lse = cuda::storage(&ls)?
            .as_cuda_slice::<f32>()?
            .slice(ll.start_offset()..);
        let dev = dq.device().clone();
        let dqv = dq.as_cuda_slice::<f32>()?.slice(ldq.start_offset()..);
        let rows = a.b * a.t as usize * a.h as usize;
        let delta = unsafe { dev.alloc::<f32>(rows)? };
        let (b, t, h) = (a.b as i32, a.t, a.h);
        let stream = dev.cuda_stream();
        let func = a.func(&dev, "delta")?;
        let mut l = stream.launch_builder(&func);
        l.arg(ov).arg(dov).arg(&delta).arg(&b).arg(&h).arg(&t);
        let cfg = LaunchConfig {
            grid_dim: (rows.div_ceil(4) as u32, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { l.launch(cfg) }.w()?;
        let func = a.func(&dev, "bwd")?;
        let mut l = stream.launch_builder(&func);
        l.arg(qv)
            .arg(kv)
            .arg(vv)
            .arg(dov)
            .arg(&lse)
            .arg(&delta)
            .arg(&dqv);
        l.arg(dkv).arg(dvv);
        a.push(&mut l);
        l.arg(&a.scale);
        let cfg = LaunchConfig {
            grid_dim: (
                (a.s as usize).div_ceil(64) as u32,
                (a.b * a.kv as usize) as u32,
                1,
            ),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { l.launch(cfg) }.w()?;
        Ok(())
    }
}

/// Gradients (dq (B, H, T, hd), dk, dv (B, KV, S, hd)) of the fused forward, from its
/// inputs, output (B, T, H, hd), log-sum-exp and the output gradient.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    d_out: &Tensor,
    lse: &Tensor,
    p: &Plan,
    spec: &super::Spec,
) -> CResult<(Tensor, Tensor, Tensor)> {
    let dev = q.device();
    let dq = Tensor::zeros((p.b, p.h, p.t, p.hd), DType::F32, dev)?;
    let dk = Tensor::zeros((p.b, p.kv, p.s, p.hd), DType::BF16, dev)?;
    let dv = Tensor::zeros((p.b, p.kv, p.s, p.hd), DType::BF16, dev)?;
    dq.inplace_op1(&Bwd {
        args: Args::new(p, spec)?,
        q: q.contiguous()?,
        k: k.contiguous()?,
        v: v.contiguous()?,
        out: out.contiguous()?,
        d_out: d_out.to_dtype(DType::BF16)?.contiguous()?,
        lse: lse.clone(),
        dk: dk.clone(),
        dv: dv.clone(),
    })?;
    Ok((dq.to_dtype(DType::BF16)?, dk, dv))
}
