//! Every custom op of `eabfit::ops` against the composite candle computation it replaces:
//! forward values and the gradient of every input, on random inputs. f64 cases are held to
//! 1e-9 relative, f32 to 1e-4, bf16 forwards to 3% of the largest output.

mod common;

use candle_core::{DType, Device, Tensor, Var, D};
use eabfit::ops::attention::{attention, mask, Spec};
use eabfit::ops::{kl, norm, rope};

fn randn(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// max |a - b| / max(max |b|, 1e-6): relative, absolute for gradients that are zero in exact
/// arithmetic (one visible key).
fn rel(a: &Tensor, b: &Tensor) -> f64 {
    common::max_abs_diff(a, b) / common::max_abs(b).max(1e-6)
}

/// The composite attention eabfit used before the op: repeated K/V, (B, H, T, T) scores plus
/// the slot's column, an additive mask, a differentiable softmax. q (B, H, T, hd), k, v
/// (B, KV, T, hd), slot (KV, hd) each -> (B, T, H, hd).
fn reference_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    slot: Option<(&Tensor, &Tensor)>,
    window: Option<usize>,
    hide_first: bool,
) -> Tensor {
    let (b, h, t, hd) = q.dims4().unwrap();
    let kv = k.dim(1).unwrap();
    let rep = h / kv;
    let repeat = |x: &Tensor| {
        x.unsqueeze(2)
            .unwrap()
            .expand((b, kv, rep, t, hd))
            .unwrap()
            .reshape((b, h, t, hd))
            .unwrap()
    };
    let (k, v) = (repeat(k), repeat(v));
    let scale = 1.0 / (hd as f64).sqrt();
    let w = window.unwrap_or(usize::MAX);
    let m: Vec<f64> = (0..t)
        .flat_map(|i| {
            (0..t).map(move |j| {
                if j > i || i - j >= w || (hide_first && j == 0) {
                    f64::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    let m = Tensor::from_vec(m, (t, t), &Device::Cpu)
        .unwrap()
        .to_dtype(q.dtype())
        .unwrap();
    let mut scores = (q.matmul(&k.t().unwrap()).unwrap() * scale)
        .unwrap()
        .broadcast_add(&m)
        .unwrap();
    let slot_heads = |x: &Tensor| {
        x.unsqueeze(1)
            .unwrap()
            .expand((kv, rep, hd))
            .unwrap()
            .reshape((h, hd))
            .unwrap()
    };
    if let Some((ks, _)) = slot {
        let ks = slot_heads(ks).unsqueeze(0).unwrap().unsqueeze(3).unwrap(); // (1, H, hd, 1)
        let s = (q.broadcast_matmul(&ks).unwrap() * scale).unwrap();
        scores = Tensor::cat(&[&scores, &s], D::Minus1).unwrap();
    }
    let p = candle_nn::ops::softmax(&scores, D::Minus1).unwrap();
    let mut out = p
        .narrow(D::Minus1, 0, t)
        .unwrap()
        .contiguous()
        .unwrap()
        .matmul(&v)
        .unwrap();
    if let Some((_, vs)) = slot {
        let vs = slot_heads(vs).unsqueeze(0).unwrap().unsqueeze(2).unwrap(); // (1, H, 1, hd)
        out = (out
            + p.narrow(D::Minus1, t, 1)
                .unwrap()
                .broadcast_mul(&vs)
                .unwrap())
        .unwrap();
    }
    out.transpose(1, 2).unwrap().contiguous().unwrap()
}

#[derive(Debug, Clone, Copy)]
struct Case {
    b: usize,
    h: usize,
    kv: usize,
    t: usize,
    hd: usize,
    slot: bool,
    window: Option<usize>,
    hide_first: bool,
    block: usize,
}

/// The op (slot as key 0 of K/V) against the reference: output and the gradients of q, k, v
/// and the slot's k', v' under the loss sum(out * R).
fn check_attention(c: Case, dtype: DType, tol: f64) {
    let shape_q = [c.b, c.h, c.t, c.hd];
    let shape_k = [c.b, c.kv, c.t, c.hd];
    let vars: Vec<Var> = [
        randn(&shape_q, 1, dtype),
        randn(&shape_k, 2, dtype),
        randn(&shape_k, 3, dtype),
        (randn(&[c.kv, c.hd], 4, dtype) * 2.0).unwrap(),
        randn(&[c.kv, c.hd], 5, dtype),
    ]
    .iter()
    .map(|t| Var::from_tensor(t).unwrap())
    .collect();
    let (q, k, v, ks, vs) = (
        vars[0].as_tensor(),
        vars[1].as_tensor(),
        vars[2].as_tensor(),
        vars[3].as_tensor(),
        vars[4].as_tensor(),
    );
    let r = randn(&[c.b, c.t, c.h, c.hd], 6, dtype);
    let spec = Spec {
        slots: c.slot as usize,
        window: c.window,
        hide_first: c.hide_first,
        block: c.block,
    };
    let (kf, vf) = if c.slot {
        let lead = |x: &Tensor| {
            x.unsqueeze(0)
                .unwrap()
                .unsqueeze(2)
                .unwrap()
                .broadcast_as((c.b, c.kv, 1, c.hd))
                .unwrap()
        };
        (
            Tensor::cat(&[&lead(ks), k], 2).unwrap(),
            Tensor::cat(&[&lead(vs), v], 2).unwrap(),
        )
    } else {
        (k.clone(), v.clone())
    };
    let m = mask(c.t, kf.dim(2).unwrap(), &spec, dtype, &Device::Cpu).unwrap();
    let (out, _) = attention(q, &kf, &vf, &m, false).unwrap();
    let slot = c.slot.then_some((ks, vs));
    let want = reference_attention(q, k, v, slot, c.window, c.hide_first);
    let e = rel(&out, &want);
    assert!(e < tol, "{c:?} {dtype:?}: output rel err {e}");
    let g = (out * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let g_ref = (want * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let names = ["q", "k", "v", "slot k", "slot v"];
    for (i, var) in vars.iter().enumerate() {
        if i >= 3 && !c.slot {
            continue;
        }
        let got = g.get(var.as_tensor()).expect("gradient");
        let exp = g_ref.get(var.as_tensor()).expect("reference gradient");
        let e = rel(got, exp);
        assert!(e < tol, "{c:?} {dtype:?}: d{} rel err {e}", names[i]);
    }
}

const BASE: Case = Case {
    b: 2,
    h: 4,
    kv: 2,
    t: 7,
    hd: 8,
    slot: true,
    window: None,
    hide_first: false,
    block: 3,
};

#[test]
fn attention_matches_the_composite_in_f64() {
    let cases = [
        BASE,
        Case {
            slot: false,
            ..BASE
        },
        Case {
            hide_first: true,
            ..BASE
        },
        Case {
            window: Some(3),
            ..BASE
        },
        Case {
            window: Some(3),
            hide_first: true,
            ..BASE
        },
        Case {
            window: Some(2),
            slot: false,
            ..BASE
        },
        Case { kv: 4, ..BASE },
        Case {
            kv: 1,
            t: 16,
            block: 5,
            ..BASE
        },
        Case {
            t: 1,
            block: 0,
            ..BASE
        },
        Case {
            t: 1,
            slot: false,
            block: 0,
            ..BASE
        },
        Case {
            t: 13,
            block: 0,
            ..BASE
        },
        Case {
            t: 9,
            block: 4,
            hide_first: true,
            ..BASE
        },
    ];
    for c in cases {
        check_attention(c, DType::F64, 1e-9);
    }
}

#[test]
fn attention_matches_the_composite_in_f32() {
    for c in [
        BASE,
        Case {
            window: Some(4),
            hide_first: true,
            t: 11,
            ..BASE
        },
    ] {
        check_attention(c, DType::F32, 1e-4);
    }
}

/// bf16 inputs: the op's output against the f64 reference on the same (rounded) inputs.
#[test]
fn attention_in_bf16_stays_within_bf16_rounding() {
    let c = Case {
        t: 21,
        block: 8,
        ..BASE
    };
    let q = randn(&[c.b, c.h, c.t, c.hd], 1, DType::BF16);
    let k = randn(&[c.b, c.kv, c.t, c.hd], 2, DType::BF16);
    let v = randn(&[c.b, c.kv, c.t, c.hd], 3, DType::BF16);
    let spec = Spec {
        slots: 0,
        window: None,
        hide_first: false,
        block: c.block,
    };
    let m = mask(c.t, c.t, &spec, DType::BF16, &Device::Cpu).unwrap();
    let (out, _) = attention(&q, &k, &v, &m, false).unwrap();
    let f = |x: &Tensor| x.to_dtype(DType::F64).unwrap();
    let want = reference_attention(&f(&q), &f(&k), &f(&v), None, None, false);
    let e = rel(&out, &want);
    assert!(e < 3e-2, "bf16 output rel err {e}");
}

/// The op's attention stats against the reference probabilities: the mean over batch, heads
/// and queries 1..T of the mass on token 0 and on the slot.
#[test]
fn attention_stats_match_the_probabilities() {
    let c = Case {
        t: 10,
        block: 4,
        ..BASE
    };
    let q = randn(&[c.b, c.h, c.t, c.hd], 1, DType::F64);
    let k = randn(&[c.b, c.kv, c.t + 1, c.hd], 2, DType::F64);
    let v = randn(&[c.b, c.kv, c.t + 1, c.hd], 3, DType::F64);
    let spec = Spec {
        slots: 1,
        window: Some(6),
        hide_first: false,
        block: c.block,
    };
    let m = mask(c.t, c.t + 1, &spec, DType::F64, &Device::Cpu).unwrap();
    let (_, st) = attention(&q, &k, &v, &m, true).unwrap();
    let st = st.expect("stats");
    // Reference: full (B, H, T, T+1) probabilities with repeated K.
    let rep = c.h / c.kv;
    let kr = k
        .unsqueeze(2)
        .unwrap()
        .expand((c.b, c.kv, rep, c.t + 1, c.hd))
        .unwrap()
        .reshape((c.b, c.h, c.t + 1, c.hd))
        .unwrap();
    let s = ((q.matmul(&kr.t().unwrap()).unwrap() / (c.hd as f64).sqrt()).unwrap())
        .broadcast_add(m.dense().unwrap())
        .unwrap();
    let p = candle_nn::ops::softmax(&s, D::Minus1).unwrap();
    let mean_col = |col: usize| -> f64 {
        p.narrow(2, 1, c.t - 1)
            .unwrap()
            .narrow(3, col, 1)
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let got = |t: &Tensor| t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
    let (first, slot) = (mean_col(1), mean_col(0));
    assert!(
        (got(&st.first_token) - first).abs() < 1e-6,
        "first token {first}"
    );
    assert!(
        (got(st.slot.as_ref().unwrap()) - slot).abs() < 1e-6,
        "slot {slot}"
    );
    assert!(first > 0.0 && slot > 0.0);
}

/// Queries that are the last rows of a longer key sequence (a KV cache): the mask aligns them
/// bottom-right, so each row equals the same row of the full square computation.
#[test]
fn attention_over_a_cache_equals_the_last_rows_of_the_full_one() {
    let (b, h, kv, n, hd) = (1, 2, 1, 9, 4);
    let q = randn(&[b, h, n, hd], 1, DType::F64);
    let k = randn(&[b, kv, n + 1, hd], 2, DType::F64);
    let v = randn(&[b, kv, n + 1, hd], 3, DType::F64);
    let spec = Spec {
        slots: 1,
        window: Some(4),
        hide_first: true,
        block: 0,
    };
    let full_mask = mask(n, n + 1, &spec, DType::F64, &Device::Cpu).unwrap();
    let (full, _) = attention(&q, &k, &v, &full_mask, false).unwrap();
    let tail = 3;
    let qt = q.narrow(2, n - tail, tail).unwrap();
    let tail_mask = mask(tail, n + 1, &spec, DType::F64, &Device::Cpu).unwrap();
    let (part, _) = attention(&qt, &k, &v, &tail_mask, false).unwrap();
    let e = rel(&part, &full.narrow(1, n - tail, tail).unwrap());
    assert!(e < 1e-12, "cached rows differ: {e}");
}

#[test]
fn rms_norm_matches_the_composite() {
    let x = Var::from_tensor(&(randn(&[2, 5, 6], 1, DType::F64) * 3.0).unwrap()).unwrap();
    let w = Var::from_tensor(&randn(&[6], 2, DType::F64)).unwrap();
    let r = randn(&[2, 5, 6], 3, DType::F64);
    let eps = 1e-5;
    let y = norm::rms_norm(x.as_tensor(), w.as_tensor(), eps).unwrap();
    let xs = x.as_tensor();
    let inv = (xs.sqr().unwrap().mean_keepdim(D::Minus1).unwrap() + eps)
        .unwrap()
        .sqrt()
        .unwrap()
        .recip()
        .unwrap();
    let want = xs
        .broadcast_mul(&inv)
        .unwrap()
        .broadcast_mul(w.as_tensor())
        .unwrap();
    assert!(rel(&y, &want) < 1e-12);
    let g = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let g_ref = (want * &r).unwrap().sum_all().unwrap().backward().unwrap();
    for (name, var) in [("x", &x), ("w", &w)] {
        let e = rel(
            g.get(var.as_tensor()).unwrap(),
            g_ref.get(var.as_tensor()).unwrap(),
        );
        assert!(e < 1e-10, "d{name} rel err {e}");
    }
    // f32 forward through candle's fused kernel.
    let x32 = x.as_tensor().to_dtype(DType::F32).unwrap();
    let y32 = norm::rms_norm(&x32, &w.as_tensor().to_dtype(DType::F32).unwrap(), eps).unwrap();
    let yref = norm::rms_norm(x.as_tensor(), w.as_tensor(), eps).unwrap();
    assert!(rel(&y32, &yref) < 1e-5);
}

#[test]
fn rope_matches_rotate_half_and_its_gradient() {
    for dtype in [DType::F64, DType::F32] {
        let (b, h, t, hd) = (2, 3, 5, 8);
        let x = Var::from_tensor(&randn(&[b, h, t, hd], 1, dtype)).unwrap();
        let ang: Vec<f64> = (0..t)
            .flat_map(|p| (0..hd / 2).map(move |i| p as f64 * 0.3f64.powi(i as i32)))
            .collect();
        let ang = Tensor::from_vec(ang, (t, hd / 2), &Device::Cpu).unwrap();
        let (cos, sin) = (
            ang.cos().unwrap().to_dtype(dtype).unwrap(),
            ang.sin().unwrap().to_dtype(dtype).unwrap(),
        );
        let y = rope::rope(x.as_tensor(), &cos, &sin).unwrap();
        let full = |c: &Tensor| Tensor::cat(&[c, c], D::Minus1).unwrap(); // (T, hd)
        let xs = x.as_tensor();
        let x1 = xs.narrow(D::Minus1, 0, hd / 2).unwrap();
        let x2 = xs.narrow(D::Minus1, hd / 2, hd / 2).unwrap();
        let rot = Tensor::cat(&[&x2.neg().unwrap(), &x1], D::Minus1).unwrap();
        let want = (xs.broadcast_mul(&full(&cos)).unwrap()
            + rot.broadcast_mul(&full(&sin)).unwrap())
        .unwrap();
        let tol = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
        assert!(rel(&y, &want) < tol, "{dtype:?} forward");
        let r = randn(&[b, h, t, hd], 2, dtype);
        let g = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let g_ref = (want * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let e = rel(g.get(xs).unwrap(), g_ref.get(xs).unwrap());
        assert!(e < tol, "{dtype:?} gradient rel err {e}");
    }
}

/// The chunked KL through the head against eabfit's full-logits KL (`loss::kl_to_teacher`):
/// value and student-hidden gradient, one chunk and several (uneven) chunks, two temperatures.
#[test]
fn chunked_kl_matches_the_full_logits_kl() {
    let (b, t, d, vocab) = (2, 5, 6, 11);
    let hs = Var::from_tensor(&randn(&[b, t, d], 1, DType::F64)).unwrap();
    let ht = randn(&[b, t, d], 2, DType::F64);
    let w = (randn(&[vocab, d], 3, DType::F64) * 2.0).unwrap();
    for tau in [1.0, 2.0] {
        let logits = |h: &Tensor| h.broadcast_matmul(&w.t().unwrap()).unwrap();
        let want = eabfit::loss::kl_to_teacher(&logits(hs.as_tensor()), &logits(&ht), tau).unwrap();
        let g_ref = want.backward().unwrap();
        for rows in [100, 3, 1] {
            let got = kl::kl_chunked(hs.as_tensor(), &ht, &w, tau, rows).unwrap();
            let e = rel(&got, &want.to_dtype(DType::F64).unwrap());
            assert!(e < 1e-6, "tau {tau} rows {rows}: value rel err {e}");
            let g = got.backward().unwrap();
            let e = rel(
                g.get(hs.as_tensor()).unwrap(),
                g_ref.get(hs.as_tensor()).unwrap(),
            );
            assert!(e < 1e-5, "tau {tau} rows {rows}: gradient rel err {e}");
        }
    }
}

/// The chunked cross-entropy through a trained head against the plain one in f64 (the full
/// logits, candle's log-softmax, the next token picked by gather): value, and the gradients of
/// the hidden states and of the head (also under an upstream factor), one chunk and several
/// (uneven) chunks.
#[test]
fn chunked_cross_entropy_matches_the_full_logits_one() {
    use eabfit::ops::ce;
    let (b, t, d, vocab) = (2, 6, 5, 13);
    let x = Var::from_tensor(&randn(&[b, t, d], 4, DType::F64)).unwrap();
    let w = Var::from_tensor(&(randn(&[vocab, d], 5, DType::F64) * 2.0).unwrap()).unwrap();
    let ids: Vec<u32> = (0..b * t).map(|i| (i * 7 % vocab) as u32).collect();
    let ids = Tensor::from_vec(ids, (b, t), &Device::Cpu).unwrap();
    let logits = x
        .as_tensor()
        .broadcast_matmul(&w.as_tensor().t().unwrap())
        .unwrap();
    let logp =
        candle_nn::ops::log_softmax(&logits.narrow(1, 0, t - 1).unwrap(), D::Minus1).unwrap();
    let next = ids
        .narrow(1, 1, t - 1)
        .unwrap()
        .contiguous()
        .unwrap()
        .unsqueeze(2)
        .unwrap();
    let want = (logp
        .gather(&next, 2)
        .unwrap()
        .neg()
        .unwrap()
        .sum_all()
        .unwrap()
        / (b * (t - 1)) as f64)
        .unwrap();
    let g_ref = want.backward().unwrap();
    for rows in [100, 4, 1] {
        let got = ce::ce_chunked(x.as_tensor(), w.as_tensor(), &ids, rows).unwrap();
        let e = rel(&got, &want);
        assert!(e < 1e-12, "rows {rows}: value rel err {e}");
        let g = got.backward().unwrap();
        for (name, v) in [("hidden", &x), ("head", &w)] {
            let e = rel(
                g.get(v.as_tensor()).unwrap(),
                g_ref.get(v.as_tensor()).unwrap(),
            );
            assert!(e < 1e-12, "rows {rows}: {name} gradient rel err {e}");
        }
        // The op forms its gradient in the forward: an upstream factor must still reach it.
        let g3 = (got * 3.0).unwrap().backward().unwrap();
        for (name, v) in [("hidden", &x), ("head", &w)] {
            let want3 = (g_ref.get(v.as_tensor()).unwrap() * 3.0).unwrap();
            let e = rel(g3.get(v.as_tensor()).unwrap(), &want3);
            assert!(e < 1e-12, "rows {rows}: {name} gradient x3 rel err {e}");
        }
    }
}
