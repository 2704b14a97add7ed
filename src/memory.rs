//! CUDA memory-pool statistics (the counterpart of torch.cuda.max_memory_allocated) and the
//! pool knobs `bench` exposes; inert on the CPU and in builds without the `cuda` feature.

use crate::Result;
use candle_core::Device;

/// CUDA memory-pool statistics and knobs; inert on other devices and without the `cuda` feature.
pub struct CudaKnobs {
    #[cfg(feature = "cuda")]
    pool: Option<pool::Pool>,
    pub event_tracking: bool,
}

impl CudaKnobs {
    #[cfg(feature = "cuda")]
    pub fn apply(device: &Device, keep_pool: bool, no_event_tracking: bool) -> Result<Self> {
        let Device::Cuda(d) = device else {
            return Ok(Self {
                pool: None,
                event_tracking: false,
            });
        };
        if no_event_tracking {
            // Safety: bench runs everything on the device's one stream.
            unsafe { d.disable_event_tracking() };
        }
        let pool = pool::Pool::of(d);
        if keep_pool {
            match &pool {
                Some(p) => p.keep_all()?,
                None => {
                    return Err(crate::Error::Usage(
                        "--keep-pool: this device does not allocate from a memory pool".into(),
                    ))
                }
            }
        }
        Ok(Self {
            pool,
            event_tracking: d.is_event_tracking(),
        })
    }

    #[cfg(not(feature = "cuda"))]
    pub fn apply(_: &Device, _: bool, _: bool) -> Result<Self> {
        Ok(Self {
            event_tracking: false,
        })
    }

    pub fn used_now(&self) -> Option<u64> {
        #[cfg(feature = "cuda")]
        if let Some(p) = &self.pool {
            return p.get(pool::Attr::CU_MEMPOOL_ATTR_USED_MEM_CURRENT);
        }
        None
    }

    pub fn reset_peak(&self) {
        #[cfg(feature = "cuda")]
        if let Some(p) = &self.pool {
            p.reset_high();
        }
    }

    pub fn peak(&self) -> Option<u64> {
        #[cfg(feature = "cuda")]
        if let Some(p) = &self.pool {
            return p.get(pool::Attr::CU_MEMPOOL_ATTR_USED_MEM_HIGH);
        }
        None
    }
}

#[cfg(feature = "cuda")]
mod pool {
    //! The device's current memory pool, which candle's allocations come from when the device
    //! supports stream-ordered allocation (cudarc then uses cuMemAllocAsync).
    use crate::{Error, Result};
    use candle_core::cuda_backend::cudarc::driver::sys;
    use candle_core::cuda_backend::CudaDevice;

    pub use sys::CUmemPool_attribute as Attr;

    pub struct Pool(sys::CUmemoryPool);

    impl Pool {
        pub fn of(d: &CudaDevice) -> Option<Self> {
            let stream = d.cuda_stream();
            let ctx = stream.context();
            if !ctx.has_async_alloc() {
                return None;
            }
            let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
            // Safety: a valid device handle and an out pointer to a local.
            let r = unsafe { sys::cuDeviceGetMemPool(&mut pool, ctx.cu_device()) };
            (r == sys::CUresult::CUDA_SUCCESS && !pool.is_null()).then_some(Self(pool))
        }

        pub fn get(&self, attr: Attr) -> Option<u64> {
            let mut v: u64 = 0;
            // Safety: the byte-count attributes are cuuint64_t.
            let r =
                unsafe { sys::cuMemPoolGetAttribute(self.0, attr, &mut v as *mut u64 as *mut _) };
            (r == sys::CUresult::CUDA_SUCCESS).then_some(v)
        }

        fn set(&self, attr: Attr, mut v: u64) -> Result<()> {
            // Safety: as in `get`.
            let r =
                unsafe { sys::cuMemPoolSetAttribute(self.0, attr, &mut v as *mut u64 as *mut _) };
            if r != sys::CUresult::CUDA_SUCCESS {
                return Err(Error::Msg(format!(
                    "cuMemPoolSetAttribute({attr:?}): {r:?}"
                )));
            }
            Ok(())
        }

        /// Resets the high-water mark of used bytes to the bytes in use now.
        pub fn reset_high(&self) {
            let _ = self.set(Attr::CU_MEMPOOL_ATTR_USED_MEM_HIGH, 0);
        }

        /// Never hand freed memory back to the driver.
        pub fn keep_all(&self) -> Result<()> {
            self.set(Attr::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, u64::MAX)
        }
    }
}
