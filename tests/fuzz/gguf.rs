//! GGUF files: a tiny llama file with a byte-level BPE vocabulary, as llama.cpp writes them,
//! mutated in its metadata, its tensor list, or as raw bytes (extremes in every length, count,
//! dim, type and offset field of the header).

use crate::common;
use crate::mutate::{extreme_u64, mutate_bytes};
use crate::{drive, open_and_run, quiet_backtraces, rng_for, scaled};
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use rand::{rngs::StdRng, Rng};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

fn gguf_tokens() -> Vec<String> {
    let mut t: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into(), "Ġ".into()];
    t.extend((b'!'..=b'~').map(|c| (c as char).to_string()));
    t.extend(["he", "Ġt", "Ġthe", "in", "Ġk", "ing"].map(String::from));
    t
}

fn gguf_metadata(cfg: &Value) -> Vec<(String, gguf_file::Value)> {
    use gguf_file::Value as V;
    let u = |k: &str| V::U32(cfg[k].as_u64().unwrap() as u32);
    let tokens = gguf_tokens();
    let mut types = vec![V::I32(1); tokens.len()];
    for t in types.iter_mut().take(3) {
        *t = V::I32(3);
    }
    vec![
        ("general.architecture".into(), V::String("llama".into())),
        ("general.alignment".into(), V::U32(32)),
        (
            "llama.attention.head_count".into(),
            u("num_attention_heads"),
        ),
        (
            "llama.attention.head_count_kv".into(),
            u("num_key_value_heads"),
        ),
        ("llama.embedding_length".into(), u("hidden_size")),
        ("llama.feed_forward_length".into(), u("intermediate_size")),
        ("llama.block_count".into(), u("num_hidden_layers")),
        ("llama.context_length".into(), u("max_position_embeddings")),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            V::F32(1e-5),
        ),
        ("llama.rope.freq_base".into(), V::F32(10000.0)),
        ("tokenizer.ggml.model".into(), V::String("gpt2".into())),
        (
            "tokenizer.ggml.tokens".into(),
            V::Array(tokens.into_iter().map(V::String).collect()),
        ),
        (
            "tokenizer.ggml.merges".into(),
            V::Array(
                ["h e", "Ġ t", "Ġt he", "i n", "Ġ k", "in g"]
                    .map(|m| V::String(m.into()))
                    .to_vec(),
            ),
        ),
        ("tokenizer.ggml.token_type".into(), V::Array(types)),
        ("tokenizer.ggml.bos_token_id".into(), V::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), V::U32(2)),
        ("tokenizer.ggml.add_bos_token".into(), V::Bool(true)),
    ]
}

/// GGUF names and f32 tensors of the tiny model (q/k rows as llama.cpp permutes them does not
/// matter for robustness).
fn gguf_tensors(cfg: &Value) -> Vec<(String, Tensor)> {
    let w = common::weights(cfg, 11);
    let mut out = vec![
        (
            "token_embd.weight".to_string(),
            w["model.embed_tokens.weight"].clone(),
        ),
        (
            "output_norm.weight".to_string(),
            w["model.norm.weight"].clone(),
        ),
        ("output.weight".to_string(), w["lm_head.weight"].clone()),
    ];
    let names = [
        ("attn_norm", "input_layernorm"),
        ("ffn_norm", "post_attention_layernorm"),
        ("attn_q", "self_attn.q_proj"),
        ("attn_k", "self_attn.k_proj"),
        ("attn_v", "self_attn.v_proj"),
        ("attn_output", "self_attn.o_proj"),
        ("ffn_gate", "mlp.gate_proj"),
        ("ffn_up", "mlp.up_proj"),
        ("ffn_down", "mlp.down_proj"),
    ];
    for l in 0..cfg["num_hidden_layers"].as_u64().unwrap() {
        for (g, h) in names {
            out.push((
                format!("blk.{l}.{g}.weight"),
                w[&format!("model.layers.{l}.{h}.weight")].clone(),
            ));
        }
    }
    out
}

