//! The keys and values incremental decoding keeps between calls: every position's
//! ([`KvCache`]), or a rolling window's ([`StreamCache`]).

use super::{CResult, Model};
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

/// A rolling KV cache ([`crate::stream`], StreamingLLM): at most `capacity` entries, the first
/// `sinks` tokens of the stream and the most recent ones, in that order. Keys are kept before
/// RoPE: an entry's position is its index in the cache, which changes as older entries leave,
/// so [`Model::forward_stream`] rotates them when it uses them. The EAB slot is no entry.
#[derive(Debug, Clone)]
pub struct StreamCache {
    pub(super) capacity: usize,
    pub(super) sinks: usize,
    /// Tokens that have entered so far.
    pub(super) seen: usize,
    /// Per layer, keys before RoPE and values (B, KV, len, hd) of the entries in cache order.
    pub(super) layers: Vec<(Tensor, Tensor)>,
}

impl StreamCache {
    pub fn new(capacity: usize, sinks: usize) -> CResult<Self> {
        if capacity == 0 || sinks >= capacity {
            candle_core::bail!(
                "a rolling cache of {capacity} entries cannot keep {sinks} sink tokens and the token being read"
            );
        }
        Ok(Self {
            capacity,
            sinks,
            seen: 0,
            layers: vec![],
        })
    }

    /// Why `model` cannot run a rolling cache of `capacity` entries with `sinks` sinks, if so.
    pub fn check(model: &Model, capacity: usize, sinks: usize) -> Result<(), String> {
        let cfg = model.config();
        if capacity > cfg.max_position_embeddings {
            return Err(format!(
                "--cache {capacity} exceeds max_position_embeddings {}: the cache's positions run to L - 1",
                cfg.max_position_embeddings
            ));
        }
        if let Some(w) = cfg.window().filter(|&w| w < capacity) {
            return Err(format!(
                "--cache {capacity} is longer than the model's sliding_window {w}, which already bounds what a query sees: use --cache {w} or less"
            ));
        }
        if model.mask_first_token && sinks > 0 {
            return Err(format!(
                "--sink-tokens {sinks}: the adapter's mask_first_token hides the first token from every query, so it can be no sink; use --sink-tokens 0"
            ));
        }
        Ok(())
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.seen.min(self.capacity)
    }

    pub fn is_empty(&self) -> bool {
        self.seen == 0
    }

    /// Tokens that have entered the cache so far.
    pub fn seen(&self) -> usize {
        self.seen
    }

    /// The stream index of every entry, in cache order.
    pub fn held(&self) -> Vec<usize> {
        if self.seen <= self.capacity {
            return (0..self.seen).collect();
        }
        let recent = self.seen - (self.capacity - self.sinks)..self.seen;
        (0..self.sinks).chain(recent).collect()
    }

    /// Per layer, the entries a segment of new tokens sees: all of them while the cache has
    /// room, else all but the oldest non-sink one (the first new token evicts it); `None`
    /// when that leaves none.
    pub(super) fn visible(&self) -> CResult<Option<Vec<(Tensor, Tensor)>>> {
        let (n, s) = (self.len(), self.sinks);
        if self.seen < self.capacity {
            return Ok((n > 0).then(|| self.layers.clone()));
        }
        if n == 1 {
            return Ok(None);
        }
        let without = |x: &Tensor| -> CResult<Tensor> {
            let parts = [(0, s), (s + 1, n - s - 1)]
                .into_iter()
                .filter(|&(_, len)| len > 0)
                .map(|(at, len)| x.narrow(2, at, len))
                .collect::<CResult<Vec<_>>>()?;
            Tensor::cat(&parts, 2)
        };
        let layers = self.layers.iter();
        Ok(Some(
            layers
                .map(|(k, v)| Ok((without(k)?, without(v)?)))
                .collect::<CResult<_>>()?,
        ))
    }

    /// After a segment of `t` tokens whose per-layer entries (the visible ones, then the new
    /// tokens') are `layers`: keeps the sinks and the newest `capacity - sinks`.
    pub(super) fn update(&mut self, layers: Vec<(Tensor, Tensor)>, t: usize) -> CResult<()> {
        let (cap, s) = (self.capacity, self.sinks);
        let trim = |x: &Tensor| -> CResult<Tensor> {
            let n = x.dim(2)?;
            if n <= cap {
                return Ok(x.clone());
            }
            let tail = x.narrow(2, n - (cap - s), cap - s)?;
            match s {
                0 => tail.contiguous(),
                _ => Tensor::cat(&[&x.narrow(2, 0, s)?, &tail], 2)?.contiguous(),
            }
        };
        // Detached: an entry computed through a trainable slot would otherwise keep the graph
        // of every pass before it, and a long stream's memory would grow without bound.
        self.layers = layers
            .iter()
            .map(|(k, v)| Ok((trim(k)?.detach(), trim(v)?.detach())))
            .collect::<CResult<_>>()?;
        self.seen += t;
        Ok(())
    }
}
