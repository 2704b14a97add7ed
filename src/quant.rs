//! Fake quantization: symmetric round-to-nearest, quantized and dequantized in float, so that a
//! model runs with the rounding error of integer weights, activations and KV cache but with
//! float kernels. The definitions are fixed so that figures compare with other tools:
//!
//! - weights: every q/k/v/o/gate/up/down matrix (LoRA merged in first), one scale per output
//!   channel; embeddings, lm_head and norms stay float;
//! - activations: the input of each of those projections, one scale per window (`tensor`, over
//!   the whole (T, d_in) input) or per token (`token`); q, k and v read one input and so share
//!   one scale, gate and up likewise;
//! - KV: post-RoPE keys and values, one scale per token per head; an EAB slot's k', v' like any
//!   key and value.
//!
//! Every scale is max |x| / (2^(b-1) - 1) over its group, values round half away from zero and
//! clamp to +-(2^(b-1) - 1). 16 bits means float: no rounding at all.

use crate::adapters::{Adapters, TARGETS};
use crate::checkpoint::Base;
use crate::model::{ActHook, LinearInput, Model};
use crate::{Error, Result};
use candle_core::{DType, Tensor, D};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Mutex;

type CResult<T> = candle_core::Result<T>;

/// Bits that mean "leave it in float".
pub const FLOAT_BITS: u32 = 16;

/// How many activation values share one scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum ActScale {
    /// One scale per projection input per window: (T, d_in).
    #[default]
    Tensor,
    /// One scale per token: (d_in).
    Token,
}

impl ActScale {
    pub fn name(self) -> &'static str {
        match self {
            ActScale::Tensor => "tensor",
            ActScale::Token => "token",
        }
    }
}

/// One quantization setting: bits of weights, activations and KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Setting {
    pub w: u32,
    pub a: u32,
    pub kv: u32,
    pub act_scale: ActScale,
}

impl Setting {
    pub fn float() -> Self {
        Self {
            w: FLOAT_BITS,
            a: FLOAT_BITS,
            kv: FLOAT_BITS,
            act_scale: ActScale::Tensor,
        }
    }

    pub fn validate(&self) -> Result<()> {
        for (name, b) in [("w", self.w), ("a", self.a), ("kv", self.kv)] {
            if !(2..=FLOAT_BITS).contains(&b) {
                return Err(Error::Usage(format!(
                    "--{name} {b}: bits must be 2..=16 (16 = float)"
                )));
            }
        }
        Ok(())
    }

    /// `W8A8`, `W4A4KV4 token`: KV is named only when quantized, the scale only when
    /// activations are.
    pub fn label(&self) -> String {
        let mut s = format!("W{}A{}", self.w, self.a);
        if self.kv < FLOAT_BITS {
            s += &format!("KV{}", self.kv);
        }
        if self.a < FLOAT_BITS {
            s += &format!(" {}", self.act_scale.name());
        }
        s
    }

    /// Parses `w8a8`, `w4a4kv4`, optionally followed by `:tensor` or `:token` (default tensor);
    /// a missing `aN` or `kvN` is float.
    pub fn parse(spec: &str) -> Result<Self> {
        let bad = || {
            Error::Usage(format!(
                "--grid: `{spec}` is not a setting like w8a8, w4a4kv4 or w8a8:token"
            ))
        };
        let lower = spec.trim().to_ascii_lowercase();
        let (bits, scale) = match lower.split_once(':') {
            Some((b, "tensor")) => (b.to_string(), ActScale::Tensor),
            Some((b, "token")) => (b.to_string(), ActScale::Token),
            Some(_) => return Err(bad()),
            None => (lower.clone(), ActScale::Tensor),
        };
        let mut s = Setting {
            act_scale: scale,
            ..Setting::float()
        };
        let mut rest = bits.as_str();
        for (key, slot) in [("w", &mut s.w), ("a", &mut s.a), ("kv", &mut s.kv)] {
            if let Some(r) = rest.strip_prefix(key) {
                let digits: String = r.chars().take_while(char::is_ascii_digit).collect();
                *slot = digits.parse().map_err(|_| bad())?;
                rest = &r[digits.len()..];
            }
        }
        if !rest.is_empty() || bits.is_empty() {
            return Err(bad());
        }
        s.validate()?;
        Ok(s)
    }
}

