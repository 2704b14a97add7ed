//! AdamW with decoupled weight decay, warmup + cosine schedule and global-norm clipping, with
//! its moments in the open so a checkpoint can hold them (exact resume). candle-optimisers
//! keeps them private and pins an older candle, hence this small one.

use crate::{Error, Result};
use candle_core::{DType, Tensor, Var};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

#[derive(Debug, Clone, Copy)]
pub struct AdamWConfig {
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
}

pub struct AdamW {
    cfg: AdamWConfig,
    /// Updates taken so far (bias correction uses it).
    pub t: usize,
    m: BTreeMap<String, Tensor>,
    v: BTreeMap<String, Tensor>,
}

impl AdamW {
    pub fn new(cfg: AdamWConfig, vars: &BTreeMap<String, Var>) -> Result<Self> {
        let zeros = |v: &Var| v.as_tensor().zeros_like();
        let m = vars
            .iter()
            .map(|(k, v)| Ok((k.clone(), zeros(v)?)))
            .collect::<Result<_>>()?;
        let v = vars
            .iter()
            .map(|(k, v)| Ok((k.clone(), zeros(v)?)))
            .collect::<Result<_>>()?;
        Ok(Self { cfg, t: 0, m, v })
    }

    /// One update of every var that has a gradient, at learning rate `lr`.
    pub fn step(
        &mut self,
        vars: &BTreeMap<String, Var>,
        grads: &BTreeMap<String, Tensor>,
        lr: f64,
    ) -> Result<()> {
        self.t += 1;
        let (b1, b2) = self.cfg.betas;
        let c1 = 1.0 - b1.powi(self.t as i32);
        let c2 = 1.0 - b2.powi(self.t as i32);
        let s = crate::ops::adamw::Step {
            lr,
            betas: (b1, b2),
            corrections: (c1, c2),
            eps: self.cfg.eps,
            weight_decay: self.cfg.weight_decay,
        };
        for (name, var) in vars {
            let Some(g) = grads.get(name) else { continue };
            let (p, m, v) =
                crate::ops::adamw::update(var.as_tensor(), g, &self.m[name], &self.v[name], &s)?;
            var.set(&p)?;
            self.m.insert(name.clone(), m);
            self.v.insert(name.clone(), v);
        }
        Ok(())
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let mut all: HashMap<String, Tensor> = HashMap::new();
        for (k, t) in &self.m {
            all.insert(format!("m.{k}"), t.clone());
        }
        for (k, t) in &self.v {
            all.insert(format!("v.{k}"), t.clone());
        }
        crate::fsio::save_safetensors(&all, path)
    }

    pub fn load(&mut self, path: &Path, t: usize) -> Result<()> {
        let dev = self
            .m
            .values()
            .next()
            .map(|t| t.device().clone())
            .unwrap_or(candle_core::Device::Cpu);
        let mut all =
            candle_core::safetensors::load(path, &dev).map_err(|e| Error::file(path, e))?;
        for (prefix, map) in [("m", &mut self.m), ("v", &mut self.v)] {
            for (k, slot) in map.iter_mut() {
                let name = format!("{prefix}.{k}");
                *slot = all
                    .remove(&name)
                    .ok_or_else(|| Error::file(path, format!("missing tensor `{name}`")))?;
            }
        }
        self.t = t;
        Ok(())
    }
}

/// Scales all gradients so their global L2 norm is at most `max` (0 = off); returns the norm
/// before clipping.
pub fn clip_grad_norm(grads: &mut BTreeMap<String, Tensor>, max: f64) -> Result<f64> {
    // The squared sums stay on the device until one read: a read per tensor is a device
    // synchronisation per tensor, which costs most when processes share a GPU.
    let sums = grads
        .values()
        .map(|g| {
            let wide = match g.dtype() {
                DType::F64 => DType::F64,
                _ => DType::F32,
            };
            g.to_dtype(wide)?.sqr()?.sum_all()?.to_dtype(DType::F64)
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    if sums.is_empty() {
        return Ok(0.0);
    }
    let sq = Tensor::stack(&sums, 0)?.sum_all()?.to_scalar::<f64>()?;
    let norm = sq.sqrt();
    if max > 0.0 && norm > max {
        let scale = max / (norm + 1e-12);
        for g in grads.values_mut() {
            *g = (&*g * scale)?;
        }
    }
    Ok(norm)
}

/// Linear warmup over `warmup` steps to `lr`, then cosine decay to `lr * min_ratio` at `total`.
pub fn lr_at(step: usize, lr: f64, warmup: usize, total: usize, min_ratio: f64) -> f64 {
    if step < warmup {
        return lr * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
    lr * (min_ratio + (1.0 - min_ratio) * cosine)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Two AdamW steps on a scalar against the update rule written out by hand.
    #[test]
    fn adamw_matches_hand_computation() {
        let cfg = AdamWConfig {
            betas: (0.9, 0.99),
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let mut vars = BTreeMap::new();
        vars.insert(
            "w".to_string(),
            Var::from_tensor(&Tensor::new(&[1.0f32], &Device::Cpu).unwrap()).unwrap(),
        );
        let mut opt = AdamW::new(cfg, &vars).unwrap();
        let (mut w, mut m, mut v) = (1.0f64, 0.0f64, 0.0f64);
        for (t, g) in [(1, 0.5f64), (2, -0.25)] {
            let mut grads = BTreeMap::new();
            grads.insert(
                "w".to_string(),
                Tensor::new(&[g as f32], &Device::Cpu).unwrap(),
            );
            opt.step(&vars, &grads, 0.01).unwrap();
            m = 0.9 * m + 0.1 * g;
            v = 0.99 * v + 0.01 * g * g;
            let (mh, vh) = (m / (1.0 - 0.9f64.powi(t)), v / (1.0 - 0.99f64.powi(t)));
            w = w * (1.0 - 0.01 * 0.1) - 0.01 * mh / (vh.sqrt() + 1e-8);
        }
        let got = vars["w"].as_tensor().to_vec1::<f32>().unwrap()[0] as f64;
        assert!((got - w).abs() < 1e-6, "{got} vs {w}");
    }

    #[test]
    fn schedule_warms_up_then_decays_to_the_floor() {
        assert!((lr_at(0, 1.0, 4, 20, 0.1) - 0.25).abs() < 1e-12);
        assert!((lr_at(3, 1.0, 4, 20, 0.1) - 1.0).abs() < 1e-12);
        assert!((lr_at(4, 1.0, 4, 20, 0.1) - 1.0).abs() < 1e-12);
        assert!((lr_at(12, 1.0, 4, 20, 0.1) - 0.55).abs() < 1e-12);
        assert!((lr_at(20, 1.0, 4, 20, 0.1) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let mut g = BTreeMap::new();
        g.insert(
            "a".to_string(),
            Tensor::new(&[3.0f32], &Device::Cpu).unwrap(),
        );
        g.insert(
            "b".to_string(),
            Tensor::new(&[4.0f32], &Device::Cpu).unwrap(),
        );
        assert!((clip_grad_norm(&mut g, 1.0).unwrap() - 5.0).abs() < 1e-6);
        assert!((g["a"].to_vec1::<f32>().unwrap()[0] - 0.6).abs() < 1e-6);
    }
}
