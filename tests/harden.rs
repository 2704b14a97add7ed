//! What a user meets outside the happy path: a closed pipe, a second run on a busy folder, a
//! killed run's lock, a write that fails half-way (`ulimit -f`, a folder that cannot exist),
//! and a checkpoint with NaN or inf weights.

mod common;

use candle_core::{DType, Device, Tensor};
use common::snapshot;
use eabfit::adapters::{AdapterMeta, AdapterSet, SlotInit};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// One line, `error: ...`, naming every needle.
fn assert_one_line_error(o: &Output, needles: &[&str]) {
    let e = stderr(o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    let lines: Vec<&str> = e.trim().lines().collect();
    assert_eq!(lines.len(), 1, "{e}");
    assert!(lines[0].starts_with("error: "), "{e}");
    for n in needles {
        assert!(lines[0].contains(n), "`{n}` not in: {e}");
    }
}

#[test]
fn a_closed_stdout_ends_quietly_with_success() {
    let tiny = common::tiny(common::Arch::Llama, 3);
    let text = common::write_text(tiny.path(), "t.txt", 300, 4);
    for args in [
        vec!["info".to_string(), "--model".into(), tiny.spec()],
        vec![
            "scan".to_string(),
            "--model".into(),
            tiny.spec(),
            "--text".into(),
            text.display().to_string(),
            "--seq-len".into(),
            "16".into(),
            "--num-seqs".into(),
            "2".into(),
        ],
    ] {
        let mut child = Command::new(common::bin())
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The reader is gone before the command prints its first line: every print is EPIPE.
        drop(child.stdout.take());
        let o = child.wait_with_output().unwrap();
        assert_eq!(o.status.code(), Some(0), "{args:?}: {}", stderr(&o));
        assert!(!stderr(&o).contains("panicked"), "{args:?}: {}", stderr(&o));
        assert!(
            !stderr(&o).contains("Broken pipe"),
            "{args:?}: {}",
            stderr(&o)
        );
    }
    // As a user types it.
    let o = Command::new("bash")
        .args([
            "-c",
            &format!(
                "set -o pipefail; '{}' info --model '{}' | head -1",
                common::bin().display(),
                tiny.spec()
            ),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout).lines().count(), 1);
    assert_eq!(stderr(&o), "");
}

#[test]
fn a_held_run_folder_is_refused_and_a_killed_runs_lock_is_recovered() {
    let r = common::TrainRun::new(51);
    let out = r.tiny.path().join("busy");
    let mut first = Command::new(common::bin())
        .args(r.args(&out, &["train.steps=1000000", "eval.every=1000000"]))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Training has begun once the first checkpoint is there; the lock was taken before it.
    let ck = out.join("checkpoints/step-000002/state.json");
    let t0 = Instant::now();
    while !ck.is_file() && t0.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(ck.is_file(), "the first run never got going");
    let second = Command::new(common::bin())
        .args(r.args(&out, &["train.steps=2"]))
        .output()
        .unwrap();
    assert_one_line_error(
        &second,
        &[
            &format!("pid {}", first.id()),
            &out.display().to_string(),
            "train.out_dir",
        ],
    );
    // kill -9: no chance to clean up. The next run must start without any help.
    first.kill().unwrap();
    first.wait().unwrap();
    let third = Command::new(common::bin())
        .args(r.args(
            &out,
            &["--resume", &out.display().to_string(), "train.steps=4"],
        ))
        .output()
        .unwrap();
    assert!(third.status.success(), "{}", stderr(&third));
    assert!(out.join("final/adapter.safetensors").is_file());
}

fn hidden_entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.') && n != ".eabfit.lock")
        .collect()
}

/// `ulimit -f` in KiB; the binary ignores SIGXFSZ itself, so the write fails with EFBIG.
fn limited(kib: u64, args: &[String]) -> Output {
    let mut line = format!("ulimit -f {kib}; exec '{}'", common::bin().display());
    for a in args {
        line.push_str(&format!(" '{a}'"));
    }
    Command::new("bash").args(["-c", &line]).output().unwrap()
}

#[test]
fn a_checkpoint_write_past_the_file_size_limit_keeps_the_previous_one_whole() {
    let r = common::TrainRun::new(52);
    let out = r.tiny.path().join("efbig");
    // Big LoRA so the optimizer file (2x the adapters) is the largest thing written.
    let big = [
        "adapters.lora.rank=64",
        "adapters.lora.targets=[down, up, gate]",
        "adapters.lora.layers=all",
    ];
    let mut first = big.to_vec();
    first.push("train.steps=2");
    let o = Command::new(common::bin())
        .args(r.args(&out, &first))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let ck = out.join("checkpoints");
    let adapter = std::fs::metadata(ck.join("step-000002/adapter.safetensors"))
        .unwrap()
        .len();
    let optim = std::fs::metadata(ck.join("step-000002/optim.safetensors"))
        .unwrap()
        .len();
    assert!(optim > adapter + 4096, "{optim} vs {adapter}");
    let before = snapshot(&out);
    // Room for the adapters, not for the optimizer moments.
    let kib = (adapter + optim) / 2 / 1024;
    let mut args = r.args(&out, &big);
    args.extend([
        "train.steps=4".to_string(),
        "--resume".into(),
        out.display().to_string(),
    ]);
    let o = limited(kib, &args);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    let last = e.trim().lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: ")
            && last.contains("optim.safetensors")
            && last.contains("File too large"),
        "{e}"
    );
    assert!(!e.contains("panicked"), "{e}");
    // The old checkpoint is as it was, the new one is not there, no half folder is left.
    let after = snapshot(&out);
    for (p, bytes) in &before {
        if p.starts_with("checkpoints") {
            assert!(after.get(p) == Some(bytes), "{} changed", p.display());
        }
    }
    assert!(!ck.join("step-000004").exists());
    assert_eq!(hidden_entries(&ck), Vec::<String>::new());
    assert_eq!(hidden_entries(&out), Vec::<String>::new());
    // And the run resumes from it once there is room.
    let o = Command::new(common::bin()).args(&args).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(ck.join("step-000004/optim.safetensors").is_file());
}

