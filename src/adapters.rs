//! Trainable additions to a frozen model: per-layer EAB (k', v') slots and LoRA pairs.
//! The model reads them as [`Adapters`] (defined beside it, in `model`) through `Model::load`;
//! the base weights never change. This module makes them trainable, saves and loads them.
//!
//! On disk an adapter is a folder: `adapter.safetensors` (f32 tensors named after the module
//! they attach to: `model.layers.{i}.self_attn.eab_k` / `eab_v` of shape (KV, hd), and
//! `model.layers.{i}.mlp.down_proj.lora_A.weight` (r, in) / `lora_B.weight` (out, r)) plus
//! `adapter_config.json` ([`AdapterMeta`]).

use crate::fsio::{save_safetensors, write_atomic};
use crate::model::Config;
pub use crate::model::{Adapters, EabSlot, Lora};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Projections LoRA can target, by their short recipe names.
pub const TARGETS: [(&str, &str); 7] = [
    ("q", "self_attn.q_proj"),
    ("k", "self_attn.k_proj"),
    ("v", "self_attn.v_proj"),
    ("o", "self_attn.o_proj"),
    ("gate", "mlp.gate_proj"),
    ("up", "mlp.up_proj"),
    ("down", "mlp.down_proj"),
];

/// Everything needed to rebuild an adapter's shapes, saved beside its tensors.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AdapterMeta {
    /// Layers that carry an EAB slot.
    pub eab_layers: Vec<usize>,
    pub mask_first_token: bool,
    pub lora_rank: usize,
    pub lora_alpha: f64,
    /// Short target names (`down`, `q`, ...).
    pub lora_targets: Vec<String>,
    pub lora_layers: Vec<usize>,
    /// Shape facts of the base model, checked on load.
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Where the base came from (informational).
    pub base_model: String,
}

impl AdapterMeta {
    pub fn lora_scale(&self) -> f64 {
        self.lora_alpha / self.lora_rank.max(1) as f64
    }
}

/// The trainable tensors as candle `Var`s, by name, plus their meta.
pub struct AdapterSet {
    pub meta: AdapterMeta,
    pub vars: BTreeMap<String, Var>,
}

pub fn slot_names(layer: usize) -> (String, String) {
    (
        format!("model.layers.{layer}.self_attn.eab_k"),
        format!("model.layers.{layer}.self_attn.eab_v"),
    )
}

fn lora_names(prefix: &str) -> (String, String) {
    (
        format!("{prefix}.lora_A.weight"),
        format!("{prefix}.lora_B.weight"),
    )
}

/// How slot vectors start.
pub enum SlotInit {
    Zeros,
    /// N(0, std) with a seeded generator.
    Normal {
        std: f64,
        seed: u64,
    },
    /// Given per layer: (k, v) each (KV, hd), e.g. the first token's mean key and value.
    Given(Vec<(Tensor, Tensor)>),
}

impl AdapterSet {
    /// Fresh adapters: slots by `init`; LoRA A ~ N(0, lora_std), B = 0 (the model starts unchanged).
    pub fn new(
        meta: AdapterMeta,
        init: SlotInit,
        lora_std: f64,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let (kv, hd) = (meta.n_kv_heads, meta.head_dim);
        let mut rng = Gauss::new(seed);
        let mut vars = BTreeMap::new();
        for (i, &layer) in meta.eab_layers.iter().enumerate() {
            let (kn, vn) = slot_names(layer);
            let (k, v) = match &init {
                SlotInit::Zeros => (
                    Tensor::zeros((kv, hd), DType::F32, device)?,
                    Tensor::zeros((kv, hd), DType::F32, device)?,
                ),
                SlotInit::Normal { std, .. } => (
                    rng.tensor((kv, hd), *std, device)?,
                    rng.tensor((kv, hd), *std, device)?,
                ),
                SlotInit::Given(kvs) => {
                    let (k, v) = kvs
                        .get(i)
                        .ok_or_else(|| Error::Msg(format!("no initial slot for layer {layer}")))?;
                    (
                        k.to_dtype(DType::F32)?.to_device(device)?,
                        v.to_dtype(DType::F32)?.to_device(device)?,
                    )
                }
            };
            vars.insert(kn, Var::from_tensor(&k)?);
            vars.insert(vn, Var::from_tensor(&v)?);
        }
        if let SlotInit::Normal { seed, .. } = init {
            rng = Gauss::new(seed.wrapping_add(1));
        }
        for (prefix, short) in meta.lora_prefixes() {
            let (inp, out) = meta
                .target_dims(&short)
                .ok_or_else(|| Error::Usage(format!("unknown LoRA target `{short}`")))?;
            let (an, bn) = lora_names(&prefix);
            vars.insert(
                an,
                Var::from_tensor(&rng.tensor((meta.lora_rank, inp), lora_std, device)?)?,
            );
            vars.insert(
                bn,
                Var::from_tensor(&Tensor::zeros((out, meta.lora_rank), DType::F32, device)?)?,
            );
        }
        Ok(Self { meta, vars })
    }

