//! Streaming: perplexity of a text longer than the context, decoded through a rolling KV cache
//! (StreamingLLM, Xiao et al. 2023), and the flags `ppl` and `generate` share for it.
//!
//! The cache holds L entries: the first S tokens of the stream (the sinks, never evicted) and
//! the L - S most recent ones; when a token enters a full cache the oldest non-sink entry
//! leaves. Each token's keys and values are computed once, when it enters; the cache's i-th
//! entry sits at position i and the newest token at the last one, so positions never pass L - 1
//! however long the stream. The EAB slot is no entry: never evicted, never rotated. Token t is
//! predicted from the cache after token t - 1 entered. [`crate::model::Model::forward_stream`]
//! computes a chunk of tokens in one pass, exactly (docs/streaming.md); one token at a time it
//! is the literal cache, the reference the tests hold the chunks to.

use crate::model::{Model, StreamCache};
use crate::{Error, Result};
use candle_core::{DType, Tensor, D};
use serde::{Deserialize, Serialize};

/// `--cache L [--sink-tokens S] [--chunk C]`.
#[derive(Debug, Clone, clap::Args)]
pub struct CacheArgs {
    /// Decode as one stream through a rolling KV cache of L entries (StreamingLLM)
    #[arg(long, value_name = "L")]
    pub cache: Option<usize>,
    /// Cache entries kept from the start of the stream, never evicted (StreamingLLM's sinks)
    #[arg(long, value_name = "S", default_value_t = 0, requires = "cache")]
    pub sink_tokens: usize,
    /// Tokens computed per pass (1: token by token through the literal cache)
    #[arg(long, value_name = "C", default_value_t = 256, requires = "cache")]
    pub chunk: usize,
}

/// A checked rolling-cache setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rolling {
    pub cache: usize,
    pub sinks: usize,
    pub chunk: usize,
}

impl CacheArgs {
    /// `None` without `--cache`; a usage error for settings no cache can have.
    pub fn rolling(&self) -> Result<Option<Rolling>> {
        self.cache
            .map(|cache| Rolling::new(cache, self.sink_tokens, self.chunk))
            .transpose()
    }
}

impl Rolling {
    pub fn new(cache: usize, sinks: usize, chunk: usize) -> Result<Self> {
        if cache == 0 {
            return Err(Error::Usage(
                "--cache 0: the cache needs at least 1 entry".into(),
            ));
        }
        if sinks >= cache {
            return Err(Error::Usage(format!(
                "--sink-tokens {sinks} >= --cache {cache}: the sinks would fill the cache and leave no room for the tokens being read"
            )));
        }
        if chunk == 0 {
            return Err(Error::Usage("--chunk must be at least 1".into()));
        }
        Ok(Self {
            cache,
            sinks,
            chunk,
        })
    }

    /// Whether `model` can run this cache: a usage error naming the limit otherwise.
    pub fn check(&self, model: &Model) -> Result<()> {
        StreamCache::check(model, self.cache, self.sinks).map_err(Error::Usage)
    }

    pub fn new_cache(&self, model: &Model) -> Result<StreamCache> {
        self.check(model)?;
        Ok(StreamCache::new(self.cache, self.sinks)?)
    }
}

/// Next-token NLL of every token of `ids` but the first, in stream order: entry t - 1 is the
/// NLL of token t predicted from the cache after token t - 1 entered.
pub fn stream_nll(model: &Model, ids: &[u32], r: &Rolling) -> Result<Vec<f32>> {
    let mut cache = r.new_cache(model)?;
    let mut nll = Vec::with_capacity(ids.len().saturating_sub(1));
    for (c, piece) in ids.chunks(r.chunk).enumerate() {
        let start = c * r.chunk;
        let x = Tensor::new(piece, model.device())?.unsqueeze(0)?; // (1, C)
        let logits = model.forward_stream(&x, &mut cache)?.squeeze(0)?; // (C, V)
                                                                        // Row i predicts token start + i + 1, which the last row of the stream does not have.
        let rows = piece.len().min(ids.len() - 1 - start);
        if rows == 0 {
            continue;
        }
        let targets = Tensor::new(&ids[start + 1..start + 1 + rows], model.device())?;
        let logp = candle_nn::ops::log_softmax(
            &logits.narrow(0, 0, rows)?.to_dtype(DType::F32)?,
            D::Minus1,
        )?; // (rows, V)
        let picked = logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?; // (rows)
        nll.extend(picked.neg()?.to_vec1::<f32>()?);
    }
    Ok(nll)
}