/// The grid of `eabfit quant --grid` without a list: weights-only and activations-only
/// first (which of the two hurts), then the usual pairs, each per tensor and per token.
pub fn default_grid() -> Vec<Setting> {
    let mut v = vec![
        Setting {
            w: 8,
            ..Setting::float()
        },
        Setting {
            a: 8,
            ..Setting::float()
        },
    ];
    for (w, a) in [(8, 8), (6, 6), (4, 8), (4, 4)] {
        for act_scale in [ActScale::Tensor, ActScale::Token] {
            v.push(Setting {
                w,
                a,
                kv: FLOAT_BITS,
                act_scale,
            });
        }
    }
    v
}

/// Symmetric round-to-nearest of each row (the last dim) of `x`, quantized and dequantized:
/// scale = max |row| / (2^(bits-1) - 1), x -> clamp(round(x / scale)) * scale. A row of zeros
/// stays zero. Computed in f32 (f64 for f64 input) and returned in the input's dtype.
pub fn fake_quant_rows(x: &Tensor, bits: u32) -> CResult<Tensor> {
    let dtype = x.dtype();
    let work = if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let xf = x.to_dtype(work)?;
    let qmax = ((1u64 << (bits - 1)) - 1) as f64;
    let scale = (xf.abs()?.max_keepdim(D::Minus1)? / qmax)?; // (..., 1)
                                                             // A zero row divides by 1 instead of 0; its values are 0 either way.
    let safe = (&scale + scale.eq(0.0)?.to_dtype(work)?)?;
    xf.broadcast_div(&safe)?
        .round()?
        .clamp(-qmax, qmax)?
        .broadcast_mul(&scale)?
        .to_dtype(dtype)
}

/// One scale over everything but the leading (batch = window) dim.
pub fn fake_quant_per_sample(x: &Tensor, bits: u32) -> CResult<Tensor> {
    let shape = x.shape().clone();
    let b = x.dim(0)?;
    fake_quant_rows(&x.reshape((b, ()))?, bits)?.reshape(shape) // (B, T*d) -> back
}

/// Activation and KV fake quantization, as a model hook.
#[derive(Debug, Clone, Copy)]
pub struct FakeQuant {
    pub a: u32,
    pub kv: u32,
    pub act_scale: ActScale,
}

impl FakeQuant {
    /// None when the setting leaves activations and KV in float.
    pub fn of(s: &Setting) -> Option<Self> {
        (s.a < FLOAT_BITS || s.kv < FLOAT_BITS).then_some(Self {
            a: s.a,
            kv: s.kv,
            act_scale: s.act_scale,
        })
    }
}

impl ActHook for FakeQuant {
    fn linear_input(&self, _layer: usize, _input: LinearInput, x: &Tensor) -> CResult<Tensor> {
        match (self.a < FLOAT_BITS, self.act_scale) {
            (false, _) => Ok(x.clone()),
            (true, ActScale::Tensor) => fake_quant_per_sample(x, self.a),
            (true, ActScale::Token) => fake_quant_rows(x, self.a), // rows of d_in = tokens
        }
    }

    fn key_value(&self, _layer: usize, k: &Tensor, v: &Tensor) -> CResult<(Tensor, Tensor)> {
        if self.kv >= FLOAT_BITS {
            return Ok((k.clone(), v.clone()));
        }
        // (B, KV, T, hd): rows of hd are one token of one head.
        Ok((fake_quant_rows(k, self.kv)?, fake_quant_rows(v, self.kv)?))
    }
}

