//! A projection's output between the GEMM layout (B*T, n*hd) and the attention layout
//! (B, n, S, hd), S = slots + T, with the rotary embedding and the EAB slot folded in.
//!
//! Through candle a head split is a strided copy, and its strided-copy kernel moved LLaMA-2-7B's
//! 64 MiB q at 4 x 2048 tokens in 342 us, as long as the 4096 x 4096 projection that made it;
//! the block op did seven such copies per layer (the q, k, v transposes, and the slot's
//! concatenation copied k and v twice more): 77 ms of a 278 ms forward. Here each direction is
//! one pass at memory speed on CUDA (bf16), and the composite everywhere else.
//!
//!   split: rows of (B*T, n*hd) -> (B, n, S, hd), RoPE applied, row 0 the slot when given;
//!   merge: rows slots..S of (B, n, S, hd) -> (B*T, n*hd), RoPE inverted (the adjoint of split).
//!
//! Qwen's projections add two steps before RoPE, folded in the same way ([`Pre`]): a bias
//! (Qwen2's q/k/v) and an RMSNorm over each head's row (Qwen3's q_norm / k_norm). Merge then
//! also runs that norm's backward, from the pre-norm rows the forward kept.

use candle_core::Tensor;

type CResult<T> = candle_core::Result<T>;

/// The rotary tables (T, hd/2) of positions 0..T in the projection's dtype.
pub type Rope<'a> = Option<(&'a Tensor, &'a Tensor)>;

/// What happens to a projection's rows before RoPE: `bias` (n*hd) added, then each head's row
/// RMS-normed with `norm` = (weight (hd), eps).
#[derive(Debug, Clone, Copy, Default)]
pub struct Pre<'a> {
    pub bias: Option<&'a Tensor>,
    pub norm: Option<(&'a Tensor, f64)>,
}

/// The norm of [`Pre`] as merge's backward needs it: the pre-norm rows u (B*T, n*hd) that the
/// forward normed (bias included), the weight (hd) and eps.
pub type NormGrad<'a> = Option<(&'a Tensor, &'a Tensor, f64)>;

/// x (B*T, n*hd) plus the bias of `pre`: the rows the norm of `pre` reads (what merge's
/// [`NormGrad`] wants back).
pub fn biased(x: &Tensor, pre: Pre) -> CResult<Tensor> {
    match pre.bias {
        Some(bias) => x.broadcast_add(&bias.to_dtype(x.dtype())?),
        None => Ok(x.clone()),
    }
}

#[cfg(feature = "cuda")]
fn use_kernel(x: &Tensor, hd: usize, rope: Rope, extra: &[&Tensor]) -> bool {
    let even = |t: &Tensor| t.is_contiguous() && t.layout().start_offset() % 2 == 0;
    let bf16 = |t: &Tensor| t.dtype() == candle_core::DType::BF16 && even(t);
    x.device().is_cuda()
        && bf16(x)
        && hd % 4 == 0
        && rope.is_none_or(|(c, s)| bf16(c) && bf16(s))
        && extra.iter().all(|t| bf16(t))
}

/// x (B*T, n*hd) -> (B, n, slots + T, hd), through `pre` and RoPE; `slot` (n, hd), any float
/// dtype, becomes key row 0 as it is. Not differentiable: the block op calls it on detached
/// tensors.
pub fn split(
    x: &Tensor,
    b: usize,
    n: usize,
    rope: Rope,
    slot: Option<&Tensor>,
    pre: Pre,
) -> CResult<Tensor> {
    let (rows, cols) = x.dims2()?;
    if b == 0 || rows % b != 0 || n == 0 || cols % n != 0 {
        candle_core::bail!("heads: {rows} x {cols} does not split into {b} sequences of {n} heads");
    }
    let (t, hd) = (rows / b, cols / n);
    let slot = slot.map(|s| s.to_dtype(x.dtype())).transpose()?;
    let bias = pre.bias.map(|v| v.to_dtype(x.dtype())).transpose()?;
    let norm = pre
        .norm
        .map(|(w, eps)| w.to_dtype(x.dtype()).map(|w| (w, eps)))
        .transpose()?;
    #[cfg(feature = "cuda")]
    {
        let extra: Vec<&Tensor> = bias.iter().chain(norm.iter().map(|(w, _)| w)).collect();
        if use_kernel(x, hd, rope, &extra) {
            let op = kernels::Split {
                b,
                t,
                n,
                hd,
                rope: rope.map(|(c, s)| (c.clone(), s.clone())),
                slot: slot.map(|s| s.contiguous()).transpose()?,
                bias: bias.clone(),
                norm: norm.clone(),
            };
            return x.apply_op1_no_bwd(&op);
        }
    }
    let x = match &bias {
        Some(bias) => x.broadcast_add(bias)?,
        None => x.clone(),
    };
    let x = x.reshape((b, t, n, hd))?; // (B, T, n, hd)
    let x = match &norm {
        Some((w, eps)) => super::norm::forward(&x, w, *eps)?,
        None => x,
    };
    let y = x.transpose(1, 2)?.contiguous()?; // (B, n, T, hd)
    let y = match rope {
        Some((c, s)) => super::rope::rope(&y, c, s)?,
        None => y,
    };
    match slot {
        Some(s) => {
            let lead = s
                .reshape((1, n, 1, hd))?
                .broadcast_as((b, n, 1, hd))?
                .contiguous()?;
            Tensor::cat(&[&lead, &y], 2) // (B, n, 1+T, hd)
        }
        None => Ok(y),
    }
}

