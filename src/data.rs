//! Text in, token windows out: the one definition of "window" every command shares.

use crate::checkpoint::Tok;
use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// Reads a text file, or every `*.txt` of a folder in name order, joined by blank lines.
pub fn read_text(path: &Path) -> Result<String> {
    let files: Vec<PathBuf> = if path.is_dir() {
        let mut v: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| Error::file(path, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "txt"))
            .collect();
        v.sort();
        v
    } else {
        vec![path.to_path_buf()]
    };
    let mut text = String::new();
    for f in &files {
        let bytes = std::fs::read(f).map_err(|e| Error::file(f, e))?;
        text.push_str(&String::from_utf8_lossy(&bytes));
        text.push_str("\n\n");
    }
    if text.trim().is_empty() {
        return Err(Error::file(
            path,
            "no text (empty file or no *.txt in the folder)",
        ));
    }
    Ok(text)
}

/// Consecutive non-overlapping windows of `seq_len` text tokens from the start of the text,
/// each with BOS in front exactly when the tokenizer says the model expects it.
#[derive(Debug, Clone)]
pub struct Windows {
    pub ids: Vec<Vec<u32>>,
    pub seq_len: usize,
    pub bos: Option<u32>,
}

impl Windows {
    pub fn new(
        tok: &Tok,
        text: &str,
        seq_len: usize,
        max_windows: Option<usize>,
        origin: &Path,
    ) -> Result<Self> {
        if seq_len == 0 {
            return Err(Error::Usage("--seq-len must be at least 1".into()));
        }
        let ids = tok.encode(text)?;
        let n = ids.len() / seq_len;
        if n == 0 {
            return Err(Error::file(
                origin,
                format!(
                    "text too short: {} tokens, a window needs {seq_len}",
                    ids.len()
                ),
            ));
        }
        let n = max_windows.map_or(n, |m| m.min(n));
        let bos = tok.bos.filter(|_| tok.add_bos);
        let ids = ids
            .chunks_exact(seq_len)
            .take(n)
            .map(|w| bos.into_iter().chain(w.iter().copied()).collect())
            .collect();
        Ok(Self { ids, seq_len, bos })
    }

    /// The windows of each text in turn (up to `max_per_text` from each), so that no window
    /// straddles two texts and every text of a list is represented.
    pub fn of_texts(
        tok: &Tok,
        paths: &[PathBuf],
        seq_len: usize,
        max_per_text: Option<usize>,
    ) -> Result<Self> {
        let mut all: Option<Self> = None;
        for p in paths {
            let w = Self::new(tok, &read_text(p)?, seq_len, max_per_text, p)?;
            match &mut all {
                Some(a) => a.ids.extend(w.ids),
                None => all = Some(w),
            }
        }
        all.ok_or_else(|| Error::Usage("no text given (an empty list)".into()))
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
    /// Tokens per window as fed to the model (BOS included).
    pub fn width(&self) -> usize {
        self.seq_len + usize::from(self.bos.is_some())
    }
}

/// Indices into `n` items of micro-batch `g` (a global count over steps x accumulation) of
/// `batch` items: the items in order of seeded per-epoch permutations, so the order depends on
/// (seed, g) alone and a checkpoint's step is all the state a resume needs.
pub fn batch_indices(n: usize, seed: u64, g: usize, batch: usize) -> Vec<usize> {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let mut perms: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
    (g * batch..(g + 1) * batch)
        .map(|k| {
            let epoch = k / n;
            let perm = perms.entry(epoch).or_insert_with(|| {
                let mut p: Vec<usize> = (0..n).collect();
                p.shuffle(&mut rand::rngs::StdRng::seed_from_u64(
                    seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                ));
                p
            });
            perm[k % n]
        })
        .collect()
}
