//! Qwen2 / Qwen2.5 and Qwen3 in the one decoder: logits against candle-transformers' own
//! `qwen2` and `qwen3`, every trainable tensor's gradient (slots, LoRA, and in pretraining the
//! biases and q/k head norms) against central finite differences in f64 on both the per-op
//! path and the block op, GGUF twins read back to their safetensors logits, and the config
//! fields and GGUF contents the decoder refuses rather than runs wrongly.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use common::Arch;
use eabfit::adapters::{AdapterMeta, AdapterSet, SlotInit};
use eabfit::checkpoint::Checkpoint;
use eabfit::model::{Adapters, Config, Model, Taps};
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::collections::{BTreeMap, HashMap};

/// Two rows of 20 token ids in the tiny vocabulary, BOS first.
fn ids(seed: u64, vocab: usize) -> Tensor {
    let mut rng = StdRng::seed_from_u64(seed);
    let v: Vec<u32> = (0..40)
        .map(|i| {
            if i % 20 == 0 {
                1
            } else {
                rng.gen_range(3..vocab as u32)
            }
        })
        .collect();
    Tensor::from_vec(v, (2, 20), &Device::Cpu).unwrap()
}

/// The Qwen3 fixture with `attention_bias: true` (q, k, v and o biases beside the head norms).
fn qwen3_with_bias(seed: u64) -> common::Tiny {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(Arch::Qwen3);
    config["attention_bias"] = true.into();
    common::write_checkpoint(dir.path(), &config, &common::weights(&config, seed));
    common::Tiny { dir, config }
}

/// The tied Qwen2 fixture whose file still carries an `lm_head.weight` of its own (random,
/// not the embedding): transformers 5.25 then unties them and runs the file's head (it warns
/// that it will "NOT tie them"), so eabfit must too.
fn qwen2_tied_with_own_head(seed: u64) -> common::Tiny {
    let dir = tempfile::tempdir().unwrap();
    let config = common::config(Arch::Qwen2);
    assert_eq!(config["tie_word_embeddings"], true);
    let mut w = common::weights(&config, seed);
    let mut untied = config.clone();
    untied["tie_word_embeddings"] = false.into();
    let head = common::weights(&untied, seed + 1)
        .remove("lm_head.weight")
        .unwrap();
    w.insert("lm_head.weight".into(), head);
    common::write_checkpoint(dir.path(), &config, &w);
    common::Tiny { dir, config }
}

fn eabfit_logits(spec: &str, ids: &Tensor) -> Tensor {
    Checkpoint::open(spec)
        .unwrap()
        .load_model(DType::F32, &Device::Cpu, &Adapters::none())
        .unwrap()
        .logits(ids)
        .unwrap()
}