/// g (B, n, slots + T, hd) -> (B*T, n*hd) from rows slots.., through the inverse rotation and,
/// when `norm` is given, the backward of the per-head norm (a bias passes gradients as they are).
pub fn merge(g: &Tensor, slots: usize, rope: Rope, norm: NormGrad) -> CResult<Tensor> {
    let (b, n, s, hd) = g.dims4()?;
    let t = s
        .checked_sub(slots)
        .ok_or_else(|| candle_core::Error::Msg(format!("heads: {slots} slots of {s} rows")))?;
    #[cfg(feature = "cuda")]
    {
        let extra: Vec<&Tensor> = norm.iter().flat_map(|(u, w, _)| [*u, *w]).collect();
        if use_kernel(g, hd, rope, &extra) {
            let op = kernels::Merge {
                b,
                t,
                n,
                hd,
                slots,
                rope: rope.map(|(c, s)| (c.clone(), s.clone())),
                norm: norm.map(|(u, w, eps)| (u.clone(), w.clone(), eps)),
            };
            return g.apply_op1_no_bwd(&op);
        }
    }
    let y = g.narrow(2, slots, t)?.contiguous()?; // (B, n, T, hd)
    let y = match rope {
        Some((c, s)) => super::rope::backward(&y, c, s)?,
        None => y,
    };
    let y = y.transpose(1, 2)?.contiguous()?; // (B, T, n, hd)
    let y = match norm {
        Some((u, w, eps)) => {
            let u = u.reshape((b, t, n, hd))?;
            super::norm::backward_dx(&u, &w.to_dtype(u.dtype())?, &y, eps)?
        }
        None => y,
    };
    y.reshape((b * t, n * hd)) // (B*T, n*hd)
}

