//! Hugging Face folders (safetensors headers, config.json, tokenizer.json) and adapter folders
//! (adapter_config.json, adapter.safetensors), mutated one file at a time from a tiny model's.

use crate::common;
use crate::mutate::{extreme_u64, mutate_bytes, mutate_json, mutate_json_file};
use crate::{drive, open_and_run, quiet_backtraces, rng_for, scaled};
use candle_core::{DType, Device, Tensor};
use eabfit::adapters::{AdapterMeta, AdapterSet, SlotInit};
use eabfit::checkpoint::Checkpoint;
use rand::{rngs::StdRng, Rng};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

pub(crate) struct Hf {
    _dir: tempfile::TempDir,
    path: PathBuf,
    pub(crate) cfg: String,
    pub(crate) tokenizer: String,
    pub(crate) weights: Vec<u8>,
}

pub(crate) fn hf_fixture() -> Hf {
    let t = common::tiny(common::Arch::Llama, 7);
    let path = t.path().to_path_buf();
    let read = |n: &str| std::fs::read_to_string(path.join(n)).unwrap();
    Hf {
        cfg: read("config.json"),
        tokenizer: read("tokenizer.json"),
        weights: std::fs::read(path.join("model.safetensors")).unwrap(),
        path,
        _dir: t.dir,
    }
}

/// Writes a HF folder into `dir` with the given bodies (tokenizer_config.json as the fixture's).
pub(crate) fn write_hf(dir: &Path, hf: &Hf, cfg: &[u8], tok: &[u8], weights: &[u8]) {
    std::fs::write(dir.join("config.json"), cfg).unwrap();
    std::fs::write(dir.join("tokenizer.json"), tok).unwrap();
    std::fs::write(dir.join("model.safetensors"), weights).unwrap();
    std::fs::copy(
        hf.path.join("tokenizer_config.json"),
        dir.join("tokenizer_config.json"),
    )
    .unwrap();
}

/// Splits a safetensors file into (header JSON, data).
fn split_safetensors(b: &[u8]) -> (Value, Vec<u8>) {
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    (
        serde_json::from_slice(&b[8..8 + n]).unwrap(),
        b[8 + n..].to_vec(),
    )
}

fn join_safetensors(header: &[u8], data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend(header);
    out.extend(data);
    out
}

/// A safetensors file mutated in its header: bytes of the length and JSON, or the JSON's
/// shapes, dtypes and offsets (length prefix kept consistent, or not).
pub(crate) fn mutate_safetensors(rng: &mut StdRng, file: &[u8]) -> Vec<u8> {
    let (header, data) = split_safetensors(file);
    let text = serde_json::to_vec(&header).unwrap();
    match rng.gen_range(0..4) {
        0 => {
            let mut b = join_safetensors(&text, &data);
            let end = 8 + text.len();
            mutate_bytes(rng, &mut b, 0..end);
            b
        }
        1 => {
            let mut b = join_safetensors(&text, &data);
            b[..8].copy_from_slice(&extreme_u64(rng).to_le_bytes());
            b
        }
        _ => {
            let mut h = header;
            let names: Vec<String> = h
                .as_object()
                .unwrap()
                .keys()
                .filter(|k| *k != "__metadata__")
                .cloned()
                .collect();
            let t = &mut h[&names[rng.gen_range(0..names.len())]];
            match rng.gen_range(0..5) {
                0 => {
                    t["dtype"] = json!(
                        ["F64", "F16", "I64", "BOOL", "U8", "Q4", "f32", ""][rng.gen_range(0..8)]
                    )
                }
                1 => {
                    let dims = t["shape"].as_array().unwrap().len();
                    let k = rng.gen_range(0..dims.max(1));
                    t["shape"][k] = json!(extreme_u64(rng));
                }
                2 => t["shape"] = json!([rng.gen_range(0..5), extreme_u64(rng), 3]),
                3 => t["data_offsets"][rng.gen_range(0..2)] = json!(extreme_u64(rng)),
                _ => mutate_json(rng, &mut h),
            }
            join_safetensors(&serde_json::to_vec(&h).unwrap(), &data)
        }
    }
}

