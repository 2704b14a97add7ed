//! What the model takes through its constructor besides the checkpoint: EAB slots by layer and
//! LoRA pairs by projection. [`crate::adapters`] builds, trains, saves and loads them; the model
//! only reads these tensors, so it needs nothing from there.

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

/// What the model reads: slots by layer, LoRA by projection prefix.
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

    /// The same adapters cut from their Vars: a forward through them builds no autograd graph
    /// (inference), while the values stay shared.
    pub fn detached(&self) -> Adapters {
        Adapters {
            slots: self
                .slots
                .iter()
                .map(|s| {
                    s.as_ref().map(|s| EabSlot {
                        k: s.k.detach(),
                        v: s.v.detach(),
                    })
                })
                .collect(),
            lora: self
                .lora
                .iter()
                .map(|(k, l)| {
                    (
                        k.clone(),
                        Lora {
                            a: l.a.detach(),
                            b: l.b.detach(),
                            scale: l.scale,
                        },
                    )
                })
                .collect(),
            mask_first_token: self.mask_first_token,
        }
    }
}
