//! The files an export writes and where: weights (one file or shards + index), JSON, the
//! temporary folder renamed into place, and the checks that keep `--out` away from the source.

use crate::checkpoint::{Checkpoint, Format};
use crate::{Error, Result};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{Device, Tensor};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::path::{Component, Path, PathBuf};

/// Writes `model.safetensors`, or shards + `model.safetensors.index.json` when the tensors
/// exceed `max_shard` bytes. `sizes` names every tensor with its byte count; `produce` makes one
/// when its shard is written, and the shard's tensors are dropped before the next shard's are
/// made, so at most one shard is in memory. Returns (shards, bytes).
pub(super) fn write_weights(
    dir: &Path,
    sizes: Vec<(String, u64)>,
    max_shard: u64,
    mut produce: impl FnMut(&str) -> Result<Tensor>,
) -> Result<(usize, u64)> {
    let total: u64 = sizes.iter().map(|(_, s)| s).sum();
    let shards = shard_plan(sizes, max_shard);
    let count = shards.len();
    let mut weight_map = BTreeMap::new();
    for (i, shard) in shards.into_iter().enumerate() {
        let file = if count == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{count:05}.safetensors", i + 1)
        };
        let mut map = HashMap::with_capacity(shard.len());
        for name in shard {
            let t = produce(&name)?;
            weight_map.insert(name.clone(), file.clone());
            map.insert(name, t);
        }
        crate::fsio::save_safetensors(&map, &dir.join(&file))?;
    }
    if count > 1 {
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        write_json(&dir.join("model.safetensors.index.json"), &index)?;
    }
    Ok((count, total))
}

/// The weights [`write_weights`] put in a folder, read back by name.
pub(super) struct WrittenWeights {
    dir: PathBuf,
    mmap: MmapedSafetensors,
}

impl WrittenWeights {
    pub(super) fn open(dir: &Path) -> Result<Self> {
        let mut files = vec![];
        for entry in std::fs::read_dir(dir).map_err(|e| Error::file(dir, e))? {
            let path = entry.map_err(|e| Error::file(dir, e))?.path();
            if path.extension().is_some_and(|x| x == "safetensors") {
                files.push(path);
            }
        }
        files.sort();
        // Safety: the files are this export's own, in its private temporary folder.
        let mmap = unsafe { MmapedSafetensors::multi(&files) }.map_err(|e| Error::file(dir, e))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            mmap,
        })
    }

    /// Tensor `name` on the host, in the dtype it was written in.
    pub(super) fn read(&self, name: &str) -> Result<Tensor> {
        self.mmap
            .load(name, &Device::Cpu)
            .map_err(|e| Error::file(&self.dir, format!("tensor `{name}`: {e}")))
    }
}

/// The tensors of each shard, in natural name order: a new shard starts where the next tensor
/// would take the current one past `max_shard` bytes (a larger tensor gets a shard of its own).
fn shard_plan(mut sizes: Vec<(String, u64)>, max_shard: u64) -> Vec<Vec<String>> {
    sizes.sort_by_key(|(n, _)| natural_key(n));
    let mut shards: Vec<Vec<String>> = vec![vec![]];
    let mut used = 0u64;
    for (n, s) in sizes {
        if used > 0 && used + s > max_shard {
            shards.push(vec![]);
            used = 0;
        }
        used += s;
        shards.last_mut().expect("one shard").push(n);
    }
    shards
}

/// `model.layers.10.x` after `model.layers.9.x`.
fn natural_key(name: &str) -> Vec<(u8, usize, String)> {
    name.split('.')
        .map(|p| match p.parse::<usize>() {
            Ok(n) => (0, n, String::new()),
            Err(_) => (1, 0, p.to_string()),
        })
        .collect()
}

/// Refuses an `--out` that would write into the source model, delete it or the adapter, or
/// replace an existing folder without `--force`.
pub(super) fn guard_paths(
    ckpt: &Checkpoint,
    adapter: &Path,
    out: &Path,
    force: bool,
) -> Result<()> {
    let src = absolute(&ckpt.source)?;
    if ckpt.format == Format::HfDir && out.starts_with(&src) {
        return Err(Error::file(
            out,
            format!(
                "--out is inside the source model's folder {}; eabfit never writes there",
                src.display()
            ),
        ));
    }
    if src.starts_with(out) {
        return Err(Error::file(
            out,
            format!("--out holds the source model {}", src.display()),
        ));
    }
    let adapter_abs = absolute(adapter)?;
    if adapter_abs.starts_with(out) {
        return Err(Error::file(
            out,
            format!("--out holds the adapter {}", adapter_abs.display()),
        ));
    }
    if let Ok(meta) = std::fs::symlink_metadata(out) {
        if !force {
            return Err(Error::file(
                out,
                "already exists; pass --force to replace it",
            ));
        }
        if !meta.is_dir() {
            return Err(Error::file(
                out,
                "exists and is not a folder; --force replaces folders only",
            ));
        }
    }
    Ok(())
}

