//! The adapted forward pass (EAB slots, LoRA) against independent references: a naive f64
//! decoder written with plain loops, the base model itself (slots initialised from its first
//! token), and a model loaded from LoRA weights merged in f64 loops.

mod common;

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::VarBuilder;
use common::adapters::{batch, llama_config, meta, random_ids, randomize_lora_b, to_vec64};
use eabfit::adapters::{AdapterSet, Adapters, SlotInit};
use eabfit::model::{Config, Model, Taps};
use rand::{rngs::StdRng, SeedableRng};
use std::collections::HashMap;

fn load_model(
    weights: &HashMap<String, Tensor>,
    cfg: &Config,
    dtype: DType,
    adapters: &Adapters,
) -> Model {
    let ts = weights
        .iter()
        .map(|(k, v)| (k.clone(), v.to_dtype(dtype).unwrap()))
        .collect();
    Model::load(
        VarBuilder::from_tensors(ts, dtype, &Device::Cpu),
        cfg,
        adapters,
    )
    .unwrap()
}

// ---------------------------------------------------------------------------------------------
// The naive reference: the whole decoder in f64 loops over Vec<f64>.

/// y = W x for a row-major W of shape (out, in).
fn matvec(w: &[f64], x: &[f64]) -> Vec<f64> {
    let n_in = x.len();
    assert_eq!(w.len() % n_in, 0);
    w.chunks(n_in)
        .map(|row| row.iter().zip(x).map(|(a, b)| a * b).sum())
        .collect()
}

fn rms_norm(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let inv = 1.0 / (ms + eps).sqrt();
    x.iter().zip(w).map(|(v, g)| v * inv * g).collect()
}

/// Rotate-half RoPE of one head vector at position `pos`: dim i pairs with dim i + hd/2.
fn rope(x: &mut [f64], pos: usize, theta: f64) {
    let hd = x.len();
    let half = hd / 2;
    for i in 0..half {
        let freq = 1.0 / theta.powf((2 * i) as f64 / hd as f64);
        let (c, s) = ((pos as f64 * freq).cos(), (pos as f64 * freq).sin());
        let (x1, x2) = (x[i], x[i + half]);
        x[i] = x1 * c - x2 * s;
        x[i + half] = x2 * c + x1 * s;
    }
}

fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

struct Naive {
    cfg: Config,
    w: HashMap<String, Vec<f64>>,
    /// Per layer, (k', v') flattened (KV * hd), never rotated.
    slots: Vec<Option<(Vec<f64>, Vec<f64>)>>,
    mask_first_token: bool,
}

impl Naive {
    fn new(cfg: &Config, weights: &HashMap<String, Tensor>, adapters: &Adapters) -> Self {
        assert!(cfg.rope_scaling.is_none() && cfg.sliding_window.is_none());
        assert!(adapters.lora.is_empty(), "the naive reference has no LoRA");
        let slots = (0..cfg.num_hidden_layers)
            .map(|l| {
                adapters
                    .slots
                    .get(l)
                    .cloned()
                    .flatten()
                    .map(|s| (to_vec64(&s.k), to_vec64(&s.v)))
            })
            .collect();
        Self {
            cfg: cfg.clone(),
            w: weights
                .iter()
                .map(|(k, v)| (k.clone(), to_vec64(v)))
                .collect(),
            slots,
            mask_first_token: adapters.mask_first_token,
        }
    }

    fn w(&self, name: &str) -> &[f64] {
        self.w
            .get(name)
            .unwrap_or_else(|| panic!("no weight {name}"))
    }

