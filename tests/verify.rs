//! `eabfit verify` on the tiny planted model: fails (exit 1, naming the check) on adapters that
//! leave the planted activation in place, passes on adapters trained to remove it.

mod common;

use common::{bin, planted};
use std::process::Command;

fn train(
    t: &common::Tiny,
    out: &std::path::Path,
    train: &std::path::Path,
    eval: &std::path::Path,
    extra: &[&str],
) {
    let mut args = vec![
        "train".to_string(),
        concat!(env!("CARGO_MANIFEST_DIR"), "/recipes/tiny-debug.yaml").to_string(),
        format!("model.path={}", t.spec()),
        format!("data.train={}", train.display()),
        format!("data.eval={}", eval.display()),
        format!("train.out_dir={}", out.display()),
        format!("log.dir={}", out.join("tb").display()),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let o = Command::new(bin()).args(&args).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn verify(
    t: &common::Tiny,
    adapter: &std::path::Path,
    eval: &std::path::Path,
    out: &std::path::Path,
) -> std::process::Output {
    Command::new(bin())
        .args([
            "verify",
            "--model",
            &t.spec(),
            "--adapter",
            adapter.to_str().unwrap(),
            "--text",
            eval.to_str().unwrap(),
            "--seq-len",
            "16",
            "--num-seqs",
            "2",
            "--max-ppl-increase",
            "0.05",
            "--out",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap()
}

#[test]
fn verify_fails_when_massive_activations_remain_and_passes_when_gone() {
    let t = planted(41);
    let train_txt = common::write_text(t.path(), "train.txt", 400, 1);
    let eval_txt = common::write_text(t.path(), "eval.txt", 100, 2);
    // Zero steps: the step-0 adapters (slots at their init, LoRA B = 0) leave the plant in place.
    let idle = t.path().join("idle");
    train(
        &t,
        &idle,
        &train_txt,
        &eval_txt,
        &["train.steps=1", "optim.lr=1e-9"],
    );
    let o = verify(&t, &idle.join("best"), &eval_txt, &t.path().join("v-idle"));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("verify failed: massive_count"), "{stderr}");
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(t.path().join("v-idle/verify.json")).unwrap(),
    )
    .unwrap();
    assert!(v["adapted"]["layers"][1]["massive_count"].as_u64().unwrap() > 0);
    assert_eq!(v["pass"], false);
    // Trained against the planted activation with LoRA on the birth layer's MLP.
    let fit = t.path().join("fit");
    train(
        &t,
        &fit,
        &train_txt,
        &eval_txt,
        &[
            "train.steps=40",
            "optim.lr=0.05",
            "adapters.lora.targets=[gate,up,down]",
            "loss.ma.weight=0.01",
            "eval.every=10",
            "optim.grad_accum=1",
        ],
    );
    let o = verify(&t, &fit.join("best"), &eval_txt, &t.path().join("v-fit"));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(t.path().join("v-fit/verify.json")).unwrap())
            .unwrap();
    assert_eq!(v["adapted"]["layers"][1]["massive_count"], 0);
    assert!(v["base"]["layers"][1]["massive_count"].as_u64().unwrap() > 0);
    for f in ["verify.md", "verify.png", "verify.svg"] {
        assert!(t.path().join("v-fit").join(f).is_file(), "{f}");
    }

    // The recipe form with the quantization check: its gap is `eabfit quant`'s on the same
    // windows, and a limit below it fails naming `quant_gap`.
    let recipe_verify = |max_gap: &str, out: &str| {
        let args = [
            "verify".to_string(),
            concat!(env!("CARGO_MANIFEST_DIR"), "/recipes/tiny-debug.yaml").to_string(),
            format!("model.path={}", t.spec()),
            format!("data.train={}", train_txt.display()),
            format!("data.eval={}", eval_txt.display()),
            format!("train.out_dir={}", fit.display()),
            "verify.max_ppl_increase=0.05".to_string(),
            "verify.quant.w=4".to_string(),
            "verify.quant.a=4".to_string(),
            format!("verify.quant.max_gap={max_gap}"),
            "--out".to_string(),
            t.path().join(out).display().to_string(),
        ];
        Command::new(bin()).args(&args).output().unwrap()
    };
    let o = recipe_verify("1000", "v-quant");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(t.path().join("v-quant/verify.json")).unwrap(),
    )
    .unwrap();
    let gap = v["quant"]["gap"].as_f64().unwrap();
    assert_eq!(v["quant"]["setting"], "W4A4 tensor");
    let q_json = t.path().join("q.json");
    let o = Command::new(bin())
        .args([
            "quant",
            "--model",
            &t.spec(),
            "--adapter",
            fit.join("best").to_str().unwrap(),
            "--text",
            eval_txt.to_str().unwrap(),
            "--seq-len",
            "16",
            "--num-seqs",
            "2",
            "--w",
            "4",
            "--a",
            "4",
            "--json",
            q_json.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let q = common::json(&q_json);
    assert!(
        (q["gap"].as_f64().unwrap() - gap).abs() < 1e-9,
        "{q} vs {gap}"
    );
    assert!(
        (q["base"]["gap"].as_f64().unwrap() - v["quant"]["base_gap"].as_f64().unwrap()).abs()
            < 1e-9
    );
    assert!(
        gap > 0.0,
        "W4A4 should cost the tiny model something: {gap}"
    );
    let o = recipe_verify("0", "v-quant-fail");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("verify failed: quant_gap"), "{stderr}");

    // Several texts: each is verified on its own, into its own folder, with the figures a
    // single-text run gives; the plan passes only if every text does.
    let other_txt = common::write_text(t.path(), "other.txt", 100, 3);
    let single = |text: &std::path::Path, out: &str| -> serde_json::Value {
        let o = verify(&t, &fit.join("best"), text, &t.path().join(out));
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        common::json(&t.path().join(out).join("verify.json"))
    };
    let (a, b) = (single(&eval_txt, "v-a"), single(&other_txt, "v-b"));
    let multi = |limit: f64, out: &str| {
        Command::new(bin())
            .args([
                "verify",
                "--model",
                &t.spec(),
                "--adapter",
                fit.join("best").to_str().unwrap(),
                "--text",
                eval_txt.to_str().unwrap(),
                "--text",
                other_txt.to_str().unwrap(),
                "--seq-len",
                "16",
                "--num-seqs",
                "2",
                "--long-seq-len",
                "32",
                "--long-num-seqs",
                "1",
                // `=`: the limit may be negative, which clap would take for a flag.
                &format!("--max-ppl-increase={limit}"),
                "--out",
                t.path().join(out).to_str().unwrap(),
            ])
            .output()
            .unwrap()
    };
    let o = multi(0.05, "v-multi");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let read = |dir: &str| -> serde_json::Value {
        serde_json::from_str(
            &std::fs::read_to_string(t.path().join("v-multi").join(dir).join("verify.json"))
                .unwrap(),
        )
        .unwrap()
    };
    for (dir, single) in [("eval-16", &a), ("other-16", &b)] {
        let v = read(dir);
        for key in ["ppl_increase", "kl"] {
            assert_eq!(v[key], single[key], "{dir} {key}");
        }
        assert_eq!(v["adapted"]["ppl"], single["adapted"]["ppl"], "{dir}");
    }
    for dir in ["eval-32", "other-32"] {
        let v = read(dir);
        assert_eq!(v["base"]["seq_len"], 32, "{dir}");
        assert_eq!(v["base"]["num_seqs"], 1, "{dir}");
    }
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("## summary"), "{stdout}");
    // A limit between the two texts' increases: the worse text fails, and with it the plan.
    let (ia, ib) = (
        a["ppl_increase"].as_f64().unwrap(),
        b["ppl_increase"].as_f64().unwrap(),
    );
    assert_ne!(ia, ib);
    let (worse, better) = if ia > ib {
        ("eval.txt", "other.txt")
    } else {
        ("other.txt", "eval.txt")
    };
    let o = multi((ia + ib) / 2.0, "v-multi-fail");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    let line = stderr
        .lines()
        .find(|l| l.contains("verify failed"))
        .unwrap();
    assert!(line.contains(&format!("{worse}, 2 x 16 tokens")), "{line}");
    assert!(
        !line.contains(&format!("{better}, 2 x 16 tokens")),
        "{line}"
    );
}
