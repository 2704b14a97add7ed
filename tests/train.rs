//! `eabfit train` on the tiny planted model: a whole run, TensorBoard read back, exact resume
//! (from a checkpoint and after a real kill), NaN handling, bad recipes, base untouched.

mod common;

use common::{bin, json};
use std::path::Path;
use std::process::Command;

fn adapters(dir: &Path) -> std::collections::HashMap<String, Vec<f32>> {
    candle_core::safetensors::load(dir.join("adapter.safetensors"), &candle_core::Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k, v.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect()
}
#[test]
fn a_run_logs_what_it_reports_and_leaves_the_base_alone() {
    let r = common::TrainRun::new(31);
    let base_bytes = std::fs::read(r.tiny.path().join("model.safetensors")).unwrap();
    let out = r.tiny.path().join("run");
    let o = r.train(&out, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s = json(&out.join("summary.json"));
    assert_eq!(s["birth_layers"], serde_json::json!([1]));
    assert_eq!(s["massive_dims"], serde_json::json!([common::PLANT_DIM]));
    assert!(
        s["best"]["score"].as_f64().unwrap() <= s["step0"]["score"].as_f64().unwrap(),
        "best never worse than step 0"
    );
    for d in ["best", "final", "checkpoints/step-000008"] {
        assert!(out.join(d).join("adapter.safetensors").is_file(), "{d}");
    }
    assert!(out.join("recipe.yaml").is_file());
    // TensorBoard event file, read back by our own reader, agrees with the summary.
    let scalars = eabfit::metrics::read_scalars(&out.join("tb").join("run")).unwrap();
    let get = |tag: &str, step: i64| {
        scalars
            .iter()
            .find(|(t, s, _)| t == tag && *s == step)
            .map(|x| x.2 as f64)
    };
    let ppl = get("eval/ppl", 8).expect("eval/ppl at step 8");
    assert!((ppl - s["last"]["ppl"].as_f64().unwrap()).abs() < 1e-3 * ppl);
    assert_eq!(
        get("eval/massive_count", 8),
        Some(s["last"]["massive_count"].as_f64().unwrap())
    );
    let loss = get("train/loss", 8).unwrap();
    assert!(
        (loss - s["final_losses"]["loss"].as_f64().unwrap()).abs() < 1e-4 * loss.abs().max(1e-3)
    );
    for tag in [
        "train/hold",
        "train/ma",
        "train/lr",
        "train/grad_norm",
        "train/tokens_per_s",
        "layers/top1/01",
        "layers/eab_slot_attn/02",
    ] {
        assert!(scalars.iter().any(|(t, _, _)| t == tag), "{tag} not logged");
    }
    // lr follows the schedule: warmup 2 -> step 1 logs lr of step index 0 = 0.01 / 2.
    assert!((get("train/lr", 1).unwrap() - 0.005).abs() < 1e-9);
    assert_eq!(
        std::fs::read(r.tiny.path().join("model.safetensors")).unwrap(),
        base_bytes,
        "base model changed"
    );
}

#[test]
fn resume_from_a_checkpoint_gives_the_same_adapters() {
    let r = common::TrainRun::new(32);
    let full = r.tiny.path().join("full");
    let o = r.train(&full, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // A run that "died" after step 4: only that checkpoint survives.
    let cut = r.tiny.path().join("cut");
    let ck = cut.join("checkpoints/step-000004");
    std::fs::create_dir_all(&ck).unwrap();
    for f in std::fs::read_dir(full.join("checkpoints/step-000004")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, ck.join(f.file_name().unwrap())).unwrap();
    }
    let mut args = r.args(&cut, &[]);
    args.extend(["--resume".to_string(), cut.display().to_string()]);
    let o = Command::new(bin()).args(&args).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("at step 4"));
    let (a, b) = (adapters(&full.join("final")), adapters(&cut.join("final")));
    assert_eq!(a.len(), b.len());
    for (k, va) in &a {
        let vb = &b[k];
        let diff = va
            .iter()
            .zip(vb)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(diff <= 1e-6, "{k}: max diff {diff}");
    }
}

#[test]
fn a_killed_run_keeps_whole_checkpoints_and_resumes() {
    let r = common::TrainRun::new(33);
    let out = r.tiny.path().join("killed");
    let mut child = Command::new(bin())
        .args(r.args(
            &out,
            &[
                "train.steps=100000",
                "train.checkpoint_every=1",
                "eval.every=1000",
            ],
        ))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let first = out.join("checkpoints/step-000003");
    let t0 = std::time::Instant::now();
    while !first.is_dir() && t0.elapsed().as_secs() < 120 {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(first.is_dir(), "no checkpoint within 2 minutes");
    assert!(
        !out.join("final").exists(),
        "the run finished before the kill"
    );
    for e in std::fs::read_dir(out.join("checkpoints")).unwrap() {
        let p = e.unwrap().path();
        if !p.file_name().unwrap().to_string_lossy().starts_with('.') {
            for f in [
                "adapter.safetensors",
                "adapter_config.json",
                "optim.safetensors",
                "state.json",
                "recipe.yaml",
            ] {
                assert!(p.join(f).is_file(), "{} lacks {f}", p.display());
            }
        }
    }
    let latest = eabfit::resume::latest_checkpoint(&out).unwrap();
    let mut args = r.args(&out, &["train.checkpoint_every=1", "eval.every=1000"]);
    let done: usize = json(&latest.join("state.json"))["step"].as_u64().unwrap() as usize;
    args.push(format!("train.steps={}", done + 2));
    args.extend(["--resume".to_string(), out.display().to_string()]);
    let o = Command::new(bin()).args(&args).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.join("final/adapter.safetensors").is_file());
}

#[test]
fn a_nan_loss_stops_with_a_clear_message() {
    let r = common::TrainRun::new(34);
    let out = r.tiny.path().join("nan");
    let o = r.train(&out, &["optim.lr=1e30", "optim.warmup_steps=0"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("loss is") && stderr.contains("Last good checkpoint"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"));
    assert!(
        out.join("best/adapter.safetensors").is_file(),
        "step-0 adapters kept"
    );
    assert!(!out.join("final").exists());
}

#[test]
fn bad_recipes_exit_2_naming_the_field() {
    let r = common::TrainRun::new(35);
    let out = r.tiny.path().join("bad");
    let cases: [(&[&str], &str); 4] = [
        (&["adapters.lora.rnak=4"], "rank"),
        (&["optim.lr=fast"], "optim.lr"),
        (&["optim.lr=-1"], "optim.lr"),
        (&["train.stpes=3"], "steps"),
    ];
    for (extra, needle) in cases {
        let o = r.train(&out, extra);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{extra:?}: {stderr}");
        assert!(stderr.contains(needle), "{extra:?}: {stderr}");
    }
    let yaml = r.tiny.path().join("typo.yaml");
    std::fs::write(
        &yaml,
        "model:\n  path: x\ndata:\n  train: a\n  eval: b\noptim:\n  lr: 0.1\n  warmpu_steps: 3\n",
    )
    .unwrap();
    let o = Command::new(bin())
        .args(["train", yaml.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("typo.yaml") && stderr.contains(":8") && stderr.contains("warmup_steps"),
        "{stderr}"
    );
    let o = Command::new(bin())
        .args(["train", "/nonexistent/recipe.yaml"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("/nonexistent/recipe.yaml"));
    // A data file that does not exist is named too.
    let o = r.train(&out, &["data.train=/nonexistent/train.txt"]);
    assert_ne!(o.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&o.stderr).contains("/nonexistent/train.txt"));
}

/// `data.train` / `data.eval` as lists and `data.long`: every text gets its own windows (the
/// base perplexity over the eval list is the geometric mean of each text's, as `eabfit ppl`
/// measures them), and every `every`-th micro-batch is one long window (the token count).
#[test]
fn text_lists_and_long_windows() {
    let r = common::TrainRun::new(37);
    let train2 = common::write_text(r.tiny.path(), "train2.txt", 200, 4);
    let eval2 = common::write_text(r.tiny.path(), "eval2.txt", 100, 5);
    let out = r.tiny.path().join("lists");
    let lists = [
        format!("data.train=[{}, {}]", r.train.display(), train2.display()),
        format!("data.eval=[{}, {}]", r.eval.display(), eval2.display()),
    ];
    let mut extra: Vec<&str> = lists.iter().map(|s| s.as_str()).collect();
    extra.extend([
        "data.batch_size=1",
        "optim.grad_accum=1",
        "train.steps=6",
        "eval.every=3",
        "data.long={seq_len: 32, windows: 1, every: 3}",
    ]);
    let o = r.train(&out, &extra);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // 6 micro-batches: 4 short windows of 16 + BOS, 2 long ones (steps 3 and 6) of 32 + BOS.
    assert!(stdout.contains("trained 134 tokens"), "{stdout}");
    let ppl_of = |text: &Path| -> f64 {
        let j = r.tiny.path().join("ppl.json");
        let o = Command::new(bin())
            .args(["ppl", "--model", &r.tiny.spec(), "--text"])
            .arg(text)
            .args(["--seq-len", "16", "--max-windows", "2", "--json"])
            .arg(&j)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        json(&j)["ppl"].as_f64().unwrap()
    };
    let want = (0.5 * (ppl_of(&r.eval).ln() + ppl_of(&eval2).ln())).exp();
    let got = json(&out.join("summary.json"))["base"]["ppl"]
        .as_f64()
        .unwrap();
    assert!((got - want).abs() < 1e-4 * want, "{got} vs {want}");
}