/// The model of `base` + `adapters` with every projection weight fake-quantized to `bits` per
/// output channel. LoRA is merged first (W + scale B A, what an export ships) and then dropped,
/// so the quantized weight is the one that runs.
pub fn quantized_model(base: &Base, adapters: &Adapters, bits: u32) -> Result<Model> {
    let adapters = base.effective_adapters(adapters);
    if bits >= FLOAT_BITS {
        return base.model(&adapters);
    }
    let mut tensors = base.tensors.clone();
    for layer in 0..base.config.num_hidden_layers {
        for (_, proj) in TARGETS {
            let prefix = format!("model.layers.{layer}.{proj}");
            let name = format!("{prefix}.weight");
            let w = tensors
                .get(&name)
                .ok_or_else(|| Error::tensor(&name, "missing from the checkpoint"))?;
            let merged = match adapters.lora.get(&prefix) {
                Some(l) => {
                    let delta = (l.b.matmul(&l.a)? * l.scale)?
                        .to_dtype(w.dtype())?
                        .to_device(w.device())?; // (out, in)
                    (w + delta)?
                }
                None => w.clone(),
            };
            let q = fake_quant_rows(&merged, bits).map_err(|e| Error::tensor(&name, e))?;
            tensors.insert(name, q);
        }
    }
    let vb = VarBuilder::from_tensors(tensors, base.dtype, &base.device);
    let slots_only = Adapters {
        lora: HashMap::new(),
        ..adapters
    };
    Ok(Model::load_placed(
        vb,
        &base.config,
        &slots_only,
        &base.placement,
    )?)
}

/// Statistics of one projection input, means over windows.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InputStats {
    pub input: LinearInput,
    pub max_abs: f64,
    /// Upper median of |x| over (T, d_in).
    pub median_abs: f64,
    /// Pearson kurtosis E[(x - mean)^4] / Var(x)^2 over (T, d_in); 3 for a Gaussian.
    pub kurtosis: f64,
    /// [position, channel] of the largest |x| in the window where it was largest.
    pub max_at: [usize; 2],
}

#[derive(Debug, Default, Clone)]
struct Acc {
    max: f64,
    median: f64,
    kurtosis: f64,
    windows: usize,
    peak: f64,
    peak_at: [usize; 2],
}

/// An [`ActHook`] that changes nothing and records [`InputStats`] of every projection input.
#[derive(Debug, Default)]
pub struct InputObserver {
    acc: Mutex<HashMap<(usize, LinearInput), Acc>>,
}

impl ActHook for InputObserver {
    fn linear_input(&self, layer: usize, input: LinearInput, x: &Tensor) -> CResult<Tensor> {
        let (b, _, d) = x.dims3()?;
        let all: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let per = all.len() / b.max(1);
        let mut acc = self
            .acc
            .lock()
            .map_err(|_| candle_core::Error::msg("input statistics lock poisoned"))?;
        let a = acc.entry((layer, input)).or_default();
        for vals in all.chunks(per.max(1)) {
            let (mut max, mut at) = (0f64, 0usize);
            let n = vals.len() as f64;
            let mean = vals.iter().map(|&v| v as f64).sum::<f64>() / n;
            let (mut m2, mut m4) = (0f64, 0f64);
            for (i, &v) in vals.iter().enumerate() {
                if (v.abs() as f64) > max {
                    (max, at) = (v.abs() as f64, i);
                }
                let c = (v as f64 - mean).powi(2);
                m2 += c;
                m4 += c * c;
            }
            let (m2, m4) = (m2 / n, m4 / n);
            let mut mags: Vec<f32> = vals.iter().map(|v| v.abs()).collect();
            a.max += max;
            a.median += crate::scan::upper_median(&mut mags);
            a.kurtosis += if m2 > 0.0 { m4 / (m2 * m2) } else { 0.0 };
            a.windows += 1;
            if max > a.peak {
                a.peak = max;
                a.peak_at = [at / d, at % d];
            }
        }
        Ok(x.clone())
    }

    fn key_value(&self, _layer: usize, k: &Tensor, v: &Tensor) -> CResult<(Tensor, Tensor)> {
        Ok((k.clone(), v.clone()))
    }
}

