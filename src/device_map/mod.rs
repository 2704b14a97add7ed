//! `--device-map` and `model.device_map`: which device holds which decoder layers, for a model
//! too large for one GPU, in one process.
//!
//! A map reads `cuda:0=0-39,cuda:1=40-79`: each entry puts a range of layers (or one layer) on
//! a device; `embed=DEVICE` and `head=DEVICE` move the embedding or the final norm + LM head,
//! which otherwise sit with the first and the last layer. `auto` splits the layers over the
//! CUDA devices by their free memory (on a build or machine without CUDA: everything on the
//! CPU). CPU devices may be numbered (`cpu:0`, `cpu:1`): they are all the one host, but the
//! model places and moves tensors between them exactly as between GPUs, so the CPU tests run
//! the split's code paths.
//!
//! [`Spec`] is the text checked on its own (what a recipe check can do), [`DeviceMap`] the
//! spec laid over a model's layer count, [`Placement`] the map with its candle devices made.

mod placement;

pub use placement::Placement;

use crate::device::parse_device;
use crate::{Error, Result};
use candle_core::Device;
use std::fmt;

/// A device as a map names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DeviceName {
    Cpu(usize),
    Cuda(usize),
}

impl fmt::Display for DeviceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceName::Cpu(n) => write!(f, "cpu:{n}"),
            DeviceName::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceName {
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        let unknown = || format!("unknown device `{s}`: expected cpu, cpu:N, cuda or cuda:N");
        let (kind, n) = match s.split_once(':') {
            Some((k, n)) => (k, n.parse::<usize>().map_err(|_| unknown())?),
            None => (s, 0),
        };
        let name = match kind {
            "cpu" => DeviceName::Cpu(n),
            "cuda" => DeviceName::Cuda(n),
            _ => return Err(unknown()),
        };
        if matches!(name, DeviceName::Cuda(_)) && !cfg!(feature = "cuda") {
            return Err(format!(
                "`{s}`: this eabfit was built without CUDA (cargo feature `cuda`); name cpu:N devices or build with --features cuda"
            ));
        }
        Ok(name)
    }

    /// The candle device: one per CUDA ordinal (candle treats two handles on one GPU as two
    /// devices and would copy between them), the host for every `cpu:N`.
    fn make(self) -> Result<Device> {
        match self {
            DeviceName::Cpu(_) => Ok(Device::Cpu),
            DeviceName::Cuda(n) => parse_device(&format!("cuda:{n}")),
        }
    }
}

/// A device map as written, checked for syntax, devices and overlaps but not yet against a
/// model's layer count.
#[derive(Debug, Clone, PartialEq)]
pub enum Spec {
    Auto,
    Layers {
        /// (device, first layer, last layer), in the order written.
        ranges: Vec<(DeviceName, usize, usize)>,
        embed: Option<DeviceName>,
        head: Option<DeviceName>,
    },
}

impl Spec {
    pub fn parse(text: &str) -> std::result::Result<Self, String> {
        let text = text.trim();
        if text == "auto" {
            return Ok(Spec::Auto);
        }
        let (mut ranges, mut embed, mut head) = (vec![], None, None);
        for entry in text.split(',').map(str::trim) {
            let shape = || {
                format!("`{entry}`: expected DEVICE=FIRST-LAST (e.g. cuda:0=0-39), DEVICE=LAYER, embed=DEVICE or head=DEVICE")
            };
            let (key, value) = entry.split_once('=').ok_or_else(shape)?;
            let (key, value) = (key.trim(), value.trim());
            match key {
                "embed" | "head" => {
                    let slot = if key == "embed" {
                        &mut embed
                    } else {
                        &mut head
                    };
                    if slot.is_some() {
                        return Err(format!("`{key}` is given twice"));
                    }
                    *slot = Some(DeviceName::parse(value)?);
                }
                _ => {
                    let dev = DeviceName::parse(key)?;
                    let num = |s: &str| s.trim().parse::<usize>().map_err(|_| shape());
                    let (a, b) = match value.split_once('-') {
                        Some((a, b)) => (num(a)?, num(b)?),
                        None => (num(value)?, num(value)?),
                    };
                    if a > b {
                        return Err(format!("`{entry}`: range {a}-{b} runs backwards"));
                    }
                    ranges.push((dev, a, b));
                }
            }
        }
        if ranges.is_empty() {
            return Err(
                "no layers placed: expected entries such as cuda:0=0-39,cuda:1=40-79, or auto"
                    .into(),
            );
        }
        for (i, &(d1, a1, b1)) in ranges.iter().enumerate() {
            for &(d2, a2, b2) in &ranges[i + 1..] {
                let (lo, hi) = (a1.max(a2), b1.min(b2));
                if lo <= hi {
                    return Err(format!("{} placed twice ({d1} and {d2})", span(lo, hi)));
                }
            }
        }
        Ok(Spec::Layers {
            ranges,
            embed,
            head,
        })
    }

