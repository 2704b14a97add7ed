//! Adapter gradients: every adapter tensor against central finite differences in f64 (base
//! weights get none), and activation recomputation and the decoder block op (with its
//! hand-written backward, also when every weight trains) against the plain per-op pass.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use common::adapters::{batch, llama_config, meta, noise, random_ids, randomize_lora_b};
use common::Arch;
use eabfit::adapters::{AdapterSet, SlotInit};
use eabfit::model::{Config, Model, Taps};
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::collections::{BTreeMap, HashMap};

/// The same adapters as f64 Vars (the finite-difference and recompute checks run in f64).
fn in_f64(set: &AdapterSet) -> AdapterSet {
    let vars: BTreeMap<String, Var> = set
        .vars
        .iter()
        .map(|(k, v)| {
            let t = v.as_tensor().to_dtype(DType::F64).unwrap();
            (k.clone(), Var::from_tensor(&t).unwrap())
        })
        .collect();
    AdapterSet {
        meta: set.meta.clone(),
        vars,
    }
}

/// Loss = sum(logits * R) for a fixed random R.
fn fd_loss(model: &Model, ids: &Tensor, r: &Tensor) -> Tensor {
    (model.logits(ids).unwrap() * r).unwrap().sum_all().unwrap()
}

/// Every adapter Var (slots in all layers, LoRA rank 2 on `down` and `q` of layer 1) gets the
/// directional derivative that central finite differences give, in f64 (rel err < 1e-3); the
/// base weights, plain tensors, get no gradient at all.
#[test]
fn adapter_gradients_match_finite_differences() {
    let (json, cfg) = llama_config();
    let weights: HashMap<String, Tensor> = common::weights(&json, 31)
        .into_iter()
        .map(|(k, v)| (k, v.to_dtype(DType::F64).unwrap()))
        .collect();
    let mut rng = StdRng::seed_from_u64(31);
    let seqs = vec![
        random_ids(&mut rng, 9, cfg.vocab_size, true),
        random_ids(&mut rng, 9, cfg.vocab_size, true),
    ];
    let ids = batch(&seqs);
    let r = {
        let n = 2 * 9 * cfg.vocab_size;
        let data: Vec<f64> = (0..n).map(|_| rng.gen::<f64>() * 2.0 - 1.0).collect();
        Tensor::from_vec(data, (2, 9, cfg.vocab_size), &Device::Cpu).unwrap()
    };
    for mask_first_token in [false, true] {
        let set32 = AdapterSet::new(
            meta(
                &cfg,
                true,
                mask_first_token,
                Some((2, 4.0, &["down", "q"], &[1])),
            ),
            SlotInit::Normal { std: 0.5, seed: 7 },
            0.3,
            7,
            &Device::Cpu,
        )
        .unwrap();
        randomize_lora_b(&set32, &mut rng, 0.3);
        assert_eq!(set32.vars.len(), 2 * 3 + 2 * 2);
        let set = in_f64(&set32);
        let model = Model::load(
            VarBuilder::from_tensors(weights.clone(), DType::F64, &Device::Cpu),
            &cfg,
            &set.adapters(),
        )
        .unwrap();
        let grads = fd_loss(&model, &ids, &r).backward().unwrap();
        for (name, w) in &weights {
            assert!(grads.get(w).is_none(), "base weight {name} got a gradient");
        }
        assert!(grads.get(model.embed_tokens()).is_none());
        assert!(grads.get(model.layer_mlp_down(1).weight()).is_none());
        for (name, var) in &set.vars {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {name}"));
            let (a, b) = var.as_tensor().dims2().unwrap();
            let u = noise(&mut rng, (a, b), 1.0).to_dtype(DType::F64).unwrap();
            let (analytic, fd) = common::directional(var, g, &u, || {
                fd_loss(&model, &ids, &r).to_scalar::<f64>().unwrap()
            });
            let rel = (fd - analytic).abs() / fd.abs().max(1e-8);
            assert!(
                rel < 1e-3,
                "mask_first_token {mask_first_token} {name}: fd {fd} analytic {analytic} rel {rel}"
            );
            assert!(
                analytic.abs() > 1e-6,
                "mask_first_token {mask_first_token} {name}: gradient {analytic}"
            );
        }
    }
}