#[test]
fn fuzz_safetensors_headers_config_and_tokenizer() {
    quiet_backtraces();
    let hf = hf_fixture();
    open_and_run(&hf.path).unwrap();
    let root = tempfile::tempdir().unwrap();
    let base = root.path().to_path_buf();
    let hf = std::sync::Arc::new(hf);
    let h = hf.clone();
    drive("safetensors", scaled(900), move |i| {
        let mut rng = rng_for("safetensors", i);
        let dir = base.join(format!("st-{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        let w = mutate_safetensors(&mut rng, &h.weights);
        write_hf(&dir, &h, h.cfg.as_bytes(), h.tokenizer.as_bytes(), &w);
        let r = open_and_run(&dir);
        let _ = std::fs::remove_dir_all(&dir);
        r
    });
    let base = root.path().to_path_buf();
    let h = hf.clone();
    drive("config.json", scaled(800), move |i| {
        let mut rng = rng_for("config", i);
        let dir = base.join(format!("cfg-{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        let c = mutate_json_file(&mut rng, &h.cfg);
        write_hf(&dir, &h, &c, h.tokenizer.as_bytes(), &h.weights);
        let r = open_and_run(&dir);
        let _ = std::fs::remove_dir_all(&dir);
        r
    });
    let base = root.path().to_path_buf();
    let h = hf.clone();
    drive("tokenizer.json", scaled(700), move |i| {
        let mut rng = rng_for("tokenizer", i);
        let dir = base.join(format!("tok-{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        let t = mutate_json_file(&mut rng, &h.tokenizer);
        write_hf(&dir, &h, h.cfg.as_bytes(), &t, &h.weights);
        let r = open_and_run(&dir);
        let _ = std::fs::remove_dir_all(&dir);
        r
    });
}

#[test]
fn fuzz_adapter_folders() {
    quiet_backtraces();
    let hf = hf_fixture();
    let ckpt = Checkpoint::open(&hf.path.display().to_string()).unwrap();
    let cfg = ckpt.config.clone();
    let mut meta = AdapterMeta::for_config(&cfg, "tiny");
    meta.eab_layers = (0..cfg.num_hidden_layers).collect();
    meta.mask_first_token = true;
    meta.lora_rank = 2;
    meta.lora_alpha = 4.0;
    meta.lora_targets = vec!["down".into(), "q".into()];
    meta.lora_layers = vec![1];
    let set = AdapterSet::new(
        meta,
        SlotInit::Normal { std: 0.1, seed: 3 },
        0.1,
        3,
        &Device::Cpu,
    )
    .unwrap();
    let root = tempfile::tempdir().unwrap();
    let clean = root.path().join("clean");
    set.save(&clean).unwrap();
    let meta_text = std::fs::read_to_string(clean.join("adapter_config.json")).unwrap();
    let weights = std::fs::read(clean.join("adapter.safetensors")).unwrap();
    let base = ckpt.base(DType::F32, &Device::Cpu).unwrap();
    let base = std::sync::Arc::new(std::sync::Mutex::new(base));
    let root_path = root.path().to_path_buf();
    drive("adapter", scaled(800), move |i| {
        let mut rng = rng_for("adapter", i);
        let dir = root_path.join(format!("ad-{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        let (m, w) = if i % 2 == 0 {
            (mutate_json_file(&mut rng, &meta_text), weights.clone())
        } else {
            (
                meta_text.clone().into_bytes(),
                mutate_safetensors(&mut rng, &weights),
            )
        };
        std::fs::write(dir.join("adapter_config.json"), m).unwrap();
        std::fs::write(dir.join("adapter.safetensors"), w).unwrap();
        let name = dir.display().to_string();
        let r = (|| {
            let set = AdapterSet::load(&dir, &cfg, &Device::Cpu)
                .map_err(|e| (e.to_string(), name.clone()))?;
            let model = base
                .lock()
                .unwrap()
                .model(&set.adapters())
                .map_err(|e| (e.to_string(), String::new()))?;
            let ids = Tensor::new(&[1u32, 5, 6, 7], &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            model
                .logits(&ids)
                .map(|_| ())
                .map_err(|e| (e.to_string(), String::new()))
        })();
        let _ = std::fs::remove_dir_all(&dir);
        r
    });
}