    /// The explicit map laid over `n_layers` layers: every layer on exactly one device.
    /// `auto` needs sizes and free memory: see [`DeviceMap::auto`].
    pub fn layout(&self, n_layers: usize) -> std::result::Result<DeviceMap, String> {
        let Spec::Layers {
            ranges,
            embed,
            head,
        } = self
        else {
            return Err("`auto` has no fixed layout".into());
        };
        let mut layers: Vec<Option<DeviceName>> = vec![None; n_layers];
        for &(dev, a, b) in ranges {
            if b >= n_layers {
                return Err(format!(
                    "layer {b} is out of range: the model has {n_layers} layers (0-{})",
                    n_layers.saturating_sub(1)
                ));
            }
            for l in &mut layers[a..=b] {
                *l = Some(dev);
            }
        }
        let gaps = runs(&layers, |l| l.is_none());
        match gaps[..] {
            [] => {}
            [(a, b)] => return Err(format!("{} on no device", span(a, b))),
            _ => {
                let list: Vec<String> = gaps.iter().map(|&(a, b)| range_text(a, b)).collect();
                return Err(format!("layers {} are on no device", list.join(", ")));
            }
        }
        let layers: Vec<DeviceName> = layers.into_iter().flatten().collect();
        Ok(DeviceMap {
            embed: embed.unwrap_or(layers[0]),
            head: head.unwrap_or(layers[n_layers - 1]),
            layers,
        })
    }
}

/// Bytes in GiB, or MiB below one GiB (test models weigh kilobytes).
fn human(b: u64) -> String {
    let gib = b as f64 / (1u64 << 30) as f64;
    if gib >= 1.0 {
        format!("{gib:.2} GiB")
    } else {
        format!("{:.2} MiB", b as f64 / (1u64 << 20) as f64)
    }
}

/// "4" / "4-7".
fn range_text(a: usize, b: usize) -> String {
    if a == b {
        format!("{a}")
    } else {
        format!("{a}-{b}")
    }
}

/// "layer 4 is" / "layers 4-7 are".
fn span(a: usize, b: usize) -> String {
    if a == b {
        format!("layer {a} is")
    } else {
        format!("layers {a}-{b} are")
    }
}

/// Maximal runs (first, last) of consecutive indices whose item satisfies `pred`.
fn runs<T>(items: &[T], pred: impl Fn(&T) -> bool) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = vec![];
    for (i, it) in items.iter().enumerate() {
        if !pred(it) {
            continue;
        }
        match out.last_mut() {
            Some((_, b)) if *b + 1 == i => *b = i,
            _ => out.push((i, i)),
        }
    }
    out
}

/// Estimated bytes of a model's pieces in the load dtype, from its config.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sizes {
    pub embed: u64,
    pub layer: u64,
    /// Final norm and LM head (a tied head is copied to the head's device when that differs
    /// from the embedding's, so it always counts).
    pub head: u64,
}

/// Every layer's device, and the embedding's and head's.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceMap {
    pub layers: Vec<DeviceName>,
    pub embed: DeviceName,
    pub head: DeviceName,
}

/// Share of each device's free memory `auto` leaves for activations, the KV cache and the
/// optimizer state.
const AUTO_RESERVE: f64 = 0.15;

impl DeviceMap {
    pub fn single(dev: DeviceName, n_layers: usize) -> Self {
        Self {
            layers: vec![dev; n_layers],
            embed: dev,
            head: dev,
        }
    }

