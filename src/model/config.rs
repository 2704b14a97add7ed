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

/// The fields of a Hugging Face `config.json` this model reads (LlamaConfig, MistralConfig,
/// Qwen2Config, Qwen3Config). `Default` (all zeros and none) only completes literals.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
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
    /// Biases on q, k, v and o (LLaMA, Qwen3); Qwen2 has q/k/v biases whatever it says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_bias: Option<bool>,
    // Read only to refuse what this decoder does not compute (see `Config::validate`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mlp_bias: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_act: Option<String>,
    /// Qwen's switch for `sliding_window` (off: the window is ignored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_sliding_window: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_types: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial_rotary_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attn_logit_softcapping: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_logit_softcapping: Option<f64>,
    /// GPTQ, AWQ, bitsandbytes, fp8, ...: weights that only mean something with their scales.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization_config: Option<serde_json::Value>,
}

/// The decoder families this model computes, by `model_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
}

impl Family {
    pub const SUPPORTED: &'static str = "llama, mistral, qwen2, qwen3";

    /// A config without `model_type` (older LLaMA checkpoints) is a LLaMA; an `eabfit export`
    /// with slots (`eab_llama`, ...) is its base family.
    pub fn of(model_type: Option<&str>) -> Result<Self, String> {
        let t = model_type.unwrap_or("llama");
        match t.strip_prefix("eab_").unwrap_or(t) {
            "llama" => Ok(Self::Llama),
            "mistral" => Ok(Self::Mistral),
            "qwen2" => Ok(Self::Qwen2),
            "qwen3" => Ok(Self::Qwen3),
            other => Err(format!(
                "model_type `{other}` is not supported (eabfit runs {})",
                Self::SUPPORTED
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Mistral => "mistral",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
        }
    }
}

impl Config {
    pub fn n_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// The family of `model_type`; [`Config::validate`] has refused unknown ones.
    pub fn family(&self) -> Family {
        Family::of(self.model_type.as_deref()).unwrap_or(Family::Llama)
    }

    /// Whether q, k and v carry biases: always in Qwen2, with `attention_bias` elsewhere.
    pub fn qkv_bias(&self) -> bool {
        self.family() == Family::Qwen2 || self.o_bias()
    }

    /// Whether o carries a bias (`attention_bias`; transformers' Qwen2 never has one).
    pub fn o_bias(&self) -> bool {
        self.family() != Family::Qwen2 && self.attention_bias.unwrap_or(false)
    }

    /// Whether queries and keys are RMS-normed per head before RoPE (`q_norm`, `k_norm`: Qwen3).
    pub fn qk_norm(&self) -> bool {
        self.family() == Family::Qwen3
    }

    /// Parameters of one layer's biases and head norms (Qwen's; none in a plain LLaMA).
    pub fn bias_and_head_norm_params(&self) -> usize {
        let (h, kv, hd) = (self.num_attention_heads, self.n_kv_heads(), self.head_dim());
        let qkv = if self.qkv_bias() {
            (h + 2 * kv) * hd
        } else {
            0
        };
        let o = if self.o_bias() { self.hidden_size } else { 0 };
        let norms = if self.qk_norm() { 2 * hd } else { 0 };
        qkv + o + norms
    }

    /// The attention window: Mistral's (and LLaMA's, when set) `sliding_window`; Qwen's only
    /// with `use_sliding_window`, which [`Config::validate`] refuses in a checkpoint (its window
    /// covers only some layers) and `Model::with_sliding_window` sets for every layer.
    pub fn window(&self) -> Option<usize> {
        match self.family() {
            Family::Qwen2 | Family::Qwen3 => self
                .sliding_window
                .filter(|_| self.use_sliding_window == Some(true)),
            Family::Llama | Family::Mistral => self.sliding_window,
        }
    }

    /// Fields that would change the computation to something this decoder does not run.
    fn check_supported(&self) -> Result<(), String> {
        let family = Family::of(self.model_type.as_deref())?;
        let name = family.name();
        if let Some(act) = self.hidden_act.as_deref().filter(|a| *a != "silu") {
            return Err(format!(
                "hidden_act `{act}` is not supported (the {name} decoder here runs silu)"
            ));
        }
        if self.mlp_bias == Some(true) {
            return Err("mlp_bias true is not supported (gate/up/down biases)".into());
        }
        if family == Family::Mistral && self.attention_bias == Some(true) {
            return Err("attention_bias true with model_type mistral is not supported (transformers' Mistral has no biases)".into());
        }
        let qwen = matches!(family, Family::Qwen2 | Family::Qwen3);
        if qwen && self.use_sliding_window == Some(true) {
            return Err(format!(
                "use_sliding_window true is not supported for {name} (windowed attention in the layers past max_window_layers); only full attention is"
            ));
        }
        if let Some(t) = self.layer_types.iter().flatten().find(|t| {
            *t != "full_attention" && !(family == Family::Mistral && *t == "sliding_attention")
        }) {
            return Err(format!(
                "layer_types `{t}` is not supported for {name} (full_attention)"
            ));
        }
        if let Some(p) = self.partial_rotary_factor.filter(|p| *p != 1.0) {
            return Err(format!(
                "partial_rotary_factor {p} is not supported (RoPE over the whole head only)"
            ));
        }
        if let Some(q) = &self.quantization_config {
            let method = q
                .get("quant_method")
                .and_then(|m| m.as_str())
                .unwrap_or("?");
            return Err(format!(
                "quantization_config (quant_method `{method}`) is not supported: eabfit reads unquantized weights \
                 (safetensors in f32, f16 or bf16, or GGUF); dequantize the checkpoint first"
            ));
        }
        for (field, v) in [
            ("attn_logit_softcapping", self.attn_logit_softcapping),
            ("final_logit_softcapping", self.final_logit_softcapping),
        ] {
            if let Some(v) = v {
                return Err(format!("{field} {v} is not supported (no softcapping)"));
            }
        }
        Ok(())
    }

    /// Checks the combinations serde cannot; the message names the offending field.
    pub fn validate(&self) -> Result<(), String> {
        self.check_supported()?;
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
