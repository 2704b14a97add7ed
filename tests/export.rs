//! `eabfit export` on tiny checkpoints: the hf export reloaded by eabfit gives the logits of
//! base + adapters in memory (single file and sharded), the merged weights equal W + scale B A
//! computed independently, the peft export has PEFT's layout and its prompt embeddings are the
//! slots, and bad input fails cleanly without leaving anything half-written.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{bin, make_adapter, tiny, Arch, Tiny};
use eabfit::adapters::{slot_names, AdapterMeta, AdapterSet, Adapters, SlotInit};
use eabfit::checkpoint::Checkpoint;
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde_json::Value;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BOS: u32 = 1;

fn all_layers() -> Vec<usize> {
    vec![0, 1, 2]
}

fn eabfit(args: &[&str]) -> Output {
    Command::new(bin()).args(args).output().unwrap()
}

fn export(model: &Path, adapter: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut a = vec![
        "export",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    a.extend_from_slice(extra);
    eabfit(&a)
}

fn ok(o: &Output) {
    assert!(
        o.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Fails with exit != 0, no panic, and a message holding every needle.
fn fails(o: &Output, needles: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        !o.status.success(),
        "expected a failure, got success: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    for n in needles {
        assert!(stderr.contains(n), "`{n}` not in: {stderr}");
    }
    stderr
}

/// No temporary or half-written export left in `dir`.
fn no_leftovers(dir: &Path) {
    for e in std::fs::read_dir(dir).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!name.contains("eabfit-tmp"), "left behind: {name}");
    }
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn ids(seed: u64, n: usize, vocab: usize) -> Tensor {
    let mut rng = StdRng::seed_from_u64(seed);
    let rows: Vec<u32> = (0..2)
        .flat_map(|_| {
            let mut r: Vec<u32> = (0..n).map(|_| rng.gen_range(3..vocab as u32)).collect();
            r[0] = BOS;
            r
        })
        .collect();
    Tensor::from_vec(rows, (2, n), &Device::Cpu).unwrap()
}

/// Logits of base + adapters in memory (the reference every export is held against).
fn reference_logits(tiny: &Tiny, adapter: &Path, ids: &Tensor) -> Tensor {
    let ckpt = Checkpoint::open(&tiny.spec()).unwrap();
    let set = AdapterSet::load(adapter, &ckpt.config, &Device::Cpu).unwrap();
    let base = ckpt.base(DType::F32, &Device::Cpu).unwrap();
    base.model(&set.adapters()).unwrap().logits(ids).unwrap()
}

/// Logits of an exported folder loaded as any model (its slots used by default).
fn export_logits(dir: &Path, ids: &Tensor) -> Tensor {
    Checkpoint::open(dir.to_str().unwrap())
        .unwrap()
        .load_model(DType::F32, &Device::Cpu, &Adapters::none())
        .unwrap()
        .logits(ids)
        .unwrap()
}

fn tensors(dir: &Path) -> HashMap<String, Tensor> {
    let mut all = HashMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            all.extend(candle_core::safetensors::load(&p, &Device::Cpu).unwrap());
        }
    }
    all
}