    /// The devices used, in order of first use (embedding, layers, head).
    pub fn devices(&self) -> Vec<DeviceName> {
        let mut out = vec![];
        for d in std::iter::once(&self.embed)
            .chain(&self.layers)
            .chain(std::iter::once(&self.head))
        {
            if !out.contains(d) {
                out.push(*d);
            }
        }
        out
    }

    /// The map in the syntax [`Spec::parse`] reads (embed/head only where they differ from the
    /// default): what `auto` decided, ready to pass back as `--device-map`.
    pub fn to_spec(&self) -> String {
        let mut parts: Vec<String> = runs_by_device(&self.layers)
            .into_iter()
            .map(|(d, a, b)| format!("{d}={}", range_text(a, b)))
            .collect();
        if Some(&self.embed) != self.layers.first() {
            parts.push(format!("embed={}", self.embed));
        }
        if Some(&self.head) != self.layers.last() {
            parts.push(format!("head={}", self.head));
        }
        parts.join(",")
    }

    /// Estimated weight bytes per device, in [`DeviceMap::devices`] order.
    pub fn bytes(&self, sizes: Sizes) -> Vec<(DeviceName, u64)> {
        self.devices()
            .into_iter()
            .map(|d| {
                let layers = self.layers.iter().filter(|&&l| l == d).count() as u64;
                let mut b = layers * sizes.layer;
                if self.embed == d {
                    b += sizes.embed;
                }
                if self.head == d {
                    b += sizes.head;
                }
                (d, b)
            })
            .collect()
    }

    /// A table of the map: per device, its layers and estimated weight memory (and free
    /// memory where known).
    pub fn plan(&self, sizes: Sizes, free: &[(DeviceName, u64)]) -> String {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        let mut s = String::new();
        for (d, bytes) in self.bytes(sizes) {
            let layers: Vec<String> = runs(&self.layers, |&l| l == d)
                .into_iter()
                .map(|(a, b)| {
                    if a == b {
                        format!("{a}")
                    } else {
                        format!("{a}-{b}")
                    }
                })
                .collect();
            let mut extra = vec![];
            if self.embed == d {
                extra.push("embed");
            }
            if self.head == d {
                extra.push("norm+head");
            }
            let layers = if layers.is_empty() {
                "none".to_string()
            } else {
                layers.join(",")
            };
            let extra = if extra.is_empty() {
                String::new()
            } else {
                format!(" + {}", extra.join(" + "))
            };
            let free = free
                .iter()
                .find(|(f, _)| *f == d)
                .map_or(String::new(), |(_, b)| {
                    format!(" (free {:.1} GiB)", gib(*b))
                });
            s.push_str(&format!(
                "  {:<8} layers {layers}{extra}: weights {}{free}\n",
                d.to_string(),
                human(bytes)
            ));
        }
        s
    }

    /// `auto` over the given devices and their free bytes: contiguous layer runs, each device's
    /// share of the weights proportional to its usable memory (free minus a reserve for
    /// activations); devices left without layers drop out.
    pub fn plan_auto(
        n_layers: usize,
        sizes: Sizes,
        free: &[(DeviceName, u64)],
    ) -> std::result::Result<Self, String> {
        if free.is_empty() {
            return Err("auto: no device to place the model on".into());
        }
        let usable: Vec<f64> = free
            .iter()
            .map(|&(_, b)| b as f64 * (1.0 - AUTO_RESERVE))
            .collect();
        let cap: f64 = usable.iter().sum();
        let total = (sizes.embed + sizes.head + n_layers as u64 * sizes.layer) as f64;
        let gib = |b: f64| b / (1u64 << 30) as f64;
        if total > cap {
            return Err(format!(
                "auto: the weights need {:.1} GiB, and the {} device(s) have {:.1} GiB usable ({:.0}% of their free memory)",
                gib(total),
                free.len(),
                gib(cap),
                (1.0 - AUTO_RESERVE) * 100.0
            ));
        }
        // Layer i goes to the first device whose cumulative share of `total` reaches the
        // middle of layer i (the embedding coming first).
        let mut bound = 0f64;
        let bounds: Vec<f64> = usable
            .iter()
            .map(|u| {
                bound += total * u / cap;
                bound
            })
            .collect();
        let mut k = 0;
        let mut layers = Vec::with_capacity(n_layers);
        for i in 0..n_layers {
            let mid = sizes.embed as f64 + (i as f64 + 0.5) * sizes.layer as f64;
            while k + 1 < bounds.len() && mid > bounds[k] {
                k += 1;
            }
            layers.push(free[k].0);
        }
        let map = Self {
            embed: layers[0],
            head: layers[n_layers - 1],
            layers,
        };
        for (d, b) in map.bytes(sizes) {
            let i = free.iter().position(|(f, _)| *f == d).unwrap_or(0);
            if b as f64 > usable[i] {
                return Err(format!(
                    "auto: {d} would hold {:.1} GiB of weights, more than its {:.1} GiB usable; give an explicit --device-map",
                    gib(b as f64),
                    gib(usable[i])
                ));
            }
        }
        Ok(map)
    }

