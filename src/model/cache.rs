//! The keys and values incremental decoding keeps between calls.

use candle_core::Tensor;

/// Per layer, the post-RoPE keys and values (B, KV, T, hd) of the positions that
/// [`Model::forward_cached`] has run. The EAB slot is not in it: it is no position.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    pub(super) layers: Vec<(Tensor, Tensor)>,
}

impl KvCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .map_or(0, |(k, _)| k.dims().get(2).copied().unwrap_or(0))
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
