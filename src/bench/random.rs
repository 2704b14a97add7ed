//! The model a benchmark times: the configurations it knows ([`Shape`]), random weights of
//! one, and the parameter counts its FLOP model uses.

use crate::device_map::Placement;
use crate::model::Config;
use crate::Result;
use candle_core::{DType, Tensor};
use serde::Serialize;
use std::collections::HashMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Shape {
    /// LLaMA-2-7B: hidden 4096, ffn 11008, 32 layers, 32/32 heads, vocab 32000, untied
    #[value(name = "llama2-7b")]
    Llama2_7b,
    /// LLaMA-2-70B: hidden 8192, ffn 28672, 80 layers, 64/8 heads, vocab 32000, untied (two
    /// GPUs or more: --device-map)
    #[value(name = "llama2-70b")]
    Llama2_70b,
    /// LLaMA-3.2-1B-like: hidden 2048, ffn 8192, 16 layers, 32/8 heads, vocab 128256, tied
    #[value(name = "llama-1b")]
    Llama1b,
    /// SmolLM2-135M: hidden 576, ffn 1536, 30 layers, 9/3 heads, vocab 49152, tied
    #[value(name = "smollm2-135m")]
    Smollm2_135m,
    /// Qwen2.5-7B: hidden 3584, ffn 18944, 28 layers, 28/4 heads, vocab 152064, untied,
    /// q/k/v biases
    #[value(name = "qwen2.5-7b")]
    Qwen2_5_7b,
    /// Qwen3-8B: hidden 4096, ffn 12288, 36 layers, 32/8 heads of 128, vocab 151936, untied,
    /// q/k head norms
    #[value(name = "qwen3-8b")]
    Qwen3_8b,
    /// A few-KB model for CPU smoke tests
    #[value(name = "tiny")]
    Tiny,
}

impl Shape {
    pub fn name(self) -> &'static str {
        match self {
            Shape::Llama2_7b => "llama2-7b",
            Shape::Llama2_70b => "llama2-70b",
            Shape::Llama1b => "llama-1b",
            Shape::Smollm2_135m => "smollm2-135m",
            Shape::Qwen2_5_7b => "qwen2.5-7b",
            Shape::Qwen3_8b => "qwen3-8b",
            Shape::Tiny => "tiny",
        }
    }

    /// The model config; `max_position_embeddings` covers `seq` (it only sizes the RoPE table).
    pub fn config(self, seq: usize) -> Config {
        // (hidden, ffn, layers, heads, kv heads, vocab, tied, rope theta)
        let (d, f, l, h, kv, v, tied, theta) = match self {
            Shape::Llama2_7b => (4096, 11008, 32, 32, 32, 32000, false, 10_000.0),
            Shape::Llama2_70b => (8192, 28672, 80, 64, 8, 32000, false, 10_000.0),
            Shape::Llama1b => (2048, 8192, 16, 32, 8, 128_256, true, 500_000.0),
            Shape::Smollm2_135m => (576, 1536, 30, 9, 3, 49_152, true, 100_000.0),
            Shape::Qwen2_5_7b => (3584, 18944, 28, 28, 4, 152_064, false, 1_000_000.0),
            Shape::Qwen3_8b => (4096, 12288, 36, 32, 8, 151_936, false, 1_000_000.0),
            Shape::Tiny => (64, 128, 2, 4, 2, 512, false, 10_000.0),
        };
        let (family, eps) = match self {
            Shape::Qwen2_5_7b => ("qwen2", 1e-6),
            Shape::Qwen3_8b => ("qwen3", 1e-6),
            _ => ("llama", 1e-5),
        };
        Config {
            model_type: Some(family.into()),
            hidden_size: d,
            intermediate_size: f,
            num_hidden_layers: l,
            num_attention_heads: h,
            num_key_value_heads: Some(kv),
            head_dim: None,
            rms_norm_eps: eps,
            rope_theta: theta,
            vocab_size: v,
            max_position_embeddings: seq.max(4096),
            tie_word_embeddings: tied,
            rope_scaling: None,
            sliding_window: None,
            bos_token_id: Some(1),
            eos_token_id: None,
            ..Default::default()
        }
    }

    pub(super) fn default_seq(self) -> usize {
        match self {
            Shape::Tiny => 32,
            _ => 2048,
        }
    }
}

