//! The training objective: a hold term that keeps the outputs, and a suppression term that
//! presses on massive activations.
//!
//! Suppression, over the chosen layers L, hidden states h_l of shape (B, T, D), threshold tau
//! and target mask M_l (which entries may be pressed on):
//!
//!   L_ma = 1/|L| * sum_l  1/B * sum_{b,t,d} M_l[b,t,d] * relu(|h_l[b,t,d]| - tau)^2 / tau^2
//!
//! M is all ones (`all`), the dims the base scan flagged (`flagged`), or the entries with
//! |h| >= ratio * median(|h|) of their layer and sample (`ratio`).

use candle_core::{DType, Tensor, D};

pub type CResult<T> = candle_core::Result<T>;

/// KL(teacher || student) per position, averaged over positions: logits (B, T, V).
pub fn kl_to_teacher(student: &Tensor, teacher: &Tensor, temperature: f64) -> CResult<Tensor> {
    let (b, t, _) = student.dims3()?;
    let ls =
        candle_nn::ops::log_softmax(&(student.to_dtype(DType::F32)? / temperature)?, D::Minus1)?;
    let lt = candle_nn::ops::log_softmax(
        &(teacher.to_dtype(DType::F32)?.detach() / temperature)?,
        D::Minus1,
    )?;
    let kl = (lt.exp()? * (lt - ls)?)?.sum_all()?;
    // T^2 keeps gradient scale independent of the temperature (Hinton et al.).
    kl * (temperature * temperature / (b * t) as f64)
}

/// Mean next-token cross-entropy: logits (B, T, V), ids (B, T).
pub fn lm_loss(logits: &Tensor, ids: &Tensor) -> CResult<Tensor> {
    let (b, t) = ids.dims2()?;
    crate::perplexity::nll_sum(logits, ids)? / (b * (t - 1)) as f64
}

/// Which entries the suppression term may press on.
#[derive(Debug, Clone, PartialEq)]
pub enum MaTarget {
    All,
    Dims(Vec<usize>),
    Ratio(f64),
}

/// L_ma of the module docs for the hidden states of the chosen layers.
pub fn ma_penalty(hidden: &[&Tensor], threshold: f64, target: &MaTarget) -> CResult<Tensor> {
    let mut total: Option<Tensor> = None;
    for h in hidden {
        // f32, or f64 in an f64 run (whose exactness tests compare to 1e-12).
        let h = h.to_dtype(crate::ops::acc(h.dtype()))?;
        let (b, _, d) = h.dims3()?;
        let excess = (h.abs()? - threshold)?.relu()?.sqr()?; // (B, T, D)
        let masked = match target {
            MaTarget::All => excess,
            MaTarget::Dims(dims) => {
                let mut m = vec![0f32; d];
                for &i in dims.iter().filter(|&&i| i < d) {
                    m[i] = 1.0;
                }
                excess.broadcast_mul(&Tensor::from_vec(m, d, h.device())?.to_dtype(h.dtype())?)?
            }
            MaTarget::Ratio(ratio) => excess.mul(&ratio_mask(&h, *ratio)?.to_dtype(h.dtype())?)?,
        };
        let p = (masked.sum_all()? / (b as f64 * threshold * threshold))?;
        total = Some(match total {
            Some(t) => (t + p)?,
            None => p,
        });
    }
    match total {
        Some(t) => t / hidden.len() as f64,
        None => candle_core::bail!("suppression term over no layers"),
    }
}

/// 1 where |h| >= ratio * median(|h|) of that sample, else 0; a constant (no gradient).
fn ratio_mask(h: &Tensor, ratio: f64) -> CResult<Tensor> {
    let (b, t, d) = h.dims3()?;
    let vals: Vec<f32> = h.abs()?.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
    let mut mask = vec![0f32; vals.len()];
    for s in 0..b {
        let chunk = &vals[s * t * d..(s + 1) * t * d];
        let median = crate::scan::upper_median(&mut chunk.to_vec());
        for (i, &v) in chunk.iter().enumerate() {
            if v as f64 >= ratio * median {
                mask[s * t * d + i] = 1.0;
            }
        }
    }
    Tensor::from_vec(mask, (b, t, d), h.device())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t3(v: Vec<f32>, shape: (usize, usize, usize)) -> Tensor {
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn penalty_matches_closed_form() {
        // One sample, two positions, three dims; tau = 10.
        let h = t3(vec![1.0, -30.0, 12.0, 500.0, 2.0, -9.0], (1, 2, 3));
        let all = ma_penalty(&[&h], 10.0, &MaTarget::All)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let expected = (20f32.powi(2) + 2f32.powi(2) + 490f32.powi(2)) / 100.0;
        assert!((all - expected).abs() < 1e-3 * expected);
        let dims = ma_penalty(&[&h], 10.0, &MaTarget::Dims(vec![0]))
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((dims - 490f32.powi(2) / 100.0).abs() < 1e-2);
        // median |h| = 12 (upper median of 6): ratio 20 keeps 500 only (>= 240).
        let ratio = ma_penalty(&[&h], 10.0, &MaTarget::Ratio(20.0))
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((ratio - 490f32.powi(2) / 100.0).abs() < 1e-2);
    }

    #[test]
    fn kl_is_zero_for_equal_logits_and_matches_closed_form() {
        let a = t3(vec![0.0, 1.0, 2.0, 3.0, 1.0, 0.0], (1, 2, 3));
        assert!(
            kl_to_teacher(&a, &a, 1.0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                .abs()
                < 1e-7
        );
        let s = t3(vec![0.0, 0.0, 0.0, 0.0, 0.0, 0.0], (1, 2, 3));
        // KL(p || uniform) = sum p ln p + ln 3, per position, averaged.
        let kl_pos = |l: [f64; 3]| {
            let z: f64 = l.iter().map(|x| x.exp()).sum();
            l.iter()
                .map(|x| x.exp() / z * ((x.exp() / z).ln() + 3f64.ln()))
                .sum::<f64>()
        };
        let expected = (kl_pos([0.0, 1.0, 2.0]) + kl_pos([3.0, 1.0, 0.0])) / 2.0;
        let got = kl_to_teacher(&s, &a, 1.0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        assert!((got - expected).abs() < 1e-6, "{got} vs {expected}");
    }
}
