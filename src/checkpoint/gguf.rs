//! GGUF files of the `llama`, `mistral`, `qwen2` and `qwen3` architectures, dequantized at load
//! and renamed into the Hugging Face layout, so that one model file serves every source.
//!
//! llama.cpp's converter interleaves the RoPE pairs of LLaMA's q/k rows (its `llama` RoPE) but
//! stores Qwen's as transformers has them (its NEOX RoPE), so only the former are unpermuted.
//! A tensor or setting the decoder would not compute (an unknown tensor name, RoPE scaling,
//! partial rotary, experts) is refused by name rather than dropped.

use super::{gguf_check, Checkpoint, Format, Tok, Weights};
use crate::model::{Config, Family};
use crate::{Error, Result};
use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub(super) fn open(path: &Path) -> Result<Checkpoint> {
    // Names inside a corrupt file can hold any bytes: escape control characters so that the
    // message stays one line.
    let err = |msg: String| Error::file(path, crate::error::escape_controls(&msg));
    let mut file = std::fs::File::open(path).map_err(|e| Error::file(path, e))?;
    let file_len = file.metadata().map_err(|e| Error::file(path, e))?.len();
    gguf_check::alignment(&mut file).map_err(|e| err(format!("not a readable GGUF: {e}")))?;
    let mut content = gguf_file::Content::read(&mut file)
        .map_err(|e| err(format!("not a readable GGUF: {e}")))?;
    gguf_check::tensors(&content, file_len).map_err(err)?;
    let md = &content.metadata;
    let arch = md
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .ok_or_else(|| err("missing metadata `general.architecture`".into()))?;
    let family = Family::of(Some(&arch)).map_err(|_| {
        err(format!(
            "unsupported GGUF architecture `{arch}` (eabfit reads {})",
            Family::SUPPORTED
        ))
    })?;
    let u = |k: &str| -> Result<usize> {
        let key = format!("{arch}.{k}");
        md.get(&key)
            .and_then(|v| v.to_u32().ok())
            .map(|x| x as usize)
            .ok_or_else(|| err(format!("missing metadata `{key}`")))
    };
    let f = |k: &str| {
        md.get(&format!("{arch}.{k}"))
            .and_then(|v| v.to_f32().ok())
            .map(f64::from)
    };
    let (n_heads, n_kv) = (u("attention.head_count")?, u("attention.head_count_kv")?);
    let hidden = u("embedding_length")?;
    let embd = content
        .tensor_infos
        .get("token_embd.weight")
        .ok_or_else(|| err("missing tensor `token_embd.weight`".into()))?;
    let vocab_size = *embd
        .shape
        .dims()
        .first()
        .ok_or_else(|| err("tensor `token_embd.weight` has no dimensions".into()))?;
    let tie = !content.tensor_infos.contains_key("output.weight");
    refuse_unsupported(md, &arch, n_heads, u("attention.key_length").ok(), hidden).map_err(err)?;
    // Biases of layer 0 stand for every layer: a layer without them fails at load, naming the
    // missing tensor. (Qwen2 has q/k/v biases whatever this says, and never an o bias.)
    let has = |t: &str| content.tensor_infos.contains_key(&format!("blk.0.{t}"));
    let attention_bias = match family {
        Family::Qwen2 if has("attn_output.bias") => {
            return Err(err(
                "tensor `blk.0.attn_output.bias`: qwen2 has no output projection bias".into(),
            ))
        }
        Family::Qwen2 => None,
        _ => Some(has("attn_q.bias") || has("attn_output.bias")),
    };
    let config = Config {
        model_type: Some(arch.clone()),
        hidden_size: hidden,
        intermediate_size: u("feed_forward_length")?,
        num_hidden_layers: u("block_count")?,
        num_attention_heads: n_heads,
        num_key_value_heads: Some(n_kv),
        head_dim: u("attention.key_length").ok(),
        rms_norm_eps: f("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
        rope_theta: f("rope.freq_base").unwrap_or(10_000.0),
        vocab_size,
        max_position_embeddings: u("context_length").unwrap_or(4096),
        tie_word_embeddings: tie,
        rope_scaling: None,
        sliding_window: None,
        bos_token_id: md
            .get("tokenizer.ggml.bos_token_id")
            .and_then(|v| v.to_u32().ok()),
        eos_token_id: md
            .get("tokenizer.ggml.eos_token_id")
            .and_then(|v| v.to_u32().ok())
            .map(Into::into),
        attention_bias,
        ..Default::default()
    };
    config
        .validate()
        .and_then(|()| super::check_limits(&config))
        .map_err(err)?;
    let tokenizer = Tok::from_gguf(path, md)?;
    let hd = config.head_dim();
    let permuted = matches!(family, Family::Llama | Family::Mistral);
    let mut tensors = HashMap::new();
    let mut stored = String::new();
    for (name, info) in std::mem::take(&mut content.tensor_infos) {
        let hf_name = hf_name(&name).ok_or_else(|| {
            err(format!(
                "tensor `{name}` is not one eabfit computes with (a {arch} decoder without it would run a different model)"
            ))
        })?;
        if name.ends_with("attn_q.weight") && stored.is_empty() {
            stored = format!("{:?}", info.ggml_dtype);
        }
        let heads = if !permuted {
            None
        } else if name.ends_with("attn_q.weight") || name.ends_with("attn_q.bias") {
            Some(n_heads)
        } else if name.ends_with("attn_k.weight") || name.ends_with("attn_k.bias") {
            Some(n_kv)
        } else {
            None
        };
        // Checked here, from the header, so that a file that cannot be unpermuted fails at open
        // as it did when every tensor was read then.
        if let Some(heads) = heads {
            let rows = info.shape.dims().first().copied().unwrap_or(0);
            if rows != heads * hd || !hd.is_multiple_of(2) || info.shape.rank() > 2 {
                return Err(err(format!(
                    "tensor `{name}` of shape {:?} does not fit {heads} heads of {hd}",
                    info.shape.dims()
                )));
            }
        }
        tensors.insert(hf_name, GgufTensor { name, info, heads });
    }
    let raw_config = serde_json::to_value(&config).map_err(|e| err(e.to_string()))?;
    Ok(Checkpoint {
        source: path.to_path_buf(),
        format: Format::Gguf,
        config,
        raw_config,
        tokenizer,
        stored_dtype: stored,
        eab: None,
        weights: Weights::Gguf(GgufWeights {
            path: path.to_path_buf(),
            data_offset: content.tensor_data_offset,
            head_dim: hd,
            tensors,
        }),
    })
}

/// A GGUF's tensors, read and dequantized one at a time when asked for: a 70B model in host
/// memory as f32 would take ~280 GB.
pub(super) struct GgufWeights {
    path: PathBuf,
    data_offset: u64,
    head_dim: usize,
    /// By Hugging Face name.
    tensors: HashMap<String, GgufTensor>,
}

struct GgufTensor {
    /// The name in the file.
    name: String,
    info: gguf_file::TensorInfo,
    /// Heads whose RoPE pairs llama.cpp interleaved (LLaMA / Mistral q and k); `None` otherwise.
    heads: Option<usize>,
}

impl GgufWeights {
    /// Every tensor's Hugging Face name and shape, from the header.
    pub(super) fn shapes(&self) -> impl Iterator<Item = (String, Vec<usize>)> + '_ {
        self.tensors
            .iter()
            .map(|(k, t)| (k.clone(), t.info.shape.dims().to_vec()))
    }

    pub(super) fn contains(&self, hf_name: &str) -> bool {
        self.tensors.contains_key(hf_name)
    }

    /// Tensor `hf_name` dequantized to f32 on the host, in the Hugging Face layout.
    pub(super) fn read(&self, hf_name: &str) -> Result<Tensor> {
        let err = |msg: String| Error::file(&self.path, crate::error::escape_controls(&msg));
        let t = self
            .tensors
            .get(hf_name)
            .ok_or_else(|| err(format!("tensor `{hf_name}`: not in the checkpoint")))?;
        let mut file = std::fs::File::open(&self.path).map_err(|e| Error::file(&self.path, e))?;
        let w = t
            .info
            .read(&mut file, self.data_offset, &Device::Cpu)
            .and_then(|q| q.dequantize(&Device::Cpu))
            .and_then(|w| w.to_dtype(DType::F32))
            .and_then(|w| match t.heads {
                Some(heads) => unpermute(&w, heads, self.head_dim),
                None => Ok(w),
            });
        w.map_err(|e| err(format!("tensor `{}`: {e}", t.name)))
    }
}

