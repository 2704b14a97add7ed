//! The model a benchmark times: random weights of a real configuration, and the parameter
//! counts its FLOP model uses.

use crate::device_map::Placement;
use crate::model::Config;
use crate::Result;
use candle_core::{DType, Tensor};
use std::collections::HashMap;

/// Parameters of `cfg` (tied head once) and the FLOP model's N (head always).
pub fn param_counts(cfg: &Config) -> (usize, usize) {
    let (d, f, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim());
    let attn = d * hd * (2 * cfg.num_attention_heads + 2 * cfg.n_kv_heads());
    let per_layer_matmul = attn + 3 * d * f;
    let head = cfg.vocab_size * d;
    let matmul = cfg.num_hidden_layers * per_layer_matmul + head;
    let norms = (2 * cfg.num_hidden_layers + 1) * d;
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
    Ok(w)
}
