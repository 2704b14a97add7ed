//! Custom ops with a real backward: the layer between the model and the devices.
//!
//! candle's fused kernels (`rms_norm`, `rope`, `softmax_last_dim`) have no backward, and its
//! composite ops keep every f32 intermediate alive for the backward pass. Each op here computes
//! its forward from detached inputs (fused kernels or blocked composites, on any device), hands
//! the result to candle as a custom op's output, and writes its own backward from the inputs
//! alone, recomputing what it needs (the flash-attention idea applied to every op). The model
//! calls these and nothing else reaches a device directly.
//!
//! - [`linear`]: a frozen projection whose backward returns only the input gradient.
//! - [`attention`]: causal / sliding-window attention over [slot; tokens], GQA, blocked over
//!   queries; keeps only its output for the backward pass.
//! - [`norm`]: RMSNorm, computed by a fused kernel with a recomputing backward.
//! - [`rope`]: rotate-half rotary embedding; its backward is the inverse rotation.
//! - [`heads`]: a projection's output into attention heads and back, RoPE and the EAB slot
//!   folded in (one pass each way on CUDA instead of candle's strided copies).
//! - [`kl`]: KL(teacher || student) through the LM head, chunked over positions.
//! - [`ce`]: next-token cross-entropy through a trained LM head, chunked over positions
//!   (pretraining).
//! - [`embedding`]: the token embedding, whose backward sums in f32 (an atomic scatter-add on
//!   CUDA) instead of candle's one-thread-per-column `index_add`.
//! - [`adamw`]: one AdamW update of a tensor, one kernel on CUDA (optimizer state, no backward).
//! - [`swiglu`]: the MLP's silu(gate) * up, one kernel each way on CUDA.
//! - [`recompute`]: activation recomputation of a decoder block.
//! - [`block`]: a whole decoder block as one op with a hand-written backward, so that
//!   candle's graph holds one node per block instead of ~50 (each costing a zero-fill and an
//!   add of a full activation in the backward pass).
//!
//! Kernel sources sit beside the op that launches them (`attention.cu`, `norm.cu`,
//! `swiglu.cu`, `heads.cu`, `kl.cu`, `ce.cu`, `embedding.cu`, `adamw.cu`); `build.rs` compiles them to PTX with the `cuda` feature.

use candle_core::{CpuStorage, Layout, Shape, Storage, Tensor};
use std::sync::Mutex;

type CResult<T> = candle_core::Result<T>;

/// Precision of norms, scores, softmax and logits: f32, or f64 when the model itself runs in f64
/// (the finite-difference tests do).
pub fn acc(dtype: candle_core::DType) -> candle_core::DType {
    if dtype == candle_core::DType::F64 {
        candle_core::DType::F64
    } else {
        candle_core::DType::F32
    }
}

/// Rows per chunk of an op through the LM head ([`kl`], [`ce`]): one chunk's f32 logits stay
/// near 256 MiB.
fn head_chunk_rows(vocab: usize) -> usize {
    ((64usize << 20) / vocab.max(1)).max(16)
}

/// `cpu_fwd` and `cuda_fwd` of a custom op with 1, 2 or 3 inputs whose forward result was
/// computed outside it and sits in its `out: Given` field: both hand that result over.
macro_rules! given_forward {
    ($($arg:ident: $lay:ident),+) => {
        fn cpu_fwd(
            &self,
            $($arg: &candle_core::CpuStorage, $lay: &candle_core::Layout),+
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            $(let _ = ($arg, $lay);)+
            self.out.cpu()
        }

        #[cfg(feature = "cuda")]
        fn cuda_fwd(
            &self,
            $($arg: &candle_core::CudaStorage, $lay: &candle_core::Layout),+
        ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
            $(let _ = ($arg, $lay);)+
            self.out.cuda()
        }
    };
}
pub(crate) use given_forward;

pub mod adamw;
pub mod attention;
pub mod block;
pub mod ce;
#[cfg(feature = "cuda")]
mod cuda;
pub mod embedding;
pub mod heads;
pub mod kl;
pub mod linear;
pub mod norm;
pub mod recompute;
pub mod rope;
pub mod swiglu;