/// Metadata of settings the decoder does not compute: RoPE scaling (llama.cpp keeps LLaMA-3's
/// in a `rope_freqs` tensor, refused as an unknown tensor), a rotary part smaller than the
/// head, mixture-of-experts layers.
fn refuse_unsupported(
    md: &HashMap<String, gguf_file::Value>,
    arch: &str,
    heads: usize,
    key_length: Option<usize>,
    hidden: usize,
) -> std::result::Result<(), String> {
    let get = |k: &str| md.get(&format!("{arch}.{k}"));
    if let Some(kind) = get("rope.scaling.type").and_then(|v| v.to_string().ok()) {
        if kind != "none" {
            return Err(format!(
                "metadata `{arch}.rope.scaling.type` `{kind}` is not supported (no RoPE scaling in a GGUF)"
            ));
        }
    }
    let head_dim = key_length.unwrap_or(hidden / heads.max(1));
    if let Some(rot) = get("rope.dimension_count").and_then(|v| v.to_u32().ok()) {
        if rot as usize != head_dim {
            return Err(format!(
                "metadata `{arch}.rope.dimension_count` {rot} is not the head dim {head_dim} (partial rotary is not supported)"
            ));
        }
    }
    if let Some(n) = get("expert_count").and_then(|v| v.to_u32().ok()) {
        if n > 0 {
            return Err(format!(
                "metadata `{arch}.expert_count` {n}: mixture-of-experts layers are not supported"
            ));
        }
    }
    Ok(())
}

/// GGUF tensor name -> Hugging Face name; `None` for a tensor the model does not compute with.
fn hf_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(n) = fixed {
        return Some(n.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, tail) = rest.split_once('.')?;
    let hf = match tail {
        "attn_norm.weight" => "input_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "attn_q.bias" => "self_attn.q_proj.bias",
        "attn_k.bias" => "self_attn.k_proj.bias",
        "attn_v.bias" => "self_attn.v_proj.bias",
        "attn_output.bias" => "self_attn.o_proj.bias",
        "attn_q_norm.weight" => "self_attn.q_norm.weight",
        "attn_k_norm.weight" => "self_attn.k_norm.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}"))
}

/// llama.cpp stores q/k rows with RoPE pairs interleaved (Meta layout); the Hugging Face layout
/// (and our rotate-half RoPE) wants the two halves of each head apart.
/// A bias (out) goes through as one column.
fn unpermute(w: &Tensor, heads: usize, hd: usize) -> candle_core::Result<Tensor> {
    if w.rank() == 1 {
        return unpermute(&w.unsqueeze(1)?, heads, hd)?.squeeze(1);
    }
    let (out, inp) = w.dims2()?;
    w.reshape((heads, hd / 2, 2, inp))? // (heads, hd/2, 2, in): pairs interleaved
        .transpose(1, 2)? // (heads, 2, hd/2, in): halves apart
        .contiguous()?
        .reshape((out, inp))
}