/// Slots in every layer (~N(0, 0.5)) and LoRA r2 on `targets` of layer 1 with B made nonzero,
/// in f64, and the model over `weights` with them.
fn f64_model_with_adapters(
    cfg: &Config,
    weights: HashMap<String, Tensor>,
    rng: &mut StdRng,
    mask_first_token: bool,
    targets: &[&str],
) -> (AdapterSet, Model) {
    let set32 = AdapterSet::new(
        meta(cfg, true, mask_first_token, Some((2, 4.0, targets, &[1]))),
        SlotInit::Normal { std: 0.5, seed: 9 },
        0.3,
        9,
        &Device::Cpu,
    )
    .unwrap();
    randomize_lora_b(&set32, rng, 0.3);
    let set = in_f64(&set32);
    let model = Model::load(
        VarBuilder::from_tensors(weights, DType::F64, &Device::Cpu),
        cfg,
        &set.adapters(),
    )
    .unwrap();
    (set, model)
}

/// Squared logits plus 1e-2 x every kept hidden state squared: a loss that reaches every layer.
fn probe_loss(out: &eabfit::model::Output) -> Tensor {
    let mut loss = out.logits.sqr().unwrap().sum_all().unwrap();
    for h in &out.hidden {
        loss = (loss + (h.sqr().unwrap().sum_all().unwrap() * 1e-2).unwrap()).unwrap();
    }
    loss
}

/// Loss and adapter gradients of `arch`'s tiny model in f64 (slots in every layer, LoRA on
/// layer 1's down and q projections, a loss on the logits and on every hidden state) with
/// `taps` against the plain per-op pass: they must agree to rounding.
fn same_as_plain_pass(arch: Arch, mask_first_token: bool, taps: Taps) {
    let json = common::config(arch);
    let cfg: Config = serde_json::from_value(json.clone()).unwrap();
    let weights: HashMap<String, Tensor> = common::weights(&json, 41)
        .into_iter()
        .map(|(k, v)| (k, v.to_dtype(DType::F64).unwrap()))
        .collect();
    let mut rng = StdRng::seed_from_u64(41);
    let ids = batch(&[
        random_ids(&mut rng, 10, cfg.vocab_size, true),
        random_ids(&mut rng, 10, cfg.vocab_size, true),
    ]);
    let (set, model) =
        f64_model_with_adapters(&cfg, weights, &mut rng, mask_first_token, &["down", "q"]);
    let run = |taps: &Taps| {
        let loss = probe_loss(&model.forward(&ids, taps).unwrap());
        (loss.to_scalar::<f64>().unwrap(), loss.backward().unwrap())
    };
    let plain = Taps {
        hidden: true,
        block_op: Some(false),
        ..Default::default()
    };
    let (l0, g0) = run(&plain);
    let (l1, g1) = run(&Taps {
        hidden: true,
        ..taps
    });
    assert!((l0 - l1).abs() <= 1e-12 * l0.abs(), "loss {l0} vs {l1}");
    for (name, var) in &set.vars {
        let a = g0.get(var.as_tensor()).expect("plain gradient");
        let b = g1
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let e = common::max_abs_diff(a, b) / common::max_abs(a);
        assert!(e < 1e-10, "{name}: rel {e}");
    }
}

/// Activation recomputation (`Taps::recompute`, the recipe's `train.recompute`) changes where
/// the backward pass gets its activations, not what it computes (LoRA's layer is kept whole).
#[test]
fn recompute_gives_the_same_loss_and_gradients() {
    same_as_plain_pass(
        Arch::Llama,
        false,
        Taps {
            recompute: true,
            block_op: Some(false),
            ..Default::default()
        },
    );
}

