//! Every op of `eabfit::ops` on CUDA against the CPU: forward and the gradient of every input,
//! f32 within 1e-4 relative, bf16 within 3% (the fused attention kernel among them); the head
//! split/merge kernels, forward only, within 1%. Built only with `--features cuda`; needs a CUDA
//! device 0 (run on the GPU machine through `scripts/gpu.sh test`).
#![cfg(feature = "cuda")]

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::gpu;
use rand::{rngs::StdRng, Rng, SeedableRng};

/// Random uniform(-1, 1) tensor on the CPU.
fn rnd(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Runs `f` on copies of `inputs` (as Vars of `dtype`) on `dev`; returns the output and the
/// gradient of every input under the loss sum(out * r), all on the CPU in f32.
fn run_op(
    inputs: &[Tensor],
    dev: &Device,
    dtype: DType,
    f: &dyn Fn(&[Tensor]) -> Tensor,
) -> (Tensor, Vec<Tensor>) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(&t.to_dtype(dtype).unwrap().to_device(dev).unwrap()).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = f(&ts);
    let r = rnd(out.dims(), 99)
        .to_dtype(out.dtype())
        .unwrap()
        .to_device(dev)
        .unwrap();
    let g = (&out * r).unwrap().sum_all().unwrap().backward().unwrap();
    let back = |t: &Tensor| {
        t.to_device(&Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    };
    let grads = ts
        .iter()
        .map(|t| back(g.get(t).expect("gradient")))
        .collect();
    (back(&out), grads)
}

fn compare_op(name: &str, inputs: &[Tensor], f: &dyn Fn(&[Tensor]) -> Tensor) {
    let dev = gpu();
    let (oc, gc) = run_op(inputs, &Device::Cpu, DType::F32, f);
    for (dtype, tol) in [(DType::F32, 1e-4), (DType::BF16, 3e-2)] {
        let (og, gg) = run_op(inputs, &dev, dtype, f);
        let rel =
            |a: &Tensor, b: &Tensor| common::max_abs_diff(a, b) / common::max_abs(b).max(1e-6);
        let e = rel(&og, &oc);
        eprintln!("{name} {dtype:?}: output rel {e:.2e}");
        assert!(e < tol, "{name} {dtype:?}: output rel {e}");
        for (i, (a, b)) in gg.iter().zip(&gc).enumerate() {
            let e = rel(a, b);
            eprintln!("{name} {dtype:?}: input {i} gradient rel {e:.2e}");
            assert!(
                e < tol * 2.0,
                "{name} {dtype:?}: input {i} gradient rel {e}"
            );
        }
    }
}

/// The fused bf16 kernel of `ops::attention` (head_dim 64 and 128) against the f32 CPU
/// composite: several 64-query and 64-key tiles, T not a multiple of them, T = 1, queries after
/// cached positions (`past`), slot on and off, GQA, window, hidden first token.
#[test]
fn fused_attention_matches_cpu() {
    use eabfit::ops::attention::{attention, mask, Spec};
    let cases = [
        // (b, h, kv, t, past, hd, slots, window, hide_first)
        (2, 4, 2, 150, 0, 128, 1, None, false),
        (1, 8, 2, 200, 0, 64, 1, None, true),
        (1, 4, 4, 129, 0, 128, 0, None, false),
        (2, 6, 3, 97, 0, 64, 1, Some(40), false),
        (1, 4, 1, 1, 0, 128, 1, None, false),
        (1, 4, 2, 3, 70, 128, 1, None, false),
        (1, 4, 2, 70, 5, 64, 0, Some(16), false),
    ];
    for (b, h, kv, t, past, hd, slots, window, hide_first) in cases {
        let s = slots + past + t;
        let spec = Spec {
            slots,
            window,
            hide_first,
            block: 0,
        };
        let f = move |x: &[Tensor]| {
            let m = mask(t, s, &spec, x[0].dtype(), x[0].device()).unwrap();
            attention(&x[0], &x[1], &x[2], &m, false).unwrap().0
        };
        let inputs = [
            rnd(&[b, h, t, hd], 21),
            rnd(&[b, kv, s, hd], 22),
            rnd(&[b, kv, s, hd], 23),
        ];
        compare_op(
            &format!(
                "fused attention b {b} h {h}/{kv} t {t} past {past} hd {hd} slots {slots} window {window:?} hide {hide_first}"
            ),
            &inputs,
            &f,
        );
    }
}

#[test]
fn ops_on_cuda_match_cpu() {
    use eabfit::ops::attention::{attention, mask, Spec};
    use eabfit::ops::{ce, embedding, kl, linear, norm, rope};
    // attention: slot as key 0, GQA 8/2, window, first token hidden, 37 queries in blocks of 16
    let (b, h, kv, t, hd) = (2, 8, 2, 37, 64);
    for (slots, window, hide_first) in [(1, None, true), (1, Some(9), false), (0, Some(5), false)] {
        let s = t + slots;
        let spec = Spec {
            slots,
            window,
            hide_first,
            block: 16,
        };
        let f = move |x: &[Tensor]| {
            let m = mask(t, s, &spec, x[0].dtype(), x[0].device()).unwrap();
            attention(&x[0], &x[1], &x[2], &m, false).unwrap().0
        };
        let inputs = [
            rnd(&[b, h, t, hd], 1),
            rnd(&[b, kv, s, hd], 2),
            rnd(&[b, kv, s, hd], 3),
        ];
        compare_op(
            &format!("attention slots {slots} window {window:?} hide {hide_first}"),
            &inputs,
            &f,
        );
    }
    compare_op("rms_norm", &[rnd(&[3, 5, 96], 4), rnd(&[96], 5)], &|x| {
        norm::rms_norm(&x[0], &x[1], 1e-5).unwrap()
    });
    let ang = rnd(&[t, hd / 2], 6);
    compare_op("rope", &[rnd(&[b, h, t, hd], 7)], &move |x| {
        let dt = x[0].dtype();
        let dev = x[0].device();
        let c = ang
            .cos()
            .unwrap()
            .to_dtype(dt)
            .unwrap()
            .to_device(dev)
            .unwrap();
        let sn = ang
            .sin()
            .unwrap()
            .to_dtype(dt)
            .unwrap()
            .to_device(dev)
            .unwrap();
        rope::rope(&x[0], &c, &sn).unwrap()
    });
    compare_op("linear", &[rnd(&[40, 96], 8)], &|x| {
        let w = rnd(&[24, 96], 9)
            .to_dtype(x[0].dtype())
            .unwrap()
            .to_device(x[0].device())
            .unwrap();
        linear::linear(&x[0], &w).unwrap()
    });
    compare_op("kl", &[rnd(&[2, 9, 32], 10)], &|x| {
        let dev = x[0].device();
        let dt = x[0].dtype();
        let ht = rnd(&[2, 9, 32], 11)
            .to_dtype(dt)
            .unwrap()
            .to_device(dev)
            .unwrap();
        let w = (rnd(&[300, 32], 12) * 3.0)
            .unwrap()
            .to_dtype(dt)
            .unwrap()
            .to_device(dev)
            .unwrap();
        kl::kl_chunked(&x[0], &ht, &w, 1.0, 5)
            .unwrap()
            .unsqueeze(0)
            .unwrap()
    });
    // Token ids drawn so that some repeat many times (the embedding's atomics) and the
    // cross-entropy's targets cover the vocabulary.
    let tok = |n: usize, vocab: u32, dev: &Device| {
        let v: Vec<u32> = (0..n as u32)
            .map(|i| (i * i * 7 + 3) % vocab % 97)
            .collect();
        Tensor::from_vec(v, n, dev).unwrap()
    };
    compare_op(
        "cross-entropy through the head",
        &[rnd(&[2, 40, 32], 13), (rnd(&[300, 32], 14) * 3.0).unwrap()],
        &move |x| {
            let ids = tok(80, 300, x[0].device()).reshape((2, 40)).unwrap();
            ce::ce_chunked(&x[0], &x[1], &ids, 7)
                .unwrap()
                .unsqueeze(0)
                .unwrap()
        },
    );
    compare_op("embedding", &[rnd(&[300, 32], 15)], &move |x| {
        let ids = tok(400, 300, x[0].device()).reshape((4, 100)).unwrap();
        embedding::embed(&x[0], &ids).unwrap()
    });
}

/// `ops::heads` on CUDA bf16 (its kernels) against the CPU f32 composite (reshape, transpose,
/// candle's RoPE, cat): split with and without RoPE and slot, merge with and without both,
/// and Qwen's steps before RoPE (a bias; a per-head RMSNorm, with merge running its backward),
/// head_dim 64 and 128, T odd; bf16 within 1% relative.
#[test]
fn heads_kernels_match_the_composite() {
    use eabfit::ops::heads::{merge, split, Pre};
    let dev = gpu();
    for (b, t, n, hd) in [(2, 37, 3, 64), (1, 130, 2, 128)] {
        let x = rnd(&[b * t, n * hd], 1);
        let g = rnd(&[b, n, t + 1, hd], 2);
        let slot = rnd(&[n, hd], 3);
        let ang = (rnd(&[t, hd / 2], 4) * 3.0).unwrap();
        let (cos, sin) = (ang.cos().unwrap(), ang.sin().unwrap());
        let bias = rnd(&[n * hd], 5);
        let nw = rnd(&[hd], 6).affine(0.3, 1.0).unwrap();
        let on = |x: &Tensor| x.to_dtype(DType::BF16).unwrap().to_device(&dev).unwrap();
        let (xg, gg, sg, cg, ng) = (on(&x), on(&g), on(&slot), on(&cos), on(&sin));
        let (bg, nwg) = (on(&bias), on(&nw));
        let check = |what: &str, gpu: Tensor, cpu: Tensor| {
            assert_eq!(gpu.dims(), cpu.dims(), "{what}");
            let gpu = gpu
                .to_device(&Device::Cpu)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            let e = common::max_abs_diff(&gpu, &cpu) / common::max_abs(&cpu);
            eprintln!("heads hd {hd} {what}: rel {e:.2e}");
            assert!(e < 1e-2, "heads hd {hd} {what}: rel {e}");
        };
        for (rope, with_slot) in [(false, false), (true, false), (true, true), (false, true)] {
            let r_cpu = rope.then_some((&cos, &sin));
            let r_gpu = rope.then_some((&cg, &ng));
            for (with_bias, normed) in [(false, false), (true, false), (false, true), (true, true)]
            {
                let what =
                    format!("split rope {rope} slot {with_slot} bias {with_bias} norm {normed}");
                let pre_cpu = Pre {
                    bias: with_bias.then_some(&bias),
                    norm: normed.then_some((&nw, 1e-6)),
                };
                let pre_gpu = Pre {
                    bias: with_bias.then_some(&bg),
                    norm: normed.then_some((&nwg, 1e-6)),
                };
                check(
                    &what,
                    split(&xg, b, n, r_gpu, with_slot.then_some(&sg), pre_gpu).unwrap(),
                    split(&x, b, n, r_cpu, with_slot.then_some(&slot), pre_cpu).unwrap(),
                );
            }
            let slots = with_slot as usize;
            let gs = g.narrow(2, 1 - slots, t + slots).unwrap();
            let gsg = gg
                .narrow(2, 1 - slots, t + slots)
                .unwrap()
                .contiguous()
                .unwrap();
            check(
                &format!("merge rope {rope} slots {slots}"),
                merge(&gsg, slots, r_gpu, None).unwrap(),
                merge(&gs, slots, r_cpu, None).unwrap(),
            );
            // The norm's backward reads the pre-norm rows: x with its bias, as the block op keeps them.
            let u = x.broadcast_add(&bias).unwrap();
            check(
                &format!("merge rope {rope} slots {slots} norm"),
                merge(&gsg, slots, r_gpu, Some((&on(&u), &nwg, 1e-6))).unwrap(),
                merge(&gs, slots, r_cpu, Some((&u, &nw, 1e-6))).unwrap(),
            );
        }
    }
}
