//! The model against independent references: candle-transformers' own llama/mistral (logits),
//! and central finite differences (gradients of every weight tensor).

mod common;

use candle_core::{DType, Device, IndexOp, Tensor, Var};
use candle_nn::VarBuilder;
use common::{tiny, Arch};
use eabfit::adapters::Adapters;
use eabfit::checkpoint::Checkpoint;
use eabfit::model::{Config, Edit, Model, Taps};
use std::collections::HashMap;

const IDS: &[u32] = &[1, 5, 9, 3, 17, 22, 40, 8, 8, 31, 12, 6, 50, 2];

fn our_logits(spec: &str) -> Tensor {
    let ckpt = Checkpoint::open(spec).unwrap();
    let model = ckpt
        .load_model(DType::F32, &Device::Cpu, &Adapters::none())
        .unwrap();
    let ids = common::row(IDS);
    model.logits(&ids).unwrap().i((0, IDS.len() - 1)).unwrap() // (V,)
}

fn candle_llama_logits(dir: &std::path::Path) -> Tensor {
    use candle_transformers::models::llama;
    let (model, cfg) = common::candle_llama(dir);
    let mut cache = llama::Cache::new(false, DType::F32, &cfg, &Device::Cpu).unwrap();
    let ids = common::row(IDS);
    model
        .forward(&ids, 0, &mut cache)
        .unwrap()
        .flatten_all()
        .unwrap()
}

#[test]
fn llama_logits_match_candle_transformers() {
    let t = tiny(Arch::Llama, 1);
    let d = common::max_abs_diff(&our_logits(&t.spec()), &candle_llama_logits(t.path()));
    assert!(d < 1e-4, "max |diff| {d}");
}

#[test]
fn llama3_rope_scaling_and_tied_head_match_candle_transformers() {
    let t = tiny(Arch::Llama3, 2);
    let d = common::max_abs_diff(&our_logits(&t.spec()), &candle_llama_logits(t.path()));
    assert!(d < 1e-4, "max |diff| {d}");
}