#[test]
fn hf_export_round_trips_through_eabfit() {
    for (arch, mask) in [
        (Arch::Llama, true),
        (Arch::Llama3, false),
        (Arch::Mistral, true),
        (Arch::Qwen2, true),
        (Arch::Qwen3, false),
    ] {
        let tiny = tiny(arch, 41);
        let hd = tiny.config["head_dim"].as_u64().unwrap_or(8);
        let work = tempfile::tempdir().unwrap();
        let adapter = work.path().join("adapter");
        make_adapter(&tiny, &adapter, mask, &all_layers(), 7);
        let out = work.path().join("hf");
        let o = export(tiny.path(), &adapter, &out, &[]);
        ok(&o);
        no_leftovers(work.path());

        let vocab = tiny.config["vocab_size"].as_u64().unwrap() as usize;
        let ids = ids(3, 12, vocab);
        let want = reference_logits(&tiny, &adapter, &ids);
        let got = export_logits(&out, &ids);
        let scale = common::max_abs(&want).max(1.0);
        let d = common::max_abs_diff(&got, &want);
        assert!(
            d <= 1e-5 * scale,
            "{arch:?}: export vs in memory {d} (scale {scale})"
        );
        // The slots matter: without them (the plain merged model) the logits move.
        let ckpt = Checkpoint::open(out.to_str().unwrap()).unwrap();
        let base = ckpt.base(DType::F32, &Device::Cpu).unwrap();
        let plain = base
            .model(&Adapters {
                slots: vec![None; 3],
                ..Adapters::none()
            })
            .unwrap();
        assert!(base.eab.is_some());
        let merged_only = {
            let vb =
                candle_nn::VarBuilder::from_tensors(base.tensors.clone(), DType::F32, &Device::Cpu);
            eabfit::model::Model::load(vb, &ckpt.config, &Adapters::none()).unwrap()
        };
        assert!(
            common::max_abs_diff(&merged_only.logits(&ids).unwrap(), &want) > 1e-3,
            "{arch:?}: slots change nothing?"
        );
        // `plain` got no slots of its own, so the export's joined: the same as `got`.
        assert!(common::max_abs_diff(&plain.logits(&ids).unwrap(), &got) == 0.0);

        // config.json: the source's, plus the eab block.
        let c = json(&out.join("config.json"));
        let eab = &c["eab"];
        assert_eq!(
            eab["slot_tensors"],
            "model.layers.{i}.self_attn.eab_k/eab_v"
        );
        assert_eq!(eab["layers"], serde_json::json!([0, 1, 2]));
        assert_eq!(eab["mask_first_token"], mask);
        assert_eq!(eab["n_kv_heads"], 2);
        assert_eq!(eab["head_dim"], hd);
        assert_eq!(eab["format_version"], 1);
        // Every field of the source is kept, but model_type: the export's own, for its code.
        for (k, v) in tiny.config.as_object().unwrap() {
            if k == "model_type" {
                assert_eq!(c[k], format!("eab_{}", v.as_str().unwrap()).as_str());
            } else {
                assert_eq!(&c[k], v, "config field {k}");
            }
        }
        assert_eq!(c["torch_dtype"], "float32");
        let ts = tensors(&out);
        for l in 0..3 {
            let (k, v) = slot_names(l);
            assert_eq!(ts[&k].dims(), &[2, hd as usize]);
            assert_eq!(ts[&v].dtype(), DType::F32);
        }
        for f in ["tokenizer.json", "tokenizer_config.json", "README.md"] {
            assert!(out.join(f).is_file(), "{f}");
        }
        assert_eq!(
            std::fs::read(out.join("tokenizer.json")).unwrap(),
            std::fs::read(tiny.path().join("tokenizer.json")).unwrap()
        );
        let card = std::fs::read_to_string(out.join("README.md")).unwrap();
        for needle in [
            "eab_k",
            "eabfit ppl --model",
            "add_bos = true",
            &format!("mask_first_token = {mask}"),
            "LoRA (rank 2, alpha 3",
        ] {
            assert!(
                card.contains(needle),
                "{arch:?}: `{needle}` not in the model card:\n{card}"
            );
        }
    }
}

#[test]
fn the_cli_runs_an_export_with_its_slots() {
    let tiny = tiny(Arch::Llama, 42);
    let work = tempfile::tempdir().unwrap();
    let adapter = work.path().join("adapter");
    make_adapter(&tiny, &adapter, true, &all_layers(), 8);
    let out = work.path().join("hf");
    ok(&export(tiny.path(), &adapter, &out, &[]));
    let text = common::write_text(work.path(), "eval.txt", 120, 5);
    // ppl of the export through ModelArgs::load (the CLI path) ...
    let pj = work.path().join("ppl.json");
    ok(&eabfit(&[
        "ppl",
        "--model",
        out.to_str().unwrap(),
        "--text",
        text.to_str().unwrap(),
        "--seq-len",
        "16",
        "--json",
        pj.to_str().unwrap(),
    ]));
    let got = json(&pj)["ppl"].as_f64().unwrap();
    // ... equals base + adapters in memory on the same windows, and differs from the base.
    let ckpt = Checkpoint::open(&tiny.spec()).unwrap();
    let windows = eabfit::data::Windows::new(
        &ckpt.tokenizer,
        &std::fs::read_to_string(&text).unwrap(),
        16,
        None,
        &text,
    )
    .unwrap();
    let base = ckpt.base(DType::F32, &Device::Cpu).unwrap();
    let set = AdapterSet::load(&adapter, &ckpt.config, &Device::Cpu).unwrap();
    let want = eabfit::perplexity::perplexity(&base.model(&set.adapters()).unwrap(), &windows)
        .unwrap()
        .ppl;
    let plain = eabfit::perplexity::perplexity(&base.model(&Adapters::none()).unwrap(), &windows)
        .unwrap()
        .ppl;
    assert!(
        (got - want).abs() <= 1e-4 * want,
        "export ppl {got}, in memory {want}"
    );
    assert!(
        (got - plain).abs() > 1e-3 * plain,
        "export ppl {got} is the base's {plain}"
    );

    // The hidden `logits` command: in memory and from the export agree.
    let a = work.path().join("a.json");
    let b = work.path().join("b.json");
    let idlist = "1,5,9,12,3,40,7";
    ok(&eabfit(&[
        "logits",
        "--model",
        &tiny.spec(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--ids",
        idlist,
        "--json",
        a.to_str().unwrap(),
    ]));
    ok(&eabfit(&[
        "logits",
        "--model",
        out.to_str().unwrap(),
        "--ids",
        idlist,
        "--json",
        b.to_str().unwrap(),
    ]));
    let (ja, jb) = (json(&a), json(&b));
    assert_eq!(ja["ids"], serde_json::json!([1, 5, 9, 12, 3, 40, 7]));
    assert_eq!(jb["slot_layers"], serde_json::json!([0, 1, 2]));
    assert_eq!(jb["mask_first_token"], true);
    let rows = |j: &Value| -> Vec<Vec<f64>> {
        j["logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap())
                    .collect()
            })
            .collect()
    };
    let (ra, rb) = (rows(&ja), rows(&jb));
    assert_eq!(ra.len(), 7);
    assert_eq!(
        ra[0].len(),
        tiny.config["vocab_size"].as_u64().unwrap() as usize
    );
    let d = ra
        .iter()
        .flatten()
        .zip(rb.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max);
    assert!(d < 1e-4, "logits in memory vs export: {d}");
}

