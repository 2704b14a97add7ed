//! Mutation fuzzing of every file eabfit reads: GGUF headers and metadata, safetensors headers,
//! config.json, tokenizer.json, adapter folders, recipes and `key=value` overrides.
//!
//! Every case is a deterministic function of its index (seeded mutators written here: bit
//! flips, truncation, byte insertion and deletion, extreme numbers in length / count / dim
//! fields, JSON and YAML type swaps). Most cases call the library in-process under
//! `catch_unwind` (fast); a smaller set runs the binary for the exit-code contract. Each case
//! must end, within a time bound, either accepted or with a one-line error naming the file.

mod common;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use eabfit::adapters::{AdapterMeta, AdapterSet, Adapters, SlotInit};
use eabfit::checkpoint::Checkpoint;
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde_json::{json, Value};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// CI runs the counts as written; `EABFIT_FUZZ_SCALE=K` runs K times as many (new seeds too)
/// for a deeper search by hand.
fn scaled(n: usize) -> usize {
    let k: usize = std::env::var("EABFIT_FUZZ_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    n * k.max(1)
}

/// A case that takes longer than this counts as a hang (the slowest real ones take ~50 ms).
const CASE_LIMIT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------
// The driver: cases run on a worker thread; the test thread watches the clock.

/// What one case ended with: `Ok` (the mutant was still valid) or the error message and the
/// text the message must name.
type Outcome = Result<(), (String, String)>;

/// Runs `n` cases of `body` and asserts the contract; returns the number of errors seen.
fn drive(name: &str, n: usize, body: impl Fn(usize) -> Outcome + Send + 'static) -> usize {
    quiet_backtraces();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for i in 0..n {
            let r = catch_unwind(AssertUnwindSafe(|| body(i)));
            if tx.send((i, r)).is_err() {
                return;
            }
        }
    });
    let start = Instant::now();
    let (mut errors, mut bad) = (0, vec![]);
    for expect in 0..n {
        let (i, r) = match rx.recv_timeout(CASE_LIMIT) {
            Ok(x) => x,
            Err(_) => panic!("{name} case {expect}: no answer within {CASE_LIMIT:?} (hang)"),
        };
        match r {
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                bad.push(format!("{name} case {i}: PANIC {msg}"));
            }
            Ok(Ok(())) => {}
            Ok(Err((msg, needle))) => {
                errors += 1;
                if msg.contains('\n') || msg.trim().is_empty() {
                    bad.push(format!("{name} case {i}: not one line: {msg:?}"));
                } else if !msg.contains(&needle) {
                    bad.push(format!("{name} case {i}: does not name `{needle}`: {msg}"));
                }
            }
        }
    }
    eprintln!(
        "fuzz {name}: {n} cases, {errors} rejected, {} accepted, {:.2} s",
        n - errors,
        start.elapsed().as_secs_f64()
    );
    assert!(
        bad.is_empty(),
        "{} failures:\n{}",
        bad.len(),
        bad.join("\n")
    );
    errors
}

/// The binary turns candle's backtraces off (main.rs); in-process cases need the same, or a
/// `RUST_BACKTRACE=1` in the environment makes every candle error many lines long.
fn quiet_backtraces() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        std::env::set_var("RUST_BACKTRACE", "0");
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    });
}

