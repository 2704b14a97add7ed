//! GGUF twins of the tiny checkpoints, written as llama.cpp's converter writes them.

use super::Tiny;
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// The GGUF twin of a tiny checkpoint, as llama.cpp's converter writes one: its architecture's
/// metadata keys, blk.N.* tensor names, LLaMA's q/k rows (and biases) with their RoPE pairs
/// interleaved (Qwen's as they are), f32, and a byte-level BPE vocabulary of the same size with
/// the architecture's pre-tokenizer.
pub fn gguf_twin(tiny: &Tiny, path: &Path) {
    use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
    use gguf_file::Value as V;
    let cfg = &tiny.config;
    let arch = cfg["model_type"].as_str().unwrap().to_string();
    let u = |k: &str| cfg[k].as_u64().unwrap() as usize;
    let (d, h, kv, v) = (
        u("hidden_size"),
        u("num_attention_heads"),
        u("num_key_value_heads"),
        u("vocab_size"),
    );
    let hd = cfg["head_dim"].as_u64().map_or(d / h, |x| x as usize);
    let key = |k: &str| format!("{arch}.{k}");
    let mut md = vec![
        ("general.architecture".to_string(), V::String(arch.clone())),
        (key("attention.head_count"), V::U32(h as u32)),
        (key("attention.head_count_kv"), V::U32(kv as u32)),
        (key("attention.key_length"), V::U32(hd as u32)),
        (key("embedding_length"), V::U32(d as u32)),
        (
            key("feed_forward_length"),
            V::U32(u("intermediate_size") as u32),
        ),
        (key("block_count"), V::U32(u("num_hidden_layers") as u32)),
        (
            key("context_length"),
            V::U32(u("max_position_embeddings") as u32),
        ),
        (
            key("attention.layer_norm_rms_epsilon"),
            V::F32(cfg["rms_norm_eps"].as_f64().unwrap() as f32),
        ),
        (
            key("rope.freq_base"),
            V::F32(cfg["rope_theta"].as_f64().unwrap() as f32),
        ),
        (key("rope.dimension_count"), V::U32(hd as u32)),
    ];
    // Byte-level tokens: the specials, printable ASCII, then fillers up to the vocabulary size.
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into(), "Ġ".into()];
    tokens.extend((b'!'..=b'~').map(|c| (c as char).to_string()));
    tokens.truncate(v - 1);
    let fill = v - 1 - tokens.len();
    tokens.extend((0..fill).map(|i| format!("tok{i}")));
    tokens.push("!\"".into());
    let pre = if arch.starts_with("qwen") {
        "qwen2"
    } else {
        "default"
    };
    let mut types = vec![V::I32(1); v];
    types[..3].fill(V::I32(3));
    md.extend([
        ("tokenizer.ggml.model".to_string(), V::String("gpt2".into())),
        ("tokenizer.ggml.pre".to_string(), V::String(pre.into())),
        (
            "tokenizer.ggml.tokens".to_string(),
            V::Array(tokens.into_iter().map(V::String).collect()),
        ),
        (
            "tokenizer.ggml.merges".to_string(),
            V::Array(vec![V::String("! \"".into())]),
        ),
        ("tokenizer.ggml.token_type".to_string(), V::Array(types)),
        ("tokenizer.ggml.bos_token_id".to_string(), V::U32(1)),
        ("tokenizer.ggml.eos_token_id".to_string(), V::U32(2)),
    ]);
    let w: HashMap<String, Tensor> =
        candle_core::safetensors::load(tiny.path().join("model.safetensors"), &Device::Cpu)
            .unwrap();
    // HF rotate-half rows -> llama.cpp's interleaved pairs: (heads, 2, hd/2, in) -> (heads, hd/2, 2, in).
    let permute = |t: &Tensor, heads: usize| -> Tensor {
        let cols = t.elem_count() / (heads * hd);
        t.reshape((heads, 2, hd / 2, cols))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape(t.shape())
            .unwrap()
    };
    let llama_rope = arch == "llama" || arch == "mistral";
    let mut out: Vec<(String, Tensor)> = vec![];
    for (name, t) in &w {
        let g = match name.as_str() {
            "model.embed_tokens.weight" => "token_embd.weight".to_string(),
            "model.norm.weight" => "output_norm.weight".to_string(),
            "lm_head.weight" => "output.weight".to_string(),
            _ => {
                let rest = name.strip_prefix("model.layers.").unwrap();
                let (layer, tail) = rest.split_once('.').unwrap();
                let g = match tail {
                    "input_layernorm.weight" => "attn_norm.weight",
                    "post_attention_layernorm.weight" => "ffn_norm.weight",
                    "self_attn.q_proj.weight" => "attn_q.weight",
                    "self_attn.k_proj.weight" => "attn_k.weight",
                    "self_attn.v_proj.weight" => "attn_v.weight",
                    "self_attn.o_proj.weight" => "attn_output.weight",
                    "self_attn.q_proj.bias" => "attn_q.bias",
                    "self_attn.k_proj.bias" => "attn_k.bias",
                    "self_attn.v_proj.bias" => "attn_v.bias",
                    "self_attn.o_proj.bias" => "attn_output.bias",
                    "self_attn.q_norm.weight" => "attn_q_norm.weight",
                    "self_attn.k_norm.weight" => "attn_k_norm.weight",
                    "mlp.gate_proj.weight" => "ffn_gate.weight",
                    "mlp.up_proj.weight" => "ffn_up.weight",
                    "mlp.down_proj.weight" => "ffn_down.weight",
                    other => panic!("no GGUF name for {other}"),
                };
                format!("blk.{layer}.{g}")
            }
        };
        let t = match name.rsplit('.').nth(1) {
            Some("q_proj") if llama_rope => permute(t, h),
            Some("k_proj") if llama_rope => permute(t, kv),
            _ => t.clone(),
        };
        out.push((g, t));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    let qs: Vec<(String, QTensor)> = out
        .iter()
        .map(|(n, t)| (n.clone(), QTensor::quantize(t, GgmlDType::F32).unwrap()))
        .collect();
    let md_refs: Vec<(&str, &V)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = qs.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &md_refs, &t_refs).unwrap();
}
