//! Launching the crate's own kernels (`src/ops/*.cu`, compiled to PTX by `build.rs`) on
//! candle's CUDA device: loading a function and reaching a tensor's device buffer.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaView, LaunchConfig};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage};
use candle_core::{Layout, Storage};
use half::bf16;

type CResult<T> = candle_core::Result<T>;

/// The `cpu_fwd` of a custom op with 1, 2 or 3 inputs that exists on CUDA only: an error.
macro_rules! cuda_only {
    ($($arg:ident: $lay:ident),+) => {
        fn cpu_fwd(
            &self,
            $($arg: &candle_core::CpuStorage, $lay: &candle_core::Layout),+
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            $(let _ = ($arg, $lay);)+
            candle_core::bail!("{}: a CUDA kernel, called on the CPU", self.name())
        }
    };
}
pub(crate) use cuda_only;

/// `name` from the PTX module `module` (loaded once per device).
pub fn func(dev: &CudaDevice, module: &str, ptx: &str, name: &str) -> CResult<CudaFunction> {
    Ok(dev
        .get_or_load_custom_func(name, module, ptx)?
        .into_cuda_function())
}

pub fn storage(s: &Storage) -> CResult<&CudaStorage> {
    match s {
        Storage::Cuda(c) => Ok(c),
        _ => candle_core::bail!("kernel input is not on a CUDA device"),
    }
}

/// The elements of type T (bf16, f32, u32 ids...) a contiguous layout addresses.
pub fn view<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout) -> CResult<CudaView<'a, T>> {
    if !l.is_contiguous() {
        candle_core::bail!("kernel input is not contiguous");
    }
    Ok(s.as_cuda_slice::<T>()?.slice(l.start_offset()..))
}

/// One thread per two elements of an n-element tensor, grid-stride past 65535 x 256.
pub fn elementwise_cfg(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((n / 2).div_ceil(256).clamp(1, 65_535) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A fresh uninitialised bf16 buffer of n elements on `dev` (the kernel writes every one).
pub fn alloc_bf16(
    dev: &CudaDevice,
    n: usize,
) -> CResult<candle_core::cuda_backend::cudarc::driver::CudaSlice<bf16>> {
    // Safety: every caller launches a kernel that writes all n elements before any read.
    unsafe { dev.alloc::<bf16>(n) }
}

pub fn device_of(s: &CudaStorage) -> CudaDevice {
    s.device().clone()
}
