//! Where a model comes from: a Hugging Face folder, a hub id in the hf-hub cache, or a GGUF file.
//! Every source ends as the same thing: a validated [`Config`], named weight tensors in the
//! Hugging Face layout, and a [`Tok`]enizer.

mod gguf;
mod gguf_check;
mod hf;
mod reader;
mod tokenizer;

pub use reader::TensorReader;
pub use tokenizer::Tok;

use crate::adapters::{slot_names, Adapters, EabSlot};
use crate::device_map::{Placement, Sizes};
use crate::model::{Config, Family, Model};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    HfDir,
    Gguf,
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Format::HfDir => "safetensors (Hugging Face folder)",
            Format::Gguf => "gguf (dequantized at load)",
        })
    }
}

enum Weights {
    /// Memory-mapped shards, read lazily by the VarBuilder.
    Safetensors(Vec<PathBuf>),
    /// A GGUF, each tensor dequantized when read.
    Gguf(gguf::GgufWeights),
}

pub struct Checkpoint {
    /// The folder or file the weights came from (a resolved cache path for hub ids).
    pub source: PathBuf,
    pub format: Format,
    pub config: Config,
    /// The original config.json (or one built from GGUF metadata), kept for export.
    pub raw_config: serde_json::Value,
    pub tokenizer: Tok,
    /// Stored dtype of the weights as the source has them (e.g. `Q4_1`, `BF16`).
    pub stored_dtype: String,
    /// Set when the folder is an `eabfit export`: its config.json `eab` block.
    pub eab: Option<EabExport>,
    weights: Weights,
}

/// The `eab` block `eabfit export --format hf` adds to config.json: the weights carry one EAB
/// slot per listed layer, `model.layers.{i}.self_attn.eab_k` / `eab_v` of shape (KV, hd).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EabExport {
    pub slot_tensors: String,
    pub layers: Vec<usize>,
    pub mask_first_token: bool,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub format_version: u32,
}

impl EabExport {
    pub const FORMAT_VERSION: u32 = 1;
    pub const SLOT_TENSORS: &'static str = "model.layers.{i}.self_attn.eab_k/eab_v";

    /// The `eab` block of a config.json, checked against the config it sits in; `None` without one.
    fn from_config(path: &Path, raw: &serde_json::Value, cfg: &Config) -> Result<Option<Self>> {
        let Some(v) = raw.get("eab") else {
            return Ok(None);
        };
        let e: Self = serde_json::from_value(v.clone())
            .map_err(|err| Error::file(path, format!("`eab`: {err}")))?;
        let bad = |msg: String| Err(Error::file(path, format!("`eab`: {msg}")));
        if e.format_version != Self::FORMAT_VERSION {
            return bad(format!(
                "format_version {} is not supported (this eabfit reads {})",
                e.format_version,
                Self::FORMAT_VERSION
            ));
        }
        if (e.n_kv_heads, e.head_dim) != (cfg.n_kv_heads(), cfg.head_dim()) {
            return bad(format!(
                "slots of {} x {} do not fit the model's {} KV heads x head_dim {}",
                e.n_kv_heads,
                e.head_dim,
                cfg.n_kv_heads(),
                cfg.head_dim()
            ));
        }
        if let Some(l) = e.layers.iter().find(|&&l| l >= cfg.num_hidden_layers) {
            return bad(format!(
                "layer {l} does not exist (num_hidden_layers {})",
                cfg.num_hidden_layers
            ));
        }
        Ok(Some(e))
    }

    fn tensor_names(&self) -> HashSet<String> {
        self.layers
            .iter()
            .flat_map(|&l| {
                let (k, v) = slot_names(l);
                [k, v]
            })
            .collect()
    }
}

impl Checkpoint {
    /// `spec` is a folder, a `.gguf` file, or a hub id such as `HuggingFaceTB/SmolLM2-135M`.
    pub fn open(spec: &str) -> Result<Self> {
        let path = Path::new(spec);
        if path.is_dir() {
            return hf::open_dir(path);
        }
        if path.is_file() {
            if path
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
            {
                return gguf::open(path);
            }
            return Err(Error::file(path, "not a model folder or a .gguf file"));
        }
        if hf::looks_like_hub_id(spec) {
            return hf::open_hub(spec);
        }
        Err(Error::file(path, "no such file or folder"))
    }

    /// Every weight, on `device` in `dtype`, read once: models built from one [`Base`] (the
    /// frozen teacher and the adapted student) share its storage.
    pub fn base(&self, dtype: DType, device: &Device) -> Result<Base> {
        self.base_placed(dtype, &Placement::single(device))
    }

