//! A device map with its candle devices made: the one thing the checkpoint loader and the
//! model ask where a tensor goes, and how an activation crosses from one device to another.

use super::{DeviceMap, DeviceName};
use candle_core::{Device, Tensor};

/// A device map with its devices made: what the checkpoint loader and the model place tensors
/// by. Devices are referred to by their index (a slot) in `devices`.
#[derive(Debug, Clone)]
pub struct Placement {
    pub(super) names: Vec<DeviceName>,
    pub(super) devices: Vec<Device>,
    /// Each layer's slot; empty for a single device, which answers for any layer.
    pub(super) layers: Vec<usize>,
    pub(super) embed: usize,
    pub(super) head: usize,
}

impl Placement {
    /// Everything on `device`, for any number of layers.
    pub fn single(device: &Device) -> Self {
        let name = match device.location() {
            candle_core::DeviceLocation::Cuda { gpu_id } => DeviceName::Cuda(gpu_id),
            _ => DeviceName::Cpu(0),
        };
        Self {
            names: vec![name],
            devices: vec![device.clone()],
            layers: vec![],
            embed: 0,
            head: 0,
        }
    }

    /// The map this placement follows, for `n_layers` layers.
    pub fn map(&self, n_layers: usize) -> DeviceMap {
        DeviceMap {
            layers: (0..n_layers).map(|i| self.name(self.layer(i))).collect(),
            embed: self.name(self.embed),
            head: self.name(self.head),
        }
    }

    /// The slot of layer `i` (a single-device placement answers for any layer).
    pub fn layer(&self, i: usize) -> usize {
        self.layers.get(i).copied().unwrap_or(self.embed)
    }
    pub fn embed(&self) -> usize {
        self.embed
    }
    pub fn head(&self) -> usize {
        self.head
    }
    pub fn device(&self, slot: usize) -> &Device {
        &self.devices[slot]
    }
    pub fn name(&self, slot: usize) -> DeviceName {
        self.names[slot]
    }
    /// Where a model takes its inputs and returns everything: the head's device.
    pub fn home(&self) -> &Device {
        &self.devices[self.head]
    }
    pub fn slots(&self) -> usize {
        self.devices.len()
    }
    /// Each device with its name, in slot order.
    pub fn named_devices(&self) -> Vec<(String, Device)> {
        self.names
            .iter()
            .map(|n| n.to_string())
            .zip(self.devices.iter().cloned())
            .collect()
    }
    pub fn is_split(&self) -> bool {
        self.devices.len() > 1
    }
    pub fn any_cuda(&self) -> bool {
        self.devices.iter().any(Device::is_cuda)
    }

    /// The slot of a checkpoint tensor, by its Hugging Face name: a layer's tensors with that
    /// layer, the embedding with the embedding, everything else (final norm, LM head) with the
    /// head.
    pub fn slot_of_tensor(&self, name: &str) -> usize {
        if let Some(rest) = name.strip_prefix("model.layers.") {
            if let Some(i) = rest.split('.').next().and_then(|n| n.parse().ok()) {
                return self.layer(i);
            }
        }
        if name.starts_with("model.embed_tokens.") {
            return self.embed;
        }
        self.head
    }

    /// `x` (on slot `from`) on slot `to`. GPUs copy peer to peer; two CPU slots are one host, so
    /// the copy is a plain one, still a node of its own in the autograd graph, as on GPUs.
    /// candle gives both a backward: gradients flow back across the boundary.
    pub fn transfer(&self, x: &Tensor, from: usize, to: usize) -> candle_core::Result<Tensor> {
        if from == to {
            return Ok(x.clone());
        }
        let dev = &self.devices[to];
        if x.device().same_device(dev) {
            x.copy()
        } else {
            x.to_device(dev)
        }
    }
}