    /// Logits (T, V) of one sequence.
    fn logits(&self, ids: &[u32]) -> Vec<Vec<f64>> {
        let c = &self.cfg;
        let (d, h, kvh, hd) = (
            c.hidden_size,
            c.num_attention_heads,
            c.n_kv_heads(),
            c.head_dim(),
        );
        let group = h / kvh;
        let t = ids.len();
        let emb = self.w("model.embed_tokens.weight");
        let mut x: Vec<Vec<f64>> = ids
            .iter()
            .map(|&id| emb[id as usize * d..(id as usize + 1) * d].to_vec())
            .collect();
        for l in 0..c.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let w = |n: &str| self.w(&format!("{p}.{n}.weight"));
            // Projections and RoPE, per position.
            let mut qs = vec![];
            let mut ks = vec![];
            let mut vs = vec![];
            for (pos, xi) in x.iter().enumerate() {
                let hn = rms_norm(xi, w("input_layernorm"), c.rms_norm_eps);
                let mut q = matvec(w("self_attn.q_proj"), &hn);
                let mut k = matvec(w("self_attn.k_proj"), &hn);
                for head in 0..h {
                    rope(&mut q[head * hd..(head + 1) * hd], pos, c.rope_theta);
                }
                for head in 0..kvh {
                    rope(&mut k[head * hd..(head + 1) * hd], pos, c.rope_theta);
                }
                qs.push(q);
                ks.push(k);
                vs.push(matvec(w("self_attn.v_proj"), &hn));
            }
            let scale = 1.0 / (hd as f64).sqrt();
            let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(u, v)| u * v).sum::<f64>();
            for i in 0..t {
                let mut attn = vec![0.0; h * hd];
                for head in 0..h {
                    let g = head / group; // the KV head this query head reads
                    let q = &qs[i][head * hd..(head + 1) * hd];
                    // (score, value) of every visible key, the slot last.
                    let mut keys: Vec<(f64, &[f64])> = vec![];
                    for j in 0..=i {
                        if self.mask_first_token && j == 0 {
                            continue;
                        }
                        keys.push((
                            dot(q, &ks[j][g * hd..(g + 1) * hd]) * scale,
                            &vs[j][g * hd..(g + 1) * hd],
                        ));
                    }
                    if let Some((sk, sv)) = &self.slots[l] {
                        keys.push((
                            dot(q, &sk[g * hd..(g + 1) * hd]) * scale,
                            &sv[g * hd..(g + 1) * hd],
                        ));
                    }
                    let m = keys.iter().map(|k| k.0).fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = keys.iter().map(|k| (k.0 - m).exp()).sum();
                    for (s, v) in &keys {
                        let pr = (s - m).exp() / z;
                        for e in 0..hd {
                            attn[head * hd + e] += pr * v[e];
                        }
                    }
                }
                let o = matvec(w("self_attn.o_proj"), &attn);
                for e in 0..d {
                    x[i][e] += o[e];
                }
            }
            for xi in x.iter_mut() {
                let hn = rms_norm(xi, w("post_attention_layernorm"), c.rms_norm_eps);
                let gate = matvec(w("mlp.gate_proj"), &hn);
                let up = matvec(w("mlp.up_proj"), &hn);
                let act: Vec<f64> = gate.iter().zip(&up).map(|(g, u)| silu(*g) * u).collect();
                let down = matvec(w("mlp.down_proj"), &act);
                for e in 0..d {
                    xi[e] += down[e];
                }
            }
        }
        let head = if self.w.contains_key("lm_head.weight") {
            self.w("lm_head.weight")
        } else {
            emb
        };
        x.iter()
            .map(|xi| {
                matvec(
                    head,
                    &rms_norm(xi, self.w("model.norm.weight"), c.rms_norm_eps),
                )
            })
            .collect()
    }
}