fn write_gguf(path: &Path, md: &[(String, gguf_file::Value)], tensors: &[(String, Tensor)]) {
    let qs: Vec<(String, QTensor)> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), QTensor::quantize(t, GgmlDType::F32).unwrap()))
        .collect();
    let md_refs: Vec<(&str, &gguf_file::Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = qs.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &md_refs, &t_refs).unwrap();
}

/// Offsets and widths of every length, count, dim, type and offset field of a GGUF header,
/// found by walking it: the places where a huge number must not become a huge allocation.
fn gguf_fields(b: &[u8]) -> (Vec<(usize, usize)>, usize) {
    let mut fields = vec![(8, 8), (16, 8)];
    let mut p = 24usize;
    let u32_at = |p: usize| u32::from_le_bytes(b[p..p + 4].try_into().unwrap());
    let u64_at = |p: usize| u64::from_le_bytes(b[p..p + 8].try_into().unwrap()) as usize;
    let (nt, nkv) = (u64_at(8), u64_at(16));
    fn skip_value(b: &[u8], p: &mut usize, ty: u32, fields: &mut Vec<(usize, usize)>) {
        let u32_at = |p: usize| u32::from_le_bytes(b[p..p + 4].try_into().unwrap());
        let u64_at = |p: usize| u64::from_le_bytes(b[p..p + 8].try_into().unwrap()) as usize;
        match ty {
            0 | 1 | 7 => *p += 1,
            2 | 3 => *p += 2,
            4..=6 => {
                fields.push((*p, 4));
                *p += 4
            }
            10..=12 => *p += 8,
            8 => {
                fields.push((*p, 8));
                *p += 8 + u64_at(*p)
            }
            9 => {
                fields.push((*p, 4));
                fields.push((*p + 4, 8));
                let (ety, n) = (u32_at(*p), u64_at(*p + 4));
                *p += 12;
                for _ in 0..n {
                    skip_value(b, p, ety, fields);
                }
            }
            _ => panic!("fixture has value type {ty}"),
        }
    }
    for _ in 0..nkv {
        fields.push((p, 8));
        p += 8 + u64_at(p);
        fields.push((p, 4));
        let ty = u32_at(p);
        p += 4;
        skip_value(b, &mut p, ty, &mut fields);
    }
    for _ in 0..nt {
        fields.push((p, 8));
        p += 8 + u64_at(p);
        fields.push((p, 4));
        let nd = u32_at(p) as usize;
        p += 4;
        for _ in 0..nd {
            fields.push((p, 8));
            p += 8;
        }
        fields.push((p, 4));
        fields.push((p + 4, 8));
        p += 12;
    }
    (fields, p)
}

fn mutate_gguf_metadata(rng: &mut StdRng, md: &mut Vec<(String, gguf_file::Value)>) {
    use gguf_file::Value as V;
    let i = rng.gen_range(0..md.len());
    let extreme_u32 = [0u32, 1, 3, 7, 1 << 16, 1 << 31, u32::MAX];
    let val = &mut md[i].1;
    match rng.gen_range(0..9) {
        0 => {
            md.remove(i);
        }
        1 => *val = V::U32(extreme_u32[rng.gen_range(0..extreme_u32.len())]),
        2 => {
            *val =
                V::String(["", "llama", "falcon", "12", "gpt2", "bpe"][rng.gen_range(0..6)].into())
        }
        3 => *val = V::F32([f32::NAN, f32::INFINITY, -1.0, 0.0, 1e38][rng.gen_range(0..5)]),
        4 => *val = V::Array(vec![]),
        5 => *val = V::Array(vec![V::U32(1), V::U32(u32::MAX)]),
        6 => *val = V::I64(-1),
        7 => *val = V::U64(u64::MAX),
        _ => {
            if let V::Array(a) = val {
                let n = a.len();
                if n > 0 {
                    a.truncate(rng.gen_range(0..n));
                }
            } else {
                *val = V::Bool(true);
            }
        }
    }
}

