//! The fields of a checkpoint's `config.json` the decoder reads, the checks serde cannot make,
//! and the RoPE frequencies they imply.

use serde::{Deserialize, Serialize};

/// Llama-3 style frequency-dependent RoPE scaling (`rope_type: llama3`); other types are rejected
/// at config validation so that no model silently runs with the wrong positions.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RopeScaling {
    #[serde(alias = "type")]
    pub rope_type: String,
    #[serde(default = "one")]
    pub factor: f64,
    #[serde(default)]
    pub low_freq_factor: Option<f64>,
    #[serde(default)]
    pub high_freq_factor: Option<f64>,
    #[serde(default)]
    pub original_max_position_embeddings: Option<usize>,
}

fn one() -> f64 {
    1.0
}
fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_max_positions() -> usize {
    4096
}

/// The fields of a Hugging Face `config.json` this model reads (LlamaConfig / MistralConfig).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Config {
    #[serde(default)]
    pub model_type: Option<String>,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    pub vocab_size: usize,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    #[serde(default)]
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
}

impl Config {
    pub fn n_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// Checks the combinations serde cannot; the message names the offending field.
    pub fn validate(&self) -> Result<(), String> {
        let h = self.num_attention_heads;
        if h == 0 || self.hidden_size == 0 || self.num_hidden_layers == 0 || self.vocab_size == 0 {
            return Err(
                "hidden_size, num_attention_heads, num_hidden_layers and vocab_size must be > 0"
                    .into(),
            );
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(h) {
            return Err(format!(
                "hidden_size {} is not divisible by num_attention_heads {h}",
                self.hidden_size
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(format!(
                "head_dim {} must be even for RoPE",
                self.head_dim()
            ));
        }
        let kv = self.n_kv_heads();
        if kv == 0 || !h.is_multiple_of(kv) {
            return Err(format!(
                "num_attention_heads {h} is not a multiple of num_key_value_heads {kv}"
            ));
        }
        if let Some(rs) = &self.rope_scaling {
            match rs.rope_type.as_str() {
                "default" => {}
                "llama3" => {
                    if rs.low_freq_factor.is_none()
                        || rs.high_freq_factor.is_none()
                        || rs.original_max_position_embeddings.is_none()
                    {
                        return Err("rope_scaling (llama3) needs low_freq_factor, high_freq_factor and original_max_position_embeddings".into());
                    }
                }
                other => {
                    return Err(format!(
                        "rope_scaling.rope_type `{other}` is not supported (llama3 or default)"
                    ))
                }
            }
        }
        Ok(())
    }

    /// Inverse RoPE frequencies, one per pair of head dims, with llama3 scaling applied.
    pub fn inv_freq(&self) -> Vec<f64> {
        let hd = self.head_dim();
        let base: Vec<f64> = (0..hd)
            .step_by(2)
            .map(|i| 1.0 / self.rope_theta.powf(i as f64 / hd as f64))
            .collect();
        let Some(rs) = self
            .rope_scaling
            .as_ref()
            .filter(|r| r.rope_type == "llama3")
        else {
            return base;
        };
        let (lo, hi) = (
            rs.low_freq_factor.unwrap_or(1.0),
            rs.high_freq_factor.unwrap_or(4.0),
        );
        let orig = rs.original_max_position_embeddings.unwrap_or(8192) as f64;
        let (lo_wavelen, hi_wavelen) = (orig / lo, orig / hi);
        base.into_iter()
            .map(|f| {
                let wavelen = 2.0 * std::f64::consts::PI / f;
                if wavelen < hi_wavelen {
                    f
                } else if wavelen > lo_wavelen {
                    f / rs.factor
                } else {
                    let smooth = (orig / wavelen - lo) / (hi - lo);
                    (1.0 - smooth) * f / rs.factor + smooth * f
                }
            })
            .collect()
    }
}