#[test]
fn sharded_export_equals_the_single_file_one() {
    let tiny = tiny(Arch::Llama, 43);
    let work = tempfile::tempdir().unwrap();
    let adapter = work.path().join("adapter");
    make_adapter(&tiny, &adapter, false, &all_layers(), 9);
    let single = work.path().join("single");
    let sharded = work.path().join("sharded");
    ok(&export(tiny.path(), &adapter, &single, &[]));
    let limit = 5000u64;
    ok(&export(
        tiny.path(),
        &adapter,
        &sharded,
        &["--max-shard-size", &limit.to_string()],
    ));
    assert!(!sharded.join("model.safetensors").exists());
    let index = json(&sharded.join("model.safetensors.index.json"));
    let map = index["weight_map"].as_object().unwrap();
    let files: BTreeSet<&str> = map.values().map(|v| v.as_str().unwrap()).collect();
    let n = files.len();
    assert!(n > 3, "only {n} shards");
    for (i, f) in files.iter().enumerate() {
        assert_eq!(*f, format!("model-{:05}-of-{n:05}.safetensors", i + 1));
        let ts = candle_core::safetensors::load(sharded.join(f), &Device::Cpu).unwrap();
        let bytes: usize = ts.values().map(|t| t.elem_count() * 4).sum();
        assert!(
            bytes as u64 <= limit || ts.len() == 1,
            "{f}: {bytes} bytes in {} tensors",
            ts.len()
        );
        for name in ts.keys() {
            assert_eq!(map[name], *f, "{name} is in {f}");
        }
    }
    let single_ts = tensors(&single);
    assert_eq!(map.len(), single_ts.len());
    let total: usize = single_ts.values().map(|t| t.elem_count() * 4).sum();
    assert_eq!(index["metadata"]["total_size"], total as u64);
    let sharded_ts = tensors(&sharded);
    for (name, t) in &single_ts {
        assert_eq!(common::max_abs_diff(t, &sharded_ts[name]), 0.0, "{name}");
    }
    let vocab = tiny.config["vocab_size"].as_u64().unwrap() as usize;
    let ids = ids(4, 10, vocab);
    let want = reference_logits(&tiny, &adapter, &ids);
    let d = common::max_abs_diff(&export_logits(&sharded, &ids), &want);
    assert!(
        d <= 1e-5 * common::max_abs(&want).max(1.0),
        "sharded export vs in memory {d}"
    );
}

#[test]
fn merged_weights_are_w_plus_scale_b_a() {
    let tiny = tiny(Arch::Llama, 44);
    let work = tempfile::tempdir().unwrap();
    let adapter = work.path().join("adapter");
    let set = make_adapter(&tiny, &adapter, false, &[1], 10);
    let out = work.path().join("hf");
    ok(&export(tiny.path(), &adapter, &out, &[]));
    let src = candle_core::safetensors::load(tiny.path().join("model.safetensors"), &Device::Cpu)
        .unwrap();
    let got = tensors(&out);
    let scale = 3.0 / 2.0;
    let v2 = |t: &Tensor| t.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap();
    let mut merged = 0;
    for (name, w) in &src {
        let prefix = name.trim_end_matches(".weight");
        let (an, bn) = (
            format!("{prefix}.lora_A.weight"),
            format!("{prefix}.lora_B.weight"),
        );
        match (set.vars.get(&an), set.vars.get(&bn)) {
            (Some(a), Some(b)) => {
                let (w, a, b, g) = (v2(w), v2(a.as_tensor()), v2(b.as_tensor()), v2(&got[name]));
                let mut worst = 0f64;
                let mut moved = 0f64;
                for o in 0..w.len() {
                    for i in 0..w[0].len() {
                        let ba: f64 = (0..a.len()).map(|r| b[o][r] * a[r][i]).sum();
                        let want = w[o][i] + scale * ba;
                        worst = worst.max((g[o][i] - want).abs());
                        moved = moved.max((g[o][i] - w[o][i]).abs());
                    }
                }
                assert!(
                    worst < 1e-5,
                    "{name}: merged differs from W + scale B A by {worst}"
                );
                assert!(moved > 1e-3, "{name}: the merge moved nothing");
                merged += 1;
            }
            _ => assert_eq!(common::max_abs_diff(w, &got[name]), 0.0, "{name} changed"),
        }
    }
    assert_eq!(merged, 6, "q, v, down of layers 0 and 2");
    // Slots only where the adapter has them.
    assert!(got.contains_key("model.layers.1.self_attn.eab_k"));
    assert!(!got.contains_key("model.layers.0.self_attn.eab_k"));
    assert_eq!(
        json(&out.join("config.json"))["eab"]["layers"],
        serde_json::json!([1])
    );

    // bf16: the f32 merge rounded once; slots stay f32.
    let out16 = work.path().join("bf16");
    ok(&export(tiny.path(), &adapter, &out16, &["--dtype", "bf16"]));
    let got16 = tensors(&out16);
    for (name, t) in &got {
        let t16 = &got16[name];
        if name.contains("eab_") {
            assert_eq!(t16.dtype(), DType::F32, "{name}");
            assert_eq!(common::max_abs_diff(t, t16), 0.0);
        } else {
            assert_eq!(t16.dtype(), DType::BF16, "{name}");
            assert_eq!(
                common::max_abs_diff(&t.to_dtype(DType::BF16).unwrap(), t16),
                0.0,
                "{name}"
            );
        }
    }
    assert_eq!(json(&out16.join("config.json"))["torch_dtype"], "bfloat16");
}