/// The model's logits, EAB slots in every layer (GQA: 4 heads share 2 KV slots), against the
/// naive f64 loop implementation of the whole forward pass above: relative error < 1e-4 with the
/// model in f32, < 1e-8 in f64.
#[test]
fn eab_attention_matches_naive_loops() {
    let (json, cfg) = llama_config();
    let weights = common::weights(&json, 21);
    let mut rng = StdRng::seed_from_u64(21);
    let seqs: Vec<Vec<u32>> = (0..2)
        .map(|b| random_ids(&mut rng, 11, cfg.vocab_size, b == 0))
        .collect();
    let ids = batch(&seqs);
    for mask_first_token in [false, true] {
        let set = AdapterSet::new(
            meta(&cfg, true, mask_first_token, None),
            SlotInit::Normal { std: 1.0, seed: 5 },
            0.0,
            5,
            &Device::Cpu,
        )
        .unwrap();
        let adapters = set.adapters();
        let naive = Naive::new(&cfg, &weights, &adapters);
        let reference: Vec<f64> = seqs
            .iter()
            .flat_map(|s| naive.logits(s).into_iter().flatten())
            .collect();
        let reference = Tensor::from_vec(reference, (2, 11, cfg.vocab_size), &Device::Cpu).unwrap();
        let scale = common::max_abs(&reference);
        for (dtype, tol) in [(DType::F32, 1e-4), (DType::F64, 1e-8)] {
            let model = load_model(&weights, &cfg, dtype, &adapters);
            let out = model
                .forward(
                    &ids,
                    &Taps {
                        attn: true,
                        ..Default::default()
                    },
                )
                .unwrap();
            let rel = common::max_abs_diff(&out.logits, &reference) / scale;
            assert!(
                rel < tol,
                "mask_first_token {mask_first_token} {dtype:?}: relative error {rel}"
            );
            // The slots carry real attention mass, so a wrong slot path could not pass.
            for (l, st) in out.attn.iter().enumerate() {
                let m = st
                    .slot
                    .as_ref()
                    .unwrap()
                    .to_dtype(DType::F64)
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap();
                assert!(m > 0.02 && m < 0.98, "layer {l}: slot mass {m}");
            }
        }
        // And the naive reference without slots is a different function.
        let plain = Naive::new(&cfg, &weights, &Adapters::none());
        let p: Vec<f64> = plain.logits(&seqs[0]).into_iter().flatten().collect();
        let r: Vec<f64> = naive.logits(&seqs[0]).into_iter().flatten().collect();
        let d = p
            .iter()
            .zip(&r)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(d > 1e-2, "slots change the logits: {d}");
    }
}

