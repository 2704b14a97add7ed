//! The decoder's parameterised pieces below attention: projections (with LoRA), RMSNorm and the
//! RoPE tables.

use super::{Adapters, CResult, Config, Lora};
use crate::ops::acc;
use crate::ops::{linear::linear, norm::rms_norm, rope::rope};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

/// A projection `y = x W^T (+ b)`, plus `scale * (x A^T) B^T` when a LoRA adapter is attached.
#[derive(Debug, Clone)]
pub struct Linear {
    pub(super) weight: Tensor,
    pub(super) bias: Option<Tensor>,
    pub(super) lora: Option<Lora>,
}

impl Linear {
    pub(super) fn load(
        vb: VarBuilder,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        adapters: &Adapters,
    ) -> CResult<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = bias.then(|| vb.get(out_dim, "bias")).transpose()?;
        let lora = adapters.lora.get(&vb.prefix()).cloned();
        Ok(Self { weight, bias, lora })
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub(super) fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        let (b, t, d) = x.dims3()?;
        let x2 = x.reshape((b * t, d))?; // (B*T, in)
        let mut y = linear(&x2, &self.weight)?; // (B*T, out)
        if let Some(bias) = &self.bias {
            y = y.broadcast_add(bias)?;
        }
        if let Some(l) = &self.lora {
            // Adapters stay f32 (bf16 LoRA updates lose most of their low-rank signal), and on
            // the device that trains them: a split model brings them to this layer's device
            // at every pass (a copy made at load would miss the optimizer's updates).
            let (a, b) = (l.a.to_device(x.device())?, l.b.to_device(x.device())?);
            let xa = x2.to_dtype(a.dtype())?.matmul(&a.t()?)?; // (B*T, r)
            let delta = (xa.matmul(&b.t()?)? * l.scale)?; // (B*T, out)
            let delta = delta.to_dtype(y.dtype())?;
            y = (y + delta)?;
        }
        y.reshape((b, t, ())) // (B, T, out)
    }
}

#[derive(Debug, Clone)]
pub(super) struct RmsNorm {
    pub(super) weight: Tensor,
    pub(super) eps: f64,
}

impl RmsNorm {
    pub(super) fn load(vb: VarBuilder, dim: usize, eps: f64) -> CResult<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            eps,
        })
    }

    pub(super) fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        rms_norm(x, &self.weight, self.eps)
    }
}

/// cos/sin tables for rotate-half RoPE (the Hugging Face layout), (max_pos, head_dim / 2): the
/// two halves of a head share their frequencies.
#[derive(Debug, Clone)]
pub(super) struct Rope {
    pub(super) cos: Tensor,
    pub(super) sin: Tensor,
}

impl Rope {
    pub(super) fn new(cfg: &Config, dtype: DType, dev: &Device) -> CResult<Self> {
        let inv = cfg.inv_freq();
        let n = cfg.max_position_embeddings;
        let mut cos = Vec::with_capacity(n * inv.len() * 2);
        let mut sin = Vec::with_capacity(n * inv.len() * 2);
        for p in 0..n {
            cos.extend(inv.iter().map(|f| (p as f64 * f).cos()));
            sin.extend(inv.iter().map(|f| (p as f64 * f).sin()));
        }
        let shape = (n, inv.len());
        // Rounded through f32 as before for f32/bf16/f16 models; full precision for f64 ones.
        let table = |v: Vec<f64>| -> CResult<Tensor> {
            Tensor::from_vec(v, shape, dev)?
                .to_dtype(acc(dtype))?
                .to_dtype(dtype)
        };
        Ok(Self {
            cos: table(cos)?,
            sin: table(sin)?,
        })
    }

    /// x: (B, H, T, hd) -> same, rotated by positions start..start + T.
    pub(super) fn apply(&self, x: &Tensor, start: usize) -> CResult<Tensor> {
        let t = x.dim(2)?;
        let table = |tab: &Tensor| tab.narrow(0, start, t)?.contiguous(); // (T, hd/2)
        rope(x, &table(&self.cos)?, &table(&self.sin)?)
    }

    /// x: (B, H, T, hd) -> same, every row rotated by the one position `pos`.
    pub(super) fn apply_at(&self, x: &Tensor, pos: usize) -> CResult<Tensor> {
        let (t, half) = (x.dim(2)?, self.cos.dim(1)?);
        let table = |tab: &Tensor| tab.narrow(0, pos, 1)?.broadcast_as((t, half))?.contiguous(); // (T, hd/2)
        rope(x, &table(&self.cos)?, &table(&self.sin)?)
    }
}