/// Perplexity over a stream, all of it and from the first eviction on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StreamPpl {
    pub cache: usize,
    pub sink_tokens: usize,
    pub chunk: usize,
    /// Tokens fed (the first is predicted by nothing).
    pub stream_tokens: usize,
    pub ppl: f64,
    pub nll: f64,
    /// Perplexity of the tokens predicted once the cache has evicted (t > L: token L entered
    /// a full cache); `None` when the stream never fills the cache.
    pub ppl_after_eviction: Option<f64>,
    pub tokens_after_eviction: usize,
    pub tokens_per_s: f64,
    pub seconds: f64,
    /// NLL of tokens 1..N in order.
    pub nll_per_token: Vec<f32>,
}

fn mean(xs: &[f32]) -> f64 {
    xs.iter().map(|&x| x as f64).sum::<f64>() / xs.len().max(1) as f64
}

/// Runs the stream and sums it up.
pub fn stream_ppl(model: &Model, ids: &[u32], r: &Rolling) -> Result<StreamPpl> {
    if ids.len() < 2 {
        return Err(Error::Usage(format!(
            "the stream has {} token(s): perplexity needs at least 2",
            ids.len()
        )));
    }
    let start = std::time::Instant::now();
    let nll = stream_nll(model, ids, r)?;
    let seconds = start.elapsed().as_secs_f64();
    // nll[i] predicts token i + 1, from a cache that has evicted once token L has entered.
    let after = &nll[r.cache.min(nll.len())..];
    let nll_all = mean(&nll);
    Ok(StreamPpl {
        cache: r.cache,
        sink_tokens: r.sinks,
        chunk: r.chunk,
        stream_tokens: ids.len(),
        ppl: nll_all.exp(),
        nll: nll_all,
        ppl_after_eviction: (!after.is_empty()).then(|| mean(after).exp()),
        tokens_after_eviction: after.len(),
        tokens_per_s: ids.len() as f64 / seconds.max(1e-9),
        seconds,
        nll_per_token: nll,
    })
}

impl StreamPpl {
    pub fn lines(&self) -> String {
        let after = match self.ppl_after_eviction {
            Some(p) => format!(
                "{p:.4} over the {} tokens after the first eviction",
                self.tokens_after_eviction
            ),
            None => "- (the stream never filled the cache)".into(),
        };
        format!(
            "stream perplexity {:.4}  (nll {:.4}, {} tokens predicted, cache {} with {} sink tokens, chunk {})\nafter eviction    {after}\nstream            {:.1} tokens/s ({} tokens in {:.2} s)\n",
            self.ppl,
            self.nll,
            self.nll_per_token.len(),
            self.cache,
            self.sink_tokens,
            self.chunk,
            self.tokens_per_s,
            self.stream_tokens,
            self.seconds
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn impossible_caches_are_usage_errors() {
        for (l, s, c, needle) in [
            (0, 0, 8, "--cache 0"),
            (4, 4, 8, "--sink-tokens 4 >= --cache 4"),
            (4, 7, 8, "--sink-tokens 7"),
            (4, 0, 0, "--chunk"),
        ] {
            let e = Rolling::new(l, s, c).expect_err("refused");
            assert!(e.is_usage() && e.to_string().contains(needle), "{e}");
        }
        assert!(Rolling::new(4, 3, 1).is_ok());
    }
}
