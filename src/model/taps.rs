//! What a caller observes or changes during a forward pass: hidden-state and attention taps,
//! in-flight edits, the activation hook, and what comes back.

use super::CResult;
use crate::ops::attention;
use crate::ops::block as block_op;
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

/// The four inputs of a layer's projections: q, k and v read one input, gate and up another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LinearInput {
    Qkv,
    O,
    GateUp,
    Down,
}

/// Sees, and may replace, the inputs of the projections and the post-RoPE keys and values
/// (fake quantization, activation statistics). Gradients flow through whatever it returns.
pub trait ActHook: std::fmt::Debug + Send + Sync {
    /// `x`: (B, T, d_in), the input of the `input` projections of `layer`.
    fn linear_input(&self, layer: usize, input: LinearInput, x: &Tensor) -> CResult<Tensor>;
    /// `k`, `v`: (B, KV, T, hd) after RoPE; an EAB slot comes through as (1, KV, 1, hd).
    fn key_value(&self, layer: usize, k: &Tensor, v: &Tensor) -> CResult<(Tensor, Tensor)>;
}

/// What a caller wants to observe or change during one forward pass.
#[derive(Debug, Clone, Default)]
pub struct Taps {
    /// Keep every layer's output hidden state in [`Output::hidden`].
    pub hidden: bool,
    /// Keep per-layer attention statistics in [`Output::attn`].
    pub attn: bool,
    /// Keep each layer's post-RoPE key and value of position 0 in [`Output::first_kv`].
    pub first_kv: bool,
    /// Entries of layer outputs to overwrite in flight (the paper's interventions).
    pub edits: Vec<Edit>,
    /// Keep only each block's input for the backward pass and run the block again there
    /// (activation recomputation; blocks with LoRA are kept whole). Only `hidden` combines
    /// with it.
    pub recompute: bool,
    /// Sees every projection input and every key/value (see [`ActHook`]).
    pub hook: Option<std::sync::Arc<dyn ActHook>>,
    /// Run each LoRA-free block as one op with a hand-written backward ([`crate::ops::block`]):
    /// `None` decides (on for CUDA bf16 with head_dim 64 or 128), `Some` forces it on or off.
    /// Only `hidden` combines with it; other taps keep the per-op path.
    pub block_op: Option<bool>,
    /// Blocks whose weights train (pretraining) take the block op too, and its backward puts
    /// their weight gradients here instead of in candle's gradient store.
    pub weight_grads: Option<std::sync::Arc<block_op::WeightGrads>>,
}

impl Taps {
    pub(super) fn linear_input(
        &self,
        layer: usize,
        input: LinearInput,
        x: Tensor,
    ) -> CResult<Tensor> {
        match &self.hook {
            Some(h) => h.linear_input(layer, input, &x),
            None => Ok(x),
        }
    }
}

/// Set `h[:, position, dim] = value` in the output of decoder layer `layer`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Edit {
    pub layer: usize,
    pub position: usize,
    pub dim: usize,
    pub value: f32,
}

/// Attention mass that queries put on position 0 and on the EAB slot, averaged over the batch,
/// the heads and the queries 1..T (query 0 has nowhere else to look). Scalar f32 tensors.
pub type AttnStats = attention::Stats;

#[derive(Debug)]
pub struct Output {
    /// (B, T, V) in f32 (f64 for an f64 model).
    pub logits: Tensor,
    /// Per layer, (B, T, D) in the model dtype, when `Taps::hidden`.
    pub hidden: Vec<Tensor>,
    pub attn: Vec<AttnStats>,
    /// Per layer, post-RoPE (key, value) of position 0, each (B, KV, hd), when `Taps::first_kv`.
    pub first_kv: Vec<(Tensor, Tensor)>,
}

/// h * (1 - M) + M * values, with M marking the edited (position, dim) entries: differentiable,
/// and exactly the identity when a layer has no edit.
pub(super) fn apply_edits(h: &Tensor, layer: usize, edits: &[Edit]) -> CResult<Tensor> {
    let mine: Vec<&Edit> = edits.iter().filter(|e| e.layer == layer).collect();
    if mine.is_empty() {
        return Ok(h.clone());
    }
    let (_, t, d) = h.dims3()?;
    let mut keep = vec![1f32; t * d];
    let mut vals = vec![0f32; t * d];
    for e in mine {
        if e.position < t && e.dim < d {
            keep[e.position * d + e.dim] = 0.0;
            vals[e.position * d + e.dim] = e.value;
        }
    }
    let keep = Tensor::from_vec(keep, (t, d), h.device())?.to_dtype(h.dtype())?;
    let vals = Tensor::from_vec(vals, (t, d), h.device())?.to_dtype(h.dtype())?;
    h.broadcast_mul(&keep)?.broadcast_add(&vals)
}
