//! The model a benchmark times: random weights of a real configuration, and the parameter
//! counts its FLOP model uses.

use crate::model::Config;
use crate::Result;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;

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

/// Random base weights in the Hugging Face layout, built on `device`: N(0, 0.02) projections
/// and embedding (generated in f32, then cast), unit norms.
pub fn random_weights(
    cfg: &Config,
    dtype: DType,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let (d, f, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let (h, kv, hd) = (cfg.num_attention_heads, cfg.n_kv_heads(), cfg.head_dim());
    let randn = |shape: (usize, usize)| -> Result<Tensor> {
        Ok(Tensor::randn(0f32, 0.02f32, shape, device)?.to_dtype(dtype)?)
    };
    let ones = |n: usize| -> Result<Tensor> { Ok(Tensor::ones(n, dtype, device)?) };
    let bias = |n: usize| -> Result<Tensor> {
        Ok(Tensor::randn(0f32, 0.02f32, n, device)?.to_dtype(dtype)?)
    };
    let mut w = HashMap::new();
    w.insert("model.embed_tokens.weight".to_string(), randn((v, d))?);
    w.insert("model.norm.weight".to_string(), ones(d)?);
    if !cfg.tie_word_embeddings {
        w.insert("lm_head.weight".to_string(), randn((v, d))?);
    }
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        w.insert(format!("{p}.input_layernorm.weight"), ones(d)?);
        w.insert(format!("{p}.post_attention_layernorm.weight"), ones(d)?);
        if cfg.qkv_bias() {
            w.insert(format!("{p}.self_attn.q_proj.bias"), bias(h * hd)?);
            w.insert(format!("{p}.self_attn.k_proj.bias"), bias(kv * hd)?);
            w.insert(format!("{p}.self_attn.v_proj.bias"), bias(kv * hd)?);
        }
        if cfg.o_bias() {
            w.insert(format!("{p}.self_attn.o_proj.bias"), bias(d)?);
        }
        if cfg.qk_norm() {
            w.insert(format!("{p}.self_attn.q_norm.weight"), ones(hd)?);
            w.insert(format!("{p}.self_attn.k_norm.weight"), ones(hd)?);
        }
        w.insert(format!("{p}.self_attn.q_proj.weight"), randn((h * hd, d))?);
        w.insert(format!("{p}.self_attn.k_proj.weight"), randn((kv * hd, d))?);
        w.insert(format!("{p}.self_attn.v_proj.weight"), randn((kv * hd, d))?);
        w.insert(format!("{p}.self_attn.o_proj.weight"), randn((d, h * hd))?);
        w.insert(format!("{p}.mlp.gate_proj.weight"), randn((f, d))?);
        w.insert(format!("{p}.mlp.up_proj.weight"), randn((f, d))?);
        w.insert(format!("{p}.mlp.down_proj.weight"), randn((d, f))?);
    }
    Ok(w)
}
