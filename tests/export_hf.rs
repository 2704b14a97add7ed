//! `eabfit export` (hf, the default format) on tiny checkpoints: the export reloaded by eabfit
//! gives the logits of base + adapters in memory (single file, sharded, a trained adapter, and
//! through the CLI's `ppl` and `logits`), the merged weights equal W + scale B A computed
//! independently (bf16: rounded once, slots kept f32), the model card carries the verify
//! reports, and a GGUF's chat template reaches tokenizer_config.json.

mod common;

use candle_core::{DType, Device, Tensor};
use common::export::{all_layers, eabfit, export, json, no_leftovers, ok, tensors};
use common::{make_adapter, tiny, Arch, Tiny};
use eabfit::adapters::{slot_names, AdapterMeta, AdapterSet, Adapters, SlotInit};
use eabfit::checkpoint::Checkpoint;
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::Path;

const BOS: u32 = 1;

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