fn write_adapter(tiny: &common::Tiny, dir: &Path) {
    let ckpt = eabfit::checkpoint::Checkpoint::open(&tiny.spec()).unwrap();
    let cfg = &ckpt.config;
    let mut meta = AdapterMeta::for_config(cfg, &tiny.spec());
    meta.eab_layers = (0..cfg.num_hidden_layers).collect();
    meta.lora_rank = 2;
    meta.lora_alpha = 4.0;
    meta.lora_targets = vec!["down".into()];
    meta.lora_layers = vec![1];
    AdapterSet::new(
        meta,
        SlotInit::Normal { std: 0.1, seed: 1 },
        0.1,
        1,
        &Device::Cpu,
    )
    .unwrap()
    .save(dir)
    .unwrap();
}

#[test]
fn an_export_that_fails_half_way_keeps_the_previous_export_whole() {
    let tiny = common::tiny(common::Arch::Llama, 53);
    let adapter = tiny.path().join("adapter");
    write_adapter(&tiny, &adapter);
    let elsewhere = tempfile::tempdir().unwrap();
    let out = elsewhere.path().join("export");
    let args = |force: bool| {
        let mut a = vec![
            "export".to_string(),
            "--model".into(),
            tiny.spec(),
            "--adapter".into(),
            adapter.display().to_string(),
            "--out".into(),
            out.display().to_string(),
        ];
        if force {
            a.push("--force".into());
        }
        a
    };
    let o = Command::new(common::bin())
        .args(args(false))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let before = snapshot(&out);
    let weights = std::fs::metadata(out.join("model.safetensors"))
        .unwrap()
        .len();
    let o = limited(weights / 2 / 1024, &args(true));
    assert_one_line_error(&o, &["model.safetensors", "File too large"]);
    assert_eq!(snapshot(&out), before, "the previous export changed");
    assert_eq!(hidden_entries(elsewhere.path()), Vec::<String>::new());
}

#[test]
fn a_folder_that_cannot_be_created_is_a_clear_error() {
    let r = common::TrainRun::new(54);
    let file = r.tiny.path().join("plain-file");
    std::fs::write(&file, "not a folder").unwrap();
    let out = file.join("run");
    let o = Command::new(common::bin())
        .args(r.args(&out, &[]))
        .output()
        .unwrap();
    assert_one_line_error(&o, &[&out.display().to_string()]);
    let adapter = r.tiny.path().join("adapter");
    write_adapter(&r.tiny, &adapter);
    let o = Command::new(common::bin())
        .args([
            "export",
            "--model",
            &r.tiny.spec(),
            "--adapter",
            &adapter.display().to_string(),
            "--out",
            &out.display().to_string(),
        ])
        .output()
        .unwrap();
    assert_one_line_error(&o, &["plain-file"]);
    assert_eq!(std::fs::read(&file).unwrap(), b"not a folder");
}

#[test]
fn nan_or_inf_weights_are_named_at_load() {
    for (bad, tensor) in [
        (f32::NAN, "model.layers.1.mlp.up_proj.weight"),
        (f32::INFINITY, "model.norm.weight"),
        (f32::NEG_INFINITY, "model.embed_tokens.weight"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = common::config(common::Arch::Llama);
        let mut w = common::weights(&cfg, 55);
        let t = &w[tensor];
        let mut v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let i = v.len() / 3;
        v[i] = bad;
        let shape = t.shape().clone();
        w.insert(
            tensor.into(),
            Tensor::from_vec(v, shape, &Device::Cpu).unwrap(),
        );
        common::write_checkpoint(dir.path(), &cfg, &w);
        let spec = dir.path().display().to_string();
        let msg = eabfit::checkpoint::Checkpoint::open(&spec)
            .unwrap()
            .base(DType::F32, &Device::Cpu)
            .err()
            .expect("a non-finite weight must not load")
            .to_string();
        assert!(msg.contains(tensor) && msg.contains("NaN or inf"), "{msg}");
        let text = common::write_text(dir.path(), "t.txt", 200, 1);
        let o = Command::new(common::bin())
            .args([
                "ppl",
                "--model",
                &spec,
                "--text",
                &text.display().to_string(),
            ])
            .output()
            .unwrap();
        assert_one_line_error(&o, &[tensor, &spec]);
    }
}