impl InputObserver {
    /// Per layer, the four inputs in model order.
    pub fn finish(&self, n_layers: usize) -> Vec<Vec<InputStats>> {
        let acc = self.acc.lock().map(|a| a.clone()).unwrap_or_default();
        (0..n_layers)
            .map(|l| {
                [
                    LinearInput::Qkv,
                    LinearInput::O,
                    LinearInput::GateUp,
                    LinearInput::Down,
                ]
                .into_iter()
                .filter_map(|input| {
                    let a = acc.get(&(l, input))?;
                    let n = a.windows.max(1) as f64;
                    Some(InputStats {
                        input,
                        max_abs: a.max / n,
                        median_abs: a.median / n,
                        kurtosis: a.kurtosis / n,
                        max_at: a.peak_at,
                    })
                })
                .collect()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn vec2(t: &Tensor) -> Vec<Vec<f32>> {
        t.to_vec2().unwrap()
    }

    #[test]
    fn rows_round_to_the_closed_form() {
        // Row 0: max 1.27 -> scale 0.01 at 8 bits, so every value is a multiple of 0.01.
        // Row 1: max 4 -> scale 4/7 at 4 bits: 1.0 -> round(1.75) = 2 -> 8/7; -4 -> -7 * 4/7.
        // Row 2: zeros stay zeros.
        let x = Tensor::new(
            &[
                [1.27f32, -0.504, 0.0149],
                [1.0, -4.0, 0.2857],
                [0.0, 0.0, 0.0],
            ],
            &Device::Cpu,
        )
        .unwrap();
        let q8 = vec2(&fake_quant_rows(&x, 8).unwrap());
        let want0 = [1.27f32, -0.50, 0.01];
        for (a, b) in q8[0].iter().zip(want0) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        let q4 = vec2(&fake_quant_rows(&x, 4).unwrap());
        let s = 4.0f32 / 7.0;
        // 0.2857 / s = 0.49997 rounds to 0.
        for (a, b) in q4[1].iter().zip([2.0 * s, -7.0 * s, 0.0]) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        assert_eq!(q4[2], vec![0.0; 3]);
        // Ties round away from zero: 0.5 * scale -> 1 * scale.
        let tie = Tensor::new(&[[7.0f32, 0.5, -0.5]], &Device::Cpu).unwrap();
        assert_eq!(
            vec2(&fake_quant_rows(&tie, 4).unwrap())[0],
            vec![7.0, 1.0, -1.0]
        );
    }

    #[test]
    fn error_is_at_most_half_a_step_and_quantization_is_idempotent() {
        let x = Tensor::randn(0f32, 3.0, (16, 40), &Device::Cpu).unwrap();
        for bits in [2u32, 4, 8] {
            let q = fake_quant_rows(&x, bits).unwrap();
            let qmax = ((1u32 << (bits - 1)) - 1) as f32;
            let rows = vec2(&x);
            for (r, qr) in rows.iter().zip(vec2(&q)) {
                let step = r.iter().fold(0f32, |m, v| m.max(v.abs())) / qmax;
                for (a, b) in r.iter().zip(&qr) {
                    assert!((a - b).abs() <= 0.5 * step * (1.0 + 1e-5), "{a} {b} {step}");
                    let k = b / step;
                    assert!((k - k.round()).abs() < 1e-3 && k.abs() <= qmax + 1e-3);
                }
            }
            let again = fake_quant_rows(&q, bits).unwrap();
            let diff = (&again - &q).unwrap().abs().unwrap().max_all().unwrap();
            assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
        }
    }

    #[test]
    fn per_sample_scale_spans_the_whole_window_and_per_token_only_its_row() {
        // One huge entry: per window it sets the scale of every token, per token only its own.
        let x = Tensor::new(
            &[[[100.0f32, 0.3], [0.2, -0.1]], [[0.2, 0.3], [0.4, -0.1]]],
            &Device::Cpu,
        )
        .unwrap(); // (B=2, T=2, d=2)
        let hook = FakeQuant {
            a: 8,
            kv: FLOAT_BITS,
            act_scale: ActScale::Tensor,
        };
        let per_window: Vec<Vec<Vec<f32>>> = hook
            .linear_input(0, LinearInput::Qkv, &x)
            .unwrap()
            .to_vec3()
            .unwrap();
        // Window 0: scale 100/127, so 0.3 -> 0, 0.2 -> 0; window 1 has its own scale 0.4/127.
        assert_eq!(per_window[0][1], vec![0.0, 0.0]);
        assert!((per_window[1][1][0] - 0.4).abs() < 1e-6);
        let s = 0.4f32 / 127.0;
        assert!((per_window[1][0][1] - (0.3f32 / s).round() * s).abs() < 1e-7);
        let per_token: Vec<Vec<Vec<f32>>> = FakeQuant {
            act_scale: ActScale::Token,
            ..hook
        }
        .linear_input(0, LinearInput::Qkv, &x)
        .unwrap()
        .to_vec3()
        .unwrap();
        let s = 0.2f32 / 127.0;
        assert!((per_token[0][1][1] - (-0.1f32 / s).round() * s).abs() < 1e-7);
        assert!((per_token[0][1][0] - 0.2).abs() < 1e-7);
    }

    #[test]
    fn kv_scales_are_per_token_per_head_and_16_bits_is_the_identity() {
        let k = Tensor::randn(0f32, 1.0, (1, 2, 3, 4), &Device::Cpu).unwrap(); // (B, KV, T, hd)
        let hook = FakeQuant {
            a: FLOAT_BITS,
            kv: 4,
            act_scale: ActScale::Tensor,
        };
        let (qk, qv) = hook.key_value(0, &k, &k).unwrap();
        let want = fake_quant_rows(&k.reshape((6, 4)).unwrap(), 4)
            .unwrap()
            .reshape((1, 2, 3, 4))
            .unwrap();
        for q in [qk, qv] {
            let d = (&q - &want).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
        }
        let x = Tensor::randn(0f32, 1.0, (1, 3, 4), &Device::Cpu).unwrap();
        let same = hook.linear_input(0, LinearInput::Down, &x).unwrap();
        let d = (&same - &x).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
        assert!(FakeQuant::of(&Setting::float()).is_none());
    }

    #[test]
    fn settings_parse_and_label() {
        let s = Setting::parse("W4A4KV4:token").unwrap();
        assert_eq!((s.w, s.a, s.kv, s.act_scale), (4, 4, 4, ActScale::Token));
        assert_eq!(s.label(), "W4A4KV4 token");
        let s = Setting::parse("w8").unwrap();
        assert_eq!((s.w, s.a, s.kv), (8, 16, 16));
        assert_eq!(s.label(), "W8A16");
        for bad in ["w8a", "x8", "w1a8", "w8a8:row", "", "w8a8kv17"] {
            assert!(Setting::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(default_grid().len(), 10);
    }

    #[test]
    fn observer_statistics_match_the_closed_form() {
        // 8 values: 4 x 1 and 4 x -1 -> mean 0, var 1, kurtosis 1; one window of (T=2, d=4).
        let x = Tensor::new(
            &[[[1f32, -1.0, 1.0, -1.0], [-1.0, 1.0, -1.0, 1.0]]],
            &Device::Cpu,
        )
        .unwrap();
        let obs = InputObserver::default();
        obs.linear_input(0, LinearInput::Down, &x).unwrap();
        // A spike: seven zeros and one 8 -> mean 1, deviations seven -1 and one 7.
        let y = Tensor::new(
            &[[[0f32, 0.0, 0.0, 0.0], [0.0, 0.0, 8.0, 0.0]]],
            &Device::Cpu,
        )
        .unwrap();
        obs.linear_input(1, LinearInput::Qkv, &y).unwrap();
        let stats = obs.finish(2);
        let s = &stats[0][0];
        assert_eq!(s.input, LinearInput::Down);
        assert_eq!((s.max_abs, s.median_abs, s.kurtosis), (1.0, 1.0, 1.0));
        let s = &stats[1][0];
        let (m2, m4) = ((7.0 + 49.0) / 8.0, (7.0 + 2401.0) / 8.0);
        assert_eq!(s.max_at, [1, 2]);
        assert_eq!(s.max_abs, 8.0);
        assert_eq!(s.median_abs, 0.0);
        assert!((s.kurtosis - m4 / (m2 * m2)).abs() < 1e-12);
    }
}
