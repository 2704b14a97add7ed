//! The tiny LLaMA config, token batches and adapter sets the adapters_* tests build their
//! checks on.

use super::Arch;
use candle_core::{DType, Device, Tensor};
use eabfit::adapters::{AdapterMeta, AdapterSet};
use eabfit::model::Config;
use rand::{rngs::StdRng, Rng};

pub const BOS: u32 = 1;

/// The tiny LLaMA-2 style config: 4 heads, 2 KV heads (GQA), 3 layers, untied head.
pub fn llama_config() -> (serde_json::Value, Config) {
    let json = super::config(Arch::Llama);
    let cfg: Config = serde_json::from_value(json.clone()).unwrap();
    assert_eq!((cfg.num_attention_heads, cfg.n_kv_heads()), (4, 2));
    (json, cfg)
}

/// Random token ids in 3..vocab, optionally starting with BOS.
pub fn random_ids(rng: &mut StdRng, n: usize, vocab: usize, bos_first: bool) -> Vec<u32> {
    (0..n)
        .map(|i| {
            if i == 0 && bos_first {
                BOS
            } else {
                rng.gen_range(3..vocab as u32)
            }
        })
        .collect()
}

pub fn batch(seqs: &[Vec<u32>]) -> Tensor {
    let t = seqs[0].len();
    let flat: Vec<u32> = seqs.iter().flatten().copied().collect();
    Tensor::from_vec(flat, (seqs.len(), t), &Device::Cpu).unwrap()
}

/// Uniform-ish noise of the given std (seeded), f32.
pub fn noise(rng: &mut StdRng, shape: (usize, usize), std: f64) -> Tensor {
    let n = shape.0 * shape.1;
    let data: Vec<f32> = (0..n)
        .map(|_| (std * 3f64.sqrt() * (rng.gen::<f64>() * 2.0 - 1.0)) as f32)
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

/// Meta with a slot in every layer and, when `lora` is given, LoRA (rank, alpha, targets, layers).
pub fn meta(
    cfg: &Config,
    slots: bool,
    mask_first_token: bool,
    lora: Option<(usize, f64, &[&str], &[usize])>,
) -> AdapterMeta {
    let mut m = AdapterMeta::for_config(cfg, "tiny-test");
    if slots {
        m.eab_layers = (0..cfg.num_hidden_layers).collect();
    }
    m.mask_first_token = mask_first_token;
    if let Some((rank, alpha, targets, layers)) = lora {
        m.lora_rank = rank;
        m.lora_alpha = alpha;
        m.lora_targets = targets.iter().map(|s| s.to_string()).collect();
        m.lora_layers = layers.to_vec();
    }
    m
}

/// Overwrites every `lora_B` (zero at init) with noise so that B A, and the gradients of A,
/// are nonzero.
pub fn randomize_lora_b(set: &AdapterSet, rng: &mut StdRng, std: f64) {
    for (name, var) in &set.vars {
        if name.ends_with("lora_B.weight") {
            let (o, r) = var.as_tensor().dims2().unwrap();
            var.set(&noise(rng, (o, r), std)).unwrap();
        }
    }
}

pub fn to_vec64(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}
