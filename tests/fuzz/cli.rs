//! Through the binary: exit status and the one-line message as a user sees them, for mutated
//! GGUF files, Hugging Face folders and recipes.

use crate::checkpoint::{hf_fixture, mutate_safetensors, write_hf};
use crate::common;
use crate::gguf::gguf_case;
use crate::mutate::mutate_json_file;
use crate::recipe::{mutate_overrides, mutate_recipe, TINY_RECIPE};
use crate::{quiet_backtraces, rng_for, scaled, CASE_LIMIT};
use std::process::Command;
use std::time::{Duration, Instant};

/// Runs the binary with a time bound; returns (exit code, stderr).
fn run_bounded(args: &[String]) -> (Option<i32>, String) {
    let mut child = Command::new(common::bin())
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::BufReader::new(stderr), &mut s).unwrap();
        s
    });
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > CASE_LIMIT {
            child.kill().unwrap();
            panic!("eabfit {args:?}: no exit within {CASE_LIMIT:?} (hang)");
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    (status.code(), reader.join().unwrap())
}

fn check_cli(case: &str, code: Option<i32>, stderr: &str, needle: &str, bad: &mut Vec<String>) {
    let lines: Vec<&str> = stderr.trim().lines().collect();
    match code {
        Some(0) => {}
        Some(1) | Some(2) => {
            if lines.len() != 1 || !lines[0].starts_with("error: ") || !lines[0].contains(needle) {
                bad.push(format!(
                    "{case}: exit {code:?}, stderr {stderr:?} (wants one line naming {needle})"
                ));
            }
        }
        other => bad.push(format!(
            "{case}: exit {other:?} (killed or panicked?): {stderr}"
        )),
    }
}

#[test]
fn fuzz_through_the_binary() {
    quiet_backtraces();
    let hf = hf_fixture();
    let root = tempfile::tempdir().unwrap();
    let mut bad = vec![];
    let start = Instant::now();
    let mut n = 0;
    for i in 0..scaled(60) {
        let path = gguf_case(root.path(), 100_000 + i);
        let (code, err) =
            run_bounded(&["info".into(), "--model".into(), path.display().to_string()]);
        check_cli(
            &format!("gguf {i}"),
            code,
            &err,
            &path.display().to_string(),
            &mut bad,
        );
        n += 1;
    }
    for i in 0..scaled(45) {
        let mut rng = rng_for("cli-hf", i);
        let dir = root.path().join(format!("hf-{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        let (c, t, w) = match i % 3 {
            0 => (
                mutate_json_file(&mut rng, &hf.cfg),
                hf.tokenizer.clone().into_bytes(),
                hf.weights.clone(),
            ),
            1 => (
                hf.cfg.clone().into_bytes(),
                mutate_json_file(&mut rng, &hf.tokenizer),
                hf.weights.clone(),
            ),
            _ => (
                hf.cfg.clone().into_bytes(),
                hf.tokenizer.clone().into_bytes(),
                mutate_safetensors(&mut rng, &hf.weights),
            ),
        };
        write_hf(&dir, &hf, &c, &t, &w);
        let (code, err) =
            run_bounded(&["info".into(), "--model".into(), dir.display().to_string()]);
        check_cli(
            &format!("hf {i}"),
            code,
            &err,
            &dir.display().to_string(),
            &mut bad,
        );
        n += 1;
    }
    let fields = eabfit::recipe::field_paths();
    for i in 0..scaled(45) {
        let mut rng = rng_for("cli-recipe", i);
        let recipe = root.path().join(format!("r-{i}.yaml"));
        // The model path never exists, so an accepted recipe ends at the model, named.
        let (text, ov) = if i % 2 == 0 {
            (mutate_recipe(&mut rng), vec![])
        } else {
            (TINY_RECIPE.to_string(), mutate_overrides(&mut rng, &fields))
        };
        std::fs::write(&recipe, text).unwrap();
        let mut args = vec!["train".to_string(), recipe.display().to_string()];
        args.extend(ov);
        args.push("model.path=/nonexistent/model".into());
        let (code, err) = run_bounded(&args);
        let needle = if code == Some(2) {
            recipe.display().to_string()
        } else {
            String::new()
        };
        check_cli(&format!("recipe {i}"), code, &err, &needle, &mut bad);
        n += 1;
    }
    eprintln!(
        "fuzz binary: {n} cases, {:.2} s",
        start.elapsed().as_secs_f64()
    );
    assert!(
        bad.is_empty(),
        "{} failures:\n{}",
        bad.len(),
        bad.join("\n")
    );
}
