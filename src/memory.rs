//! CUDA memory-pool statistics (the counterpart of torch.cuda.max_memory_allocated) and how
//! eabfit sets up a CUDA device; inert on the CPU and in builds without the `cuda` feature.

use crate::Result;
use candle_core::Device;
use std::collections::BTreeMap;

/// Sets up a CUDA device the way PyTorch runs one, before anything is allocated on it:
/// freed memory stays in the pool (PyTorch's caching allocator; handing it back to the driver
/// at every synchronisation and mapping it again cost ~5% of a 7B training step), and cudarc's
/// per-tensor event tracking is off (it orders work between streams; candle and eabfit's
/// kernels run everything on the device's one stream). `bench --release-pool
/// --event-tracking` turns each back on to measure them.
pub fn configure(device: &Device, release_pool: bool, event_tracking: bool) -> Result<()> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        let ctx = d.cuda_stream().context().clone();
        // Safety: one stream per device (above), so no cross-stream ordering is left undone.
        unsafe {
            if event_tracking {
                ctx.enable_event_tracking()
            } else {
                ctx.disable_event_tracking()
            }
        }
        if let Some(p) = pool::Pool::of(d) {
            p.set_release(if release_pool { 0 } else { u64::MAX })?;
        }
    }
    #[cfg(not(feature = "cuda"))]
    let _ = (device, release_pool, event_tracking);
    Ok(())
}

/// Free bytes of every CUDA device of the machine, by ordinal; empty without the `cuda`
/// feature or without a GPU (what `--device-map auto` splits by).
pub fn cuda_free_memory() -> Result<Vec<(usize, u64)>> {
    #[cfg(feature = "cuda")]
    {
        use candle_core::cuda_backend::cudarc::driver::CudaContext;
        let n = match CudaContext::device_count() {
            Ok(n) => n.max(0) as usize,
            // No driver or no device: the CPU is all there is.
            Err(_) => return Ok(vec![]),
        };
        (0..n)
            .map(|i| {
                let ctx =
                    CudaContext::new(i).map_err(|e| crate::Error::Msg(format!("cuda:{i}: {e}")))?;
                let (free, _) = ctx
                    .mem_get_info()
                    .map_err(|e| crate::Error::Msg(format!("cuda:{i}: cuMemGetInfo: {e}")))?;
                Ok((i, free as u64))
            })
            .collect()
    }
    #[cfg(not(feature = "cuda"))]
    Ok(vec![])
}

/// Lets every pair of the given CUDA devices read each other's memory, so that a layer split's
/// activation copies go GPU to GPU (candle's `to_device` copies with cuMemcpyPeerAsync, which
/// otherwise stages through the host, or fails with CUDA_ERROR_INVALID_CONTEXT: candle issue
/// #3524). Pairs the hardware cannot connect are left to that fallback.
pub fn enable_peer_access(devices: &[Device]) -> Result<()> {
    #[cfg(feature = "cuda")]
    {
        use candle_core::cuda_backend::cudarc::driver::sys;
        let ctxs: Vec<_> = devices
            .iter()
            .filter_map(|d| match d {
                Device::Cuda(c) => Some(c.cuda_stream().context().clone()),
                _ => None,
            })
            .collect();
        for a in &ctxs {
            for b in &ctxs {
                if a.ordinal() == b.ordinal() {
                    continue;
                }
                let mut can: std::ffi::c_int = 0;
                // Safety: valid device handles and an out pointer to a local.
                let r =
                    unsafe { sys::cuDeviceCanAccessPeer(&mut can, a.cu_device(), b.cu_device()) };
                if r != sys::CUresult::CUDA_SUCCESS || can == 0 {
                    continue;
                }
                a.bind_to_thread()
                    .map_err(|e| crate::Error::Msg(format!("cuda:{}: {e}", a.ordinal())))?;
                // Safety: b's context outlives the call (held in `ctxs`); flags must be 0.
                let r = unsafe { sys::cuCtxEnablePeerAccess(b.cu_ctx(), 0) };
                if r != sys::CUresult::CUDA_SUCCESS
                    && r != sys::CUresult::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED
                {
                    return Err(crate::Error::Msg(format!(
                        "cuCtxEnablePeerAccess(cuda:{} -> cuda:{}): {r:?}",
                        a.ordinal(),
                        b.ordinal()
                    )));
                }
            }
        }
    }
    #[cfg(not(feature = "cuda"))]
    let _ = devices;
    Ok(())
}

/// CUDA memory-pool statistics; inert on other devices and without the `cuda` feature.
pub struct CudaMemory {
    #[cfg(feature = "cuda")]
    pool: Option<pool::Pool>,
    pub event_tracking: bool,
}

impl CudaMemory {
    pub fn of(device: &Device) -> Self {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(d) = device {
            return Self {
                pool: pool::Pool::of(d),
                event_tracking: d.is_event_tracking(),
            };
        }
        let _ = device;
        Self {
            #[cfg(feature = "cuda")]
            pool: None,
            event_tracking: false,
        }
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

    /// [`Self::peak`] in GiB.
    pub fn peak_gib(&self) -> Option<f64> {
        self.peak().map(|b| b as f64 / (1u64 << 30) as f64)
    }
}

/// The memory pools of the devices a (possibly split) model runs on, by device name.
pub struct Pools(Vec<(String, CudaMemory)>);

impl Pools {
    pub fn of(devices: &[(String, Device)]) -> Self {
        Self(
            devices
                .iter()
                .map(|(n, d)| (n.clone(), CudaMemory::of(d)))
                .collect(),
        )
    }

    pub fn reset_peak(&self) {
        for (_, m) in &self.0 {
            m.reset_peak();
        }
    }

    /// Bytes in use now, summed over the devices.
    pub fn used_now(&self) -> Option<u64> {
        self.0
            .iter()
            .filter_map(|(_, m)| m.used_now())
            .reduce(|a, b| a + b)
    }

    /// Each CUDA device's high-water mark in GiB (empty off CUDA).
    pub fn peak_gib(&self) -> BTreeMap<String, f64> {
        self.0
            .iter()
            .filter_map(|(n, m)| m.peak_gib().map(|g| (n.clone(), g)))
            .collect()
    }

    pub fn event_tracking(&self) -> bool {
        self.0.iter().any(|(_, m)| m.event_tracking)
    }
}

/// "cuda:0 71.2 GiB, cuda:1 73.9 GiB": the peaks of a split, or `None` for one device.
pub fn per_device(peaks: &BTreeMap<String, f64>) -> Option<String> {
    (peaks.len() > 1).then(|| {
        let each: Vec<String> = peaks
            .iter()
            .map(|(n, g)| format!("{n} {g:.1} GiB"))
            .collect();
        each.join(", ")
    })
}

/// The end of a run's closing line: ", peak device memory X GiB", or nothing off CUDA.
pub fn peak_suffix(peak_gib: Option<f64>) -> String {
    peak_gib.map_or(String::new(), |g| {
        format!(", peak device memory {g:.1} GiB")
    })
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

        /// Bytes of freed memory the pool keeps across a synchronisation (u64::MAX: all).
        pub fn set_release(&self, bytes: u64) -> Result<()> {
            self.set(Attr::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, bytes)
        }
    }
}
