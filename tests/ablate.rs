//! `eabfit ablate` on the tiny planted model: a 2x2 grid plus a point that fails.

mod common;

use common::{bin, planted};
use std::process::Command;

#[test]
fn grid_runs_every_point_reports_failures_and_resumes() {
    let t = planted(51);
    let train = common::write_text(t.path(), "train.txt", 300, 1);
    let eval = common::write_text(t.path(), "eval.txt", 100, 2);
    let out = t.path().join("grid");
    let base = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/recipes/tiny-debug.yaml"
    ))
    .unwrap();
    let recipe = t.path().join("grid.yaml");
    std::fs::write(
        &recipe,
        format!(
            "{base}\nablate:\n  grid:\n    loss.ma.weight: [0.0, 0.001]\n    adapters.lora.rank: [0, 2]\n  points:\n    - {{optim.lr: 1.0e30, optim.warmup_steps: 0}}\n"
        ),
    )
    .unwrap();
    let args = |extra: &[&str]| {
        let mut a = vec![
            "ablate".to_string(),
            recipe.display().to_string(),
            format!("model.path={}", t.spec()),
            format!("data.train={}", train.display()),
            format!("data.eval={}", eval.display()),
            format!("train.out_dir={}", out.display()),
            format!("log.dir={}", out.join("tb").display()),
            "train.steps=4".to_string(),
            "verify.max_ppl_increase=10".to_string(),
        ];
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let dry = Command::new(bin())
        .args(args(&["--dry-run"]))
        .output()
        .unwrap();
    assert!(
        dry.status.success(),
        "{}",
        String::from_utf8_lossy(&dry.stderr)
    );
    assert!(String::from_utf8_lossy(&dry.stdout).contains("5 points"));
    assert!(!out.join("tb").exists(), "dry run ran something");

    let o = Command::new(bin()).args(args(&[])).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(out.join("ablate.json")).unwrap()).unwrap();
    assert_eq!(rows.len(), 5);
    let names: Vec<&str> = rows.iter().map(|r| r["point"].as_str().unwrap()).collect();
    assert_eq!(names[0], "adapters.lora.rank=0,loss.ma.weight=0.0");
    assert!(
        rows[4]["status"].as_str().unwrap().starts_with("failed: "),
        "{}",
        rows[4]
    );
    assert!(rows[4]["status"].as_str().unwrap().contains("loss is"));
    for row in &rows[..4] {
        let name = row["point"].as_str().unwrap();
        assert_eq!(row["status"], "done");
        // The table holds each run's own final figures.
        let s: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join(name).join("summary.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(row["loss"], s["final_losses"]["loss"]);
        assert_eq!(row["massive_count"], s["best"]["massive_count"]);
        assert_eq!(row["ppl_base"], s["base"]["ppl"]);
        let events = std::fs::read_dir(out.join("tb").join(name))
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with("events.out.tfevents")
            })
            .count();
        assert!(events >= 1, "{name}: no event file");
        assert!(!eabfit::metrics::read_scalars(&out.join("tb").join(name))
            .unwrap()
            .is_empty());
    }
    // LoRA rank 0 points have no LoRA tensors; rank 2 points do.
    let tensors = |name: &str| {
        candle_core::safetensors::load(
            out.join(name).join("final/adapter.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap()
    };
    assert!(!tensors(names[0]).keys().any(|k| k.contains("lora")));
    assert!(
        tensors(names[2]).keys().any(|k| k.contains("lora")),
        "{}",
        names[2]
    );
    let md = std::fs::read_to_string(out.join("ablate.md")).unwrap();
    assert_eq!(md.lines().count(), 2 + 5);
    let csv = std::fs::read_to_string(out.join("ablate.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + 5);

    // Resume reruns only the point that did not finish.
    let o = Command::new(bin())
        .args(args(&["--resume"]))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert_eq!(
        stderr.matches("done before, skipped").count(),
        4,
        "{stderr}"
    );
    assert_eq!(stderr.matches("point optim.lr").count(), 1, "{stderr}");
}

#[test]
fn a_grid_key_that_is_not_a_recipe_field_fails_before_anything_runs() {
    let t = planted(52);
    let base = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/recipes/tiny-debug.yaml"
    ))
    .unwrap();
    let recipe = t.path().join("bad.yaml");
    let out = t.path().join("out");
    std::fs::write(
        &recipe,
        format!("{base}\nablate:\n  grid:\n    loss.ma.wieght: [0.0, 1.0]\n"),
    )
    .unwrap();
    let o = Command::new(bin())
        .args([
            "ablate",
            recipe.to_str().unwrap(),
            &format!("train.out_dir={}", out.display()),
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("loss.ma.wieght") && stderr.contains("loss.ma.weight"),
        "{stderr}"
    );
    assert!(!out.exists());
}
