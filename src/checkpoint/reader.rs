//! One weight at a time: names and shapes from the safetensors or GGUF headers without reading
//! any data, and single tensors read from the memory map (or dequantized from the GGUF) straight
//! onto a device. The loader reads every
//! tensor through it; `export` reads one output shard's worth at a time, so that merging a model
//! never holds all of it.

use super::gguf::GgufWeights;
use super::{Checkpoint, EabExport, Weights};
use crate::model::Adapters;
use crate::{Error, Result};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;

/// A checkpoint's weights opened for reading by name.
pub struct TensorReader<'a> {
    ckpt: &'a Checkpoint,
    store: Store<'a>,
}

enum Store<'a> {
    Mmap(MmapedSafetensors),
    Gguf(&'a GgufWeights),
}

impl Checkpoint {
    pub fn reader(&self) -> Result<TensorReader<'_>> {
        let store = match &self.weights {
            // Safety: the files are only read; mmap of a file changed under us is the
            // documented risk of every safetensors loader.
            Weights::Safetensors(files) => Store::Mmap(
                unsafe { MmapedSafetensors::multi(files) }
                    .map_err(|e| Error::file(&self.source, e))?,
            ),
            Weights::Gguf(g) => Store::Gguf(g),
        };
        Ok(TensorReader { ckpt: self, store })
    }
}

impl TensorReader<'_> {
    /// Every stored tensor (an export's slot tensors included) with its shape, by name.
    pub fn shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut v: Vec<(String, Vec<usize>)> = match &self.store {
            Store::Mmap(st) => st
                .tensors()
                .into_iter()
                .map(|(name, view)| (name, view.shape().to_vec()))
                .collect(),
            Store::Gguf(g) => g.shapes().collect(),
        };
        v.sort();
        v
    }

    /// Tensor `name` on `device` in `dtype`; errors name the source and the tensor.
    pub fn read(&self, name: &str, device: &Device, dtype: DType) -> Result<Tensor> {
        let placed = match &self.store {
            Store::Mmap(st) => st.load(name, device),
            // A GGUF tensor comes dequantized on the host, its errors naming the file's name.
            Store::Gguf(g) => g.read(name)?.to_device(device),
        };
        placed
            .and_then(|t| t.to_dtype(dtype))
            .map_err(|e| Error::file(&self.ckpt.source, format!("tensor `{name}`: {e}")))
    }

    /// The EAB slots of an `eabfit export` (f32, on the host), reading only their tensors;
    /// `None` for other sources.
    pub fn eab_slots(&self) -> Result<Option<Adapters>> {
        let Some(e) = &self.ckpt.eab else {
            return Ok(None);
        };
        let mut tensors = HashMap::new();
        for name in e.tensor_names() {
            if let Some(t) = self.read_if_present(&name)? {
                tensors.insert(name, t);
            }
        }
        self.ckpt.take_slots(e, &mut tensors).map(Some)
    }

    /// An export's slot tensor, or `None` where the weights lack it (then [`Checkpoint::take_slots`]
    /// says which one the config lists).
    fn read_if_present(&self, name: &str) -> Result<Option<Tensor>> {
        let present = match &self.store {
            Store::Mmap(st) => st.get(name).is_ok(),
            Store::Gguf(g) => g.contains(name),
        };
        if !present {
            return Ok(None);
        }
        let t = self.read(name, &Device::Cpu, DType::F32)?;
        super::check_finite_one(&self.ckpt.source, name, &t)?;
        Ok(Some(t))
    }

    /// The names an `eabfit export` source keeps its slots under (empty for other sources).
    pub fn slot_tensor_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .ckpt
            .eab
            .as_ref()
            .map(EabExport::tensor_names)
            .unwrap_or_default()
            .into_iter()
            .collect();
        v.sort();
        v
    }
}