/// candle's mistral masks j when i - j > w; Hugging Face (and eabfit) when i - j >= w. So our
/// window w + 1 is candle's w: the comparison runs with the window active (w < sequence length).
#[test]
fn mistral_sliding_window_matches_candle_transformers() {
    use candle_transformers::models::mistral;
    let t = tiny(Arch::Mistral, 3);
    let mut cfg: mistral::Config = serde_json::from_value(t.config.clone()).unwrap();
    cfg.sliding_window = Some(t.config["sliding_window"].as_u64().unwrap() as usize - 1);
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(
            &[t.path().join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
    };
    let mut model = mistral::Model::new(&cfg, vb).unwrap();
    let ids = common::row(IDS);
    let reference = model.forward(&ids, 0).unwrap().flatten_all().unwrap();
    let ours = our_logits(&t.spec());
    let d = common::max_abs_diff(&ours, &reference);
    assert!(d < 1e-4, "max |diff| {d}");
    // The window matters here: without it the logits differ.
    let mut no_window = t.config.clone();
    no_window.as_object_mut().unwrap().remove("sliding_window");
    std::fs::write(t.path().join("config.json"), no_window.to_string()).unwrap();
    assert!(common::max_abs_diff(&our_logits(&t.spec()), &reference) > 1e-3);
}

/// Every position's logits, not only the last: position p of a long run equals the last
/// position of the run cut at p (causality), checked against candle's last-position llama.
#[test]
fn logits_cover_every_position() {
    let t = tiny(Arch::Llama, 4);
    let ckpt = Checkpoint::open(&t.spec()).unwrap();
    let model = ckpt
        .load_model(DType::F32, &Device::Cpu, &Adapters::none())
        .unwrap();
    let ids = common::row(IDS);
    let all = model.logits(&ids).unwrap();
    assert_eq!(all.dims(), &[1, IDS.len(), 61]);
    for p in [0, 3, 7] {
        let cut = common::row(&IDS[..=p]);
        let last = model.logits(&cut).unwrap().i((0, p)).unwrap();
        assert!(common::max_abs_diff(&all.i((0, p)).unwrap(), &last) < 1e-5);
    }
}

#[test]
fn taps_expose_and_edit_hidden_states() {
    let t = tiny(Arch::Llama, 5);
    let ckpt = Checkpoint::open(&t.spec()).unwrap();
    let model = ckpt
        .load_model(DType::F32, &Device::Cpu, &Adapters::none())
        .unwrap();
    let ids = common::row(IDS);
    let base = model
        .forward(
            &ids,
            &Taps {
                hidden: true,
                attn: true,
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(base.hidden.len(), 3);
    assert_eq!(base.hidden[1].dims(), &[1, IDS.len(), 32]);
    assert_eq!(base.attn.len(), 3);
    let mass = base.attn[0].first_token.to_scalar::<f32>().unwrap();
    assert!(mass > 0.0 && mass < 1.0);
    // Setting an entry to the value it already has changes nothing; setting it elsewhere
    // changes that entry exactly and, downstream, the logits.
    let v = base.hidden[1]
        .i((0, 4, 7))
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let same = Taps {
        hidden: true,
        edits: vec![Edit {
            layer: 1,
            position: 4,
            dim: 7,
            value: v,
        }],
        ..Default::default()
    };
    let out = model.forward(&ids, &same).unwrap();
    assert!(common::max_abs_diff(&out.logits, &base.logits) < 1e-6);
    let moved = Taps {
        hidden: true,
        edits: vec![Edit {
            layer: 1,
            position: 4,
            dim: 7,
            value: 50.0,
        }],
        ..Default::default()
    };
    let out = model.forward(&ids, &moved).unwrap();
    assert_eq!(
        out.hidden[1]
            .i((0, 4, 7))
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        50.0
    );
    assert!(common::max_abs_diff(&out.hidden[0], &base.hidden[0]) == 0.0);
    assert!(
        common::max_abs_diff(
            &out.logits.i((0, 3)).unwrap(),
            &base.logits.i((0, 3)).unwrap()
        ) < 1e-6,
        "causal: earlier positions unchanged"
    );
    assert!(common::max_abs_diff(&out.logits, &base.logits) > 1e-3);
}

/// Loss = sum(logits * R) for a fixed random R; every weight is a Var in f64.
fn fd_loss(model: &Model, ids: &Tensor, r: &Tensor) -> Tensor {
    (model.logits(ids).unwrap() * r).unwrap().sum_all().unwrap()
}

/// Every weight tensor, made trainable, gets the gradient that central finite differences give
/// along a random direction: |fd - <g, u>| / max(|fd|, 1e-8) < 1e-2, in f64.
#[test]
fn every_weight_gradient_matches_finite_differences() {
    for arch in [Arch::Llama, Arch::Llama3, Arch::Mistral] {
        let cfg_json = common::config(arch);
        let cfg: Config = serde_json::from_value(cfg_json.clone()).unwrap();
        let weights = common::weights(&cfg_json, 11);
        let vars: HashMap<String, Var> = weights
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    Var::from_tensor(&v.to_dtype(DType::F64).unwrap()).unwrap(),
                )
            })
            .collect();
        let ts: HashMap<String, Tensor> = vars
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        let model = Model::load(
            VarBuilder::from_tensors(ts, DType::F64, &Device::Cpu),
            &cfg,
            &Adapters::none(),
        )
        .unwrap();
        let ids = common::row(&IDS[..9]);
        let r = Tensor::randn(0f64, 1.0, (1, 9, cfg.vocab_size), &Device::Cpu).unwrap();
        let grads = fd_loss(&model, &ids, &r).backward().unwrap();
        let mut names: Vec<&String> = vars.keys().collect();
        names.sort();
        for name in names {
            let var = &vars[name];
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{arch:?}: no gradient for {name}"));
            let u = Tensor::randn(0f64, 1.0, var.shape(), &Device::Cpu).unwrap();
            let (analytic, fd) = common::directional(var, g, &u, || {
                fd_loss(&model, &ids, &r).to_scalar::<f64>().unwrap()
            });
            let rel = (fd - analytic).abs() / fd.abs().max(1e-8);
            assert!(
                rel < 1e-2,
                "{arch:?} {name}: fd {fd} analytic {analytic} rel {rel}"
            );
            assert!(analytic.abs() > 0.0, "{arch:?} {name}: zero gradient");
        }
    }
}