#[cfg(feature = "cuda")]
mod kernels {
    use crate::ops::cuda;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaStorage, WrapErr};
    use candle_core::{CustomOp1, Layout, Shape, Tensor};

    type CResult<T> = candle_core::Result<T>;

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/heads.ptx"));

    pub struct Split {
        pub b: usize,
        pub t: usize,
        pub n: usize,
        pub hd: usize,
        pub rope: Option<(Tensor, Tensor)>,
        pub slot: Option<Tensor>,
        pub bias: Option<Tensor>,
        pub norm: Option<(Tensor, f64)>,
    }

    pub struct Merge {
        pub b: usize,
        pub t: usize,
        pub n: usize,
        pub hd: usize,
        pub slots: usize,
        pub rope: Option<(Tensor, Tensor)>,
        /// Pre-norm rows u (B*T, n*hd), the norm weight (hd), eps.
        pub norm: Option<(Tensor, Tensor, f64)>,
    }

    fn int(v: usize) -> CResult<i32> {
        i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("heads: {v} exceeds i32")))
    }

    /// One warp per head row (the norm kernels reduce over the row), plus, for split, one
    /// thread per bf16x2 of the slot rows; grid-stride beyond that.
    fn warp_cfg(rows: usize, extra: usize) -> LaunchConfig {
        let threads = rows * 32 + extra;
        LaunchConfig {
            grid_dim: (threads.div_ceil(256).clamp(1, 65_535) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// Launches `name` over x with the tensors `inputs` in the kernel's order, `None` standing
    /// for one not given (x goes in its place; the kernel does not read it then), then the
    /// output and the int arguments `dims`, and `eps` when the kernel normalises.
    #[allow(clippy::too_many_arguments)]
    fn launch(
        name: &str,
        x: &CudaStorage,
        lx: &Layout,
        inputs: &[Option<&Tensor>],
        dims: &[i32],
        eps: Option<f32>,
        out_shape: Shape,
        cfg: LaunchConfig,
    ) -> CResult<(CudaStorage, Shape)> {
        let dev = cuda::device_of(x);
        let xv = cuda::view::<half::bf16>(x, lx)?;
        let guards: Vec<_> = inputs
            .iter()
            .map(|t| t.map(|t| t.storage_and_layout()))
            .collect();
        let mut views = vec![];
        for g in &guards {
            views.push(match g {
                Some((s, l)) => Some(cuda::view::<half::bf16>(cuda::storage(s)?, l)?),
                None => None,
            });
        }
        let y = cuda::alloc_bf16(&dev, out_shape.elem_count())?;
        let f = cuda::func(&dev, "eabfit_heads", PTX, name)?;
        let stream = dev.cuda_stream();
        let mut l = stream.launch_builder(&f);
        l.arg(&xv);
        for v in &views {
            l.arg(v.as_ref().unwrap_or(&xv));
        }
        l.arg(&y);
        for d in dims {
            l.arg(d);
        }
        if let Some(e) = &eps {
            l.arg(e);
        }
        unsafe { l.launch(cfg) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(y, dev), out_shape))
    }

    impl CustomOp1 for Split {
        fn name(&self) -> &'static str {
            "heads-split-kernel"
        }

        cuda::cuda_only!(a: la);

        fn cuda_fwd(&self, x: &CudaStorage, lx: &Layout) -> CResult<(CudaStorage, Shape)> {
            let (b, t, n, hd) = (self.b, self.t, self.n, self.hd);
            let slots = self.slot.is_some() as usize;
            let shape = Shape::from((b, n, slots + t, hd));
            let rope = self.rope.as_ref();
            let dims = [
                int(b)?,
                int(t)?,
                int(n)?,
                int(hd)?,
                int(slots)?,
                rope.is_some() as i32,
                self.bias.is_some() as i32,
            ];
            let mut inputs = vec![
                rope.map(|r| &r.0),
                rope.map(|r| &r.1),
                self.slot.as_ref(),
                self.bias.as_ref(),
            ];
            let (name, eps, cfg) = match &self.norm {
                Some((w, eps)) => {
                    inputs.push(Some(w));
                    let cfg = warp_cfg(b * t * n, slots * b * n * hd / 2);
                    ("eab_heads_split_norm_bf16", Some(*eps as f32), cfg)
                }
                None => (
                    "eab_heads_split_bf16",
                    None,
                    cuda::elementwise_cfg(shape.elem_count() / 2),
                ),
            };
            launch(name, x, lx, &inputs, &dims, eps, shape, cfg)
        }
    }

    impl CustomOp1 for Merge {
        fn name(&self) -> &'static str {
            "heads-merge-kernel"
        }

        cuda::cuda_only!(a: la);

        fn cuda_fwd(&self, g: &CudaStorage, lg: &Layout) -> CResult<(CudaStorage, Shape)> {
            let (b, t, n, hd) = (self.b, self.t, self.n, self.hd);
            let shape = Shape::from((b * t, n * hd));
            let rope = self.rope.as_ref();
            let dims = [
                int(b)?,
                int(t)?,
                int(n)?,
                int(hd)?,
                int(self.slots)?,
                if rope.is_some() { -1 } else { 0 },
            ];
            let mut inputs = vec![rope.map(|r| &r.0), rope.map(|r| &r.1)];
            let (name, eps, cfg) = match &self.norm {
                Some((u, w, eps)) => {
                    inputs.extend([Some(u), Some(w)]);
                    let cfg = warp_cfg(b * t * n, 0);
                    ("eab_heads_merge_norm_bf16", Some(*eps as f32), cfg)
                }
                None => (
                    "eab_heads_merge_bf16",
                    None,
                    cuda::elementwise_cfg(shape.elem_count() / 2),
                ),
            };
            launch(name, g, lg, &inputs, &dims, eps, shape, cfg)
        }
    }
}