/// candle-transformers' `qwen2` / `qwen3` on the fixture's folder: its final hidden states
/// through the fixture's own head, the file's `lm_head.weight` when it has one, else the
/// embedding (its causal-LM wrapper returns the last position only).
fn candle_logits(tiny: &common::Tiny, ids: &Tensor) -> Tensor {
    use candle_transformers::models::{qwen2, qwen3};
    let dir = tiny.path();
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(
            &[dir.join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
    };
    let mut json = tiny.config.clone();
    let hidden = match json["model_type"].as_str().unwrap() {
        "qwen2" => {
            // candle's qwen2 windows every layer by `sliding_window` whatever
            // `use_sliding_window` says; transformers (and eabfit) use no window when it is off.
            json["sliding_window"] = json["max_position_embeddings"].clone();
            let cfg: qwen2::Config = serde_json::from_value(json).unwrap();
            let mut m = qwen2::Model::new(&cfg, vb.clone()).unwrap();
            m.forward(ids, 0, None).unwrap()
        }
        "qwen3" => {
            let cfg: qwen3::Config = serde_json::from_value(json).unwrap();
            let mut m = qwen3::Model::new(&cfg, vb.clone()).unwrap();
            m.forward(ids, 0).unwrap()
        }
        other => panic!("no candle reference for {other}"),
    };
    let head = if vb.contains_tensor("lm_head.weight") {
        vb.get_unchecked("lm_head.weight").unwrap()
    } else {
        vb.get_unchecked("model.embed_tokens.weight").unwrap()
    };
    hidden.broadcast_matmul(&head.t().unwrap()).unwrap()
}

/// Logits of every position of the tiny Qwen2 (q/k/v biases, tied head, a switched-off
/// window narrower than the sequence), Qwen3 (head norms, head_dim apart from hidden/heads)
/// Qwen3 with `attention_bias`, and the tied Qwen2 with a head of its own in the file against
/// candle-transformers: within 1e-4 of the largest.
#[test]
fn qwen_logits_match_candle_transformers() {
    let cases = [
        ("qwen2", common::tiny(Arch::Qwen2, 5)),
        ("qwen3", common::tiny(Arch::Qwen3, 6)),
        ("qwen3 attention_bias", qwen3_with_bias(7)),
        ("qwen2 tied, own lm_head", qwen2_tied_with_own_head(8)),
    ];
    for (what, tiny) in &cases {
        let ids = ids(3, common::WORDS.len() + 3);
        let ours = eabfit_logits(&tiny.spec(), &ids);
        let reference = candle_logits(tiny, &ids);
        let e = common::max_abs_diff(&ours, &reference) / common::max_abs(&reference);
        eprintln!("{what}: max |eabfit - candle| / max |logit| = {e:.2e}");
        assert!(e < 1e-4, "{what}: rel {e}");
        // Without its biases / norms the model is another one: the check can see them.
        let plain = {
            let mut cfg = tiny.config.clone();
            cfg["model_type"] = "llama".into();
            cfg["attention_bias"] = false.into();
            cfg.as_object_mut().unwrap().remove("sliding_window");
            let cfg: Config = serde_json::from_value(cfg).unwrap();
            let st =
                candle_core::safetensors::load(tiny.path().join("model.safetensors"), &Device::Cpu)
                    .unwrap();
            Model::load(
                VarBuilder::from_tensors(st, DType::F32, &Device::Cpu),
                &cfg,
                &Adapters::none(),
            )
            .unwrap()
            .logits(&ids)
            .unwrap()
        };
        let moved = common::max_abs_diff(&plain, &reference) / common::max_abs(&reference);
        assert!(
            moved > 1e-2,
            "{what}: biases/norms change the logits only by {moved}"
        );
    }
}

/// A tiny GGUF of each architecture, written as llama.cpp writes them (LLaMA's q/k rows
/// permuted, Qwen's not; Qwen's bias and head-norm tensors), reads back to its safetensors
/// twin's logits.
#[test]
fn gguf_twins_give_the_safetensors_logits() {
    let cases = [
        common::tiny(Arch::Llama, 8),
        common::tiny(Arch::Qwen2, 9),
        common::tiny(Arch::Qwen3, 10),
        qwen3_with_bias(11),
    ];
    for tiny in &cases {
        let gguf = tiny.path().join("twin.gguf");
        common::gguf_twin(tiny, &gguf);
        let ckpt = Checkpoint::open(gguf.to_str().unwrap()).unwrap();
        let what = ckpt.config.model_type.clone().unwrap();
        let st = Checkpoint::open(&tiny.spec()).unwrap();
        for (name, a, b) in [
            ("qkv_bias", ckpt.config.qkv_bias(), st.config.qkv_bias()),
            ("o_bias", ckpt.config.o_bias(), st.config.o_bias()),
            ("qk_norm", ckpt.config.qk_norm(), st.config.qk_norm()),
        ] {
            assert_eq!(a, b, "{what}: {name}");
        }
        assert_eq!(ckpt.config.head_dim(), st.config.head_dim(), "{what}");
        let ids = ids(4, common::WORDS.len() + 3);
        let a = eabfit_logits(gguf.to_str().unwrap(), &ids);
        let b = eabfit_logits(&tiny.spec(), &ids);
        let e = common::max_abs_diff(&a, &b) / common::max_abs(&b);
        eprintln!("{what} GGUF: rel {e:.2e}");
        assert!(e < 1e-6, "{what}: GGUF logits differ, rel {e}");
    }
}

/// The GGUF twin's `qwen2` pre-tokenizer splits like Qwen2's tokenizer.json: letters, one
/// digit at a time, a space before a digit on its own (GPT-2's regex keeps " 123" together).
#[test]
fn qwen2_pre_tokenizer_splits_digits_one_by_one() {
    let tiny = common::tiny(Arch::Qwen2, 12);
    let gguf = tiny.path().join("twin.gguf");
    common::gguf_twin(&tiny, &gguf);
    let tok = Checkpoint::open(gguf.to_str().unwrap()).unwrap().tokenizer;
    let pieces: Vec<String> = tok
        .inner
        .get_pre_tokenizer()
        .map(|p| {
            use tokenizers::PreTokenizer;
            let mut s = tokenizers::PreTokenizedString::from("abc 123!");
            p.pre_tokenize(&mut s).unwrap();
            s.get_splits(
                tokenizers::OffsetReferential::Original,
                tokenizers::OffsetType::Byte,
            )
            .into_iter()
            .map(|(t, _, _)| t.to_string())
            .collect()
        })
        .unwrap();
    assert_eq!(pieces, ["abc", "Ġ", "1", "2", "3", "!"]);
}

// ---------------------------------------------------------------------------------------------
// Gradients against finite differences, f64.

/// Slots in every layer, LoRA rank 2 on q, k, v and down of layer 1 (B made nonzero), as f64
/// Vars.
fn adapters_f64(cfg: &Config, seed: u64) -> AdapterSet {
    let mut meta = AdapterMeta::for_config(cfg, "tiny-test");
    meta.eab_layers = (0..cfg.num_hidden_layers).collect();
    meta.lora_rank = 2;
    meta.lora_alpha = 4.0;
    meta.lora_targets = ["q", "k", "v", "down"].map(String::from).to_vec();
    meta.lora_layers = vec![1];
    let set = AdapterSet::new(
        meta,
        SlotInit::Normal { std: 0.5, seed },
        0.3,
        seed,
        &Device::Cpu,
    )
    .unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    let vars = set
        .vars
        .iter()
        .map(|(name, var)| {
            let t = var.as_tensor().to_dtype(DType::F64).unwrap();
            let t = if name.ends_with("lora_B.weight") {
                let n = t.elem_count();
                let v: Vec<f64> = (0..n).map(|_| rng.gen_range(-0.3..0.3)).collect();
                Tensor::from_vec(v, t.shape(), &Device::Cpu).unwrap()
            } else {
                t
            };
            (name.clone(), Var::from_tensor(&t).unwrap())
        })
        .collect();
    AdapterSet {
        meta: set.meta,
        vars,
    }
}

/// Every trainable tensor of a Qwen model in f64: the adapters of [`adapters_f64`], and, as in
/// pretraining, every bias and q/k head norm of the base; the gradient of a loss reaching
/// every position (logits against a fixed random R) along a random direction against the
/// central difference, on the per-op path and through the block op (whose backward hands
/// the base tensors' gradients to a `WeightGrads`; layer 1, with LoRA, stays per-op).
#[test]
fn qwen_gradients_match_finite_differences() {
    use eabfit::ops::block::WeightGrads;
    use std::sync::Arc;
    let mut cases = vec![
        ("qwen2", common::config(Arch::Qwen2)),
        ("qwen3", common::config(Arch::Qwen3)),
    ];
    let mut biased = common::config(Arch::Qwen3);
    biased["attention_bias"] = true.into();
    cases.push(("qwen3 attention_bias", biased));
    for (what, json) in cases {
        let cfg: Config = serde_json::from_value(json.clone()).unwrap();
        let mut base: HashMap<String, Tensor> = HashMap::new();
        let mut trained: BTreeMap<String, Var> = BTreeMap::new();
        for (name, t) in common::weights(&json, 21) {
            let t = t.to_dtype(DType::F64).unwrap();
            if name.ends_with(".bias")
                || name.contains("_norm.weight") && name.contains("self_attn")
            {
                let v = Var::from_tensor(&t).unwrap();
                base.insert(name.clone(), v.as_tensor().clone());
                trained.insert(name, v);
            } else {
                base.insert(name, t);
            }
        }
        assert!(!trained.is_empty(), "{what}: no biases or head norms");
        let set = adapters_f64(&cfg, 21);
        let model = Model::load(
            VarBuilder::from_tensors(base, DType::F64, &Device::Cpu),
            &cfg,
            &set.adapters(),
        )
        .unwrap();
        let ids = ids(5, cfg.vocab_size);
        let mut rng = StdRng::seed_from_u64(22);
        let r = {
            let n = 2 * 20 * cfg.vocab_size;
            let v: Vec<f64> = (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
            Tensor::from_vec(v, (2, 20, cfg.vocab_size), &Device::Cpu).unwrap()
        };
        let loss = |block_op: bool, sink: Option<Arc<WeightGrads>>| {
            let taps = Taps {
                block_op: Some(block_op),
                weight_grads: sink,
                ..Default::default()
            };
            let logits = model.forward(&ids, &taps).unwrap().logits;
            (logits * &r).unwrap().sum_all().unwrap()
        };
        for block_op in [false, true] {
            let sink = Arc::new(WeightGrads::default());
            let grads = loss(block_op, Some(sink.clone())).backward().unwrap();
            let sunk = sink.take().unwrap();
            let mut checked = 0;
            for (name, var) in set.vars.iter().chain(&trained) {
                let g = match (grads.get(var.as_tensor()), sunk.get(name)) {
                    (Some(g), None) | (None, Some(g)) => g.clone(),
                    (a, b) => panic!(
                        "{what} block_op {block_op} {name}: gradient from candle {}, from the op {}",
                        a.is_some(),
                        b.is_some()
                    ),
                };
                let n = var.as_tensor().elem_count();
                let u: Vec<f64> = (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
                let u = Tensor::from_vec(u, var.as_tensor().shape(), &Device::Cpu).unwrap();
                let (analytic, fd) = common::directional(var, &g, &u, || {
                    loss(false, None).to_scalar::<f64>().unwrap()
                });
                let rel = (fd - analytic).abs() / fd.abs().max(1e-8);
                assert!(
                    rel < 1e-6 && analytic.abs() > 1e-6,
                    "{what} block_op {block_op} {name}: fd {fd} analytic {analytic} rel {rel}"
                );
                checked += 1;
            }
            if block_op {
                // The blocks without LoRA (0 and 2) handed their biases and norms over (with
                // every frozen weight's gradient beside them).
                for name in trained.keys().filter(|n| !n.starts_with("model.layers.1.")) {
                    assert!(sunk.contains_key(name), "{what}: the block op kept {name}");
                }
            }
            eprintln!("{what} block_op {block_op}: {checked} tensors checked");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Refusals.

/// Each config change that the decoder would not compute is refused at open, naming the field
/// (and, for the family, the supported list); the unchanged fixture opens.
#[test]
fn unsupported_config_fields_are_refused_by_name() {
    let cases: &[(Arch, &str, serde_json::Value, &[&str])] = &[
        (
            Arch::Qwen2,
            "model_type",
            "gemma".into(),
            &["model_type `gemma`", "llama, mistral, qwen2, qwen3"],
        ),
        (
            Arch::Qwen2,
            "use_sliding_window",
            true.into(),
            &["use_sliding_window", "qwen2"],
        ),
        (
            Arch::Qwen3,
            "use_sliding_window",
            true.into(),
            &["use_sliding_window", "qwen3"],
        ),
        (
            Arch::Qwen3,
            "hidden_act",
            "gelu".into(),
            &["hidden_act `gelu`"],
        ),
        (Arch::Llama, "mlp_bias", true.into(), &["mlp_bias"]),
        (
            Arch::Mistral,
            "attention_bias",
            true.into(),
            &["attention_bias", "mistral"],
        ),
        (
            Arch::Llama,
            "partial_rotary_factor",
            0.5.into(),
            &["partial_rotary_factor 0.5"],
        ),
        (
            Arch::Llama,
            "rope_parameters",
            serde_json::json!({"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25}),
            &["partial_rotary_factor 0.25"],
        ),
        (
            Arch::Llama,
            "final_logit_softcapping",
            30.0.into(),
            &["final_logit_softcapping"],
        ),
        (
            Arch::Llama,
            "attn_logit_softcapping",
            50.0.into(),
            &["attn_logit_softcapping"],
        ),
        (
            Arch::Qwen2,
            "layer_types",
            serde_json::json!(["full_attention", "sliding_attention", "full_attention"]),
            &["layer_types `sliding_attention`"],
        ),
        (
            Arch::Qwen2,
            "rope_scaling",
            serde_json::json!({"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}),
            &["rope_scaling.rope_type `yarn`"],
        ),
        (
            Arch::Qwen3,
            "quantization_config",
            serde_json::json!({"quant_method": "fp8", "weight_block_size": [128, 128]}),
            &["quantization_config", "`fp8`"],
        ),
    ];
    for (arch, field, value, needles) in cases {
        let tiny = common::tiny(*arch, 13);
        Checkpoint::open(&tiny.spec()).unwrap();
        let mut cfg = tiny.config.clone();
        cfg[*field] = value.clone();
        std::fs::write(tiny.path().join("config.json"), cfg.to_string()).unwrap();
        let e = Checkpoint::open(&tiny.spec())
            .err()
            .unwrap_or_else(|| panic!("{field}: opened"))
            .to_string();
        assert!(e.contains("config.json"), "{field}: {e}");
        for n in *needles {
            assert!(e.contains(n), "{field}: `{n}` not in: {e}");
        }
    }
    // A llama config that says attention_bias is a llama with all four biases: weights without
    // them are refused, naming the missing tensor.
    let tiny = common::tiny(Arch::Llama, 14);
    let mut cfg = tiny.config.clone();
    cfg["attention_bias"] = true.into();
    std::fs::write(tiny.path().join("config.json"), cfg.to_string()).unwrap();
    let e = Checkpoint::open(&tiny.spec())
        .unwrap()
        .load_model(DType::F32, &Device::Cpu, &Adapters::none())
        .map(|_| ())
        .expect_err("loaded without biases")
        .to_string();
    assert!(e.contains("q_proj.bias"), "{e}");
}

/// A GGUF with a tensor the decoder does not compute with (LLaMA-3's `rope_freqs`), RoPE
/// scaling, a partial rotary part, or an unknown pre-tokenizer is refused by name.
#[test]
fn unsupported_gguf_contents_are_refused_by_name() {
    use candle_core::quantized::{gguf_file, QTensor};
    let tiny = common::tiny(Arch::Qwen2, 15);
    let path = tiny.path().join("twin.gguf");
    common::gguf_twin(&tiny, &path);
    let read = || {
        let mut f = std::fs::File::open(&path).unwrap();
        let c = gguf_file::Content::read(&mut f).unwrap();
        let ts: Vec<(String, QTensor)> = c
            .tensor_infos
            .keys()
            .map(|n| (n.clone(), c.tensor(&mut f, n, &Device::Cpu).unwrap()))
            .collect();
        (c.metadata, ts)
    };
    let md0 = read().0;
    let write = |md: &HashMap<String, gguf_file::Value>,
                 ts: &[(String, QTensor)],
                 to: &std::path::Path| {
        let md: Vec<(&str, &gguf_file::Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let ts: Vec<(&str, &QTensor)> = ts.iter().map(|(k, v)| (k.as_str(), v)).collect();
        gguf_file::write(&mut std::fs::File::create(to).unwrap(), &md, &ts).unwrap();
    };
    use gguf_file::Value as V;
    type Change = Box<dyn Fn(&mut HashMap<String, V>, &mut Vec<(String, QTensor)>)>;
    let cases: Vec<(&str, Change)> = vec![
        (
            "tensor `rope_freqs.weight`",
            Box::new(|_, ts| {
                let t = Tensor::ones(8, DType::F32, &Device::Cpu).unwrap();
                let q = QTensor::quantize(&t, candle_core::quantized::GgmlDType::F32).unwrap();
                ts.push(("rope_freqs.weight".into(), q));
            }),
        ),
        (
            "`qwen2.rope.scaling.type` `yarn`",
            Box::new(|md, _| {
                md.insert("qwen2.rope.scaling.type".into(), V::String("yarn".into()));
            }),
        ),
        (
            "`qwen2.rope.dimension_count` 4",
            Box::new(|md, _| {
                md.insert("qwen2.rope.dimension_count".into(), V::U32(4));
            }),
        ),
        (
            "`tokenizer.ggml.pre` `falcon`",
            Box::new(|md, _| {
                md.insert("tokenizer.ggml.pre".into(), V::String("falcon".into()));
            }),
        ),
        (
            "`blk.0.attn_output.bias`",
            Box::new(|_, ts| {
                let t = Tensor::zeros(32, DType::F32, &Device::Cpu).unwrap();
                let q = QTensor::quantize(&t, candle_core::quantized::GgmlDType::F32).unwrap();
                ts.push(("blk.0.attn_output.bias".into(), q));
            }),
        ),
    ];
    for (i, (needle, change)) in cases.iter().enumerate() {
        let (mut md, mut ts) = (md0.clone(), read().1);
        change(&mut md, &mut ts);
        let to = tiny.path().join(format!("bad{i}.gguf"));
        write(&md, &ts, &to);
        let e = Checkpoint::open(to.to_str().unwrap())
            .err()
            .unwrap_or_else(|| panic!("{needle}: opened"))
            .to_string();
        assert!(e.contains(needle), "`{needle}` not in: {e}");
    }
}
