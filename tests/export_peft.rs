//! `eabfit export --format peft` (and `both`) on tiny checkpoints: the merged base has the hf
//! export's weights and no slots, the adapter has PEFT's prefix-tuning layout and its prompt
//! embeddings are the slots (keys rotated to position 1, held against the Hugging Face RoPE
//! formula written here); what a prefix cannot express is refused, leaving nothing behind.

mod common;

use candle_core::{DType, Device};
use common::export::{all_layers, export, fails, json, no_leftovers, ok, tensors};
use common::{make_adapter, tiny, Arch};
use eabfit::adapters::slot_names;
use eabfit::checkpoint::Checkpoint;
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::collections::BTreeSet;

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
    // Its peft base is the peft export's, byte for byte (export reads it back from hf/ instead
    // of merging again; a second merge would give the same bytes, so this holds the result only).
    assert_eq!(
        std::fs::read(both.join("peft/model.safetensors")).unwrap(),
        std::fs::read(out.join("model.safetensors")).unwrap()
    );
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
