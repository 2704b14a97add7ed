//! Where a model comes from: a Hugging Face folder, a hub id in the hf-hub cache, or a GGUF file.
//! Every source ends as the same thing: a validated [`Config`], named weight tensors in the
//! Hugging Face layout, and a [`Tok`]enizer.

mod gguf;
mod hf;
mod tokenizer;

pub use tokenizer::Tok;

use crate::adapters::Adapters;
use crate::model::{Config, Model};
use crate::{Error, Result};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use std::collections::HashMap;
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
    /// Tensors already in memory (a dequantized GGUF), Hugging Face names, f32 on the CPU.
    InMemory(HashMap<String, Tensor>),
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
    weights: Weights,
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
        let tensors = match &self.weights {
            Weights::Safetensors(files) => {
                // Safety: the files are only read; mmap of a file changed under us is the
                // documented risk of every safetensors loader.
                let st = unsafe { MmapedSafetensors::multi(files) }
                    .map_err(|e| Error::file(&self.source, e))?;
                st.tensors()
                    .into_iter()
                    .map(|(name, _)| {
                        let t = st.load(&name, device).and_then(|t| t.to_dtype(dtype));
                        t.map(|t| (name.clone(), t))
                            .map_err(|e| Error::file(&self.source, format!("tensor `{name}`: {e}")))
                    })
                    .collect::<Result<_>>()?
            }
            Weights::InMemory(ts) => ts
                .iter()
                .map(|(k, v)| Ok((k.clone(), v.to_device(device)?.to_dtype(dtype)?)))
                .collect::<Result<_>>()?,
        };
        Ok(Base {
            tensors,
            dtype,
            device: device.clone(),
            config: self.config.clone(),
            source: self.source.clone(),
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
        let layer = attn + 3 * d * f + 2 * d;
        let head = if c.tie_word_embeddings {
            0
        } else {
            c.vocab_size * d
        };
        c.num_hidden_layers * layer + c.vocab_size * d + d + head
    }
}

/// A checkpoint's weights in memory, ready to build any number of models that share them.
pub struct Base {
    pub tensors: HashMap<String, Tensor>,
    pub dtype: DType,
    pub device: Device,
    pub config: Config,
    source: PathBuf,
}

impl Base {
    pub fn model(&self, adapters: &Adapters) -> Result<Model> {
        let vb = VarBuilder::from_tensors(self.tensors.clone(), self.dtype, &self.device);
        Model::load(vb, &self.config, adapters).map_err(|e| Error::file(&self.source, e))
    }
}

/// Parses and validates a config.json body; errors name the file and the field.
fn parse_config(path: &Path, text: &str) -> Result<(Config, serde_json::Value)> {
    let raw: serde_json::Value =
        serde_json::from_str(text).map_err(|e| Error::file(path, format!("invalid JSON: {e}")))?;
    let cfg: Config = serde_json::from_value(raw.clone()).map_err(|e| Error::file(path, e))?;
    cfg.validate().map_err(|e| Error::file(path, e))?;
    Ok((cfg, raw))
}
