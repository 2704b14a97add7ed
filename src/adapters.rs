//! Trainable additions to a frozen model: per-layer EAB (k', v') slots and LoRA pairs.
//! They enter the model through `Model::load`; the base weights never change.

use candle_core::Tensor;
use std::collections::HashMap;

/// One explicit key/value slot per KV head of a layer: k', v' of shape (KV, hd), f32.
/// k' is position-free (never rotated), which makes it equal to a one-token KV prefix.
#[derive(Debug, Clone)]
pub struct EabSlot {
    pub k: Tensor,
    pub v: Tensor,
}

/// A low-rank update `scale * B A` of a projection: a (r, in), b (out, r), f32.
#[derive(Debug, Clone)]
pub struct Lora {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
}

#[derive(Debug, Clone, Default)]
pub struct Adapters {
    /// Indexed by layer; `None` where a layer has no slot.
    pub slots: Vec<Option<EabSlot>>,
    /// Keyed by the projection's tensor prefix, e.g. `model.layers.1.mlp.down_proj`.
    pub lora: HashMap<String, Lora>,
    /// Hide position 0 from every query so the slot stands in for the first token.
    pub mask_first_token: bool,
}

impl Adapters {
    pub fn none() -> Self {
        Self::default()
    }
}