    /// [`Checkpoint::base`] with each tensor read straight onto the device `placement` gives
    /// its layer (or the embedding's, or the head's): a split model never sits whole on one
    /// device.
    pub fn base_placed(&self, dtype: DType, placement: &Placement) -> Result<Base> {
        // An export's slot tensors stay f32, like every adapter.
        let slots = self
            .eab
            .as_ref()
            .map(EabExport::tensor_names)
            .unwrap_or_default();
        let dtype_of = |name: &str| {
            if slots.contains(name) {
                DType::F32
            } else {
                dtype
            }
        };
        let reader = self.reader()?;
        let mut tensors: HashMap<String, Tensor> = reader
            .shapes()
            .into_iter()
            .map(|(name, _)| {
                let device = placement.device(placement.slot_of_tensor(&name));
                let t = reader.read(&name, device, dtype_of(&name))?;
                Ok((name, t))
            })
            .collect::<Result<_>>()?;
        check_finite(&self.source, &tensors)?;
        let eab = match &self.eab {
            Some(e) => Some(self.take_slots(e, &mut tensors)?),
            None => None,
        };
        Ok(Base {
            tensors,
            dtype,
            device: placement.home().clone(),
            placement: placement.clone(),
            config: self.config.clone(),
            eab,
            source: self.source.clone(),
        })
    }

    /// Moves an export's slot tensors out of the weights into an [`Adapters`] of slots only.
    fn take_slots(&self, e: &EabExport, tensors: &mut HashMap<String, Tensor>) -> Result<Adapters> {
        let (kv, hd) = (self.config.n_kv_heads(), self.config.head_dim());
        let mut take = |name: String| -> Result<Tensor> {
            let t = tensors.remove(&name).ok_or_else(|| {
                Error::file(
                    &self.source,
                    format!("config.json `eab` lists tensor `{name}`, the weights lack it"),
                )
            })?;
            if t.dims() != [kv, hd] {
                return Err(Error::file(
                    &self.source,
                    format!(
                        "tensor `{name}` has shape {:?}, expected [{kv}, {hd}]",
                        t.dims()
                    ),
                ));
            }
            Ok(t)
        };
        let mut slots = vec![None; self.config.num_hidden_layers];
        for &l in &e.layers {
            let (k, v) = slot_names(l);
            slots[l] = Some(EabSlot {
                k: take(k)?,
                v: take(v)?,
            });
        }
        Ok(Adapters {
            slots,
            lora: HashMap::new(),
            mask_first_token: e.mask_first_token,
        })
    }

    pub fn load_model(&self, dtype: DType, device: &Device, adapters: &Adapters) -> Result<Model> {
        self.base(dtype, device)?.model(adapters)
    }

    /// Parameters of the model as configured (tied heads counted once).
    pub fn param_count(&self) -> usize {
        let c = &self.config;
        let (d, f, hd) = (c.hidden_size, c.intermediate_size, c.head_dim());
        let attn = d * hd * (2 * c.num_attention_heads + 2 * c.n_kv_heads());
        let layer = attn + 3 * d * f + 2 * d + c.bias_and_head_norm_params();
        let head = if c.tie_word_embeddings {
            0
        } else {
            c.vocab_size * d
        };
        c.num_hidden_layers * layer + c.vocab_size * d + d + head
    }
}

/// Estimated bytes of a model's embedding, of one layer, and of its final norm + head, in
/// `dtype`: what `--device-map auto` splits by.
pub fn sizes(c: &Config, dtype: DType) -> Sizes {
    let (d, f, hd) = (c.hidden_size, c.intermediate_size, c.head_dim());
    let attn = d * hd * (2 * c.num_attention_heads + 2 * c.n_kv_heads());
    let b = dtype.size_in_bytes() as u64;
    let embed = (c.vocab_size * d) as u64 * b;
    Sizes {
        embed,
        layer: (attn + 3 * d * f + 2 * d) as u64 * b,
        head: embed + d as u64 * b,
    }
}

/// A checkpoint's weights in memory, ready to build any number of models that share them.
pub struct Base {
    pub tensors: HashMap<String, Tensor>,
    pub dtype: DType,
    /// Where models of this base take inputs and return outputs: the head's device.
    pub device: Device,
    /// Which device holds which tensor.
    pub placement: Placement,
    pub config: Config,
    /// The EAB slots (f32) and mask_first_token of an `eabfit export`; `None` for other sources.
    pub eab: Option<Adapters>,
    source: PathBuf,
}

impl Base {
    /// `adapters` as models of this base run them (see [`effective_adapters`]).
    pub fn effective_adapters(&self, adapters: &Adapters) -> Adapters {
        effective_adapters(self.eab.as_ref(), adapters)
    }

    pub fn model(&self, adapters: &Adapters) -> Result<Model> {
        let vb = VarBuilder::from_tensors(self.tensors.clone(), self.dtype, &self.device);
        let adapters = self.effective_adapters(adapters);
        Model::load_placed(vb, &self.config, &adapters, &self.placement)
            .map_err(|e| Error::file(&self.source, e))
    }
}

/// `adapters` as a model with an export's own slots `eab` runs them: those slots (with their
/// mask_first_token) join, unless `adapters` brings slots of its own.
pub fn effective_adapters(eab: Option<&Adapters>, adapters: &Adapters) -> Adapters {
    match eab {
        Some(e) if adapters.slots.iter().all(Option::is_none) => Adapters {
            slots: e.slots.clone(),
            lora: adapters.lora.clone(),
            mask_first_token: e.mask_first_token,
        },
        _ => adapters.clone(),
    }
}