/// Rotate-half RoPE to position `pos`, written from the Hugging Face formula
/// `x * cos + rotate_half(x) * sin`, `rotate_half(x) = [-x2, x1]`.
fn hf_rope(x: &[f64], pos: f64, theta: f64) -> Vec<f64> {
    let hd = x.len();
    let rot: Vec<f64> = (0..hd)
        .map(|i| {
            if i < hd / 2 {
                -x[i + hd / 2]
            } else {
                x[i - hd / 2]
            }
        })
        .collect();
    (0..hd)
        .map(|i| {
            let f = 1.0 / theta.powf((2 * (i % (hd / 2))) as f64 / hd as f64);
            x[i] * (pos * f).cos() + rot[i] * (pos * f).sin()
        })
        .collect()
}

#[test]
fn peft_export_layout_and_prompt_embeddings() {
    let tiny = tiny(Arch::Llama, 45);
    let work = tempfile::tempdir().unwrap();
    let adapter = work.path().join("adapter");
    let set = make_adapter(&tiny, &adapter, false, &all_layers(), 11);
    let out = work.path().join("peft");
    ok(&export(tiny.path(), &adapter, &out, &["--format", "peft"]));
    no_leftovers(work.path());

    // The base: merged, no slot tensors, no eab block; eabfit reads it as a plain model.
    let c = json(&out.join("config.json"));
    assert!(c.get("eab").is_none());
    let ts = tensors(&out);
    let src = candle_core::safetensors::load(tiny.path().join("model.safetensors"), &Device::Cpu)
        .unwrap();
    let names: BTreeSet<&String> = ts.keys().collect();
    assert_eq!(names, src.keys().collect::<BTreeSet<_>>());
    assert!(Checkpoint::open(out.to_str().unwrap())
        .unwrap()
        .eab
        .is_none());
    let hf_dir = work.path().join("hf");
    ok(&export(tiny.path(), &adapter, &hf_dir, &[]));
    let hf_ts = tensors(&hf_dir);
    for (name, t) in &ts {
        assert_eq!(
            common::max_abs_diff(t, &hf_ts[name]),
            0.0,
            "{name}: peft and hf merges differ"
        );
    }

    // adapter_config.json as PEFT's PrefixTuningConfig reads it (GQA: sized per KV head).
    let ac = json(&out.join("peft_adapter/adapter_config.json"));
    let (l, kv, hd) = (3usize, 2usize, 8usize);
    assert_eq!(ac["peft_type"], "PREFIX_TUNING");
    assert_eq!(ac["task_type"], "CAUSAL_LM");
    assert_eq!(ac["num_virtual_tokens"], 1);
    assert_eq!(ac["token_dim"], kv * hd);
    assert_eq!(ac["num_layers"], l);
    assert_eq!(ac["num_attention_heads"], kv);
    assert_eq!(ac["num_transformer_submodules"], 1);
    assert_eq!(ac["encoder_hidden_size"], kv * hd);
    assert_eq!(ac["prefix_projection"], false);
    assert_eq!(ac["inference_mode"], true);

    let pe = candle_core::safetensors::load(
        out.join("peft_adapter/adapter_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(pe.len(), 1);
    let pe = &pe["prompt_embeddings"];
    assert_eq!(pe.dims(), &[1, l * 2 * kv * hd]);
    assert_eq!(pe.dtype(), DType::F32);
    // PEFT get_prompt: view(batch, num_virtual_tokens, num_layers * 2, heads, head_dim),
    // permute([2, 0, 3, 1, 4]), split(2): per layer (key, value) of (batch, heads, 1, head_dim).
    let pkv = pe
        .reshape((1, 1, l * 2, kv, hd))
        .unwrap()
        .permute((2, 0, 3, 1, 4))
        .unwrap()
        .contiguous()
        .unwrap();
    for layer in 0..l {
        let (kn, vn) = slot_names(layer);
        let key = pkv.get(2 * layer).unwrap().reshape((kv, hd)).unwrap();
        let value = pkv.get(2 * layer + 1).unwrap().reshape((kv, hd)).unwrap();
        assert_eq!(
            common::max_abs_diff(&value, set.vars[&vn].as_tensor()),
            0.0,
            "layer {layer} value"
        );
        // The key is the slot key rotated to position 1 (PEFT's tokens sit at 1..T).
        let slot_k = set.vars[&kn]
            .as_tensor()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec2::<f64>()
            .unwrap();
        let key = key.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap();
        for h in 0..kv {
            let want = hf_rope(&slot_k[h], 1.0, 10_000.0);
            let d = want
                .iter()
                .zip(&key[h])
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            assert!(
                d < 1e-6,
                "layer {layer} head {h}: key {:?} vs R(1) k' {want:?}",
                key[h]
            );
            // Back at position -1 it is the slot itself.
            let back = hf_rope(&key[h], -1.0, 10_000.0);
            let d = back
                .iter()
                .zip(&slot_k[h])
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            assert!(d < 1e-6);
        }
    }
    // Why position 1: a query at p+1 (HF, after the prefix) against R(1) k' scores what a
    // query at p (eabfit) scores against the unrotated k'.
    let mut rng = StdRng::seed_from_u64(1);
    let q: Vec<f64> = (0..hd).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let k: Vec<f64> = (0..hd).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    for p in [0.0, 1.0, 7.0, 100.0] {
        let hf = dot(&hf_rope(&q, p + 1.0, 10_000.0), &hf_rope(&k, 1.0, 10_000.0));
        let ours = dot(&hf_rope(&q, p, 10_000.0), &k);
        assert!((hf - ours).abs() < 1e-9, "p {p}: {hf} vs {ours}");
    }
    // The same rotation as eabfit's own (llama3-scaled frequencies included).
    let cfg3: eabfit::model::Config = serde_json::from_value(common::config(Arch::Llama3)).unwrap();
    let x: Vec<f32> = (0..hd).map(|i| i as f32 - 3.5).collect();
    let r = eabfit::export::rope_rotate(&x, &cfg3.inv_freq(), 3.0);
    let back = eabfit::export::rope_rotate(&r, &cfg3.inv_freq(), -3.0);
    assert!(x.iter().zip(&back).all(|(a, b)| (a - b).abs() < 1e-5));

    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(
        card.contains("PeftModel.from_pretrained") && card.contains("position 1"),
        "{card}"
    );

    // both: hf/ and peft/ side by side.
    let both = work.path().join("both");
    ok(&export(tiny.path(), &adapter, &both, &["--format", "both"]));
    assert!(json(&both.join("hf/config.json")).get("eab").is_some());
    assert!(both
        .join("peft/peft_adapter/adapter_model.safetensors")
        .is_file());
    assert_eq!(
        json(&both.join("peft/peft_adapter/adapter_config.json"))["base_model_name_or_path"],
        both.join("peft")
            .canonicalize()
            .unwrap()
            .display()
            .to_string()
    );
}

#[test]
fn peft_refuses_what_a_prefix_cannot_express() {
    let tiny = tiny(Arch::Llama, 46);
    let work = tempfile::tempdir().unwrap();
    let masked = work.path().join("masked");
    make_adapter(&tiny, &masked, true, &all_layers(), 12);
    let out = work.path().join("out");
    let o = export(tiny.path(), &masked, &out, &["--format", "peft"]);
    fails(&o, &["mask_first_token = true", "--format hf"]);
    let o = export(tiny.path(), &masked, &out, &["--format", "both"]);
    fails(&o, &["mask_first_token"]);
    assert!(!out.exists());
    let partial = work.path().join("partial");
    make_adapter(&tiny, &partial, false, &[0, 2], 13);
    let o = export(tiny.path(), &partial, &out, &["--format", "peft"]);
    fails(&o, &["every layer", "[1]"]);
    assert!(!out.exists());
    no_leftovers(work.path());
}

/// The files under `dir`, with their bytes.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut v = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                v.push((p.clone(), std::fs::read(&p).unwrap()));
            }
        }
    }
    v.sort();
    v
}