    /// The model-facing view; its tensors share storage with the Vars, so optimizer updates
    /// are seen by the model without rebuilding it.
    pub fn adapters(&self) -> Adapters {
        let get = |n: &str| self.vars.get(n).map(|v| v.as_tensor().clone());
        let mut slots = vec![None; self.meta.num_hidden_layers];
        for &layer in &self.meta.eab_layers {
            let (kn, vn) = slot_names(layer);
            if let (Some(k), Some(v)) = (get(&kn), get(&vn)) {
                slots[layer] = Some(EabSlot { k, v });
            }
        }
        let mut lora = HashMap::new();
        for (prefix, _) in self.meta.lora_prefixes() {
            let (an, bn) = lora_names(&prefix);
            if let (Some(a), Some(b)) = (get(&an), get(&bn)) {
                lora.insert(
                    prefix,
                    Lora {
                        a,
                        b,
                        scale: self.meta.lora_scale(),
                    },
                );
            }
        }
        Adapters {
            slots,
            lora,
            mask_first_token: self.meta.mask_first_token,
        }
    }

    pub fn tensors(&self) -> HashMap<String, Tensor> {
        self.vars
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect()
    }

    /// Writes `adapter.safetensors` and `adapter_config.json` into `dir` (each atomically).
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, e))?;
        save_safetensors(&self.tensors(), &dir.join("adapter.safetensors"))?;
        let meta = serde_json::to_string_pretty(&self.meta).map_err(|e| Error::file(dir, e))?;
        write_atomic(&dir.join("adapter_config.json"), meta.as_bytes())
    }

    /// Loads an adapter folder and checks every tensor against `cfg` (the base it will join).
    pub fn load(dir: &Path, cfg: &Config, device: &Device) -> Result<Self> {
        let meta_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&meta_path).map_err(|e| Error::file(&meta_path, e))?;
        let meta: AdapterMeta =
            serde_json::from_str(&text).map_err(|e| Error::file(&meta_path, e))?;
        let expect = [
            ("hidden_size", meta.hidden_size, cfg.hidden_size),
            (
                "intermediate_size",
                meta.intermediate_size,
                cfg.intermediate_size,
            ),
            (
                "num_hidden_layers",
                meta.num_hidden_layers,
                cfg.num_hidden_layers,
            ),
            (
                "num_attention_heads",
                meta.num_attention_heads,
                cfg.num_attention_heads,
            ),
            ("num_key_value_heads", meta.n_kv_heads, cfg.n_kv_heads()),
            ("head_dim", meta.head_dim, cfg.head_dim()),
        ];
        for (field, got, want) in expect {
            if got != want {
                return Err(Error::file(
                    &meta_path,
                    format!("adapter is for another model: {field} {got}, the base has {want}"),
                ));
            }
        }
        let n = cfg.num_hidden_layers;
        for (field, layers) in [
            ("eab_layers", &meta.eab_layers),
            ("lora_layers", &meta.lora_layers),
        ] {
            if let Some(l) = layers.iter().find(|&&l| l >= n) {
                return Err(Error::file(
                    &meta_path,
                    format!("{field}: layer {l} does not exist (num_hidden_layers {n})"),
                ));
            }
        }
        let st_path = dir.join("adapter.safetensors");
        let mut ts = candle_core::safetensors::load(&st_path, device)
            .map_err(|e| Error::file(&st_path, e))?;
        // Shapes are checked before anything is allocated from the (untrusted) config.
        let mut vars = BTreeMap::new();
        for (name, dims) in meta.shapes().map_err(|e| Error::file(&meta_path, e))? {
            let t = ts
                .remove(&name)
                .ok_or_else(|| Error::file(&st_path, format!("missing tensor `{name}`")))?;
            if t.dims() != dims {
                return Err(Error::file(
                    &st_path,
                    format!(
                        "tensor `{name}` has shape {:?}, expected {dims:?}",
                        t.dims()
                    ),
                ));
            }
            vars.insert(name, Var::from_tensor(&t.to_dtype(DType::F32)?)?);
        }
        if let Some(extra) = ts.keys().next() {
            return Err(Error::file(
                &st_path,
                format!("unexpected tensor `{extra}`"),
            ));
        }
        Ok(Self { meta, vars })
    }
}

