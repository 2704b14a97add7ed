//! The binary as a user runs it: help, info, ppl (checked against an independent perplexity),
//! and one clear error line with a non-zero exit for each kind of bad input.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{bin, tiny, Arch};
use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    Command::new(bin()).args(args).output().unwrap()
}

/// A failed run: non-zero exit, no panic, and one `error:` line naming `needles`.
fn assert_clean_error(out: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got success; stderr: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line expected: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    for n in needles {
        assert!(stderr.contains(n), "`{n}` not named in: {stderr}");
    }
}

#[test]
fn help_lists_subcommands() {
    let out = run(&["--help"]);
    assert!(out.status.success());
    let s = String::from_utf8_lossy(&out.stdout);
    for cmd in ["info", "ppl"] {
        assert!(
            s.lines().any(|l| l.trim_start().starts_with(cmd)),
            "{cmd} missing from help:\n{s}"
        );
    }
}

#[test]
fn info_reports_architecture_and_tokenizer() {
    let t = tiny(Arch::Mistral, 1);
    let out = run(&["info", "--model", &t.spec()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("layers          3"), "{s}");
    assert!(s.contains("4 query / 2 kv, head_dim 8"), "{s}");
    assert!(s.contains("sliding window  5"), "{s}");
    assert!(s.contains("add_bos       true"), "{s}");
    // 3 layers x (attn 32*8*(8+4) + mlp 3*32*64 + norms 64) + embed 61*32 + norm 32 + head 61*32
    let expected = 3 * (32 * 8 * 12 + 3 * 32 * 64 + 64) + 2 * 61 * 32 + 32;
    assert!(s.contains(&format!("parameters      {expected} ")), "{s}");
}

/// Reference perplexity from candle-transformers' llama: for every prefix, its last-position
/// logits give the next token's log-probability.
fn reference_ppl(dir: &std::path::Path, windows: &[Vec<u32>]) -> f64 {
    use candle_transformers::models::llama;
    let (model, cfg) = common::candle_llama(dir);
    let (mut nll, mut n) = (0f64, 0usize);
    for w in windows {
        for p in 1..w.len() {
            let mut cache = llama::Cache::new(false, DType::F32, &cfg, &Device::Cpu).unwrap();
            let ids = Tensor::new(&w[..p], &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let logits: Vec<f32> = model
                .forward(&ids, 0, &mut cache)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            nll += common::nll_f64(&logits, w[p]);
            n += 1;
        }
    }
    (nll / n as f64).exp()
}

#[test]
fn ppl_matches_reference_and_writes_json() {
    let t = tiny(Arch::Llama, 7);
    let text = common::write_text(t.path(), "text.txt", 70, 3);
    let json = t.path().join("ppl.json");
    let out = run(&[
        "ppl",
        "--model",
        &t.spec(),
        "--text",
        text.to_str().unwrap(),
        "--seq-len",
        "16",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(v["windows"], 4);
    assert_eq!(v["seq_len"], 16);
    assert_eq!(
        v["tokens"],
        4 * 16,
        "BOS + 16 tokens predicts 16 per window"
    );
    // Independent windows: words -> ids through the fixture's vocabulary, BOS in front.
    let words: Vec<u32> = common::text(70, 3)
        .split(' ')
        .map(|w| 3 + common::WORDS.iter().position(|x| *x == w).unwrap() as u32)
        .collect();
    let windows: Vec<Vec<u32>> = words
        .chunks_exact(16)
        .map(|c| std::iter::once(1).chain(c.iter().copied()).collect())
        .collect();
    let reference = reference_ppl(t.path(), &windows);
    let ppl = v["ppl"].as_f64().unwrap();
    assert!(
        (ppl - reference).abs() / reference < 1e-4,
        "ppl {ppl} vs reference {reference}"
    );
}

#[test]
fn missing_model_is_named() {
    let out = run(&["info", "--model", "/nonexistent/model.gguf"]);
    assert_clean_error(&out, &["/nonexistent/model.gguf", "no such file"]);
}

#[test]
fn truncated_safetensors_is_named() {
    let t = tiny(Arch::Llama, 1);
    let st = t.path().join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
    assert_clean_error(
        &run(&["info", "--model", &t.spec()]),
        &["model.safetensors"],
    );
    let text = common::write_text(t.path(), "t.txt", 50, 1);
    assert_clean_error(
        &run(&[
            "ppl",
            "--model",
            &t.spec(),
            "--text",
            text.to_str().unwrap(),
        ]),
        &["model.safetensors"],
    );
}

#[test]
fn config_missing_field_is_named() {
    let t = tiny(Arch::Llama, 1);
    let mut cfg = t.config.clone();
    cfg.as_object_mut().unwrap().remove("hidden_size");
    std::fs::write(t.path().join("config.json"), cfg.to_string()).unwrap();
    let out = run(&["info", "--model", &t.spec()]);
    assert_clean_error(&out, &["config.json", "hidden_size"]);
}

#[test]
fn gguf_of_unsupported_architecture_is_named() {
    use candle_core::quantized::{gguf_file, QTensor};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("falcon.gguf");
    let t = QTensor::quantize(
        &Tensor::zeros((4, 32), DType::F32, &Device::Cpu).unwrap(),
        candle_core::quantized::GgmlDType::F32,
    )
    .unwrap();
    let arch = gguf_file::Value::String("falcon".into());
    let mut f = std::fs::File::create(&path).unwrap();
    gguf_file::write(
        &mut f,
        &[("general.architecture", &arch)],
        &[("token_embd.weight", &t)],
    )
    .unwrap();
    drop(f);
    let out = run(&["info", "--model", path.to_str().unwrap()]);
    assert_clean_error(
        &out,
        &["falcon.gguf", "unsupported GGUF architecture `falcon`"],
    );
    // A file that is no GGUF at all.
    std::fs::write(&path, b"GGUF but not really").unwrap();
    assert_clean_error(
        &run(&["info", "--model", path.to_str().unwrap()]),
        &["falcon.gguf", "GGUF"],
    );
}

#[test]
fn bad_flags_exit_2() {
    let t = tiny(Arch::Llama, 1);
    let out = run(&[
        "ppl",
        "--model",
        &t.spec(),
        "--seq-len",
        "0",
        "--text",
        t.path().join("config.json").to_str().unwrap(),
    ]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&["info", "--model", &t.spec(), "--dtype", "f8"]);
    assert_eq!(out.status.code(), Some(2));
    let out = run(&["info", "--bogus"]);
    assert_eq!(out.status.code(), Some(2));
}

/// A hub id resolves through the hf-hub cache layout (refs/main -> snapshots/<rev>/) offline;
/// an id that is not cached is a clear error when nothing can be downloaded.
#[test]
fn hub_ids_resolve_through_the_cache() {
    let t = tiny(Arch::Llama, 8);
    let home = tempfile::tempdir().unwrap();
    let repo = home.path().join("hub/models--tiny-org--tiny-llama");
    let snap = repo.join("snapshots/abc123");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "abc123").unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(t.path().join(f), snap.join(f)).unwrap();
    }
    let out = Command::new(bin())
        .args(["info", "--model", "tiny-org/tiny-llama"])
        .env("HF_HOME", home.path())
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(snap.to_str().unwrap()));
    let out = Command::new(bin())
        .args(["info", "--model", "tiny-org/absent"])
        .env("HF_HOME", home.path())
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert_clean_error(&out, &["tiny-org/absent", "not in the hf-hub cache"]);
}
