//! `eabfit export --device-map`: the streaming merge on several CPU "devices" (`cpu:0`, `cpu:1`,
//! ...) writes the same bytes as the merge on one device, from sharded Hugging Face checkpoints
//! (index.json) and from a GGUF, for LLaMA and for Qwen2 (q/k/v biases, tied head); the merged
//! weights equal W + scale B A computed here in f64 from the input files; a bad map exits 2
//! naming its problem and writes nothing.

mod common;

use candle_core::{DType, Device, Tensor};
use common::export::{export, ok, tensors};
use common::{bin, make_adapter, snapshot, tiny, Arch};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

const MAPS: &[&str] = &[
    "cpu:0=0,cpu:1=1,cpu:2=2",
    "cpu:1=0-1,cpu:0=2",
    "cpu:0=0,cpu:1=1-2,embed=cpu:2,head=cpu:3",
];

/// The export of `model` + `adapter` with `extra` flags, once without a map and once per map
/// (into the same `--out`, so that paths written into the files agree): every file byte for
/// byte alike. Returns the files without a map.
fn same_bytes_under_every_map(
    model: &Path,
    adapter: &Path,
    out: &Path,
    extra: &[&str],
) -> BTreeMap<PathBuf, Vec<u8>> {
    let force = [&["--force"], extra].concat();
    ok(&export(model, adapter, out, &force));
    let want = snapshot(out);
    for map in MAPS {
        let args = [&force[..], &["--device-map", map]].concat();
        ok(&export(model, adapter, out, &args));
        let got = snapshot(out);
        assert!(got.keys().eq(want.keys()), "{map} {extra:?}: files");
        for ((p, a), (_, b)) in got.iter().zip(&want) {
            assert!(a == b, "{map} {extra:?}: {} differs", p.display());
        }
    }
    want
}

fn v2(t: &Tensor) -> Vec<Vec<f64>> {
    t.to_dtype(DType::F64).unwrap().to_vec2().unwrap()
}

/// The exported weights of `out` against the source's in f64: `W + 1.5 B A` (alpha 3 / rank 2)
/// where the adapter has a LoRA pair, bit for bit the source elsewhere. Returns how many
/// weights the merge changed.
fn check_merge(src: &HashMap<String, Tensor>, adapter: &Path, out: &Path) -> usize {
    let lora =
        candle_core::safetensors::load(adapter.join("adapter.safetensors"), &Device::Cpu).unwrap();
    let got = tensors(out);
    let mut merged = 0;
    for (name, w) in src {
        let prefix = name.trim_end_matches(".weight");
        let pair = (
            lora.get(&format!("{prefix}.lora_A.weight")),
            lora.get(&format!("{prefix}.lora_B.weight")),
        );
        let (Some(a), Some(b)) = pair else {
            assert_eq!(common::max_abs_diff(w, &got[name]), 0.0, "{name} changed");
            continue;
        };
        let (w, a, b, g) = (v2(w), v2(a), v2(b), v2(&got[name]));
        let mut worst = 0f64;
        for o in 0..w.len() {
            for i in 0..w[0].len() {
                let ba: f64 = (0..a.len()).map(|r| b[o][r] * a[r][i]).sum();
                let want = w[o][i] + 1.5 * ba;
                worst = worst.max((g[o][i] - want).abs() / want.abs().max(1.0));
            }
        }
        assert!(worst < 1e-6, "{name}: off W + scale B A by {worst}");
        merged += 1;
    }
    merged
}

/// A sharded tiny checkpoint of `arch` with an adapter (LoRA on q, v, down of layers 0 and 2;
/// slots in every layer): every format and dtype, with output shards of a few kB, the same
/// bytes under every map; the merge checked against the input files.
fn sharded_case(arch: Arch, seed: u64) {
    let tiny = tiny(arch, seed);
    let src = tensors(tiny.path());
    common::shard_by_layer(tiny.path());
    assert!(tiny.path().join("model.safetensors.index.json").is_file());
    let model_before = snapshot(tiny.path());
    let work = tempfile::tempdir().unwrap();
    let adapter = work.path().join("adapter");
    make_adapter(&tiny, &adapter, false, &[0, 1, 2], seed + 1);
    let out = work.path().join("out");

    let files = same_bytes_under_every_map(
        tiny.path(),
        &adapter,
        &out,
        &["--format", "both", "--max-shard-size", "6000"],
    );
    let shards = files
        .iter()
        .filter(|(p, _)| p.starts_with("hf") && p.to_string_lossy().contains("-of-"))
        .count();
    assert!(shards > 3, "only {shards} output shards");
    assert_eq!(check_merge(&src, &adapter, &out.join("hf")), 6);
    assert_eq!(check_merge(&src, &adapter, &out.join("peft")), 6);

    same_bytes_under_every_map(tiny.path(), &adapter, &out, &["--dtype", "bf16"]);
    assert!(out.join("model.safetensors").is_file());
    assert_eq!(
        snapshot(tiny.path()),
        model_before,
        "the base model changed"
    );
}

#[test]
fn llama_export_is_the_same_under_every_map() {
    sharded_case(Arch::Llama, 61);
}

#[test]
fn qwen2_export_with_biases_is_the_same_under_every_map() {
    sharded_case(Arch::Qwen2, 62);
}

#[test]
fn gguf_export_is_the_same_under_every_map() {
    let tiny = tiny(Arch::Llama, 63);
    let work = tempfile::tempdir().unwrap();
    let gguf = work.path().join("tiny.gguf");
    common::gguf_twin(&tiny, &gguf);
    let adapter = work.path().join("adapter");
    make_adapter(&tiny, &adapter, false, &[1], 64);
    let out = work.path().join("out");
    same_bytes_under_every_map(&gguf, &adapter, &out, &["--max-shard-size", "6000"]);
    // The GGUF twin holds the tiny model's weights (q/k rows re-interleaved and undone at load).
    assert_eq!(check_merge(&tensors(tiny.path()), &adapter, &out), 6);
}

#[test]
fn bad_maps_exit_2_naming_the_problem_and_write_nothing() {
    let tiny = tiny(Arch::Llama, 65);
    let work = tempfile::tempdir().unwrap();
    let adapter = work.path().join("adapter");
    make_adapter(&tiny, &adapter, false, &[0, 1, 2], 66);
    let out = work.path().join("out");
    let mut cases = vec![
        ("cpu:0=0,cpu:1=2", "layer 1 is on no device"),
        (
            "cpu:0=0-1,cpu:1=1-2",
            "layer 1 is placed twice (cpu:0 and cpu:1)",
        ),
        (
            "cpu:0=0-3",
            "layer 3 is out of range: the model has 3 layers (0-2)",
        ),
        (
            "gpu:0=0-2",
            "unknown device `gpu:0`: expected cpu, cpu:N, cuda or cuda:N",
        ),
        ("cpu:0", "`cpu:0`: expected DEVICE=FIRST-LAST"),
    ];
    if !cfg!(feature = "cuda") {
        cases.push(("cuda:0=0-2", "`cuda:0`: this eabfit was built without CUDA"));
    }
    for (map, why) in &cases {
        let o = std::process::Command::new(bin())
            .args(["export", "--model"])
            .arg(tiny.path())
            .arg("--adapter")
            .arg(&adapter)
            .arg("--out")
            .arg(&out)
            .args(["--device-map", map])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{map}: {stderr}");
        let want = format!("--device-map `{map}`: {why}");
        assert!(stderr.contains(&want), "{map}: `{want}` not in {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(!out.exists(), "{map}: an output was written");
        let left: Vec<_> = std::fs::read_dir(work.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("adapter")], "{map}");
    }
}
