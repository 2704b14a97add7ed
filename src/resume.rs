//! A run folder's checkpoints (`checkpoints/step-N/`, written whole by train and pretrain): the
//! newest complete one to resume from, the state it saved, and deleting the older ones.

use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// The newest complete checkpoint under a run folder, or `dir` itself if it is one.
pub fn latest_checkpoint(dir: &Path) -> Result<PathBuf> {
    if dir.join("state.json").is_file() {
        return Ok(dir.to_path_buf());
    }
    let ck = dir.join("checkpoints");
    complete_checkpoints(dir)?
        .pop()
        .ok_or_else(|| Error::file(&ck, "no complete checkpoint to resume from"))
}

/// A run folder's complete checkpoints (those with a `state.json`), oldest first.
fn complete_checkpoints(dir: &Path) -> Result<Vec<PathBuf>> {
    let ck = dir.join("checkpoints");
    let mut steps: Vec<PathBuf> = std::fs::read_dir(&ck)
        .map_err(|e| Error::file(&ck, format!("no checkpoints to resume from: {e}")))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("step-"))
                && p.join("state.json").is_file()
        })
        .collect();
    // Zero-padded step numbers: the names sort in step order.
    steps.sort();
    Ok(steps)
}

/// Deletes all but the newest `keep` complete checkpoints of a run folder (`keep` 0: none).
/// Called right after a checkpoint is written, so the newest is always one just saved.
pub fn prune_checkpoints(dir: &Path, keep: usize) -> Result<()> {
    if keep == 0 {
        return Ok(());
    }
    let steps = complete_checkpoints(dir)?;
    let old = steps.len().saturating_sub(keep);
    for p in &steps[..old] {
        std::fs::remove_dir_all(p).map_err(|e| Error::file(p, format!("cannot delete: {e}")))?;
    }
    Ok(())
}

/// The run state a checkpoint folder's `state.json` holds (train's or pretrain's).
pub fn read_state<S: serde::de::DeserializeOwned>(ck: &Path) -> Result<S> {
    let path = ck.join("state.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::file(&path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::file(&path, e))
}