fn rng_for(target: &str, i: usize) -> StdRng {
    let salt = target
        .bytes()
        .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
    StdRng::seed_from_u64(salt ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

// ---------------------------------------------------------------------------------------
// Mutators.

const EXTREME_U64: [u64; 14] = [
    0,
    1,
    2,
    0x7f,
    0xff,
    0xffff,
    1 << 31,
    u32::MAX as u64,
    1 << 32,
    1 << 40,
    1 << 62,
    i64::MAX as u64,
    u64::MAX - 7,
    u64::MAX,
];

fn extreme_u64(rng: &mut StdRng) -> u64 {
    EXTREME_U64[rng.gen_range(0..EXTREME_U64.len())]
}

/// One random byte-level mutation inside `region` of `b`.
fn mutate_bytes(rng: &mut StdRng, b: &mut Vec<u8>, region: std::ops::Range<usize>) {
    let (lo, hi) = (region.start.min(b.len()), region.end.min(b.len()).max(1));
    let lo = lo.min(hi - 1);
    let at = |rng: &mut StdRng| rng.gen_range(lo..hi);
    match rng.gen_range(0..7) {
        0 => {
            for _ in 0..rng.gen_range(1..=8) {
                let i = at(rng);
                if i < b.len() {
                    b[i] ^= 1 << rng.gen_range(0..8);
                }
            }
        }
        1 => b.truncate(at(rng)),
        2 => {
            let i = at(rng).min(b.len());
            let junk: Vec<u8> = (0..rng.gen_range(1..=16)).map(|_| rng.gen()).collect();
            b.splice(i..i, junk);
        }
        3 => {
            let i = at(rng).min(b.len());
            let j = (i + rng.gen_range(1..=32)).min(b.len());
            b.drain(i..j);
        }
        4 | 5 => {
            let width = if rng.gen_bool(0.5) { 8 } else { 4 };
            let i = at(rng);
            let v = extreme_u64(rng).to_le_bytes();
            for (k, &byte) in v.iter().enumerate().take(width) {
                if let Some(x) = b.get_mut(i + k) {
                    *x = byte;
                }
            }
        }
        _ => {
            let i = at(rng).min(b.len());
            let j = (i + rng.gen_range(1..=64)).min(b.len());
            let chunk = b[i..j].to_vec();
            b.splice(i..i, chunk);
        }
    }
}

fn junk_value(rng: &mut StdRng, was: &Value) -> Value {
    match rng.gen_range(0..16) {
        0 => json!(-1),
        1 => json!(0),
        2 => json!(u64::MAX),
        3 => json!(i64::MIN),
        4 => json!(1e308),
        5 => json!(-1e308),
        6 => json!(9007199254740993u64),
        7 => json!(0.5),
        8 => json!(extreme_u64(rng)),
        9 => Value::Null,
        10 => json!(true),
        11 => json!(""),
        12 => json!("x".repeat(rng.gen_range(1..5000))),
        13 => json!([was.clone()]),
        14 => json!({}),
        // A number written as a string and a string as a number: the common type swap.
        _ => match was {
            Value::Number(n) => json!(n.to_string()),
            Value::String(s) => s.parse::<f64>().map(|x| json!(x)).unwrap_or(json!(7)),
            _ => json!([]),
        },
    }
}

/// One structural mutation somewhere in `v`: a random walk picks the node.
fn mutate_json(rng: &mut StdRng, v: &mut Value) {
    let descend = rng.gen_bool(0.85);
    match v {
        Value::Object(map) if !map.is_empty() && descend => {
            let keys: Vec<String> = map.keys().cloned().collect();
            let k = &keys[rng.gen_range(0..keys.len())];
            match rng.gen_range(0..10) {
                0 => {
                    map.remove(k);
                }
                1 => {
                    let val = map.remove(k).unwrap_or(Value::Null);
                    map.insert(format!("{k}_"), val);
                }
                2 => {
                    map.insert("zz_unknown".into(), json!(1));
                }
                _ => mutate_json(rng, map.get_mut(k).unwrap()),
            }
        }
        Value::Array(a) if !a.is_empty() && descend => {
            let i = rng.gen_range(0..a.len());
            match rng.gen_range(0..8) {
                0 => {
                    a.remove(i);
                }
                1 => {
                    let x = a[i].clone();
                    a.insert(i, x);
                }
                2 => a.clear(),
                _ => mutate_json(rng, &mut a[i]),
            }
        }
        other => *other = junk_value(rng, other),
    }
}

fn mutate_json_file(rng: &mut StdRng, text: &str) -> Vec<u8> {
    if rng.gen_bool(0.75) {
        let mut v: Value = serde_json::from_str(text).unwrap();
        for _ in 0..rng.gen_range(1..=3) {
            mutate_json(rng, &mut v);
        }
        serde_json::to_vec(&v).unwrap()
    } else {
        let mut b = text.as_bytes().to_vec();
        let n = b.len();
        mutate_bytes(rng, &mut b, 0..n);
        b
    }
}

// ---------------------------------------------------------------------------------------
// Fixtures: one tiny model of each kind, built once per test.

struct Hf {
    _dir: tempfile::TempDir,
    path: PathBuf,
    cfg: String,
    tokenizer: String,
    weights: Vec<u8>,
}

fn hf_fixture() -> Hf {
    let t = common::tiny(common::Arch::Llama, 7);
    let path = t.path().to_path_buf();
    let read = |n: &str| std::fs::read_to_string(path.join(n)).unwrap();
    Hf {
        cfg: read("config.json"),
        tokenizer: read("tokenizer.json"),
        weights: std::fs::read(path.join("model.safetensors")).unwrap(),
        path,
        _dir: t.dir,
    }
}

/// Writes a HF folder into `dir` with the given bodies (tokenizer_config.json as the fixture's).
fn write_hf(dir: &Path, hf: &Hf, cfg: &[u8], tok: &[u8], weights: &[u8]) {
    std::fs::write(dir.join("config.json"), cfg).unwrap();
    std::fs::write(dir.join("tokenizer.json"), tok).unwrap();
    std::fs::write(dir.join("model.safetensors"), weights).unwrap();
    std::fs::copy(
        hf.path.join("tokenizer_config.json"),
        dir.join("tokenizer_config.json"),
    )
    .unwrap();
}

/// What every model-reading command does with a checkpoint: open, load, tokenize, run.
/// Load-time errors must name the checkpoint; a forward error (the input was accepted) only
/// has to be one clean line.
fn open_and_run(spec: &Path) -> Outcome {
    let name = spec.display().to_string();
    let err = |e: eabfit::Error| (e.to_string(), name.clone());
    let ckpt = Checkpoint::open(&name).map_err(err)?;
    let model = ckpt
        .load_model(DType::F32, &Device::Cpu, &Adapters::none())
        .map_err(err)?;
    let ids = ckpt
        .tokenizer
        .encode("the king and the queen")
        .map_err(err)?;
    let n = ids
        .len()
        .clamp(1, 4)
        .min(ckpt.config.max_position_embeddings.max(1));
    let ids: Vec<u32> = ids.into_iter().take(n).collect();
    if ids.is_empty() {
        return Ok(());
    }
    let t = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    model
        .logits(&t)
        .map(|_| ())
        .map_err(|e| (e.to_string(), String::new()))
}

/// Splits a safetensors file into (header JSON, data).
fn split_safetensors(b: &[u8]) -> (Value, Vec<u8>) {
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    (
        serde_json::from_slice(&b[8..8 + n]).unwrap(),
        b[8 + n..].to_vec(),
    )
}

fn join_safetensors(header: &[u8], data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend(header);
    out.extend(data);
    out
}

/// A safetensors file mutated in its header: bytes of the length and JSON, or the JSON's
/// shapes, dtypes and offsets (length prefix kept consistent, or not).
fn mutate_safetensors(rng: &mut StdRng, file: &[u8]) -> Vec<u8> {
    let (header, data) = split_safetensors(file);
    let text = serde_json::to_vec(&header).unwrap();
    match rng.gen_range(0..4) {
        0 => {
            let mut b = join_safetensors(&text, &data);
            let end = 8 + text.len();
            mutate_bytes(rng, &mut b, 0..end);
            b
        }
        1 => {
            let mut b = join_safetensors(&text, &data);
            b[..8].copy_from_slice(&extreme_u64(rng).to_le_bytes());
            b
        }
        _ => {
            let mut h = header;
            let names: Vec<String> = h
                .as_object()
                .unwrap()
                .keys()
                .filter(|k| *k != "__metadata__")
                .cloned()
                .collect();
            let t = &mut h[&names[rng.gen_range(0..names.len())]];
            match rng.gen_range(0..5) {
                0 => {
                    t["dtype"] = json!(
                        ["F64", "F16", "I64", "BOOL", "U8", "Q4", "f32", ""][rng.gen_range(0..8)]
                    )
                }
                1 => {
                    let dims = t["shape"].as_array().unwrap().len();
                    let k = rng.gen_range(0..dims.max(1));
                    t["shape"][k] = json!(extreme_u64(rng));
                }
                2 => t["shape"] = json!([rng.gen_range(0..5), extreme_u64(rng), 3]),
                3 => t["data_offsets"][rng.gen_range(0..2)] = json!(extreme_u64(rng)),
                _ => mutate_json(rng, &mut h),
            }
            join_safetensors(&serde_json::to_vec(&h).unwrap(), &data)
        }
    }
}

// GGUF: a tiny llama file with a byte-level BPE vocabulary, as llama.cpp writes them.

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

fn gguf_case(dir: &Path, i: usize) -> PathBuf {
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

// ---------------------------------------------------------------------------------------
// The in-process suites.

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

#[test]
fn fuzz_safetensors_headers_config_and_tokenizer() {
    quiet_backtraces();
    let hf = hf_fixture();
    open_and_run(&hf.path).unwrap();
    let root = tempfile::tempdir().unwrap();
    let base = root.path().to_path_buf();
    let hf = std::sync::Arc::new(hf);
    let h = hf.clone();
    drive("safetensors", scaled(900), move |i| {
        let mut rng = rng_for("safetensors", i);
        let dir = base.join(format!("st-{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        let w = mutate_safetensors(&mut rng, &h.weights);
        write_hf(&dir, &h, h.cfg.as_bytes(), h.tokenizer.as_bytes(), &w);
        let r = open_and_run(&dir);
        let _ = std::fs::remove_dir_all(&dir);
        r
    });
    let base = root.path().to_path_buf();
    let h = hf.clone();
    drive("config.json", scaled(800), move |i| {
        let mut rng = rng_for("config", i);
        let dir = base.join(format!("cfg-{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        let c = mutate_json_file(&mut rng, &h.cfg);
        write_hf(&dir, &h, &c, h.tokenizer.as_bytes(), &h.weights);
        let r = open_and_run(&dir);
        let _ = std::fs::remove_dir_all(&dir);
        r
    });
    let base = root.path().to_path_buf();
    let h = hf.clone();
    drive("tokenizer.json", scaled(700), move |i| {
        let mut rng = rng_for("tokenizer", i);
        let dir = base.join(format!("tok-{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        let t = mutate_json_file(&mut rng, &h.tokenizer);
        write_hf(&dir, &h, h.cfg.as_bytes(), &t, &h.weights);
        let r = open_and_run(&dir);
        let _ = std::fs::remove_dir_all(&dir);
        r
    });
}

#[test]
fn fuzz_adapter_folders() {
    quiet_backtraces();
    let hf = hf_fixture();
    let ckpt = Checkpoint::open(&hf.path.display().to_string()).unwrap();
    let cfg = ckpt.config.clone();
    let mut meta = AdapterMeta::for_config(&cfg, "tiny");
    meta.eab_layers = (0..cfg.num_hidden_layers).collect();
    meta.mask_first_token = true;
    meta.lora_rank = 2;
    meta.lora_alpha = 4.0;
    meta.lora_targets = vec!["down".into(), "q".into()];
    meta.lora_layers = vec![1];
    let set = AdapterSet::new(
        meta,
        SlotInit::Normal { std: 0.1, seed: 3 },
        0.1,
        3,
        &Device::Cpu,
    )
    .unwrap();
    let root = tempfile::tempdir().unwrap();
    let clean = root.path().join("clean");
    set.save(&clean).unwrap();
    let meta_text = std::fs::read_to_string(clean.join("adapter_config.json")).unwrap();
    let weights = std::fs::read(clean.join("adapter.safetensors")).unwrap();
    let base = ckpt.base(DType::F32, &Device::Cpu).unwrap();
    let base = std::sync::Arc::new(std::sync::Mutex::new(base));
    let root_path = root.path().to_path_buf();
    drive("adapter", scaled(800), move |i| {
        let mut rng = rng_for("adapter", i);
        let dir = root_path.join(format!("ad-{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        let (m, w) = if i % 2 == 0 {
            (mutate_json_file(&mut rng, &meta_text), weights.clone())
        } else {
            (
                meta_text.clone().into_bytes(),
                mutate_safetensors(&mut rng, &weights),
            )
        };
        std::fs::write(dir.join("adapter_config.json"), m).unwrap();
        std::fs::write(dir.join("adapter.safetensors"), w).unwrap();
        let name = dir.display().to_string();
        let r = (|| {
            let set = AdapterSet::load(&dir, &cfg, &Device::Cpu)
                .map_err(|e| (e.to_string(), name.clone()))?;
            let model = base
                .lock()
                .unwrap()
                .model(&set.adapters())
                .map_err(|e| (e.to_string(), String::new()))?;
            let ids = Tensor::new(&[1u32, 5, 6, 7], &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            model
                .logits(&ids)
                .map(|_| ())
                .map_err(|e| (e.to_string(), String::new()))
        })();
        let _ = std::fs::remove_dir_all(&dir);
        r
    });
}

const TINY_RECIPE: &str = include_str!("../recipes/tiny-debug.yaml");

/// A recipe mutated as YAML (values, keys, types) or as text (lines, bytes).
fn mutate_recipe(rng: &mut StdRng) -> String {
    match rng.gen_range(0..4) {
        0 | 1 => {
            let mut v: Value = serde_norway::from_str(TINY_RECIPE).unwrap();
            for _ in 0..rng.gen_range(1..=3) {
                mutate_json(rng, &mut v);
            }
            serde_norway::to_string(&v).unwrap()
        }
        2 => {
            let mut lines: Vec<String> = TINY_RECIPE.lines().map(String::from).collect();
            for _ in 0..rng.gen_range(1..=3) {
                let i = rng.gen_range(0..lines.len());
                match rng.gen_range(0..5) {
                    0 => {
                        lines.remove(i);
                    }
                    1 => {
                        let l = lines[i].clone();
                        lines.insert(i, l);
                    }
                    2 => lines[i] = format!("  {}", lines[i]),
                    3 => lines[i] = lines[i].trim_start().to_string(),
                    _ => lines[i] = lines[i].replacen(':', "", 1),
                }
            }
            lines.join("\n")
        }
        _ => {
            let mut b = TINY_RECIPE.as_bytes().to_vec();
            let n = b.len();
            mutate_bytes(rng, &mut b, 0..n);
            String::from_utf8_lossy(&b).into_owned()
        }
    }
}

const OVERRIDE_VALUES: [&str; 34] = [
    "1",
    "-1",
    "0",
    "1e999",
    "-1e999",
    ".nan",
    ".inf",
    "-.inf",
    "18446744073709551616",
    "99999999999999999999999",
    "true",
    "null",
    "~",
    "[]",
    "{}",
    "[1, 2",
    "{a: 1}",
    "\"",
    "'",
    "*anchor",
    "&a b",
    "!!binary AAAA",
    "x\ny",
    "",
    "- 1",
    "[0, 1000000]",
    "[-1]",
    "kl",
    "all",
    "birth",
    "/nonexistent/x",
    "0.5",
    "2.5e-3",
    "[down, nope]",
];

fn mutate_overrides(rng: &mut StdRng, fields: &[String]) -> Vec<String> {
    (0..rng.gen_range(1..=3))
        .map(|_| {
            let mut key = fields[rng.gen_range(0..fields.len())].clone();
            match rng.gen_range(0..8) {
                0 => key.push('x'),
                1 => key = key.replacen('.', "..", 1),
                2 => key = format!("{key}.deeper"),
                3 => key = key.split('.').next().unwrap_or_default().to_string(),
                _ => {}
            }
            let value = if rng.gen_bool(0.1) {
                "a".repeat(rng.gen_range(1000..20000))
            } else {
                OVERRIDE_VALUES[rng.gen_range(0..OVERRIDE_VALUES.len())].to_string()
            };
            match rng.gen_range(0..12) {
                0 => key,
                1 => format!("={value}"),
                _ => format!("{key}={value}"),
            }
        })
        .collect()
}

#[test]
fn fuzz_recipes_and_overrides() {
    quiet_backtraces();
    eabfit::recipe::parse_str(TINY_RECIPE, "tiny.yaml", &[]).unwrap();
    drive("recipe", scaled(900), |i| {
        let mut rng = rng_for("recipe", i);
        let text = mutate_recipe(&mut rng);
        let origin = format!("fuzz-{i}.yaml");
        eabfit::recipe::parse_str(&text, &origin, &[])
            .map(|r| {
                // An accepted recipe must survive its own round trip (train writes it out).
                eabfit::recipe::parse_str(&r.to_yaml(), "resolved.yaml", &[]).unwrap();
            })
            .map_err(|e| (e.to_string(), origin))
    });
    let fields = eabfit::recipe::field_paths();
    drive("overrides", scaled(800), move |i| {
        let mut rng = rng_for("overrides", i);
        let ov = mutate_overrides(&mut rng, &fields);
        let origin = format!("fuzz-{i}.yaml");
        eabfit::recipe::parse_str(TINY_RECIPE, &origin, &ov)
            .map(|_| ())
            .map_err(|e| (e.to_string(), origin))
    });
}

// ---------------------------------------------------------------------------------------
// Through the binary: exit status and the one-line message as a user sees them.

/// Runs the binary with a time bound; returns (exit code, stderr).
fn run_bounded(args: &[String]) -> (Option<i32>, String) {
    let mut child = Command::new(common::bin())
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::BufReader::new(stderr), &mut s).unwrap();
        s
    });
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > CASE_LIMIT {
            child.kill().unwrap();
            panic!("eabfit {args:?}: no exit within {CASE_LIMIT:?} (hang)");
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    (status.code(), reader.join().unwrap())
}

fn check_cli(case: &str, code: Option<i32>, stderr: &str, needle: &str, bad: &mut Vec<String>) {
    let lines: Vec<&str> = stderr.trim().lines().collect();
    match code {
        Some(0) => {}
        Some(1) | Some(2) => {
            if lines.len() != 1 || !lines[0].starts_with("error: ") || !lines[0].contains(needle) {
                bad.push(format!(
                    "{case}: exit {code:?}, stderr {stderr:?} (wants one line naming {needle})"
                ));
            }
        }
        other => bad.push(format!(
            "{case}: exit {other:?} (killed or panicked?): {stderr}"
        )),
    }
}

#[test]
fn fuzz_through_the_binary() {
    quiet_backtraces();
    let hf = hf_fixture();
    let root = tempfile::tempdir().unwrap();
    let mut bad = vec![];
    let start = Instant::now();
    let mut n = 0;
    for i in 0..scaled(60) {
        let path = gguf_case(root.path(), 100_000 + i);
        let (code, err) =
            run_bounded(&["info".into(), "--model".into(), path.display().to_string()]);
        check_cli(
            &format!("gguf {i}"),
            code,
            &err,
            &path.display().to_string(),
            &mut bad,
        );
        n += 1;
    }
    for i in 0..scaled(45) {
        let mut rng = rng_for("cli-hf", i);
        let dir = root.path().join(format!("hf-{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        let (c, t, w) = match i % 3 {
            0 => (
                mutate_json_file(&mut rng, &hf.cfg),
                hf.tokenizer.clone().into_bytes(),
                hf.weights.clone(),
            ),
            1 => (
                hf.cfg.clone().into_bytes(),
                mutate_json_file(&mut rng, &hf.tokenizer),
                hf.weights.clone(),
            ),
            _ => (
                hf.cfg.clone().into_bytes(),
                hf.tokenizer.clone().into_bytes(),
                mutate_safetensors(&mut rng, &hf.weights),
            ),
        };
        write_hf(&dir, &hf, &c, &t, &w);
        let (code, err) =
            run_bounded(&["info".into(), "--model".into(), dir.display().to_string()]);
        check_cli(
            &format!("hf {i}"),
            code,
            &err,
            &dir.display().to_string(),
            &mut bad,
        );
        n += 1;
    }
    let fields = eabfit::recipe::field_paths();
    for i in 0..scaled(45) {
        let mut rng = rng_for("cli-recipe", i);
        let recipe = root.path().join(format!("r-{i}.yaml"));
        // The model path never exists, so an accepted recipe ends at the model, named.
        let (text, ov) = if i % 2 == 0 {
            (mutate_recipe(&mut rng), vec![])
        } else {
            (TINY_RECIPE.to_string(), mutate_overrides(&mut rng, &fields))
        };
        std::fs::write(&recipe, text).unwrap();
        let mut args = vec!["train".to_string(), recipe.display().to_string()];
        args.extend(ov);
        args.push("model.path=/nonexistent/model".into());
        let (code, err) = run_bounded(&args);
        let needle = if code == Some(2) {
            recipe.display().to_string()
        } else {
            String::new()
        };
        check_cli(&format!("recipe {i}"), code, &err, &needle, &mut bad);
        n += 1;
    }
    eprintln!(
        "fuzz binary: {n} cases, {:.2} s",
        start.elapsed().as_secs_f64()
    );
    assert!(
        bad.is_empty(),
        "{} failures:\n{}",
        bad.len(),
        bad.join("\n")
    );
}