impl AdapterMeta {
    /// (prefix, short target) of every LoRA pair.
    pub fn lora_prefixes(&self) -> Vec<(String, String)> {
        if self.lora_rank == 0 {
            return vec![];
        }
        let mut v = vec![];
        for &layer in &self.lora_layers {
            for short in &self.lora_targets {
                if let Some((_, long)) = TARGETS.iter().find(|(s, _)| s == short) {
                    v.push((format!("model.layers.{layer}.{long}"), short.clone()));
                }
            }
        }
        v
    }

    /// Name and shape of every tensor [`AdapterSet::new`] makes for this meta.
    fn shapes(&self) -> std::result::Result<Vec<(String, Vec<usize>)>, String> {
        let mut v = vec![];
        for &layer in &self.eab_layers {
            let (k, val) = slot_names(layer);
            v.push((k, vec![self.n_kv_heads, self.head_dim]));
            v.push((val, vec![self.n_kv_heads, self.head_dim]));
        }
        for (prefix, short) in self.lora_prefixes() {
            let (inp, out) = self
                .target_dims(&short)
                .ok_or_else(|| format!("unknown LoRA target `{short}`"))?;
            let (a, b) = lora_names(&prefix);
            v.push((a, vec![self.lora_rank, inp]));
            v.push((b, vec![out, self.lora_rank]));
        }
        Ok(v)
    }

    /// (in, out) features of a target projection.
    fn target_dims(&self, short: &str) -> Option<(usize, usize)> {
        let (d, f, hd) = (self.hidden_size, self.intermediate_size, self.head_dim);
        Some(match short {
            "q" => (d, self.num_attention_heads * hd),
            "k" | "v" => (d, self.n_kv_heads * hd),
            "o" => (self.num_attention_heads * hd, d),
            "gate" | "up" => (d, f),
            "down" => (f, d),
            _ => return None,
        })
    }
}

/// Box-Muller normal samples from a seeded generator: init must be reproducible across
/// devices, which candle's own `randn` is not.
pub(crate) struct Gauss(rand::rngs::StdRng);

impl Gauss {
    pub(crate) fn new(seed: u64) -> Self {
        use rand::SeedableRng;
        Self(rand::rngs::StdRng::seed_from_u64(seed))
    }
    pub(crate) fn tensor(
        &mut self,
        shape: (usize, usize),
        std: f64,
        device: &Device,
    ) -> Result<Tensor> {
        use rand::Rng;
        let n = shape.0 * shape.1;
        let data: Vec<f32> = (0..n)
            .map(|_| {
                let (u1, u2): (f64, f64) =
                    (self.0.gen::<f64>().max(f64::MIN_POSITIVE), self.0.gen());
                (std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
            })
            .collect();
        Ok(Tensor::from_vec(data, shape, device)?)
    }
}

impl AdapterMeta {
    /// Meta for `cfg` with no slots and no LoRA yet; callers fill in what they train.
    pub fn for_config(cfg: &Config, base_model: &str) -> Self {
        Self {
            eab_layers: vec![],
            mask_first_token: false,
            lora_rank: 0,
            lora_alpha: 0.0,
            lora_targets: vec![],
            lora_layers: vec![],
            hidden_size: cfg.hidden_size,
            intermediate_size: cfg.intermediate_size,
            num_hidden_layers: cfg.num_hidden_layers,
            num_attention_heads: cfg.num_attention_heads,
            n_kv_heads: cfg.n_kv_heads(),
            head_dim: cfg.head_dim(),
            base_model: base_model.to_string(),
        }
    }
}