fn mutate_gguf_tensors(rng: &mut StdRng, ts: &mut Vec<(String, Tensor)>) {
    let i = rng.gen_range(0..ts.len());
    match rng.gen_range(0..4) {
        0 => {
            ts.remove(i);
        }
        1 => ts[i].0 = format!("{}x", ts[i].0),
        2 => {
            let dims: &[usize] = [&[1][..], &[5, 3], &[2, 2, 2], &[64, 33]][rng.gen_range(0..4)];
            ts[i].1 = Tensor::zeros(dims, DType::F32, &Device::Cpu).unwrap();
        }
        _ => {
            let n = ts[i].1.elem_count();
            let bad = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][rng.gen_range(0..3)];
            let mut v: Vec<f32> = ts[i].1.flatten_all().unwrap().to_vec1().unwrap();
            v[rng.gen_range(0..n)] = bad;
            ts[i].1 = Tensor::from_vec(v, ts[i].1.shape(), &Device::Cpu).unwrap();
        }
    }
}

pub(crate) fn gguf_case(dir: &Path, i: usize) -> PathBuf {
    let mut rng = rng_for("gguf", i);
    let cfg = common::config(common::Arch::Llama);
    let cfg = {
        let mut c = cfg;
        c["vocab_size"] = json!(gguf_tokens().len());
        c
    };
    let mut md = gguf_metadata(&cfg);
    let mut ts = gguf_tensors(&cfg);
    let path = dir.join(format!("case-{i}.gguf"));
    match i % 4 {
        // Structured: values a writer could put there (wrong types, extremes, missing keys,
        // wrong shapes, non-finite weights).
        0 => {
            for _ in 0..rng.gen_range(1..=2) {
                mutate_gguf_metadata(&mut rng, &mut md);
            }
            write_gguf(&path, &md, &ts);
        }
        1 => {
            mutate_gguf_tensors(&mut rng, &mut ts);
            write_gguf(&path, &md, &ts);
        }
        // Raw: extremes in the header's length / count / dim fields, or random bytes.
        _ => {
            write_gguf(&path, &md, &ts);
            let mut b = std::fs::read(&path).unwrap();
            let (fields, end) = gguf_fields(&b);
            if i % 4 == 2 {
                let (at, w) = fields[rng.gen_range(0..fields.len())];
                let v = extreme_u64(&mut rng).to_le_bytes();
                b[at..at + w].copy_from_slice(&v[..w]);
            } else {
                let len = b.len();
                let region = if rng.gen_bool(0.8) { 0..end } else { 0..len };
                mutate_bytes(&mut rng, &mut b, region);
            }
            std::fs::write(&path, b).unwrap();
        }
    }
    path
}

#[test]
fn fuzz_gguf_headers_and_metadata() {
    quiet_backtraces();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    // The unmutated fixture is a model eabfit reads: the mutants start from something valid.
    let clean = root.join("clean.gguf");
    let cfg = {
        let mut c = common::config(common::Arch::Llama);
        c["vocab_size"] = json!(gguf_tokens().len());
        c
    };
    write_gguf(&clean, &gguf_metadata(&cfg), &gguf_tensors(&cfg));
    open_and_run(&clean).unwrap();
    // And without the optional keys (llama.cpp writes `general.alignment` only sometimes).
    let mut md = gguf_metadata(&cfg);
    md.retain(|(k, _)| k != "general.alignment" && k != "tokenizer.ggml.token_type");
    write_gguf(&clean, &md, &gguf_tensors(&cfg));
    open_and_run(&clean).unwrap();
    let rejected = drive("gguf", scaled(1200), move |i| {
        let path = gguf_case(&root, i);
        let r = open_and_run(&path);
        let _ = std::fs::remove_file(&path);
        r
    });
    assert!(
        rejected > 600,
        "most mutants must be rejected, {rejected} were"
    );
}