/// The decoder block as one op with a hand-written backward (`ops::block`, on by default for
/// CUDA bf16) gives the per-op pass's loss and gradients: GQA, the slot with and without the
/// hidden first token, Mistral's window, Qwen2's biases and Qwen3's head norms, and LoRA's layer
/// on the per-op path between blocks on the op's.
#[test]
fn block_op_gives_the_same_loss_and_gradients() {
    for (arch, mask) in [
        (Arch::Llama, false),
        (Arch::Llama, true),
        (Arch::Mistral, false),
        (Arch::Llama3, true),
        (Arch::Qwen2, true),
        (Arch::Qwen3, false),
    ] {
        same_as_plain_pass(
            arch,
            mask,
            Taps {
                block_op: Some(true),
                ..Default::default()
            },
        );
    }
}

/// Pretraining through the block op: every weight trains, and the op's backward hands the
/// weight gradients of its blocks to a `WeightGrads` instead of candle's store. Loss and the
/// gradient of every weight and slot (f64; layer 1 has LoRA and stays on the per-op path, so
/// its weights' gradients come from candle) against the plain per-op pass.
#[test]
fn block_op_gives_every_weight_gradient_when_weights_train() {
    use eabfit::ops::block::WeightGrads;
    use std::sync::Arc;
    for arch in [Arch::Llama, Arch::Mistral] {
        let json = common::config(arch);
        let cfg: Config = serde_json::from_value(json.clone()).unwrap();
        let vars: BTreeMap<String, Var> = common::weights(&json, 43)
            .into_iter()
            .map(|(k, v)| {
                (
                    k,
                    Var::from_tensor(&v.to_dtype(DType::F64).unwrap()).unwrap(),
                )
            })
            .collect();
        let tensors = vars
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        let mut rng = StdRng::seed_from_u64(43);
        let ids = batch(&[
            random_ids(&mut rng, 9, cfg.vocab_size, true),
            random_ids(&mut rng, 9, cfg.vocab_size, true),
        ]);
        let (set, model) = f64_model_with_adapters(&cfg, tensors, &mut rng, false, &["down"]);
        let run = |block_op: bool| {
            let sink = Arc::new(WeightGrads::default());
            let taps = Taps {
                hidden: true,
                block_op: Some(block_op),
                weight_grads: Some(sink.clone()),
                ..Default::default()
            };
            let loss = probe_loss(&model.forward(&ids, &taps).unwrap());
            let gs = loss.backward().unwrap();
            let sunk = sink.take().unwrap();
            let mut grads = BTreeMap::new();
            for (name, var) in vars.iter().chain(&set.vars) {
                let g = match (gs.get(var.as_tensor()), sunk.get(name)) {
                    (Some(g), None) | (None, Some(g)) => g.clone(),
                    (a, b) => panic!(
                        "{name}: gradient from candle {}, from the op {}",
                        a.is_some(),
                        b.is_some()
                    ),
                };
                grads.insert(name.clone(), g);
            }
            (loss.to_scalar::<f64>().unwrap(), grads, sunk.len())
        };
        let (l0, g0, n0) = run(false);
        let (l1, g1, n1) = run(true);
        assert_eq!(n0, 0, "{arch:?}: the per-op pass wrote to the sink");
        // 9 weights in each of the two blocks without LoRA (0 and 2).
        assert_eq!(n1, 18, "{arch:?}: weights the block op handed over");
        assert!(
            (l0 - l1).abs() <= 1e-12 * l0.abs(),
            "{arch:?}: loss {l0} vs {l1}"
        );
        for (name, a) in &g0 {
            let e = common::max_abs_diff(a, &g1[name]) / common::max_abs(a);
            assert!(e < 1e-10, "{arch:?} {name}: rel {e}");
        }
    }
}