    /// `auto` on this machine: every CUDA device by its free memory, or the CPU alone when the
    /// build has no CUDA or the machine no GPU. Returns the map and the free memory it saw.
    pub fn auto(n_layers: usize, sizes: Sizes) -> Result<(Self, Vec<(DeviceName, u64)>)> {
        let free: Vec<(DeviceName, u64)> = crate::memory::cuda_free_memory()?
            .into_iter()
            .map(|(i, b)| (DeviceName::Cuda(i), b))
            .collect();
        if free.is_empty() {
            return Ok((Self::single(DeviceName::Cpu(0), n_layers), vec![]));
        }
        let map = Self::plan_auto(n_layers, sizes, &free).map_err(Error::Usage)?;
        Ok((map, free))
    }

    /// Makes each named device once and places the model on them.
    pub fn resolve(&self) -> Result<Placement> {
        let names = self.devices();
        let devices = names.iter().map(|n| n.make()).collect::<Result<Vec<_>>>()?;
        crate::memory::enable_peer_access(&devices)?;
        let slot = |d: &DeviceName| names.iter().position(|n| n == d).unwrap_or(0);
        Ok(Placement {
            layers: self.layers.iter().map(slot).collect(),
            embed: slot(&self.embed),
            head: slot(&self.head),
            names,
            devices,
        })
    }
}

