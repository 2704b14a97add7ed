//! `eabfit quant` on tiny checkpoints: the float setting is `eabfit ppl` exactly, weights are
//! merged then rounded per output channel as the closed form says, and a planted massive
//! activation ruins per-tensor A8 while the same model with a slot that took over does not.

mod common;

use candle_core::{DType, Device, IndexOp, Tensor};
use common::{bin, json, planted, row, PLANT_DIM};
use eabfit::adapters::{Adapters, EabSlot, Lora};
use eabfit::checkpoint::{Base, Checkpoint};
use eabfit::data::Windows;
use eabfit::loss::kl_to_teacher;
use eabfit::model::ActHook;
use eabfit::model::{LinearInput, Taps};
use eabfit::quant::{quantized_model, ActScale, FakeQuant, Setting, FLOAT_BITS};
use eabfit::quant_eval::Measured;
use std::collections::HashMap;
use std::process::Command;
use std::sync::Arc;

fn run(args: &[&str]) -> std::process::Output {
    Command::new(bin()).args(args).output().unwrap()
}
#[test]
fn float_setting_is_ppl_exactly_and_the_json_holds_the_fields() {
    let t = common::tiny(common::Arch::Llama, 61);
    let text = common::write_text(t.path(), "text.txt", 400, 3);
    let (text, spec) = (text.to_str().unwrap(), t.spec());
    let win = ["--seq-len", "16"];
    let ppl_json = t.path().join("ppl.json");
    let mut args = vec![
        "ppl",
        "--model",
        &spec,
        "--text",
        text,
        "--max-windows",
        "3",
    ];
    args.extend(win);
    args.extend(["--json", ppl_json.to_str().unwrap()]);
    let o = run(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ppl = json(&ppl_json)["ppl"].as_f64().unwrap();

    let q_json = t.path().join("q.json");
    let mut args = vec!["quant", "--model", &spec, "--text", text, "--num-seqs", "3"];
    args.extend(win);
    args.extend(["--w", "16", "--a", "16", "--kv", "16"]);
    args.extend(["--json", q_json.to_str().unwrap()]);
    let o = run(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v = json(&q_json);
    assert_eq!(v["float_ppl"].as_f64().unwrap(), ppl);
    assert_eq!(v["quant_ppl"].as_f64().unwrap(), ppl);
    assert_eq!(
        (v["w"].clone(), v["a"].clone(), v["kv"].clone()),
        (16.into(), 16.into(), 16.into())
    );
    assert_eq!(v["act_scale"], "tensor");
    let layers = v["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 3);
    assert_eq!(layers[0]["inputs"].as_array().unwrap().len(), 4);

    // A grid writes `rows`, a plot, and W8A8 differs from float.
    let grid_json = t.path().join("grid.json");
    let plot = t.path().join("gaps.png");
    let mut args = vec!["quant", "--model", &spec, "--text", text, "--num-seqs", "3"];
    args.extend(win);
    args.extend(["--grid", "w16a16,w8a8,w4a4:token"]);
    args.extend(["--json", grid_json.to_str().unwrap()]);
    args.extend(["--plot", plot.to_str().unwrap()]);
    let o = run(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rows = json(&grid_json)["rows"].as_array().unwrap().clone();
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0]["quant_ppl"].as_f64().unwrap(), ppl);
    assert_ne!(rows[1]["quant_ppl"].as_f64().unwrap(), ppl);
    assert_eq!(rows[2]["act_scale"], "token");
    assert_eq!(&std::fs::read(&plot).unwrap()[..8], b"\x89PNG\r\n\x1a\n");

    // Bad input: one line naming the flag, exit 2; a missing adapter names its file, exit 1.
    let o = run(&["quant", "--model", &spec, "--text", text, "--w", "1"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--w 1"));
    let o = run(&["quant", "--model", &spec, "--text", text, "--grid", "w8b8"]);
    assert_eq!(o.status.code(), Some(2));
    let missing = t.path().join("nope");
    let o = run(&[
        "quant",
        "--model",
        &spec,
        "--text",
        text,
        "--adapter",
        missing.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("nope/adapter_config.json"));
}

/// Round-to-nearest of each row by hand, in f64: the closed form of the weight definition.
fn rtn_rows(w: &[Vec<f32>], bits: u32) -> Vec<Vec<f64>> {
    let qmax = ((1u32 << (bits - 1)) - 1) as f64;
    w.iter()
        .map(|r| {
            let m = r.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
            let s = m / qmax;
            r.iter()
                .map(|&v| {
                    if s == 0.0 {
                        0.0
                    } else {
                        (v as f64 / s).round() * s
                    }
                })
                .collect()
        })
        .collect()
}

#[test]
fn weights_are_merged_with_lora_then_rounded_per_output_channel() {
    let t = common::tiny(common::Arch::Llama, 62);
    let ckpt = Checkpoint::open(&t.spec()).unwrap();
    let base = ckpt.base(DType::F32, &Device::Cpu).unwrap();
    let name = "model.layers.1.mlp.down_proj";
    let (d, f) = (32, 64);
    let a = Tensor::randn(0f32, 0.5, (2, f), &Device::Cpu).unwrap();
    let b = Tensor::randn(0f32, 0.5, (d, 2), &Device::Cpu).unwrap();
    let mut lora = HashMap::new();
    lora.insert(
        name.to_string(),
        Lora {
            a: a.clone(),
            b: b.clone(),
            scale: 2.0,
        },
    );
    let adapters = Adapters {
        lora,
        ..Adapters::none()
    };
    let model = quantized_model(&base, &adapters, 4).unwrap();
    let w: Vec<Vec<f32>> = base.tensors[&format!("{name}.weight")].to_vec2().unwrap();
    let ba: Vec<Vec<f32>> = b.matmul(&a).unwrap().to_vec2().unwrap();
    let merged: Vec<Vec<f32>> = w
        .iter()
        .zip(&ba)
        .map(|(r, s)| r.iter().zip(s).map(|(x, y)| x + 2.0 * y).collect())
        .collect();
    let want = rtn_rows(&merged, 4);
    let got: Vec<Vec<f32>> = model.layer_mlp_down(1).weight().to_vec2().unwrap();
    for (gr, wr) in got.iter().zip(&want) {
        for (g, w) in gr.iter().zip(wr) {
            assert!((*g as f64 - w).abs() < 1e-5, "{g} vs {w}");
        }
        // At most 2^4 - 1 distinct levels per row.
        let mut levels: Vec<i64> = gr.iter().map(|g| (g * 1e5).round() as i64).collect();
        levels.sort_unstable();
        levels.dedup();
        assert!(levels.len() <= 15, "{}", levels.len());
    }
    // Untouched by LoRA, layer 0's weight is rounded as it is.
    let w0: Vec<Vec<f32>> = base.tensors["model.layers.0.mlp.down_proj.weight"]
        .to_vec2()
        .unwrap();
    let got0: Vec<Vec<f32>> = model.layer_mlp_down(0).weight().to_vec2().unwrap();
    for (gr, wr) in got0.iter().zip(rtn_rows(&w0, 4)) {
        for (g, w) in gr.iter().zip(wr) {
            assert!((*g as f64 - w).abs() < 1e-5);
        }
    }
}

/// The planted model plus adapters under which a slot does the planted BOS's job: the slot
/// holds BOS's own post-RoPE key and value in every layer, position 0 is hidden, and a LoRA on
/// layer 1's up_proj silences the MLP unit that wrote the massive activation. Every query
/// after BOS then computes exactly what it computed before; BOS is no longer massive.
fn took_over(base: &Base) -> Adapters {
    let model = base.model(&Adapters::none()).unwrap();
    let out = model
        .forward(
            &row(&[1, 5, 9]),
            &Taps {
                first_kv: true,
                ..Default::default()
            },
        )
        .unwrap();
    let slots = out
        .first_kv
        .iter()
        .map(|(k, v)| {
            Some(EabSlot {
                k: k.i(0).unwrap(),
                v: v.i(0).unwrap(),
            })
        })
        .collect();
    // B A = -e_0 W[0, :] zeroes row 0 of layer 1's up_proj: the planted unit stays silent.
    let w = &base.tensors["model.layers.1.mlp.up_proj.weight"];
    let (f, d) = w.dims2().unwrap();
    let mut e0 = vec![0f32; f];
    e0[0] = -1.0;
    let mut lora = HashMap::new();
    lora.insert(
        "model.layers.1.mlp.up_proj".to_string(),
        Lora {
            a: w.narrow(0, 0, 1).unwrap().reshape((1, d)).unwrap(),
            b: Tensor::from_vec(e0, (f, 1), &Device::Cpu).unwrap(),
            scale: 1.0,
        },
    );
    Adapters {
        slots,
        lora,
        mask_first_token: true,
    }
}

/// Real birth units fire far above their neighbours (SmolLM2's layer-11 down_proj input:
/// 2,937 against a median of 0.06); the fixture's writes its ~19,000 through a large weight
/// instead. Scaling the unit's gate and up rows by `k` and its down column by 1 / k^2 keeps
/// the planted value (silu(x) ~ x that far out) and makes the unit's own activation k^2 larger.
fn sharpen(base: &mut Base, k: f64) {
    let mut scale = |name: &str, rows: bool, by: f64| {
        let w = base.tensors[name].clone();
        let (r, c) = w.dims2().unwrap();
        let mut m = vec![1f32; r * c];
        for i in 0..r {
            for j in 0..c {
                if (rows && i == 0) || (!rows && j == 0) {
                    m[i * c + j] = by as f32;
                }
            }
        }
        let m = Tensor::from_vec(m, (r, c), &Device::Cpu).unwrap();
        base.tensors.insert(name.to_string(), (w * m).unwrap());
    };
    scale("model.layers.1.mlp.gate_proj.weight", true, k);
    scale("model.layers.1.mlp.up_proj.weight", true, k);
    scale("model.layers.1.mlp.down_proj.weight", false, 1.0 / (k * k));
}

#[test]
fn planted_massive_activation_ruins_per_tensor_a8_and_a_slot_that_took_over_does_not() {
    let t = planted(63);
    let ckpt = Checkpoint::open(&t.spec()).unwrap();
    let mut base = ckpt.base(DType::F32, &Device::Cpu).unwrap();
    sharpen(&mut base, 4.0);
    let path = common::write_text(t.path(), "text.txt", 600, 4);
    let text = std::fs::read_to_string(&path).unwrap();
    let windows = Windows::new(&ckpt.tokenizer, &text, 24, Some(6), &path).unwrap();
    let adapters = took_over(&base);
    let a8 = |act_scale| Setting {
        w: FLOAT_BITS,
        a: 8,
        kv: FLOAT_BITS,
        act_scale,
    };

    let planted_m = Measured::new(&base, &Adapters::none(), &windows).unwrap();
    let took_m = Measured::new(&base, &adapters, &windows).unwrap();
    // The slot reproduces every later position; only BOS's own prediction may move.
    let rel = took_m.float_ppl / planted_m.float_ppl - 1.0;
    assert!(
        rel.abs() < 0.05,
        "float ppl {} vs {}",
        took_m.float_ppl,
        planted_m.float_ppl
    );
    // The outlier sits in layer 1's down_proj input at BOS, and is gone after the take-over.
    let down1 = |m: &Measured| {
        m.layers[1]
            .inputs
            .iter()
            .find(|i| i.input == LinearInput::Down)
            .unwrap()
            .clone()
    };
    let (p, k) = (down1(&planted_m), down1(&took_m));
    assert_eq!(p.max_at[0], 0, "at BOS");
    assert_eq!(p.max_at[1], 0, "the planted MLP unit");
    assert!(
        p.max_abs > 3.0 * k.max_abs,
        "{} vs {}",
        p.max_abs,
        k.max_abs
    );
    // The planted value itself is still massive.
    let h = base
        .model(&Adapters::none())
        .unwrap()
        .forward(
            &row(&windows.ids[0]),
            &Taps {
                hidden: true,
                ..Default::default()
            },
        )
        .unwrap()
        .hidden;
    let v = h[1]
        .i((0, 0, PLANT_DIM))
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(v.abs() > 5000.0, "{v}");

    // A random model predicts nearly uniformly (ppl ~ vocab), so perplexity barely moves
    // whatever the noise; the divergence of the quantized model from the float one shows it.
    let kl = |adapters: &Adapters, s: Setting| {
        let float = base.model(adapters).unwrap();
        let quant = quantized_model(&base, adapters, s.w).unwrap();
        let taps = Taps {
            hook: FakeQuant::of(&s).map(|h| Arc::new(h) as Arc<dyn ActHook>),
            ..Default::default()
        };
        let mut total = 0f64;
        for w in &windows.ids {
            let ids = row(w);
            let lf = float.logits(&ids).unwrap();
            let lq = quant.forward(&ids, &taps).unwrap().logits;
            // Position 0's prediction differs by construction (BOS is hidden); score the rest.
            let t = w.len() - 1;
            let k = kl_to_teacher(
                &lq.narrow(1, 1, t).unwrap(),
                &lf.narrow(1, 1, t).unwrap(),
                1.0,
            );
            total += k.unwrap().to_scalar::<f32>().unwrap() as f64;
        }
        total / windows.len() as f64
    };
    let k_planted = kl(&Adapters::none(), a8(ActScale::Tensor));
    let k_took = kl(&adapters, a8(ActScale::Tensor));
    let k_token = kl(&Adapters::none(), a8(ActScale::Token));
    eprintln!("KL(float || A8): per tensor planted {k_planted:.3e}, took over {k_took:.3e}; per token planted {k_token:.3e}");
    assert!(
        k_planted > 0.05,
        "per-tensor A8 should wreck the planted model: {k_planted}"
    );
    assert!(k_planted > 20.0 * k_took, "{k_planted} vs {k_took}");
    // Per-token scales isolate the one outlier token: the planted model quantizes fine too.
    assert!(k_planted > 20.0 * k_token, "{k_planted} vs {k_token}");
}
