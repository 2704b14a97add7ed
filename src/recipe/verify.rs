//! The recipe's `verify:` section: the limits a trained adapter is checked against, at which
//! windows, and the optional quantization and streaming checks.

use super::Texts;
use serde::{Deserialize, Serialize};

/// Windows verify checks at: `windows` windows of `seq_len` tokens from each text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyWindows {
    pub seq_len: usize,
    pub windows: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VerifySection {
    pub max_massive: usize,
    /// Allowed relative perplexity increase over the base model.
    pub max_ppl_increase: f64,
    /// Text(s) to verify on [default: data.eval]; text the run never saw is the honest test.
    /// Each text is checked on its own; verify passes only if every one does.
    pub text: Option<Texts>,
    /// Long by default: massive activations on mid-window tokens (LLaMA-2's "." and "\n"
    /// kind) only show in windows long enough to hold such tokens.
    pub seq_len: usize,
    pub windows: usize,
    /// A second pass at long windows (same checks), where context-length effects show.
    pub long: Option<VerifyWindows>,
    pub quant: QuantCheck,
    pub stream: StreamCheck,
}

impl Default for VerifySection {
    fn default() -> Self {
        Self {
            max_massive: 0,
            max_ppl_increase: 0.01,
            text: None,
            seq_len: 512,
            windows: 10,
            long: None,
            quant: QuantCheck::default(),
            stream: StreamCheck::default(),
        }
    }
}

/// Optional check that the adapted model streams (docs/streaming.md): its perplexity over the
/// first `tokens` tokens of the verify text through a rolling cache of `cache` entries with
/// `sink_tokens` sinks, at most `max_ppl_increase` above its own dense perplexity on the same
/// tokens in one window (0.02 = +2%). No check while `max_ppl_increase` is unset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StreamCheck {
    pub max_ppl_increase: Option<f64>,
    pub cache: usize,
    pub sink_tokens: usize,
    pub tokens: usize,
}

impl Default for StreamCheck {
    fn default() -> Self {
        Self {
            max_ppl_increase: None,
            cache: 256,
            sink_tokens: 0,
            tokens: 2048,
        }
    }
}

/// Optional check that the adapted model quantizes well: its perplexity under the setting
/// (w, a, kv, act_scale; see `eabfit quant`) at most `max_gap` above its float perplexity
/// (0.1 = +10%). No check while `max_gap` is unset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QuantCheck {
    pub max_gap: Option<f64>,
    pub w: u32,
    pub a: u32,
    pub kv: u32,
    pub act_scale: crate::quant::ActScale,
}

impl Default for QuantCheck {
    fn default() -> Self {
        Self {
            max_gap: None,
            w: 8,
            a: 8,
            kv: 16,
            act_scale: crate::quant::ActScale::Tensor,
        }
    }
}

impl QuantCheck {
    pub fn setting(&self) -> crate::quant::Setting {
        crate::quant::Setting {
            w: self.w,
            a: self.a,
            kv: self.kv,
            act_scale: self.act_scale,
        }
    }
}
