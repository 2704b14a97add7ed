//! The GPU collective: one NCCL communicator per rank thread, made in that thread on candle's
//! own stream of its device, so that a sum is ordered after the backward pass that produced
//! its gradients without a device synchronisation. The shared [`Hub`] carries only a host
//! meeting before each sum and the abort flag: NCCL cannot be woken from a sum that one rank
//! never joins, so no rank issues one before every rank has come to the meeting (the host
//! runs ahead of the GPU, so the meeting costs microseconds, not a drained stream).

use super::threads::Hub;
use super::Collective;
use crate::{Error, Result};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, ValidAsZeroBits};
pub use candle_core::cuda_backend::cudarc::nccl::Id;
use candle_core::cuda_backend::cudarc::nccl::{Comm, NcclType, ReduceOp};
use candle_core::cuda_backend::{CudaDType, CudaStorage};
use candle_core::{CpuStorage, DType, Device, Layout, Shape, Tensor};
use std::sync::Arc;

/// A fresh NCCL id for one run (made once, shared by every rank thread).
pub fn new_id() -> Result<Id> {
    Id::new().map_err(|e| Error::Msg(format!("NCCL: cannot make a communicator id: {e:?}")))
}

pub struct NcclCollective {
    hub: Arc<Hub>,
    comm: Comm,
    rank: usize,
    device: Device,
}

impl NcclCollective {
    /// Joins the communicator `id` as `rank` on `device` (a CUDA device made in this thread).
    /// Blocks until every rank has joined, so every rank first meets at the hub: a rank whose
    /// device failed to open fails the others there instead of leaving them in NCCL.
    pub fn new(hub: Arc<Hub>, rank: usize, device: &Device, id: Id) -> Result<Self> {
        let cuda = device.as_cuda_device()?;
        let stream = cuda.cuda_stream();
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| Error::Msg(format!("rank {rank}: cannot bind the CUDA context: {e:?}")))?;
        hub.barrier(rank)?;
        let comm = Comm::from_rank(stream, rank, hub.world(), id).map_err(|e| {
            Error::Msg(format!(
                "rank {rank}: NCCL communicator: {e:?} (is libnccl.so.2 on LD_LIBRARY_PATH?)"
            ))
        })?;
        Ok(Self {
            hub,
            comm,
            rank,
            device: device.clone(),
        })
    }
}

/// The all-reduce as a candle op without backward: candle hands over the input's device
/// buffer and takes the output's.
struct SumOp<'a> {
    comm: &'a Comm,
}

impl SumOp<'_> {
    fn run<T: CudaDType + NcclType + DeviceRepr + ValidAsZeroBits>(
        &self,
        s: &CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<CudaStorage> {
        let (start, end) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("NCCL sum of a strided tensor".into()))?;
        let src = s.as_cuda_slice::<T>()?.slice(start..end);
        let dev = s.device().clone();
        let mut dst = dev.alloc_zeros::<T>(end - start)?;
        self.comm
            .all_reduce(&src, &mut dst, &ReduceOp::Sum)
            .map_err(|e| candle_core::Error::Msg(format!("NCCL all-reduce: {e:?}")))?;
        Ok(CudaStorage::wrap_cuda_slice(dst, dev))
    }
}

impl candle_core::CustomOp1 for SumOp<'_> {
    fn name(&self) -> &'static str {
        "nccl-sum"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Err(candle_core::Error::Msg(
            "NCCL sums device buffers: a CPU tensor reached it".into(),
        ))
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let out = match s.dtype() {
            DType::F32 => self.run::<f32>(s, l)?,
            DType::F64 => self.run::<f64>(s, l)?,
            other => {
                return Err(candle_core::Error::Msg(format!(
                    "NCCL sum of {other:?}: only f32 and f64 are summed"
                )))
            }
        };
        Ok((out, l.shape().clone()))
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.hub.world()
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn sync(&mut self) -> Result<()> {
        self.hub.barrier(self.rank)
    }

    fn sum(&mut self, buf: &Tensor) -> Result<Tensor> {
        let buf = buf.contiguous()?;
        self.hub.barrier(self.rank)?;
        Ok(buf.apply_op1_no_bwd(&SumOp { comm: &self.comm })?)
    }

    fn abort(&self, msg: &str) {
        self.hub.fail(self.rank, msg);
    }
}
