//! The merge, one tensor at a time: each base tensor is read from the checkpoint onto the
//! device that holds its layer under the device map (the embedding's or the head's for the
//! rest), gets `W + scale * B A` there in f32, is cast to the export dtype and comes back to the
//! host to be written. The writer asks for one output shard's tensors, writes the shard and drops
//! them before asking for the next, so a merge holds one shard (plus the adapter), never the model.

use crate::checkpoint::TensorReader;
use crate::device_map::Placement;
use crate::model::{Adapters, Lora};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

pub(super) struct Merger<'a> {
    reader: &'a TensorReader<'a>,
    source: PathBuf,
    placement: Placement,
    /// The base's tensors with their shapes: every stored tensor but an export's slots, which
    /// come from the adapters instead.
    base: Vec<(String, Vec<usize>)>,
    /// LoRA pairs by the weight they change (`{prefix}.weight`).
    lora: HashMap<String, &'a Lora>,
}

impl<'a> Merger<'a> {
    /// Checks that every LoRA pair finds its weight, in the weight's shape, before anything is
    /// read or written.
    pub(super) fn new(
        reader: &'a TensorReader<'a>,
        source: PathBuf,
        placement: Placement,
        adapters: &'a Adapters,
    ) -> Result<Self> {
        let slots: HashSet<String> = reader.slot_tensor_names().into_iter().collect();
        let base: Vec<(String, Vec<usize>)> = reader
            .shapes()
            .into_iter()
            .filter(|(n, _)| !slots.contains(n))
            .collect();
        let shapes: HashMap<&str, &[usize]> = base
            .iter()
            .map(|(n, s)| (n.as_str(), s.as_slice()))
            .collect();
        let mut lora = HashMap::new();
        for (prefix, l) in &adapters.lora {
            let name = format!("{prefix}.weight");
            let w = shapes
                .get(name.as_str())
                .ok_or_else(|| Error::tensor(&name, "LoRA targets it, the base lacks it"))?;
            // B (out, r) A (r, in) -> (out, in)
            let delta = [l.b.dim(0)?, l.a.dim(1)?];
            if *w != delta {
                return Err(Error::tensor(
                    &name,
                    format!("shape {w:?}, the LoRA update has {delta:?}"),
                ));
            }
            lora.insert(name, l);
        }
        Ok(Self {
            reader,
            source,
            placement,
            base,
            lora,
        })
    }

    /// Each output tensor's name and byte count in `dtype`, what the shards are planned by.
    pub(super) fn sizes(&self, dtype: DType) -> Vec<(String, u64)> {
        self.base
            .iter()
            .map(|(n, s)| {
                let elems: usize = s.iter().product();
                (n.clone(), (elems * dtype.size_in_bytes()) as u64)
            })
            .collect()
    }

    /// Base tensor `name` merged (`W + scale * B A` in f32 where a LoRA pair targets it, as it
    /// is otherwise), cast to `dtype`, on the host.
    pub(super) fn tensor(&self, name: &str, dtype: DType) -> Result<Tensor> {
        let device = self.placement.device(self.placement.slot_of_tensor(name));
        let w = self.reader.read(name, device, DType::F32)?;
        crate::checkpoint::check_finite_one(&self.source, name, &w)?;
        let merged = match self.lora.get(name) {
            Some(l) => {
                let on = |t: &Tensor| t.to_dtype(DType::F32)?.to_device(device);
                let delta = (on(&l.b)?.matmul(&on(&l.a)?)? * l.scale)?;
                (w + delta)?
            }
            None => w,
        };
        Ok(merged.to_dtype(dtype)?.to_device(&Device::Cpu)?)
    }
}
