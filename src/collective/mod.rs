//! Collective operations between the ranks of a data-parallel run, behind one interface:
//! [`threads::ThreadsCollective`] (ranks are threads of this process on the CPU; the sums go
//! through shared host buffers) and, with the `nccl` feature, [`nccl::NcclCollective`] (one
//! NCCL communicator per GPU, on candle's own stream). `train` and `pretrain` call only
//! [`Collective`] and the bucketed gradient mean built on it here.
//!
//! Both implementations share a [`threads::Hub`]: a host-side rendezvous with an abort flag, so
//! that a rank that fails wakes every other rank with its error instead of leaving them
//! waiting, and a wait that lasts past the timeout names the ranks that never came.

pub mod threads;

#[cfg(feature = "nccl")]
pub mod nccl;

use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;

/// What every rank calls, in the same order with the same sizes on every rank.
pub trait Collective {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    fn device(&self) -> &Device;
    /// Waits until every rank has come here (or one has failed: then an error naming it).
    fn sync(&mut self) -> Result<()>;
    /// The element-wise sum over ranks of a 1-D f32 or f64 tensor on this rank's device;
    /// every rank gets the same result. It starts with a meeting at the hub, so that a rank
    /// that failed before it stops the others there (an NCCL sum cannot be woken).
    fn sum(&mut self, buf: &Tensor) -> Result<Tensor>;
    /// Tells every other rank that this one failed with `msg`: their pending and later calls
    /// return an error naming this rank.
    fn abort(&self, msg: &str);
}

/// Gradient elements per bucket: one all-reduce carries up to this many (100 MiB of f32),
/// so that a model of many small tensors costs a few collectives, not one per tensor.
pub const BUCKET_ELEMS: usize = 25 << 20;

/// Which gradients travel together: names in order, each bucket one dtype and at most
/// `cap` elements (a larger tensor gets a bucket of its own).
#[derive(Debug, Clone, PartialEq)]
pub struct Buckets {
    pub buckets: Vec<Vec<(String, Vec<usize>)>>,
}

impl Buckets {
    pub fn plan(grads: &BTreeMap<String, Tensor>, cap: usize) -> Self {
        let mut buckets: Vec<Vec<(String, Vec<usize>)>> = vec![];
        let (mut filled, mut dtype) = (0usize, None);
        for (name, g) in grads {
            let n = g.elem_count();
            let fits = dtype == Some(g.dtype()) && filled + n <= cap;
            if !fits || buckets.is_empty() {
                buckets.push(vec![]);
                filled = 0;
                dtype = Some(g.dtype());
            }
            filled += n;
            if let Some(b) = buckets.last_mut() {
                b.push((name.clone(), g.dims().to_vec()));
            }
        }
        Self { buckets }
    }

    /// Bucket `i` as one 1-D tensor: its gradients flattened and laid end to end.
    pub fn flatten(&self, i: usize, grads: &BTreeMap<String, Tensor>) -> Result<Tensor> {
        let parts = self.buckets[i]
            .iter()
            .map(|(name, _)| {
                let g = grads
                    .get(name)
                    .ok_or_else(|| Error::tensor(name, "no gradient on this rank"))?;
                Ok(g.flatten_all()?)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// The inverse of [`Buckets::flatten`]: bucket `i`'s gradients back under their names.
    pub fn unflatten(
        &self,
        i: usize,
        flat: &Tensor,
        grads: &mut BTreeMap<String, Tensor>,
    ) -> Result<()> {
        let mut at = 0;
        for (name, dims) in &self.buckets[i] {
            let n: usize = dims.iter().product();
            let g = flat.narrow(0, at, n)?.reshape(dims.as_slice())?;
            grads.insert(name.clone(), g);
            at += n;
        }
        Ok(())
    }
}

/// Replaces every gradient by its mean over ranks, one all-reduce per bucket.
pub fn mean_grads(c: &mut dyn Collective, grads: &mut BTreeMap<String, Tensor>) -> Result<()> {
    let plan = Buckets::plan(grads, BUCKET_ELEMS);
    let scale = 1.0 / c.world() as f64;
    for i in 0..plan.buckets.len() {
        let flat = plan.flatten(i, grads)?;
        let mean = (c.sum(&flat)? * scale)?;
        plan.unflatten(i, &mean, grads)?;
    }
    Ok(())
}

/// The mean over ranks of a few host numbers (losses, flags).
pub fn mean_f64(c: &mut dyn Collective, v: &[f64]) -> Result<Vec<f64>> {
    let t = Tensor::new(v, c.device())?;
    let world = c.world() as f64;
    let s = c.sum(&t)?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    Ok(s.into_iter().map(|x| x / world).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn grads() -> BTreeMap<String, Tensor> {
        let dev = Device::Cpu;
        let mut g = BTreeMap::new();
        let t = |n: usize, shape: &[usize], dtype: DType| {
            let v: Vec<f64> = (0..n).map(|i| i as f64 * 0.5 - 3.0).collect();
            Tensor::from_vec(v, shape, &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
        };
        g.insert("a".to_string(), t(6, &[2, 3], DType::F32));
        g.insert("b".to_string(), t(4, &[4], DType::F32));
        g.insert("c".to_string(), t(12, &[3, 2, 2], DType::F32));
        g.insert("d".to_string(), t(5, &[5], DType::F64));
        g.insert("e".to_string(), t(2, &[1, 2], DType::F32));
        g
    }

    #[test]
    fn buckets_split_by_cap_and_dtype_and_round_trip() {
        let g = grads();
        let plan = Buckets::plan(&g, 10);
        let names: Vec<Vec<&str>> = plan
            .buckets
            .iter()
            .map(|b| b.iter().map(|(n, _)| n.as_str()).collect())
            .collect();
        // a+b = 10 fit; c alone is over the cap; d is f64; e is f32 again.
        assert_eq!(names, vec![vec!["a", "b"], vec!["c"], vec!["d"], vec!["e"]]);
        let mut back = BTreeMap::new();
        for i in 0..plan.buckets.len() {
            let flat = plan.flatten(i, &g).unwrap();
            assert_eq!(flat.rank(), 1);
            plan.unflatten(i, &flat, &mut back).unwrap();
        }
        assert_eq!(back.len(), g.len());
        for (name, t) in &g {
            let b = &back[name];
            assert_eq!(b.dims(), t.dims(), "{name}");
            assert_eq!(b.dtype(), t.dtype(), "{name}");
            let (x, y) = (
                t.flatten_all().unwrap().to_dtype(DType::F64).unwrap(),
                b.flatten_all().unwrap().to_dtype(DType::F64).unwrap(),
            );
            assert_eq!(
                x.to_vec1::<f64>().unwrap(),
                y.to_vec1::<f64>().unwrap(),
                "{name}"
            );
        }
    }

    #[test]
    fn a_missing_gradient_is_named() {
        let g = grads();
        let plan = Buckets::plan(&g, 100);
        let mut short = g.clone();
        short.remove("b");
        let e = plan.flatten(0, &short).unwrap_err().to_string();
        assert!(e.contains("`b`"), "{e}");
    }
}
