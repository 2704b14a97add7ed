//! `eabfit export` on bad input: an adapter of another model or with a bent tensor, missing
//! adapter files, an adapter that changes nothing, an --out that cannot be written, exists
//! already, or lies over the model or the adapter, bad flags. Each fails with a message naming
//! the fault (usage errors exit 2), no panic, nothing half-written, the user's files untouched.

mod common;

use candle_core::{DType, Device, Tensor};
use common::export::{all_layers, export, fails, no_leftovers, ok};
use common::{make_adapter, snapshot, tiny, Arch, Tiny};
use eabfit::adapters::{AdapterMeta, AdapterSet, SlotInit};
use eabfit::checkpoint::Checkpoint;
use std::path::{Path, PathBuf};

#[test]
fn bad_input_fails_cleanly() {
    let tiny = tiny(Arch::Llama, 47);
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let adapter = w.join("adapter");
    make_adapter(&tiny, &adapter, true, &all_layers(), 14);
    let model_files = snapshot(tiny.path());
    let out = w.join("out");

    // An adapter of another model: the meta names the field ...
    let mut other_cfg = common::config(Arch::Llama);
    other_cfg["hidden_size"] = 48.into();
    other_cfg["num_attention_heads"] = 6.into();
    let other = common::tiny(Arch::Llama, 1);
    common::write_checkpoint(other.path(), &other_cfg, &common::weights(&other_cfg, 2));
    let foreign = w.join("foreign");
    make_adapter(&other, &foreign, true, &all_layers(), 15);
    fails(
        &export(tiny.path(), &foreign, &out, &[]),
        &["another model", "hidden_size 48"],
    );
    // ... and a tensor of the wrong shape is named.
    let bent = w.join("bent");
    make_adapter(&tiny, &bent, true, &all_layers(), 16);
    let mut ts =
        candle_core::safetensors::load(bent.join("adapter.safetensors"), &Device::Cpu).unwrap();
    let name = "model.layers.0.mlp.down_proj.lora_B.weight";
    ts.insert(
        name.into(),
        Tensor::ones((32, 3), DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&ts, bent.join("adapter.safetensors")).unwrap();
    fails(&export(tiny.path(), &bent, &out, &[]), &[name, "shape"]);

    // Missing adapter files.
    fails(
        &export(tiny.path(), &w.join("nowhere"), &out, &[]),
        &["nowhere", "adapter_config.json"],
    );
    let half = w.join("half");
    std::fs::create_dir_all(&half).unwrap();
    std::fs::copy(
        adapter.join("adapter_config.json"),
        half.join("adapter_config.json"),
    )
    .unwrap();
    fails(
        &export(tiny.path(), &half, &out, &[]),
        &["adapter.safetensors"],
    );

    // An adapter that changes nothing: B all zero, no slots.
    let idle = w.join("idle");
    {
        let cfg = Checkpoint::open(&tiny.spec()).unwrap().config;
        let mut meta = AdapterMeta::for_config(&cfg, "x");
        meta.lora_rank = 2;
        meta.lora_alpha = 2.0;
        meta.lora_targets = vec!["down".into()];
        meta.lora_layers = vec![1];
        AdapterSet::new(meta, SlotInit::Zeros, 0.1, 0, &Device::Cpu)
            .unwrap()
            .save(&idle)
            .unwrap();
    }
    fails(&export(tiny.path(), &idle, &out, &[]), &["changes nothing"]);
    assert!(!out.exists());

    // --out not writable: below a file, and in /proc.
    let file = w.join("a-file");
    std::fs::write(&file, "x").unwrap();
    fails(
        &export(tiny.path(), &adapter, &file.join("out"), &[]),
        &["a-file"],
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"x");
    if Path::new("/proc/self").exists() {
        let o = export(
            tiny.path(),
            &adapter,
            Path::new("/proc/eabfit-export-test"),
            &[],
        );
        fails(&o, &["/proc"]);
    }

    // An existing --out needs --force; without it nothing changes.
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    fails(
        &export(tiny.path(), &adapter, &out, &[]),
        &["already exists", "--force"],
    );
    assert_eq!(
        std::fs::read_to_string(out.join("keep.txt")).unwrap(),
        "mine"
    );
    ok(&export(tiny.path(), &adapter, &out, &["--force"]));
    assert!(!out.join("keep.txt").exists());
    assert!(out.join("model.safetensors").is_file());
    // A failing export with --force leaves the old one whole.
    let before = snapshot(&out);
    fails(
        &export(
            tiny.path(),
            &masked_copy(&tiny, w),
            &out,
            &["--force", "--format", "peft"],
        ),
        &["mask_first_token"],
    );
    assert_eq!(snapshot(&out), before);

    // Never inside the model's folder, never over the model or the adapter.
    fails(
        &export(tiny.path(), &adapter, &tiny.path().join("export"), &[]),
        &["inside the source model's folder"],
    );
    fails(
        &export(tiny.path(), &adapter, tiny.path(), &["--force"]),
        &["source model"],
    );
    let models = w.join("models");
    let copy = models.join("m");
    std::fs::create_dir_all(&copy).unwrap();
    for (p, bytes) in &model_files {
        std::fs::write(copy.join(p.file_name().unwrap()), bytes).unwrap();
    }
    fails(
        &export(&copy, &adapter, &models, &["--force"]),
        &["holds the source model"],
    );
    assert!(copy.join("model.safetensors").is_file());
    fails(&export(tiny.path(), &adapter, w, &["--force"]), &["holds"]);
    assert!(adapter.join("adapter.safetensors").is_file());
    assert_eq!(
        snapshot(tiny.path()),
        model_files,
        "the model folder changed"
    );

    // Usage errors exit 2.
    let o = export(tiny.path(), &adapter, &w.join("x"), &["--format", "onnx"]);
    assert_eq!(o.status.code(), Some(2));
    let o = export(tiny.path(), &adapter, &w.join("x"), &["--dtype", "f8"]);
    assert_eq!(o.status.code(), Some(2));
    no_leftovers(w);
    assert!(!w.join("x").exists());
}

/// A mask_first_token adapter (which `--format peft` refuses), in its own folder.
fn masked_copy(tiny: &Tiny, w: &Path) -> PathBuf {
    let d = w.join("masked-copy");
    make_adapter(tiny, &d, true, &all_layers(), 17);
    d
}