/// Parameters of `cfg` (tied head once) and the FLOP model's N (head always).
pub fn param_counts(cfg: &Config) -> (usize, usize) {
    let (d, f, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim());
    let attn = d * hd * (2 * cfg.num_attention_heads + 2 * cfg.n_kv_heads());
    let per_layer_matmul = attn + 3 * d * f;
    let head = cfg.vocab_size * d;
    let matmul = cfg.num_hidden_layers * per_layer_matmul + head;
    let norms = (2 * cfg.num_hidden_layers + 1) * d
        + cfg.num_hidden_layers * cfg.bias_and_head_norm_params();
    let embed = cfg.vocab_size * d;
    let total = cfg.num_hidden_layers * per_layer_matmul
        + norms
        + embed
        + if cfg.tie_word_embeddings { 0 } else { head };
    (total, matmul)
}

/// Random base weights in the Hugging Face layout, each built on the device `placement` gives
/// its tensor: N(0, 0.02) projections and embedding (generated in f32, then cast), unit norms.
pub fn random_weights(
    cfg: &Config,
    dtype: DType,
    placement: &Placement,
) -> Result<HashMap<String, Tensor>> {
    let (d, f, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let (h, kv, hd) = (cfg.num_attention_heads, cfg.n_kv_heads(), cfg.head_dim());
    let on = |name: &str| placement.device(placement.slot_of_tensor(name));
    let mut w = HashMap::new();
    let mut randn = |name: String, shape: (usize, usize)| -> Result<()> {
        let t = Tensor::randn(0f32, 0.02f32, shape, on(&name))?.to_dtype(dtype)?;
        w.insert(name, t);
        Ok(())
    };
    randn("model.embed_tokens.weight".into(), (v, d))?;
    if !cfg.tie_word_embeddings {
        randn("lm_head.weight".into(), (v, d))?;
    }
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        randn(format!("{p}.self_attn.q_proj.weight"), (h * hd, d))?;
        randn(format!("{p}.self_attn.k_proj.weight"), (kv * hd, d))?;
        randn(format!("{p}.self_attn.v_proj.weight"), (kv * hd, d))?;
        randn(format!("{p}.self_attn.o_proj.weight"), (d, h * hd))?;
        randn(format!("{p}.mlp.gate_proj.weight"), (f, d))?;
        randn(format!("{p}.mlp.up_proj.weight"), (f, d))?;
        randn(format!("{p}.mlp.down_proj.weight"), (d, f))?;
    }
    let mut norms = vec!["model.norm.weight".to_string()];
    for i in 0..cfg.num_hidden_layers {
        norms.push(format!("model.layers.{i}.input_layernorm.weight"));
        norms.push(format!("model.layers.{i}.post_attention_layernorm.weight"));
    }
    for n in norms {
        let t = Tensor::ones(d, dtype, on(&n))?;
        w.insert(n, t);
    }
    // Qwen's biases (N(0, 0.02)) and unit head norms, each on its layer's device.
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}.self_attn");
        let mut extra = vec![];
        if cfg.qkv_bias() {
            extra.push((format!("{p}.q_proj.bias"), h * hd, false));
            extra.push((format!("{p}.k_proj.bias"), kv * hd, false));
            extra.push((format!("{p}.v_proj.bias"), kv * hd, false));
        }
        if cfg.o_bias() {
            extra.push((format!("{p}.o_proj.bias"), d, false));
        }
        if cfg.qk_norm() {
            extra.push((format!("{p}.q_norm.weight"), hd, true));
            extra.push((format!("{p}.k_norm.weight"), hd, true));
        }
        for (name, n, unit) in extra {
            let t = if unit {
                Tensor::ones(n, dtype, on(&name))?
            } else {
                Tensor::randn(0f32, 0.02f32, n, on(&name))?.to_dtype(dtype)?
            };
            w.insert(name, t);
        }
    }
    Ok(w)
}
