//! `--device` and `--dtype`: the spellings every command and recipe accepts, turned into a
//! candle device (with its memory pool configured) and a dtype.

use crate::{Error, Result};
use candle_core::{DType, Device};

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
        Some(other) => Err(Error::Usage(format!(
            "--dtype `{other}`: expected f32, bf16 or f16"
        ))),
    }
}