#[test]
fn bad_input_fails_cleanly() {
    let tiny = tiny(Arch::Llama, 47);
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let adapter = w.join("adapter");
    make_adapter(&tiny, &adapter, true, &all_layers(), 14);
    let model_files = snapshot(tiny.path());
    let out = w.join("out");

    // An adapter of another model: the meta names the field ...
    let mut other_cfg = common::config(Arch::Llama);
    other_cfg["hidden_size"] = 48.into();
    other_cfg["num_attention_heads"] = 6.into();
    let other = common::tiny(Arch::Llama, 1);
    common::write_checkpoint(other.path(), &other_cfg, &common::weights(&other_cfg, 2));
    let foreign = w.join("foreign");
    make_adapter(&other, &foreign, true, &all_layers(), 15);
    fails(
        &export(tiny.path(), &foreign, &out, &[]),
        &["another model", "hidden_size 48"],
    );
    // ... and a tensor of the wrong shape is named.
    let bent = w.join("bent");
    make_adapter(&tiny, &bent, true, &all_layers(), 16);
    let mut ts =
        candle_core::safetensors::load(bent.join("adapter.safetensors"), &Device::Cpu).unwrap();
    let name = "model.layers.0.mlp.down_proj.lora_B.weight";
    ts.insert(
        name.into(),
        Tensor::ones((32, 3), DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&ts, bent.join("adapter.safetensors")).unwrap();
    fails(&export(tiny.path(), &bent, &out, &[]), &[name, "shape"]);

    // Missing adapter files.
    fails(
        &export(tiny.path(), &w.join("nowhere"), &out, &[]),
        &["nowhere", "adapter_config.json"],
    );
    let half = w.join("half");
    std::fs::create_dir_all(&half).unwrap();
    std::fs::copy(
        adapter.join("adapter_config.json"),
        half.join("adapter_config.json"),
    )
    .unwrap();
    fails(
        &export(tiny.path(), &half, &out, &[]),
        &["adapter.safetensors"],
    );

    // An adapter that changes nothing: B all zero, no slots.
    let idle = w.join("idle");
    {
        let cfg = Checkpoint::open(&tiny.spec()).unwrap().config;
        let mut meta = AdapterMeta::for_config(&cfg, "x");
        meta.lora_rank = 2;
        meta.lora_alpha = 2.0;
        meta.lora_targets = vec!["down".into()];
        meta.lora_layers = vec![1];
        AdapterSet::new(meta, SlotInit::Zeros, 0.1, 0, &Device::Cpu)
            .unwrap()
            .save(&idle)
            .unwrap();
    }
    fails(&export(tiny.path(), &idle, &out, &[]), &["changes nothing"]);
    assert!(!out.exists());

    // --out not writable: below a file, and in /proc.
    let file = w.join("a-file");
    std::fs::write(&file, "x").unwrap();
    fails(
        &export(tiny.path(), &adapter, &file.join("out"), &[]),
        &["a-file"],
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"x");
    if Path::new("/proc/self").exists() {
        let o = export(
            tiny.path(),
            &adapter,
            Path::new("/proc/eabfit-export-test"),
            &[],
        );
        fails(&o, &["/proc"]);
    }

    // An existing --out needs --force; without it nothing changes.
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    fails(
        &export(tiny.path(), &adapter, &out, &[]),
        &["already exists", "--force"],
    );
    assert_eq!(
        std::fs::read_to_string(out.join("keep.txt")).unwrap(),
        "mine"
    );
    ok(&export(tiny.path(), &adapter, &out, &["--force"]));
    assert!(!out.join("keep.txt").exists());
    assert!(out.join("model.safetensors").is_file());
    // A failing export with --force leaves the old one whole.
    let before = snapshot(&out);
    fails(
        &export(
            tiny.path(),
            &masked_copy(&tiny, w),
            &out,
            &["--force", "--format", "peft"],
        ),
        &["mask_first_token"],
    );
    assert_eq!(snapshot(&out), before);

    // Never inside the model's folder, never over the model or the adapter.
    fails(
        &export(tiny.path(), &adapter, &tiny.path().join("export"), &[]),
        &["inside the source model's folder"],
    );
    fails(
        &export(tiny.path(), &adapter, tiny.path(), &["--force"]),
        &["source model"],
    );
    let models = w.join("models");
    let copy = models.join("m");
    std::fs::create_dir_all(&copy).unwrap();
    for (p, bytes) in &model_files {
        std::fs::write(copy.join(p.file_name().unwrap()), bytes).unwrap();
    }
    fails(
        &export(&copy, &adapter, &models, &["--force"]),
        &["holds the source model"],
    );
    assert!(copy.join("model.safetensors").is_file());
    fails(&export(tiny.path(), &adapter, w, &["--force"]), &["holds"]);
    assert!(adapter.join("adapter.safetensors").is_file());
    assert_eq!(
        snapshot(tiny.path()),
        model_files,
        "the model folder changed"
    );

    // Usage errors exit 2.
    let o = export(tiny.path(), &adapter, &w.join("x"), &["--format", "onnx"]);
    assert_eq!(o.status.code(), Some(2));
    let o = export(tiny.path(), &adapter, &w.join("x"), &["--dtype", "f8"]);
    assert_eq!(o.status.code(), Some(2));
    no_leftovers(w);
    assert!(!w.join("x").exists());
}

/// A mask_first_token adapter (which `--format peft` refuses), in its own folder.
fn masked_copy(tiny: &Tiny, w: &Path) -> PathBuf {
    let d = w.join("masked-copy");
    make_adapter(tiny, &d, true, &all_layers(), 17);
    d
}

#[test]
fn a_trained_adapter_exports_and_reloads() {
    let tiny = common::planted(48);
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let train = common::write_text(w, "train.txt", 400, 1);
    let eval = common::write_text(w, "eval.txt", 100, 2);
    let run = w.join("run");
    ok(&eabfit(&[
        "train",
        concat!(env!("CARGO_MANIFEST_DIR"), "/recipes/tiny-debug.yaml"),
        &format!("model.path={}", tiny.spec()),
        &format!("data.train={}", train.display()),
        &format!("data.eval={}", eval.display()),
        &format!("train.out_dir={}", run.display()),
        &format!("log.dir={}", w.join("tb").display()),
    ]));
    let adapter = run.join("final");
    // A verify report beside the run, as `eabfit verify` writes it, reaches the model card.
    let verify = serde_json::json!({
        "adapter": adapter.display().to_string(),
        "base": {"ppl": 61.25, "layers": [{"massive_count": 4}, {"massive_count": 2}]},
        "adapted": {"ppl": 61.5, "layers": [{"massive_count": 0}, {"massive_count": 0}]},
        "kl": 0.0123, "ppl_increase": 0.004, "pass": true,
        "checks": [{"name": "massive_count", "value": 0.0, "limit": 0.0, "pass": true}],
    });
    std::fs::create_dir_all(run.join("verify")).unwrap();
    std::fs::write(run.join("verify/verify.json"), verify.to_string()).unwrap();
    let out = w.join("export");
    ok(&export(tiny.path(), &adapter, &out, &[]));
    let vocab = tiny.config["vocab_size"].as_u64().unwrap() as usize;
    let ids = ids(5, 16, vocab);
    let want = reference_logits(&tiny, &adapter, &ids);
    let d = common::max_abs_diff(&export_logits(&out, &ids), &want);
    assert!(
        d <= 1e-5 * common::max_abs(&want).max(1.0),
        "trained export vs in memory {d}"
    );
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    for needle in [
        "## Verification",
        "61.2500",
        "61.5000",
        "+0.40%",
        "pass",
        "| massive activations | 6 | 0 |",
    ] {
        assert!(card.contains(needle), "`{needle}` not in:\n{card}");
    }

    // A verify of several texts or window lengths writes one folder per pass: each reaches
    // the card, in name order.
    std::fs::remove_file(run.join("verify/verify.json")).unwrap();
    for (pass, ppl) in [("b-32", 70.5), ("a-16", 65.25)] {
        let mut v = verify.clone();
        v["adapted"]["ppl"] = ppl.into();
        std::fs::create_dir_all(run.join("verify").join(pass)).unwrap();
        std::fs::write(
            run.join("verify").join(pass).join("verify.json"),
            v.to_string(),
        )
        .unwrap();
    }
    let out2 = w.join("export2");
    ok(&export(tiny.path(), &adapter, &out2, &[]));
    let card = std::fs::read_to_string(out2.join("README.md")).unwrap();
    assert_eq!(card.matches("## Verification").count(), 2, "{card}");
    let (a, b) = (card.find("65.2500").unwrap(), card.find("70.5000").unwrap());
    assert!(a < b, "passes out of order:\n{card}");
}

/// Classes, their bases and the imports of a Python file, through Python's own parser:
/// {"classes": {name: [base, ...]}, "imports": [[level, module, [name, ...]], ...],
/// "assigns": {class.attr: constant}}.
fn python_outline(path: &Path) -> Value {
    let script = r#"
import ast, json, sys
tree = ast.parse(open(sys.argv[1]).read(), sys.argv[1])
out = {"classes": {}, "imports": [], "assigns": {}}
for node in ast.walk(tree):
    if isinstance(node, ast.ClassDef):
        out["classes"][node.name] = [ast.unparse(b) for b in node.bases]
        for st in node.body:
            if isinstance(st, ast.Assign) and isinstance(st.value, ast.Constant):
                for t in st.targets:
                    out["assigns"][f"{node.name}.{ast.unparse(t)}"] = st.value.value
    elif isinstance(node, ast.ImportFrom):
        out["imports"].append([node.level, node.module, [a.name for a in node.names]])
print(json.dumps(out))
"#;
    let o = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(path)
        .output()
        .expect("python3 is needed to parse the generated transformers code");
    ok(&o);
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn hf_export_carries_transformers_code_for_its_family() {
    for (arch, family, class) in [
        (Arch::Llama, "llama", "Llama"),
        (Arch::Mistral, "mistral", "Mistral"),
    ] {
        let tiny = tiny(arch, 43);
        let work = tempfile::tempdir().unwrap();
        let adapter = work.path().join("adapter");
        make_adapter(&tiny, &adapter, true, &all_layers(), 18);
        let out = work.path().join("hf");
        ok(&export(tiny.path(), &adapter, &out, &[]));
        let cfg: Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        let model_type = format!("eab_{family}");
        assert_eq!(cfg["model_type"], model_type.as_str());
        assert_eq!(
            cfg["architectures"],
            serde_json::json!([format!("Eab{class}ForCausalLM")])
        );
        assert_eq!(cfg["eab"]["layers"], serde_json::json!([0, 1, 2]));
        assert_eq!(cfg["eab"]["mask_first_token"], true);
        assert_eq!(cfg["eab"]["n_kv_heads"], 2);
        assert_eq!(cfg["eab"]["head_dim"], 8);
        if arch == Arch::Mistral {
            assert_eq!(cfg["sliding_window"], 5);
        }

        // auto_map names module.Class pairs; each module is a file beside the weights that
        // defines that class on transformers' own class of the family.
        let auto_map = cfg["auto_map"].as_object().expect("auto_map");
        let keys: BTreeSet<&str> = auto_map.keys().map(String::as_str).collect();
        assert_eq!(keys, BTreeSet::from(["AutoConfig", "AutoModelForCausalLM"]));
        let base_module = |kind: &str| format!("transformers.models.{family}.{kind}_{family}");
        for (auto, want_base, want_module) in [
            (
                "AutoConfig",
                format!("{class}Config"),
                base_module("configuration"),
            ),
            (
                "AutoModelForCausalLM",
                format!("{class}ForCausalLM"),
                base_module("modeling"),
            ),
        ] {
            let (module, name) = auto_map[auto].as_str().unwrap().split_once('.').unwrap();
            let outline = python_outline(&out.join(format!("{module}.py")));
            assert_eq!(
                outline["classes"][name],
                serde_json::json!([want_base]),
                "{auto}"
            );
            let imported = outline["imports"].as_array().unwrap().iter().any(|i| {
                i[0] == 0
                    && i[1] == want_module.as_str()
                    && i[2]
                        .as_array()
                        .unwrap()
                        .contains(&want_base.as_str().into())
            });
            assert!(
                imported,
                "{module}.py does not import {want_base} from {want_module}"
            );
        }
        let config_outline = python_outline(&out.join("configuration_eab.py"));
        assert_eq!(
            config_outline["assigns"][format!("Eab{class}Config.model_type")],
            model_type.as_str()
        );
        let modeling = python_outline(&out.join("modeling_eab.py"));
        assert_eq!(
            modeling["classes"][format!("Eab{class}Attention")],
            serde_json::json!([format!("{class}Attention")])
        );
        // The modeling file reaches its configuration by a relative import, which transformers
        // copies along with it.
        assert!(modeling["imports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i[0] == 1
                && i[1] == "configuration_eab"
                && i[2]
                    .as_array()
                    .unwrap()
                    .contains(&format!("Eab{class}Config").into())));
        // The slot parameters are the tensors the export wrote.
        let source = std::fs::read_to_string(out.join("modeling_eab.py")).unwrap();
        assert!(
            source.contains("self.eab_k = nn.Parameter")
                && source.contains("self.eab_v = nn.Parameter")
        );
        let written = tensors(&out);
        for l in 0..3 {
            let (k, v) = slot_names(l);
            assert_eq!(written[&k].dims(), [2, 8]);
            assert!(written.contains_key(&v));
        }

        // eabfit still reads the folder, and an export of it keeps its family.
        let ckpt = Checkpoint::open(out.to_str().unwrap()).unwrap();
        assert_eq!(ckpt.config.model_type.as_deref(), Some(model_type.as_str()));
        assert!(ckpt.eab.is_some());
        let again = work.path().join("again");
        ok(&export(&out, &adapter, &again, &[]));
        let cfg2: Value =
            serde_json::from_str(&std::fs::read_to_string(again.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(cfg2["model_type"], model_type.as_str());
        assert_eq!(cfg2["auto_map"], cfg["auto_map"]);
    }
}

#[test]
fn peft_export_of_an_eab_export_is_the_plain_family_again() {
    let tiny = tiny(Arch::Mistral, 44);
    let work = tempfile::tempdir().unwrap();
    let adapter = work.path().join("adapter");
    make_adapter(&tiny, &adapter, false, &all_layers(), 19);
    let hf = work.path().join("hf");
    ok(&export(tiny.path(), &adapter, &hf, &[]));
    let peft = work.path().join("peft");
    ok(&export(&hf, &adapter, &peft, &["--format", "peft"]));
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(peft.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["model_type"], "mistral");
    assert_eq!(
        cfg["architectures"],
        serde_json::json!(["MistralForCausalLM"])
    );
    assert!(cfg.get("auto_map").is_none() && cfg.get("eab").is_none());
    assert!(!peft.join("modeling_eab.py").exists());
}

#[test]
fn gguf_export_carries_the_chat_template() {
    let (gguf, _) = common::real_assets()
        .expect("real assets missing: run scripts/fetch-assets.sh (scripts/test.sh does)");
    let src = Checkpoint::open(gguf.to_str().unwrap()).unwrap();
    let template = src
        .tokenizer
        .chat_template
        .clone()
        .expect("SmolLM2-Instruct's GGUF has tokenizer.chat_template");
    let work = tempfile::tempdir().unwrap();
    let adapter = work.path().join("adapter");
    let mut meta = AdapterMeta::for_config(&src.config, gguf.to_str().unwrap());
    meta.eab_layers = (0..src.config.num_hidden_layers).collect();
    AdapterSet::new(
        meta,
        SlotInit::Normal { std: 0.1, seed: 3 },
        0.0,
        3,
        &Device::Cpu,
    )
    .unwrap()
    .save(&adapter)
    .unwrap();
    let out = work.path().join("hf");
    ok(&export(&gguf, &adapter, &out, &[]));
    let tc: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap())
            .unwrap();
    assert_eq!(tc["chat_template"], template.as_str());
    // eabfit reads it back from the folder: the same prompt tokens as from the GGUF.
    let back = Checkpoint::open(out.to_str().unwrap()).unwrap();
    let ask = "What is the capital of France?";
    let from_gguf = eabfit::generate::prompt_ids(&src.tokenizer, ask, false).unwrap();
    let from_export = eabfit::generate::prompt_ids(&back.tokenizer, ask, false).unwrap();
    assert!(from_gguf.1 && from_export.1, "both through the template");
    assert_eq!(from_export.0, from_gguf.0);
}