/// A NaN or inf weight would surface as a NaN loss many steps later; name the tensor at load.
fn check_finite(source: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    for name in names {
        check_finite_one(source, name, &tensors[name])?;
    }
    Ok(())
}

/// [`check_finite`] of one tensor: `x * 0` is 0 for every finite x and NaN otherwise, so one sum
/// finds it.
pub(crate) fn check_finite_one(source: &Path, name: &str, t: &Tensor) -> Result<()> {
    let probe = t
        .affine(0.0, 0.0)
        .and_then(|z| z.sum_all())
        .and_then(|z| z.to_dtype(DType::F32))
        .and_then(|z| z.to_scalar::<f32>())
        .map_err(|e| Error::file(source, format!("tensor `{name}`: {e}")))?;
    if !probe.is_finite() {
        return Err(Error::file(
            source,
            format!(
                "tensor `{name}` holds NaN or inf values (in {:?}); the checkpoint is corrupt",
                t.dtype()
            ),
        ));
    }
    Ok(())
}

/// Sizes the model allocates from the config alone (not checked against any weight), bounded
/// so that a corrupt value is an error instead of an allocation that takes the machine down.
fn check_limits(cfg: &Config) -> std::result::Result<(), String> {
    const MAX_POSITIONS: usize = 1 << 22;
    if cfg.max_position_embeddings > MAX_POSITIONS {
        return Err(format!(
            "max_position_embeddings {} is larger than eabfit supports ({MAX_POSITIONS})",
            cfg.max_position_embeddings
        ));
    }
    Ok(())
}

/// Parses and validates a config.json body; errors name the file and the field.
fn parse_config(path: &Path, text: &str) -> Result<(Config, serde_json::Value)> {
    let raw: serde_json::Value =
        serde_json::from_str(text).map_err(|e| Error::file(path, format!("invalid JSON: {e}")))?;
    let cfg: Config = serde_json::from_value(with_class_defaults(with_rope_parameters(&raw)))
        .map_err(|e| Error::file(path, e))?;
    cfg.validate()
        .and_then(|()| check_limits(&cfg))
        .map_err(|e| Error::file(path, e))?;
    Ok((cfg, raw))
}

/// A field config.json leaves out takes the default of transformers' config class for the
/// family, where that differs from what eabfit would derive (its own defaults are LLaMA's):
/// Mistral's 8 KV heads and window of 4096, Qwen's 32 KV heads, Qwen3's head_dim 128, and
/// every family's rms_norm_eps 1e-6. Written-out nulls stay nulls, as transformers reads them.
fn with_class_defaults(mut v: serde_json::Value) -> serde_json::Value {
    let family = Family::of(v.get("model_type").and_then(|t| t.as_str()));
    let defaults: &[(&str, serde_json::Value)] = match family {
        Ok(Family::Mistral) => &[
            ("num_key_value_heads", 8.into()),
            ("sliding_window", 4096.into()),
        ],
        Ok(Family::Qwen2) => &[("num_key_value_heads", 32.into())],
        Ok(Family::Qwen3) => &[("num_key_value_heads", 32.into()), ("head_dim", 128.into())],
        _ => &[],
    };
    if let Some(obj) = v.as_object_mut() {
        for (key, value) in defaults
            .iter()
            .chain([("rms_norm_eps", 1e-6.into())].iter())
        {
            obj.entry(*key).or_insert_with(|| value.clone());
        }
    }
    v
}

/// transformers 5 writes RoPE settings as `rope_parameters: {rope_type, rope_theta, ...}`
/// instead of top-level `rope_theta` / `rope_scaling`; reading only the old keys would run such a
/// model with the default theta, silently wrong.
fn with_rope_parameters(raw: &serde_json::Value) -> serde_json::Value {
    let mut v = raw.clone();
    let Some(rp) = raw.get("rope_parameters").filter(|p| p.is_object()) else {
        return v;
    };
    // A partial rotary part it holds is refused by `Config::validate` as a top-level one is.
    for key in ["rope_theta", "partial_rotary_factor"] {
        if v.get(key).is_none() {
            if let Some(x) = rp.get(key) {
                v[key] = x.clone();
            }
        }
    }
    let kind = rp
        .get("rope_type")
        .and_then(|t| t.as_str())
        .unwrap_or("default");
    if kind != "default" && v.get("rope_scaling").is_none_or(|s| s.is_null()) {
        v["rope_scaling"] = rp.clone();
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transformers5_rope_parameters_are_read() {
        let text = r#"{"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "rms_norm_eps": 1e-5, "vocab_size": 10,
            "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}"#;
        let (cfg, _) = parse_config(Path::new("config.json"), text).unwrap();
        assert_eq!(cfg.rope_theta, 500000.0);
        let rs = cfg.rope_scaling.unwrap();
        assert_eq!((rs.rope_type.as_str(), rs.factor), ("llama3", 8.0));
        let plain = r#"{"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "rms_norm_eps": 1e-5, "vocab_size": 10, "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0}}"#;
        let (cfg, _) = parse_config(Path::new("config.json"), plain).unwrap();
        assert_eq!(cfg.rope_theta, 100000.0);
        assert!(cfg.rope_scaling.is_none());
    }
}
