//! Running `eabfit` as a user would, and reading back what `eabfit export` wrote: shared by
//! the export_* tests.

use super::bin;
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Output};

pub fn all_layers() -> Vec<usize> {
    vec![0, 1, 2]
}

pub fn eabfit(args: &[&str]) -> Output {
    Command::new(bin()).args(args).output().unwrap()
}

pub fn export(model: &Path, adapter: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut a = vec![
        "export",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    a.extend_from_slice(extra);
    eabfit(&a)
}

pub fn ok(o: &Output) {
    assert!(
        o.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Fails with exit != 0, no panic, and a message holding every needle.
pub fn fails(o: &Output, needles: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        !o.status.success(),
        "expected a failure, got success: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    for n in needles {
        assert!(stderr.contains(n), "`{n}` not in: {stderr}");
    }
    stderr
}

/// No temporary or half-written export left in `dir`.
pub fn no_leftovers(dir: &Path) {
    for e in std::fs::read_dir(dir).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!name.contains("eabfit-tmp"), "left behind: {name}");
    }
}

#[allow(unused_imports)] // dead_code does not cover a re-export some binaries never call
pub use super::json;

/// Every tensor of the `.safetensors` files in `dir` (shards included).
pub fn tensors(dir: &Path) -> HashMap<String, Tensor> {
    let mut all = HashMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            all.extend(candle_core::safetensors::load(&p, &Device::Cpu).unwrap());
        }
    }
    all
}