/// A forward result computed outside a custom op, moved into the op's output on first use so
/// that the graph holds one copy of it, not two.
struct Given(Mutex<Option<Tensor>>);

impl Given {
    fn new(t: Tensor) -> Self {
        Self(Mutex::new(Some(t)))
    }

    fn take(&self) -> CResult<Tensor> {
        self.0
            .lock()
            .map_err(|_| candle_core::Error::Msg("custom op state poisoned".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("custom op forward ran twice".into()))
    }

    /// The result's storage, contiguous and owned, as candle's op output.
    fn cpu(&self) -> CResult<(CpuStorage, Shape)> {
        let t = self.take()?.contiguous()?;
        let (s, l) = t.storage_and_layout();
        match &*s {
            Storage::Cpu(c) => Ok((exact_cpu(c, l)?, l.shape().clone())),
            _ => candle_core::bail!("custom op: forward result is not on the CPU"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda(&self) -> CResult<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::{BackendDevice, BackendStorage};
        let t = self.take()?.contiguous()?;
        let (s, l) = t.storage_and_layout();
        match &*s {
            Storage::Cuda(c) if l.start_offset() == 0 => Ok((c.try_clone(l)?, l.shape().clone())),
            Storage::Cuda(c) => {
                // A view into a larger buffer: copy just its elements.
                let dev = c.device().clone();
                let mut dst = unsafe { dev.alloc_uninit(l.shape(), c.dtype())? };
                c.copy_strided_src(&mut dst, 0, l)?;
                Ok((dst, l.shape().clone()))
            }
            _ => candle_core::bail!("custom op: forward result is not on a CUDA device"),
        }
    }
}

/// A scalar loss whose forward already formed its input gradients (for an upstream gradient
/// of 1): the backward only scales them by the upstream gradient. The chunked losses through
/// the LM head ([`kl`] on its kernel, [`ce`]) form them while each chunk's softmax exists.
struct FormedLoss {
    out: Given,
    grads: (Option<Tensor>, Option<Tensor>),
}

impl candle_core::CustomOp2 for FormedLoss {
    fn name(&self) -> &'static str {
        "loss-with-formed-gradients"
    }

    given_forward!(a: la, b: lb);

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _loss: &Tensor,
        g: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let k = g.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        let scaled = |d: &Option<Tensor>, like: &Tensor| {
            d.as_ref()
                .map(|d| (d * k)?.to_dtype(like.dtype()))
                .transpose()
        };
        Ok((scaled(&self.grads.0, a)?, scaled(&self.grads.1, b)?))
    }
}

/// `loss` as a function of `a` and `b` whose gradients `da`, `db` (shaped like them; `None`
/// for an input that gets none) were formed in the forward.
fn formed_loss(
    a: &Tensor,
    b: &Tensor,
    loss: Tensor,
    da: Option<Tensor>,
    db: Option<Tensor>,
) -> CResult<Tensor> {
    a.apply_op2(
        b,
        FormedLoss {
            out: Given::new(loss),
            grads: (da, db),
        },
    )
}

/// The elements a contiguous layout addresses, as an owned CPU storage.
fn exact_cpu(c: &CpuStorage, l: &Layout) -> CResult<CpuStorage> {
    use candle_core::backend::BackendStorage;
    let n = l.shape().elem_count();
    let (start, end) = (l.start_offset(), l.start_offset() + n);
    Ok(match c {
        CpuStorage::F32(v) => CpuStorage::F32(v[start..end].to_vec()),
        CpuStorage::F64(v) => CpuStorage::F64(v[start..end].to_vec()),
        CpuStorage::BF16(v) => CpuStorage::BF16(v[start..end].to_vec()),
        CpuStorage::F16(v) => CpuStorage::F16(v[start..end].to_vec()),
        other => candle_core::bail!("custom op: unsupported dtype {:?}", other.dtype()),
    })
}
