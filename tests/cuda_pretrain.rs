//! The decoder block op's backward on CUDA as pretraining runs it: every base weight trains,
//! and the op hands its blocks' weight gradients (with Qwen2's q/k/v biases and Qwen3's q/k
//! head norms) to a `WeightGrads` instead of candle's store. Against the CPU's f32 per-op pass,
//! within what bf16 alone costs there. Built only with `--features cuda`; needs a CUDA device 0
//! (run on the GPU machine through `scripts/gpu.sh test`).
#![cfg(feature = "cuda")]

mod common;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use common::Arch;
use eabfit::model::{Adapters, Config, Model, Taps};
use eabfit::ops::block::WeightGrads;
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Every base weight as a Var of `dtype` on `dev`, no adapters; loss = mean(logits * R) over
/// two rows of 150 tokens. Returns the loss, every weight's gradient (f32, on the CPU) and the
/// names the block op handed over.
fn gradients(
    json: &serde_json::Value,
    cfg: &Config,
    dev: &Device,
    dtype: DType,
    block_op: bool,
) -> (f32, BTreeMap<String, Tensor>, Vec<String>) {
    let vars: BTreeMap<String, Var> = common::weights(json, 7)
        .into_iter()
        .map(|(k, v)| {
            let t = v.to_dtype(dtype).unwrap().to_device(dev).unwrap();
            (k, Var::from_tensor(&t).unwrap())
        })
        .collect();
    let tensors = vars
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    let vb = VarBuilder::from_tensors(tensors, dtype, dev);
    let model = Model::load(vb, cfg, &Adapters::none()).unwrap();
    let (b, t, v) = (2, 150, cfg.vocab_size);
    let mut rng = StdRng::seed_from_u64(7);
    let ids: Vec<u32> = (0..b * t)
        .map(|i| {
            if i % t == 0 {
                1
            } else {
                rng.gen_range(3..v as u32)
            }
        })
        .collect();
    let ids = Tensor::from_vec(ids, (b, t), dev).unwrap();
    let r: Vec<f32> = (0..b * t * v).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let r = Tensor::from_vec(r, (b, t, v), dev).unwrap();
    let sink = Arc::new(WeightGrads::default());
    let taps = Taps {
        block_op: Some(block_op),
        weight_grads: Some(sink.clone()),
        ..Default::default()
    };
    let logits = model.forward(&ids, &taps).unwrap().logits; // (B, T, V)
    let loss = (logits.to_dtype(DType::F32).unwrap() * r)
        .unwrap()
        .mean_all()
        .unwrap();
    let gs = loss.backward().unwrap();
    let sunk = sink.take().unwrap();
    let mut grads = BTreeMap::new();
    for (name, var) in &vars {
        let g = match (gs.get(var.as_tensor()), sunk.get(name)) {
            (Some(g), None) | (None, Some(g)) => g,
            (a, b) => panic!(
                "{name}: gradient from candle {}, from the op {}",
                a.is_some(),
                b.is_some()
            ),
        };
        let g = g.to_device(&Device::Cpu).unwrap();
        grads.insert(name.clone(), g.to_dtype(DType::F32).unwrap());
    }
    let loss = loss.to_scalar::<f32>().unwrap();
    (loss, grads, sunk.into_keys().collect())
}

/// LLaMA, Qwen2 and Qwen3 at head_dim 64 (the fused kernels): the block op on CUDA bf16 hands
/// over every tensor of every block, the biases and head norms among them, and the loss and
/// each weight's gradient stay within 1.5x what bf16 costs the CPU's per-op pass, plus 2% of
/// the gradient's size, of the CPU's f32 per-op pass.
#[test]
fn block_op_weight_gradients_on_cuda_match_cpu() {
    let gpu = Device::new_cuda(0).expect("a CUDA device 0");
    for arch in [Arch::Llama, Arch::Qwen2, Arch::Qwen3] {
        let json = common::config_hd64(arch);
        let cfg: Config = serde_json::from_value(json.clone()).unwrap();
        let (l_cpu, g_cpu, none) = gradients(&json, &cfg, &Device::Cpu, DType::F32, false);
        assert!(
            none.is_empty(),
            "{arch:?}: the per-op pass wrote to the sink"
        );
        let (l_c16, g_c16, _) = gradients(&json, &cfg, &Device::Cpu, DType::BF16, false);
        let (l_gpu, g_gpu, sunk) = gradients(&json, &cfg, &gpu, DType::BF16, true);
        let in_blocks: Vec<String> = g_cpu
            .keys()
            .filter(|n| n.starts_with("model.layers."))
            .cloned()
            .collect();
        assert_eq!(sunk, in_blocks, "{arch:?}: what the block op handed over");
        let extras: &[&str] = match arch {
            Arch::Qwen2 => &["q_proj.bias", "k_proj.bias", "v_proj.bias"],
            Arch::Qwen3 => &["q_norm.weight", "k_norm.weight"],
            _ => &[],
        };
        for e in extras {
            assert!(sunk.iter().any(|n| n.ends_with(e)), "{arch:?}: no {e}");
        }
        let rel_loss = |l: f32| ((l - l_cpu) / l_cpu).abs();
        let (e, e16) = (rel_loss(l_gpu), rel_loss(l_c16));
        eprintln!("{arch:?}: loss cpu f32 {l_cpu:.6}, cuda bf16 {l_gpu:.6} (rel {e:.2e}), cpu bf16 rel {e16:.2e}");
        assert!(
            e < 1.5 * e16 + 1e-2,
            "{arch:?}: loss rel {e} (cpu bf16 {e16})"
        );
        for (name, a) in &g_cpu {
            let scale = common::max_abs(a).max(1e-12);
            let e = common::max_abs_diff(&g_gpu[name], a) / scale;
            let e16 = common::max_abs_diff(&g_c16[name], a) / scale;
            eprintln!("{arch:?}: {name} gradient rel {e:.2e} (cpu bf16 {e16:.2e})");
            assert!(
                e < 1.5 * e16 + 2e-2,
                "{arch:?} {name}: gradient rel {e}, cpu bf16 {e16}"
            );
        }
    }
}