/// Maximal runs of one device over consecutive layers: (device, first, last).
fn runs_by_device(layers: &[DeviceName]) -> Vec<(DeviceName, usize, usize)> {
    let mut out: Vec<(DeviceName, usize, usize)> = vec![];
    for (i, &d) in layers.iter().enumerate() {
        match out.last_mut() {
            Some((ld, _, b)) if *ld == d => *b = i,
            _ => out.push((d, i, i)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu(n: usize) -> DeviceName {
        DeviceName::Cpu(n)
    }

    #[test]
    fn a_map_reads_ranges_single_layers_and_embed_head() {
        let m = Spec::parse("cpu:0=0-1, cpu:1=2,cpu:0=3, head=cpu:2")
            .unwrap()
            .layout(4)
            .unwrap();
        assert_eq!(m.layers, vec![cpu(0), cpu(0), cpu(1), cpu(0)]);
        assert_eq!((m.embed, m.head), (cpu(0), cpu(2)));
        assert_eq!(m.devices(), vec![cpu(0), cpu(1), cpu(2)]);
        assert_eq!(m.to_spec(), "cpu:0=0-1,cpu:1=2,cpu:0=3,head=cpu:2");
        let again = Spec::parse(&m.to_spec()).unwrap().layout(4).unwrap();
        assert_eq!(again, m);
        assert_eq!(Spec::parse(" auto ").unwrap(), Spec::Auto);
        assert_eq!(
            Spec::parse("cpu=0-2").unwrap().layout(3).unwrap(),
            DeviceMap::single(cpu(0), 3)
        );
    }

    #[test]
    fn bad_maps_name_their_problem() {
        let err = |s: &str, n: usize| match Spec::parse(s) {
            Ok(spec) => spec.layout(n).unwrap_err(),
            Err(e) => e,
        };
        assert_eq!(err("cpu:0=0-1,cpu:1=3", 4), "layer 2 is on no device");
        assert_eq!(err("cpu:0=0,cpu:1=4", 6), "layers 1-3, 5 are on no device");
        assert_eq!(err("cpu:0=2-3", 8), "layers 0-1, 4-7 are on no device");
        assert_eq!(
            err("cpu:0=0-2,cpu:1=2-3", 4),
            "layer 2 is placed twice (cpu:0 and cpu:1)"
        );
        assert_eq!(
            err("cpu:0=0-2,cpu:1=1-3", 4),
            "layers 1-2 are placed twice (cpu:0 and cpu:1)"
        );
        assert_eq!(
            err("cpu:0=0-4", 4),
            "layer 4 is out of range: the model has 4 layers (0-3)"
        );
        assert_eq!(
            err("gpu:0=0-3", 4),
            "unknown device `gpu:0`: expected cpu, cpu:N, cuda or cuda:N"
        );
        assert_eq!(err("cpu:0=3-1", 4), "`cpu:0=3-1`: range 3-1 runs backwards");
        assert!(err("cpu:0", 4).starts_with("`cpu:0`: expected DEVICE=FIRST-LAST"));
        assert!(err("cpu:0=a-3", 4).starts_with("`cpu:0=a-3`: expected"));
        assert_eq!(
            err("cpu=0-3,embed=cpu,embed=cpu:1", 4),
            "`embed` is given twice"
        );
        assert!(err("head=cpu:1", 4).starts_with("no layers placed"));
        #[cfg(not(feature = "cuda"))]
        assert!(err("cuda:0=0-1,cuda:1=2-3", 4)
            .starts_with("`cuda:0`: this eabfit was built without CUDA"));
    }

    #[test]
    fn auto_splits_by_usable_memory_and_refuses_what_does_not_fit() {
        let gib = 1u64 << 30;
        let s = Sizes {
            embed: gib / 2,
            layer: gib,
            head: gib / 2,
        };
        // Equal devices: 80 layers split 40/40 (embed and head weigh the same).
        let two = [(cpu(0), 100 * gib), (cpu(1), 100 * gib)];
        let m = DeviceMap::plan_auto(80, s, &two).unwrap();
        assert_eq!(m.to_spec(), "cpu:0=0-39,cpu:1=40-79");
        // A device with three times the memory takes three times the layers.
        let uneven = [(cpu(0), 150 * gib), (cpu(1), 50 * gib)];
        let m = DeviceMap::plan_auto(80, s, &uneven).unwrap();
        assert_eq!(m.to_spec(), "cpu:0=0-59,cpu:1=60-79");
        // The whole model on one device when it is the only one.
        let m = DeviceMap::plan_auto(4, s, &two[..1]).unwrap();
        assert_eq!(m, DeviceMap::single(cpu(0), 4));
        let e = DeviceMap::plan_auto(80, s, &[(cpu(0), 50 * gib), (cpu(1), 40 * gib)]).unwrap_err();
        assert!(e.starts_with("auto: the weights need 81.0 GiB"), "{e}");
        let plan = DeviceMap::plan_auto(80, s, &two).unwrap().plan(s, &two);
        assert!(
            plan.contains("cpu:0    layers 0-39 + embed: weights 40.50 GiB (free 100.0 GiB)"),
            "{plan}"
        );
        assert!(plan.contains("cpu:1    layers 40-79 + norm+head: weights 40.50 GiB"));
    }

    #[test]
    fn tensors_go_with_their_layer_embedding_or_head() {
        let p = Spec::parse("cpu:0=0-1,cpu:1=2-3,embed=cpu:2")
            .unwrap()
            .layout(4)
            .unwrap()
            .resolve()
            .unwrap();
        assert_eq!(p.slots(), 3);
        let name = |t: &str| p.name(p.slot_of_tensor(t));
        assert_eq!(name("model.embed_tokens.weight"), cpu(2));
        assert_eq!(name("model.layers.1.mlp.up_proj.weight"), cpu(0));
        assert_eq!(name("model.layers.3.self_attn.eab_k"), cpu(1));
        assert_eq!(name("model.norm.weight"), cpu(1));
        assert_eq!(name("lm_head.weight"), cpu(1));
        assert!(p.is_split() && !p.any_cuda());
    }
}