/// Slots initialised from the base model's own post-RoPE key/value of position 0 (BOS), with
/// position 0 masked, reproduce the base logits at every position of any BOS-first sequence:
/// the slot is then exactly the sink it replaces. Without the mask the sink counts twice and
/// the logits move.
#[test]
fn first_token_init_keeps_outputs_when_the_first_token_is_fixed() {
    let (json, cfg) = llama_config();
    let weights = common::weights(&json, 41);
    let base = load_model(&weights, &cfg, DType::F32, &Adapters::none());
    let mut rng = StdRng::seed_from_u64(41);
    let probe: Vec<Vec<u32>> = (0..3)
        .map(|_| random_ids(&mut rng, 8, cfg.vocab_size, true))
        .collect();
    let out = base
        .forward(
            &batch(&probe),
            &Taps {
                first_kv: true,
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(out.first_kv.len(), cfg.num_hidden_layers);
    let given: Vec<(Tensor, Tensor)> = out
        .first_kv
        .iter()
        .map(|(k, v)| {
            assert_eq!(k.dims(), &[3, cfg.n_kv_heads(), cfg.head_dim()]);
            assert_eq!(v.dims(), &[3, cfg.n_kv_heads(), cfg.head_dim()]);
            // Causal: position 0 is BOS alone in every row.
            for b in 1..3 {
                assert!(common::max_abs_diff(&k.i(b).unwrap(), &k.i(0).unwrap()) < 1e-6);
                assert!(common::max_abs_diff(&v.i(b).unwrap(), &v.i(0).unwrap()) < 1e-6);
            }
            (k.i(0).unwrap(), v.i(0).unwrap())
        })
        .collect();
    let adapted = |mask_first_token: bool| {
        let set = AdapterSet::new(
            meta(&cfg, true, mask_first_token, None),
            SlotInit::Given(given.clone()),
            0.0,
            0,
            &Device::Cpu,
        )
        .unwrap();
        load_model(&weights, &cfg, DType::F32, &set.adapters())
    };
    let (masked, unmasked) = (adapted(true), adapted(false));
    // Sequences other than the probe, of several lengths, batched and alone.
    for len in [1, 5, 16] {
        let seqs: Vec<Vec<u32>> = (0..2)
            .map(|_| random_ids(&mut rng, len, cfg.vocab_size, true))
            .collect();
        let ids = batch(&seqs);
        let want = base.logits(&ids).unwrap();
        let got = masked.logits(&ids).unwrap();
        let d = common::max_abs_diff(&got, &want);
        assert!(d < 1e-5, "len {len}: max |diff| {d}");
        // A lone BOS reads (k0, v0) twice or once: the same average. Longer rows see the
        // sink's weight doubled.
        if len > 1 {
            let moved = common::max_abs_diff(&unmasked.logits(&ids).unwrap(), &want);
            assert!(
                moved > 1e-4,
                "len {len}: unmasked slot left logits unchanged ({moved})"
            );
        }
    }
}

/// A LoRA'd projection equals a plain one whose weight is W + scale * B A: logits of the base
/// with LoRA adapters on every target of layers 0 and 2 match the logits of a model loaded from
/// weights merged in f64 loops: within 1e-5 (relative to the largest logit) in f32, 1e-10 in f64.
#[test]
fn lora_merge_equivalence() {
    let (json, cfg) = llama_config();
    let weights = common::weights(&json, 51);
    let mut rng = StdRng::seed_from_u64(51);
    let targets = ["q", "k", "v", "o", "gate", "up", "down"];
    let set = AdapterSet::new(
        meta(&cfg, false, false, Some((2, 3.0, &targets, &[0, 2]))),
        SlotInit::Zeros,
        0.2,
        9,
        &Device::Cpu,
    )
    .unwrap();
    randomize_lora_b(&set, &mut rng, 0.2);
    let adapters = set.adapters();
    assert_eq!(adapters.lora.len(), 14);
    // Merged weights, kept in f64 for the f64 comparison.
    let mut merged = weights.clone();
    for (prefix, l) in &adapters.lora {
        let name = format!("{prefix}.weight");
        let w = &weights[&name];
        let (out, inp) = w.dims2().unwrap();
        let r = l.a.dims2().unwrap().0;
        let (w, a, b) = (to_vec64(w), to_vec64(&l.a), to_vec64(&l.b));
        let mut m = vec![0f64; out * inp];
        for o in 0..out {
            for i in 0..inp {
                let ba: f64 = (0..r).map(|k| b[o * r + k] * a[k * inp + i]).sum();
                m[o * inp + i] = w[o * inp + i] + l.scale * ba;
            }
        }
        merged.insert(name, Tensor::from_vec(m, (out, inp), &Device::Cpu).unwrap());
    }
    let ids = batch(&[
        random_ids(&mut rng, 12, cfg.vocab_size, true),
        random_ids(&mut rng, 12, cfg.vocab_size, false),
    ]);
    // f32 model, f32 adapters (the training configuration).
    let with_lora = load_model(&weights, &cfg, DType::F32, &adapters)
        .logits(&ids)
        .unwrap();
    let from_merged = load_model(&merged, &cfg, DType::F32, &Adapters::none())
        .logits(&ids)
        .unwrap();
    let rel = common::max_abs_diff(&with_lora, &from_merged) / common::max_abs(&from_merged);
    assert!(rel < 1e-5, "f32: relative error {rel}");
    // f64 model, adapters in f64 too: the equivalence up to rounding.
    let mut adapters64 = adapters.clone();
    for l in adapters64.lora.values_mut() {
        l.a = l.a.to_dtype(DType::F64).unwrap();
        l.b = l.b.to_dtype(DType::F64).unwrap();
    }
    let with_lora64 = load_model(&weights, &cfg, DType::F64, &adapters64)
        .logits(&ids)
        .unwrap();
    let from_merged64 = load_model(&merged, &cfg, DType::F64, &Adapters::none())
        .logits(&ids)
        .unwrap();
    let d = common::max_abs_diff(&with_lora64, &from_merged64);
    assert!(d < 1e-10, "f64: max |diff| {d}");
    // LoRA does change the function, so the comparison is not vacuous.
    let base = load_model(&weights, &cfg, DType::F32, &Adapters::none())
        .logits(&ids)
        .unwrap();
    let moved = common::max_abs_diff(&with_lora, &base);
    assert!(moved > 1e-2, "LoRA changes the logits: {moved}");
}
