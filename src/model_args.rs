//! The flags every model-reading command shares: which model, on which device (or devices),
//! in which dtype.

use crate::assets::default_model;
use crate::checkpoint::{sizes, Base, Checkpoint};
use crate::device::{parse_device, parse_dtype};
use crate::device_map::{DeviceMap, Placement, Spec};
use crate::model::{Adapters, Config, Model};
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
    /// Layers over several devices, e.g. `cuda:0=0-39,cuda:1=40-79` (embed=DEV, head=DEV move
    /// the embedding or the norm + head), or `auto` by free memory; replaces --device
    #[arg(long)]
    pub device_map: Option<String>,
    /// f32, bf16 or f16 [default: f32 on CPU, bf16 on CUDA]
    #[arg(long)]
    pub dtype: Option<String>,
}

impl ModelArgs {
    /// Just a model, on the CPU.
    pub fn on_cpu(model: Option<String>) -> Self {
        Self {
            model,
            device: "cpu".into(),
            device_map: None,
            dtype: None,
        }
    }

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

    pub fn open(&self) -> Result<Checkpoint> {
        Checkpoint::open(&self.model_spec()?)
    }

    /// Where `ckpt` goes: by `--device-map` when given (printing the plan when it is `auto`),
    /// else all of it on `--device`; and in which dtype.
    pub fn placement(&self, ckpt: &Checkpoint) -> Result<(Placement, DType)> {
        placement(
            "--device-map",
            &self.device,
            self.device_map.as_deref(),
            self.dtype.as_deref(),
            &ckpt.config,
        )
    }

    /// The checkpoint's weights on their devices, ready to build models.
    pub fn base(&self, ckpt: &Checkpoint) -> Result<Base> {
        let (placement, dtype) = self.placement(ckpt)?;
        ckpt.base_placed(dtype, &placement)
    }

    /// Opens the checkpoint and builds the model with `adapters` on the chosen device(s).
    pub fn load(&self, adapters: &Adapters) -> Result<(Checkpoint, Model)> {
        let ckpt = self.open()?;
        let model = self.base(&ckpt)?.model(adapters)?;
        Ok((ckpt, model))
    }
}

/// The placement and dtype of a model of config `cfg` from a device, an optional device map
/// (`what` names where the map came from, for errors) and an optional dtype: the one rule for
/// flags and recipes.
pub fn placement(
    what: &str,
    device: &str,
    device_map: Option<&str>,
    dtype: Option<&str>,
    cfg: &Config,
) -> Result<(Placement, DType)> {
    let Some(text) = device_map else {
        let device = parse_device(device)?;
        let dtype = parse_dtype(dtype, &device)?;
        return Ok((Placement::single(&device), dtype));
    };
    let bad = |e: String| Error::Usage(format!("{what} `{text}`: {e}"));
    let n = cfg.num_hidden_layers;
    let map = match Spec::parse(text).map_err(bad)? {
        Spec::Auto => {
            // The dtype decides the sizes; before the devices exist, choose it as they would.
            let cuda = !crate::memory::cuda_free_memory()?.is_empty();
            let dtype = match dtype {
                None if cuda => DType::BF16,
                d => parse_dtype(d, &Device::Cpu)?,
            };
            let sizes = sizes(cfg, dtype);
            let (map, free) = DeviceMap::auto(n, sizes)?;
            eprintln!(
                "device map auto: {} ({} layers)\n{}",
                map.to_spec(),
                n,
                map.plan(sizes, &free).trim_end()
            );
            map
        }
        spec => spec.layout(n).map_err(bad)?,
    };
    let placement = map.resolve()?;
    // bf16 by default as soon as one device is a GPU, as --device cuda does.
    let dtype = match dtype {
        None if placement.any_cuda() => DType::BF16,
        d => parse_dtype(d, placement.home())?,
    };
    Ok((placement, dtype))
}
