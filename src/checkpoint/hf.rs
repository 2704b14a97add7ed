//! Hugging Face folders (config.json, safetensors shards, tokenizer.json) and hub ids.

use super::{parse_config, Checkpoint, EabExport, Format, Tok, Weights};
use crate::{Error, Result};
use candle_core::safetensors::MmapedSafetensors;
use std::path::{Path, PathBuf};

pub(super) fn looks_like_hub_id(spec: &str) -> bool {
    let parts: Vec<&str> = spec.split('/').collect();
    parts.len() == 2 && parts.iter().all(|p| !p.is_empty() && !p.starts_with('.'))
}

pub(super) fn open_dir(dir: &Path) -> Result<Checkpoint> {
    let config_path = dir.join("config.json");
    let text = read(&config_path)?;
    let (config, raw_config) = parse_config(&config_path, &text)?;
    let eab = EabExport::from_config(&config_path, &raw_config, &config)?;
    let files = shard_files(dir)?;
    let stored_dtype = check_shards(&files)?;
    let tokenizer = Tok::from_hf_dir(dir, &config)?;
    Ok(Checkpoint {
        source: dir.to_path_buf(),
        format: Format::HfDir,
        config,
        raw_config,
        tokenizer,
        stored_dtype,
        eab,
        weights: Weights::Safetensors(files),
    })
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::file(path, e))
}

/// The shards named by `model.safetensors.index.json`, else `model.safetensors`, else every
/// `*.safetensors` in the folder.
fn shard_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let v: serde_json::Value = serde_json::from_str(&read(&index)?)
            .map_err(|e| Error::file(&index, format!("invalid JSON: {e}")))?;
        let map = v["weight_map"]
            .as_object()
            .ok_or_else(|| Error::file(&index, "missing field `weight_map`"))?;
        let mut names: Vec<&str> = map.values().filter_map(|s| s.as_str()).collect();
        names.sort();
        names.dedup();
        return Ok(names.into_iter().map(|n| dir.join(n)).collect());
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let mut all: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::file(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    all.sort();
    if all.is_empty() {
        return Err(Error::file(
            dir,
            "no model.safetensors, no index json and no *.safetensors",
        ));
    }
    Ok(all)
}

/// Opens each shard on its own so a truncated or corrupt one is named; returns the stored dtype.
fn check_shards(files: &[PathBuf]) -> Result<String> {
    let mut dtype = String::from("unknown");
    for f in files {
        if !f.is_file() {
            return Err(Error::file(f, "shard listed in the index is missing"));
        }
        // Safety: read-only mapping, see Checkpoint::var_builder.
        let st = unsafe { MmapedSafetensors::new(f) }
            .map_err(|e| Error::file(f, format!("unreadable safetensors: {e}")))?;
        if let Some((_, view)) = st.tensors().first() {
            dtype = format!("{:?}", view.dtype());
        }
    }
    Ok(dtype)
}

/// Resolves a hub id through the hf-hub cache; downloads only what is missing, and says so
/// clearly when that is impossible (offline machines are the common case).
pub(super) fn open_hub(id: &str) -> Result<Checkpoint> {
    let cache = hf_hub::Cache::from_env();
    let cached = cache.model(id.to_string());
    let get = |name: &str| -> Result<PathBuf> {
        if let Some(p) = cached.get(name) {
            return Ok(p);
        }
        if std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1") {
            return Err(Error::Msg(format!(
                "{id}: `{name}` is not in the hf-hub cache ({}) and HF_HUB_OFFLINE=1",
                cache.path().display()
            )));
        }
        let api = hf_hub::api::sync::ApiBuilder::from_cache(cache.clone())
            .with_progress(false)
            .build()
            .map_err(|e| Error::Msg(format!("{id}: hub client: {e}")))?;
        api.model(id.to_string()).get(name).map_err(|e| {
            Error::Msg(format!(
                "{id}: `{name}` is not in the hf-hub cache ({}) and could not be downloaded: {e}",
                cache.path().display()
            ))
        })
    };
    let config = get("config.json")?;
    get("tokenizer.json")?;
    let _ = get("tokenizer_config.json");
    match get("model.safetensors.index.json") {
        Ok(index) => {
            let v: serde_json::Value =
                serde_json::from_str(&read(&index)?).map_err(|e| Error::file(&index, e))?;
            if let Some(map) = v["weight_map"].as_object() {
                for shard in map.values().filter_map(|s| s.as_str()) {
                    get(shard)?;
                }
            }
        }
        Err(_) => {
            get("model.safetensors")?;
        }
    }
    let dir = config
        .parent()
        .ok_or_else(|| Error::file(&config, "no parent folder"))?;
    open_dir(dir)
}
