//! The flags every model-reading command shares: which model, on which device, in which dtype.

use crate::assets::default_model;
use crate::checkpoint::Checkpoint;
use crate::device::{parse_device, parse_dtype};
use crate::model::{Adapters, Model};
use crate::{Error, Result};
use candle_core::{DType, Device};

#[derive(Debug, Clone, clap::Args)]
pub struct ModelArgs {
    /// Hugging Face folder, hub id, or .gguf file [default: the fetched SmolLM2-135M GGUF]
    #[arg(long)]
    pub model: Option<String>,
    /// cpu, cuda or cuda:N
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// f32, bf16 or f16 [default: f32 on CPU, bf16 on CUDA]
    #[arg(long)]
    pub dtype: Option<String>,
}

impl ModelArgs {
    pub fn model_spec(&self) -> Result<String> {
        if let Some(m) = &self.model {
            return Ok(m.clone());
        }
        let p = default_model();
        if !p.is_file() {
            return Err(Error::file(
                &p,
                "default model not fetched yet: run scripts/fetch-assets.sh, or pass --model",
            ));
        }
        Ok(p.display().to_string())
    }

    pub fn device(&self) -> Result<Device> {
        parse_device(&self.device)
    }

    pub fn dtype(&self, device: &Device) -> Result<DType> {
        parse_dtype(self.dtype.as_deref(), device)
    }

    pub fn open(&self) -> Result<Checkpoint> {
        Checkpoint::open(&self.model_spec()?)
    }

    /// Opens the checkpoint and builds the model with `adapters` on the chosen device.
    pub fn load(&self, adapters: &Adapters) -> Result<(Checkpoint, Model)> {
        let ckpt = self.open()?;
        let device = self.device()?;
        let model = ckpt.load_model(self.dtype(&device)?, &device, adapters)?;
        Ok((ckpt, model))
    }
}
