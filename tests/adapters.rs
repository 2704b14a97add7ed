//! Adapters (EAB slots, LoRA) against independent references: a naive f64 forward pass written
//! with plain loops, central finite differences, the base model itself (first-token init),
//! merged LoRA weights, and the files written by `AdapterSet::save`.

mod common;

use candle_core::{DType, Device, IndexOp, Tensor, Var};
use candle_nn::VarBuilder;
use common::Arch;
use eabfit::adapters::{slot_names, AdapterMeta, AdapterSet, Adapters, SlotInit};
use eabfit::model::{Config, Model, Taps};
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::collections::{BTreeMap, HashMap};

const BOS: u32 = 1;

/// The tiny LLaMA-2 style config: 4 heads, 2 KV heads (GQA), 3 layers, untied head.
fn llama_config() -> (serde_json::Value, Config) {
    let json = common::config(Arch::Llama);
    let cfg: Config = serde_json::from_value(json.clone()).unwrap();
    assert_eq!((cfg.num_attention_heads, cfg.n_kv_heads()), (4, 2));
    (json, cfg)
}

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

/// Random token ids in 3..vocab, optionally starting with BOS.
fn random_ids(rng: &mut StdRng, n: usize, vocab: usize, bos_first: bool) -> Vec<u32> {
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

fn batch(seqs: &[Vec<u32>]) -> Tensor {
    let t = seqs[0].len();
    let flat: Vec<u32> = seqs.iter().flatten().copied().collect();
    Tensor::from_vec(flat, (seqs.len(), t), &Device::Cpu).unwrap()
}

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

/// Uniform-ish noise of the given std (seeded), f32.
fn noise(rng: &mut StdRng, shape: (usize, usize), std: f64) -> Tensor {
    let n = shape.0 * shape.1;
    let data: Vec<f32> = (0..n)
        .map(|_| (std * 3f64.sqrt() * (rng.gen::<f64>() * 2.0 - 1.0)) as f32)
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

/// Meta with a slot in every layer and, when `lora` is given, LoRA (rank, alpha, targets, layers).
fn meta(
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
fn randomize_lora_b(set: &AdapterSet, rng: &mut StdRng, std: f64) {
    for (name, var) in &set.vars {
        if name.ends_with("lora_B.weight") {
            let (o, r) = var.as_tensor().dims2().unwrap();
            var.set(&noise(rng, (o, r), std)).unwrap();
        }
    }
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

fn to_vec64(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
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

/// Save then load gives back the very same tensors and meta; loading against another base, a
/// tensor of the wrong shape, or a folder without `adapter.safetensors` fails with a message
/// naming the file and the field or tensor at fault.
#[test]
fn adapter_save_load_round_trip_and_shape_errors() {
    let (_, cfg) = llama_config();
    let mut rng = StdRng::seed_from_u64(61);
    let set = AdapterSet::new(
        meta(&cfg, true, true, Some((2, 4.0, &["down", "q"], &[1]))),
        SlotInit::Normal { std: 0.5, seed: 3 },
        0.3,
        3,
        &Device::Cpu,
    )
    .unwrap();
    randomize_lora_b(&set, &mut rng, 0.3);
    let dir = tempfile::tempdir().unwrap();
    set.save(dir.path()).unwrap();

    let back = AdapterSet::load(dir.path(), &cfg, &Device::Cpu).unwrap();
    assert_eq!(back.meta, set.meta);
    assert_eq!(
        back.vars.keys().collect::<Vec<_>>(),
        set.vars.keys().collect::<Vec<_>>()
    );
    for (name, var) in &set.vars {
        let t = back.vars[name].as_tensor();
        assert_eq!(t.dims(), var.as_tensor().dims(), "{name}");
        assert_eq!(t.dtype(), DType::F32, "{name}");
        assert_eq!(common::max_abs_diff(t, var.as_tensor()), 0.0, "{name}");
    }

    type Edit = (&'static str, fn(&mut Config));
    let edits: [Edit; 2] = [
        ("hidden_size", |c| c.hidden_size = 48),
        ("num_hidden_layers", |c| c.num_hidden_layers = 4),
    ];
    for (field, edit) in edits {
        let mut other = cfg.clone();
        edit(&mut other);
        let msg = AdapterSet::load(dir.path(), &other, &Device::Cpu)
            .err()
            .unwrap_or_else(|| panic!("loaded against another {field}"))
            .to_string();
        assert!(
            msg.contains("adapter_config.json") && msg.contains(field),
            "{field}: {msg}"
        );
    }

    let st = dir.path().join("adapter.safetensors");
    let (eab_k, _) = slot_names(1);
    for bad in [
        eab_k,
        "model.layers.1.mlp.down_proj.lora_A.weight".to_string(),
    ] {
        let mut ts = set.tensors();
        let (a, b) = ts[&bad].dims2().unwrap();
        ts.insert(
            bad.clone(),
            Tensor::zeros((a, b + 1), DType::F32, &Device::Cpu).unwrap(),
        );
        candle_core::safetensors::save(&ts, &st).unwrap();
        let msg = AdapterSet::load(dir.path(), &cfg, &Device::Cpu)
            .err()
            .unwrap_or_else(|| panic!("loaded a wrong-shaped {bad}"))
            .to_string();
        assert!(
            msg.contains(&format!("`{bad}`")) && msg.contains("adapter.safetensors"),
            "{bad}: {msg}"
        );
    }

    std::fs::remove_file(&st).unwrap();
    let msg = AdapterSet::load(dir.path(), &cfg, &Device::Cpu)
        .err()
        .expect("loaded without adapter.safetensors")
        .to_string();
    assert!(msg.contains("adapter.safetensors"), "{msg}");
}

/// Regression: `mask_first_token` with a slot in only some layers used to give all-NaN logits
/// (a layer without a slot left query 0 with every key masked); it is now refused at load.
#[test]
fn mask_first_token_needs_a_slot_in_every_layer() {
    let (json, cfg) = llama_config();
    let weights: HashMap<String, Tensor> = common::weights(&json, 71);
    let ts =
        |w: &HashMap<String, Tensor>| VarBuilder::from_tensors(w.clone(), DType::F32, &Device::Cpu);
    let mut m = meta(&cfg, false, true, None);
    m.eab_layers = vec![0, 2];
    let set = AdapterSet::new(
        m,
        SlotInit::Normal { std: 1.0, seed: 1 },
        0.0,
        1,
        &Device::Cpu,
    )
    .unwrap();
    let msg = Model::load(ts(&weights), &cfg, &set.adapters())
        .map(|_| ())
        .expect_err("loaded mask_first_token with layer 1 slot-less")
        .to_string();
    assert!(
        msg.contains("mask_first_token") && msg.contains("layer 1"),
        "{msg}"
    );
    // The same slots without the mask are fine, and finite.
    let mut adapters = set.adapters();
    adapters.mask_first_token = false;
    let model = Model::load(ts(&weights), &cfg, &adapters).unwrap();
    let logits = model.logits(&batch(&[vec![1, 5, 7, 9]])).unwrap();
    let n_finite = to_vec64(&logits).iter().filter(|x| x.is_finite()).count();
    assert_eq!(n_finite, logits.elem_count());
}
