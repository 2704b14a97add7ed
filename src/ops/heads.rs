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

use candle_core::Tensor;

type CResult<T> = candle_core::Result<T>;

/// The rotary tables (T, hd/2) of positions 0..T in the projection's dtype.
pub type Rope<'a> = Option<(&'a Tensor, &'a Tensor)>;

#[cfg(feature = "cuda")]
fn use_kernel(x: &Tensor, hd: usize, rope: Rope) -> bool {
    let even = |t: &Tensor| t.is_contiguous() && t.layout().start_offset() % 2 == 0;
    x.device().is_cuda()
        && x.dtype() == candle_core::DType::BF16
        && hd % 4 == 0
        && even(x)
        && rope.is_none_or(|(c, s)| c.dtype() == candle_core::DType::BF16 && even(c) && even(s))
}

/// x (B*T, n*hd) -> (B, n, slots + T, hd); `slot` (n, hd), any float dtype, becomes key row 0.
/// Not differentiable: the block op calls it on detached tensors.
pub fn split(x: &Tensor, b: usize, n: usize, rope: Rope, slot: Option<&Tensor>) -> CResult<Tensor> {
    let (rows, cols) = x.dims2()?;
    if b == 0 || rows % b != 0 || n == 0 || cols % n != 0 {
        candle_core::bail!("heads: {rows} x {cols} does not split into {b} sequences of {n} heads");
    }
    let (t, hd) = (rows / b, cols / n);
    let slot = slot.map(|s| s.to_dtype(x.dtype())).transpose()?;
    #[cfg(feature = "cuda")]
    if use_kernel(x, hd, rope) {
        let op = kernels::Split {
            b,
            t,
            n,
            hd,
            rope: rope.map(|(c, s)| (c.clone(), s.clone())),
            slot: slot.map(|s| s.contiguous()).transpose()?,
        };
        return x.apply_op1_no_bwd(&op);
    }
    let y = x.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()?; // (B, n, T, hd)
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

/// g (B, n, slots + T, hd) -> (B*T, n*hd) from rows slots.., through the inverse rotation.
pub fn merge(g: &Tensor, slots: usize, rope: Rope) -> CResult<Tensor> {
    let (b, n, s, hd) = g.dims4()?;
    let t = s
        .checked_sub(slots)
        .ok_or_else(|| candle_core::Error::Msg(format!("heads: {slots} slots of {s} rows")))?;
    #[cfg(feature = "cuda")]
    if use_kernel(g, hd, rope) {
        let op = kernels::Merge {
            b,
            t,
            n,
            hd,
            slots,
            rope: rope.map(|(c, s)| (c.clone(), s.clone())),
        };
        return g.apply_op1_no_bwd(&op);
    }
    let y = g.narrow(2, slots, t)?.contiguous()?; // (B, n, T, hd)
    let y = match rope {
        Some((c, s)) => super::rope::backward(&y, c, s)?,
        None => y,
    };
    y.transpose(1, 2)?.contiguous()?.reshape((b * t, n * hd)) // (B*T, n*hd)
}

#[cfg(feature = "cuda")]
mod kernels {
    use crate::ops::cuda;
    use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
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
    }

    pub struct Merge {
        pub b: usize,
        pub t: usize,
        pub n: usize,
        pub hd: usize,
        pub slots: usize,
        pub rope: Option<(Tensor, Tensor)>,
    }

    fn int(v: usize) -> CResult<i32> {
        i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("heads: {v} exceeds i32")))
    }

    /// Launches `name` over x: (cos, sin, slot) tensors where given, x itself standing in for
    /// what is not (the kernel does not read it then); `sign` 1 rotates, -1 inverts.
    #[allow(clippy::too_many_arguments)]
    fn launch(
        name: &str,
        x: &CudaStorage,
        lx: &Layout,
        rope: &Option<(Tensor, Tensor)>,
        sign: i32,
        slot: Option<&Tensor>,
        (b, t, n, hd, slots): (usize, usize, usize, usize, usize),
        out_shape: Shape,
    ) -> CResult<(CudaStorage, Shape)> {
        let dev = cuda::device_of(x);
        let xv = cuda::view::<half::bf16>(x, lx)?;
        let guards: Vec<_> = rope
            .iter()
            .flat_map(|(c, s)| [c, s])
            .chain(slot)
            .map(|t| t.storage_and_layout())
            .collect();
        let mut views = vec![];
        for (s, l) in &guards {
            views.push(cuda::view::<half::bf16>(cuda::storage(s)?, l)?);
        }
        let (cos, sin, slot_v) = match (rope.is_some(), slot.is_some()) {
            (true, true) => (&views[0], &views[1], &views[2]),
            (true, false) => (&views[0], &views[1], &xv),
            (false, true) => (&xv, &xv, &views[0]),
            (false, false) => (&xv, &xv, &xv),
        };
        let n_out = out_shape.elem_count();
        let y = cuda::alloc_bf16(&dev, n_out)?;
        let f = cuda::func(&dev, "eabfit_heads", PTX, name)?;
        let stream = dev.cuda_stream();
        let mut l = stream.launch_builder(&f);
        let dims = [
            int(b)?,
            int(t)?,
            int(n)?,
            int(hd)?,
            int(slots)?,
            if rope.is_some() { sign } else { 0 },
        ];
        l.arg(&xv).arg(cos).arg(sin);
        if name.ends_with("split_bf16") {
            l.arg(slot_v);
        }
        l.arg(&y);
        for d in &dims {
            l.arg(d);
        }
        unsafe { l.launch(cuda::elementwise_cfg(n_out / 2)) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(y, dev), out_shape))
    }

    impl CustomOp1 for Split {
        fn name(&self) -> &'static str {
            "heads-split-kernel"
        }

        cuda::cuda_only!(a: la);

        fn cuda_fwd(&self, x: &CudaStorage, lx: &Layout) -> CResult<(CudaStorage, Shape)> {
            let slots = self.slot.is_some() as usize;
            let shape = Shape::from((self.b, self.n, slots + self.t, self.hd));
            let dims = (self.b, self.t, self.n, self.hd, slots);
            let slot = self.slot.as_ref();
            launch(
                "eab_heads_split_bf16",
                x,
                lx,
                &self.rope,
                1,
                slot,
                dims,
                shape,
            )
        }
    }

    impl CustomOp1 for Merge {
        fn name(&self) -> &'static str {
            "heads-merge-kernel"
        }

        cuda::cuda_only!(a: la);

        fn cuda_fwd(&self, g: &CudaStorage, lg: &Layout) -> CResult<(CudaStorage, Shape)> {
            let shape = Shape::from((self.b * self.t, self.n * self.hd));
            let dims = (self.b, self.t, self.n, self.hd, self.slots);
            launch(
                "eab_heads_merge_bf16",
                g,
                lg,
                &self.rope,
                -1,
                None,
                dims,
                shape,
            )
        }
    }
}