/// `p` made absolute: its longest existing ancestor canonicalized, the rest (`.` and `..`
/// resolved) appended.
pub(super) fn absolute(p: &Path) -> Result<PathBuf> {
    let joined = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| Error::file(p, e))?
            .join(p)
    };
    let mut norm = PathBuf::new();
    for c in joined.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                norm.pop();
            }
            other => norm.push(other),
        }
    }
    let mut existing = norm.clone();
    let mut rest = vec![];
    while std::fs::symlink_metadata(&existing).is_err() {
        match (existing.file_name(), existing.parent()) {
            (Some(n), Some(parent)) => {
                rest.push(n.to_owned());
                existing = parent.to_path_buf();
            }
            _ => break,
        }
    }
    let mut out = existing.canonicalize().unwrap_or(existing);
    for n in rest.iter().rev() {
        out.push(n);
    }
    Ok(out)
}

/// The export's temporary folder: removed on drop unless committed.
pub(super) struct TempDir(pub(super) PathBuf, bool);

impl TempDir {
    pub(super) fn new(path: PathBuf) -> Result<Self> {
        if path.exists() {
            let _ = std::fs::remove_dir_all(&path);
        }
        std::fs::create_dir(&path).map_err(|e| {
            Error::file(
                &path,
                format!("cannot write beside --out (is its folder writable?): {e}"),
            )
        })?;
        Ok(Self(path, false))
    }

    /// Renames the folder to `out`; an existing `out` is moved aside first and removed after.
    pub(super) fn commit(mut self, out: &Path) -> Result<()> {
        let old = self.0.with_file_name(format!(
            "{}.old",
            self.0.file_name().unwrap_or_default().to_string_lossy()
        ));
        let replacing = out.exists();
        if replacing {
            std::fs::rename(out, &old)
                .map_err(|e| Error::file(out, format!("cannot move the old export aside: {e}")))?;
        }
        if let Err(e) = std::fs::rename(&self.0, out) {
            if replacing {
                let _ = std::fs::rename(&old, out);
            }
            return Err(Error::file(
                out,
                format!("cannot move the export into place: {e}"),
            ));
        }
        if replacing {
            let _ = std::fs::remove_dir_all(&old);
        }
        self.1 = true;
        Ok(())
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.1 {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

pub(super) fn mkdir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, e))
}

pub(super) fn write_file(path: &Path, body: &[u8]) -> Result<()> {
    std::fs::write(path, body).map_err(|e| Error::file(path, e))
}

pub(super) fn write_json(path: &Path, v: &Value) -> Result<()> {
    let body = serde_json::to_string_pretty(v).map_err(|e| Error::file(path, e))?;
    write_file(path, body.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The writer makes a shard's tensors only once the shard before is on disk: the tensors in
    /// memory at any time are one shard's.
    #[test]
    fn shards_are_made_and_written_one_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        // Ten tensors of 3 f32 (12 bytes) under a 30-byte limit: five shards of two.
        let sizes: Vec<(String, u64)> = (0..10).map(|i| (format!("t.{i}"), 12)).collect();
        let on_disk = || {
            std::fs::read_dir(dir.path())
                .unwrap()
                .filter(|e| {
                    let p = e.as_ref().unwrap().path();
                    p.extension().is_some_and(|x| x == "safetensors")
                })
                .count()
        };
        let mut made = vec![];
        let (count, total) = write_weights(dir.path(), sizes, 30, |name| {
            made.push((name.to_string(), on_disk()));
            let i: f32 = name[2..].parse().unwrap();
            Ok(Tensor::new(&[i, i + 0.5, -i], &Device::Cpu)?)
        })
        .unwrap();
        assert_eq!((count, total), (5, 120));
        // Tensor i, the (i % 2)-th of shard i / 2, is made with shards 0 .. i / 2 written.
        let want: Vec<(String, usize)> = (0..10).map(|i| (format!("t.{i}"), i / 2)).collect();
        assert_eq!(made, want);
        let index: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("model.safetensors.index.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(
            index["weight_map"]["t.7"],
            "model-00004-of-00005.safetensors"
        );
        let shard = candle_core::safetensors::load(
            dir.path().join("model-00004-of-00005.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(shard.len(), 2);
        assert_eq!(shard["t.7"].to_vec1::<f32>().unwrap(), [7.0, 7.5, -7.0]);
    }
}
