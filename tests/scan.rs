//! scan and intervene on a tiny model with one planted massive activation, the real SmolLM2
//! regression, and bad input.

mod common;

use candle_core::{DType, Device, IndexOp, Tensor};
use common::{bin, json, planted, PLANT_DIM};
use eabfit::adapters::Adapters;
use eabfit::checkpoint::Checkpoint;
use eabfit::model::{Edit, Taps};
use std::process::Command;

fn run(args: &[&str]) -> std::process::Output {
    Command::new(bin()).args(args).output().unwrap()
}
#[test]
fn scan_finds_exactly_the_planted_activation() {
    let t = planted(21);
    let text = common::write_text(t.path(), "text.txt", 200, 5);
    let out_json = t.path().join("scan.json");
    let plot = t.path().join("scan.svg");
    let out = run(&[
        "scan",
        "--model",
        &t.spec(),
        "--text",
        text.to_str().unwrap(),
        "--seq-len",
        "24",
        "--num-seqs",
        "5",
        "--json",
        out_json.to_str().unwrap(),
        "--plot",
        plot.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json(&out_json);
    assert_eq!(v["num_seqs"], 5);
    assert_eq!(v["first_massive_layer"], 1);
    assert_eq!(v["massive_dims"], serde_json::json!([PLANT_DIM]));
    // In every window the planted entry is layer 1's largest |h|: its dim, on the first token.
    assert_eq!(
        v["layers"][1]["top1_at"],
        serde_json::json!({"dim": PLANT_DIM, "dim_share": 1.0, "first": 1.0})
    );
    // The value the model computes at (layer 1, position 0 = BOS, planted dim).
    let ckpt = Checkpoint::open(&t.spec()).unwrap();
    let model = ckpt
        .load_model(DType::F32, &Device::Cpu, &Adapters::none())
        .unwrap();
    let ids = Tensor::new(&[1u32, 5, 9, 12][..], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let h = model
        .forward(
            &ids,
            &Taps {
                hidden: true,
                ..Default::default()
            },
        )
        .unwrap()
        .hidden;
    for layer in [1usize, 2] {
        let expected = h[layer]
            .i((0, 0, PLANT_DIM))
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        assert!(expected > 1000.0, "plant too weak: {expected}");
        let l = &v["layers"][layer];
        assert_eq!(l["massive_count"], 5, "one entry in each of 5 windows");
        let m = &l["massive"][0];
        assert_eq!(m["dim"], PLANT_DIM);
        assert_eq!(m["position"], 0);
        assert_eq!(m["token"], "<s>");
        assert!((m["mean"].as_f64().unwrap() - expected).abs() < 1e-3 * expected);
        assert!(
            m["cv"].as_f64().unwrap() < 1e-6,
            "BOS-only value must be input-invariant"
        );
        assert!((l["top"][0].as_f64().unwrap() - expected).abs() < 1e-3 * expected);
    }
    assert_eq!(v["layers"][0]["massive_count"], 0);
    assert!(std::fs::read_to_string(&plot).unwrap().contains("<svg"));
    // The overlay of two scans draws too.
    let overlay = t.path().join("overlay.png");
    let out = run(&[
        "plot",
        out_json.to_str().unwrap(),
        out_json.to_str().unwrap(),
        "--out",
        overlay.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(&std::fs::read(&overlay).unwrap()[..8], b"\x89PNG\r\n\x1a\n");
}

/// Perplexity computed in the test from the model's logits with an explicit edit, in f64.
fn direct_ppl(t: &common::Tiny, windows: &[Vec<u32>], value: Option<f32>) -> f64 {
    let ckpt = Checkpoint::open(&t.spec()).unwrap();
    let model = ckpt
        .load_model(DType::F32, &Device::Cpu, &Adapters::none())
        .unwrap();
    let (mut nll, mut n) = (0f64, 0usize);
    for w in windows {
        let edits = value
            .map(|v| {
                vec![Edit {
                    layer: 1,
                    position: 0,
                    dim: PLANT_DIM,
                    value: v,
                }]
            })
            .unwrap_or_default();
        let ids = Tensor::new(w.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits: Vec<Vec<f32>> = model
            .forward(
                &ids,
                &Taps {
                    edits,
                    ..Default::default()
                },
            )
            .unwrap()
            .logits
            .i(0)
            .unwrap()
            .to_vec2()
            .unwrap();
        for p in 0..w.len() - 1 {
            let l = &logits[p];
            let max = l.iter().cloned().fold(f32::MIN, f32::max) as f64;
            let lse = max + l.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
            nll += lse - l[w[p + 1] as usize] as f64;
            n += 1;
        }
    }
    (nll / n as f64).exp()
}

#[test]
fn intervene_matches_a_direct_computation() {
    let t = planted(22);
    let calib = common::write_text(t.path(), "calib.txt", 120, 6);
    let text = common::write_text(t.path(), "eval.txt", 120, 7);
    let out_json = t.path().join("int.json");
    let out = run(&[
        "intervene",
        "--model",
        &t.spec(),
        "--calib",
        calib.to_str().unwrap(),
        "--text",
        text.to_str().unwrap(),
        "--seq-len",
        "30",
        "--num-seqs",
        "3",
        "--json",
        out_json.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json(&out_json);
    assert_eq!(v["layer"], 1);
    assert_eq!(v["dims"], serde_json::json!([PLANT_DIM]));
    assert_eq!(v["edited_entries"], 3);
    let mean = v["means"][PLANT_DIM.to_string()].as_f64().unwrap();
    let words: Vec<u32> = common::text(120, 7)
        .split(' ')
        .map(|w| 3 + common::WORDS.iter().position(|x| *x == w).unwrap() as u32)
        .collect();
    let windows: Vec<Vec<u32>> = words
        .chunks_exact(30)
        .take(3)
        .map(|c| std::iter::once(1).chain(c.iter().copied()).collect())
        .collect();
    for (arm, value) in [
        ("original", None),
        ("zero", Some(0.0)),
        ("mean", Some(mean as f32)),
    ] {
        let expected = direct_ppl(&t, &windows, value);
        let got = v[arm]["ppl"].as_f64().unwrap();
        assert!(
            (got - expected).abs() < 1e-4 * expected,
            "{arm}: {got} vs {expected}"
        );
    }
    // Zeroing a BOS-only constant changes the outputs; its mean (= its value) does not.
    assert!(
        (v["mean"]["ppl"].as_f64().unwrap() - v["original"]["ppl"].as_f64().unwrap()).abs() < 1e-3
    );
    assert!(
        (v["zero"]["ppl"].as_f64().unwrap() - v["original"]["ppl"].as_f64().unwrap()).abs() > 1e-2
    );
}

/// Pins what the scan of the real SmolLM2-135M finds: massive activations born at layer 11 in
/// dims 247 and 507 on the first token (measured: ~23,600 and ~1,790 against a median of ~1.7).
#[test]
fn smollm2_massive_activations_regression() {
    let (gguf, text) = common::real_assets().expect("run scripts/fetch-assets.sh");
    let dir = tempfile::tempdir().unwrap();
    let out_json = dir.path().join("scan.json");
    let out = run(&[
        "scan",
        "--model",
        gguf.to_str().unwrap(),
        "--text",
        text.to_str().unwrap(),
        "--seq-len",
        "128",
        "--num-seqs",
        "3",
        "--json",
        out_json.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json(&out_json);
    assert_eq!(v["first_massive_layer"], 11);
    assert_eq!(v["massive_dims"], serde_json::json!([247, 507]));
    let l = &v["layers"][11];
    let top = l["massive"][0].clone();
    assert_eq!(
        (top["dim"].as_u64(), top["position"].as_u64()),
        (Some(507), Some(0))
    );
    assert!(top["mean"].as_f64().unwrap() > 10_000.0);
    assert_eq!(v["layers"][10]["massive_count"], 0);
    // Dim 507 is already every window's top-1 at layer 2 (~766 against a median ~0.94), nine
    // layers before it passes the rule; there it sits on the first token in 2 of the 3
    // windows (these windows start mid-text, without BOS), at layer 11 in all of them.
    let at = |layer: usize| v["layers"][layer]["top1_at"].clone();
    assert_eq!(at(2)["dim"], 507);
    assert_eq!(at(2)["dim_share"], 1.0);
    assert!((at(2)["first"].as_f64().unwrap() - 2.0 / 3.0).abs() < 1e-12);
    assert_eq!(
        at(11),
        serde_json::json!({"dim": 507, "dim_share": 1.0, "first": 1.0})
    );
}

#[test]
fn bad_input_is_a_clear_error() {
    let t = planted(23);
    let empty = t.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let short = common::write_text(t.path(), "short.txt", 5, 1);
    let ok = common::write_text(t.path(), "ok.txt", 100, 1);
    let cases: Vec<(Vec<&str>, &str, i32)> = vec![
        (
            vec!["scan", "--text", empty.to_str().unwrap()],
            "empty.txt",
            1,
        ),
        (
            vec!["scan", "--text", short.to_str().unwrap(), "--seq-len", "16"],
            "text too short",
            1,
        ),
        (
            vec!["scan", "--text", ok.to_str().unwrap(), "--seq-len", "0"],
            "--seq-len",
            2,
        ),
        (
            vec!["scan", "--text", ok.to_str().unwrap(), "--num-seqs", "0"],
            "--num-seqs",
            2,
        ),
        (
            vec![
                "intervene",
                "--calib",
                ok.to_str().unwrap(),
                "--text",
                ok.to_str().unwrap(),
                "--seq-len",
                "16",
                "--layer",
                "7",
            ],
            "--layer 7 out of range",
            2,
        ),
    ];
    for (args, needle, code) in cases {
        let mut full = args.clone();
        full.extend(["--model", t.path().to_str().unwrap()]);
        let out = run(&full);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
        assert!(
            stderr.contains(needle) && !stderr.contains("panicked"),
            "{args:?}: {stderr}"
        );
    }
}
