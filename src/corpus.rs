//! A token corpus for pretraining, and `eabfit tokenize`, which makes one from text files.
//!
//! A corpus is a folder, written whole or not at all:
//! - `train.bin`, `val.bin`: token ids as u32 little-endian, documents one after another, each
//!   followed by the separator token. Each input file is one document; whole documents go to
//!   the held-out split, so no held-out text is ever seen in training.
//! - `corpus.json`: [`CorpusMeta`] (tokenizer, vocabulary size, BOS and separator, counts).
//! - `val-files.txt`: the held-out input files, one path a line (text to scan a model on that
//!   it never trained on).
//! - `tokenizer.json`, `tokenizer_config.json`: the tokenizer, with BOS as its first token, so
//!   that a model trained on the corpus is written out with the tokenizer that reads it.
//!
//! Training windows ([`TokenWindows`]) are consecutive slices of a split with BOS in front of
//! every one: a constant first token is where an attention sink forms.

use crate::checkpoint::{Checkpoint, Tok};
use crate::fsio::{replace_dir, write_atomic};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

pub const META: &str = "corpus.json";
pub const VAL_FILES: &str = "val-files.txt";
const FORMAT_VERSION: u32 = 1;
/// Files read and tokenized together: large enough to keep every core busy, small enough
/// that only a slice of a large corpus is in memory at once.
const CHUNK_FILES: usize = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Val,
}

impl Split {
    pub fn file(self) -> &'static str {
        match self {
            Split::Train => "train.bin",
            Split::Val => "val.bin",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitCounts {
    pub documents: usize,
    /// Separators included.
    pub tokens: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CorpusMeta {
    pub format_version: u32,
    /// Where the tokenizer came from.
    pub tokenizer: String,
    pub vocab_size: usize,
    pub bos_id: u32,
    pub bos: String,
    /// The token after every document.
    pub sep_id: u32,
    pub sep: String,
    pub val_fraction: f64,
    /// Empty input files, left out.
    pub skipped_empty: usize,
    pub train: SplitCounts,
    pub val: SplitCounts,
}

#[derive(Debug, clap::Args)]
pub struct TokenizeArgs {
    /// Text files, or folders searched recursively for files ending in --ext
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// Output corpus folder (train.bin, val.bin, corpus.json, tokenizer files)
    #[arg(long)]
    pub out: PathBuf,
    /// A tokenizer.json, or a folder holding one (with its tokenizer_config.json)
    #[arg(long, conflicts_with = "model")]
    pub tokenizer: Option<PathBuf>,
    /// Use this model's tokenizer (Hugging Face folder, hub id or .gguf)
    #[arg(long)]
    pub model: Option<String>,
    /// File endings searched for in folders
    #[arg(long = "ext", default_values_t = [String::from("txt")])]
    pub exts: Vec<String>,
    /// Share of the documents held out for validation
    #[arg(long, default_value_t = 0.01)]
    pub val_fraction: f64,
    /// First token of every training window [default: the tokenizer's BOS, else its EOS]
    #[arg(long)]
    pub bos: Option<String>,
    /// Token after every document [default: the tokenizer's EOS, else its BOS]
    #[arg(long)]
    pub sep: Option<String>,
    /// Replace an existing --out
    #[arg(long)]
    pub force: bool,
}

pub fn tokenize_cmd(args: &TokenizeArgs) -> Result<()> {
    if !(0.0..1.0).contains(&args.val_fraction) {
        return Err(Error::Usage(format!(
            "--val-fraction must be in [0, 1), got {}",
            args.val_fraction
        )));
    }
    if args.out.exists() && !args.force {
        return Err(Error::file(
            &args.out,
            "already exists; pass --force to replace it",
        ));
    }
    let tok = match (&args.tokenizer, &args.model) {
        (Some(t), None) => Tok::open(t)?,
        (None, Some(m)) => Checkpoint::open(m)?.tokenizer,
        _ => return Err(Error::Usage("tokenize needs --tokenizer or --model".into())),
    };
    let files = input_files(&args.inputs, &args.exts)?;
    let start = std::time::Instant::now();
    let meta = tokenize(&tok, &files, args, &args.out)?;
    let secs = start.elapsed().as_secs_f64();
    let total = meta.train.tokens + meta.val.tokens;
    println!(
        "train    {} documents, {} tokens",
        meta.train.documents, meta.train.tokens
    );
    println!(
        "val      {} documents, {} tokens",
        meta.val.documents, meta.val.tokens
    );
    println!(
        "bos {} {:?}, separator {} {:?}, vocab {}; {} empty files skipped",
        meta.bos_id, meta.bos, meta.sep_id, meta.sep, meta.vocab_size, meta.skipped_empty
    );
    println!(
        "{total} tokens in {secs:.1} s ({:.0} tokens/s) -> {}",
        total as f64 / secs.max(1e-9),
        args.out.display()
    );
    Ok(())
}

/// Every input file, folders expanded recursively, in path order (the corpus is then the same
/// whatever order the shell listed them in).
fn input_files(inputs: &[PathBuf], exts: &[String]) -> Result<Vec<PathBuf>> {
    fn walk(dir: &Path, exts: &[String], out: &mut Vec<PathBuf>) -> Result<()> {
        for e in std::fs::read_dir(dir).map_err(|e| Error::file(dir, e))? {
            let p = e.map_err(|e| Error::file(dir, e))?.path();
            if p.is_dir() {
                walk(&p, exts, out)?;
            } else if p.file_name().is_some_and(|n| {
                exts.iter()
                    .any(|x| n.to_string_lossy().ends_with(x.as_str()))
            }) {
                out.push(p);
            }
        }
        Ok(())
    }
    let mut files = vec![];
    for i in inputs {
        if i.is_dir() {
            walk(i, exts, &mut files)?;
        } else if i.is_file() {
            files.push(i.clone());
        } else {
            return Err(Error::file(i, "no such file or folder"));
        }
    }
    files.sort();
    files.dedup();
    if files.is_empty() {
        return Err(Error::Usage(format!(
            "no input files (folders are searched for files ending in {})",
            exts.join(", ")
        )));
    }
    Ok(files)
}

/// Whether document `i` (of the non-empty ones) is held out: every time `i * fraction` passes
/// an integer, which spreads the held-out documents evenly over the corpus.
fn held_out(i: usize, fraction: f64) -> bool {
    ((i + 1) as f64 * fraction).floor() > (i as f64 * fraction).floor()
}

fn token_id(
    tok: &Tok,
    flag: &str,
    text: &Option<String>,
    fallback: [Option<u32>; 2],
) -> Result<u32> {
    match text {
        Some(t) => tok
            .inner
            .token_to_id(t)
            .ok_or_else(|| Error::Usage(format!("{flag} `{t}` is not a token of {}", tok.origin))),
        None => fallback.into_iter().flatten().next().ok_or_else(|| {
            Error::Usage(format!(
                "{} has neither BOS nor EOS: name a token with {flag}",
                tok.origin
            ))
        }),
    }
}

/// Tokenizes `files` into the corpus folder `out` (replaced whole).
fn tokenize(tok: &Tok, files: &[PathBuf], args: &TokenizeArgs, out: &Path) -> Result<CorpusMeta> {
    let bos = token_id(tok, "--bos", &args.bos, [tok.bos, tok.eos])?;
    let sep = token_id(tok, "--sep", &args.sep, [tok.eos, tok.bos])?;
    let text = |id: u32| tok.inner.id_to_token(id).unwrap_or_default();
    let mut meta = CorpusMeta {
        format_version: FORMAT_VERSION,
        tokenizer: tok.origin.clone(),
        vocab_size: tok.vocab_size(),
        bos_id: bos,
        bos: text(bos),
        sep_id: sep,
        sep: text(sep),
        val_fraction: args.val_fraction,
        skipped_empty: 0,
        train: SplitCounts::default(),
        val: SplitCounts::default(),
    };
    replace_dir(out, |tmp| {
        let open = |s: Split| -> Result<std::io::BufWriter<std::fs::File>> {
            let p = tmp.join(s.file());
            let f = std::fs::File::create(&p).map_err(|e| Error::file(&p, e))?;
            Ok(std::io::BufWriter::with_capacity(1 << 20, f))
        };
        let (mut train, mut val) = (open(Split::Train)?, open(Split::Val)?);
        let mut val_files = String::new();
        let mut doc = 0usize;
        for chunk in files.chunks(CHUNK_FILES) {
            let texts: Vec<String> = chunk
                .iter()
                .map(|f| {
                    let bytes = std::fs::read(f).map_err(|e| Error::file(f, e))?;
                    Ok(String::from_utf8_lossy(&bytes).into_owned())
                })
                .collect::<Result<_>>()?;
            let encodings = tok
                .inner
                .encode_batch(texts.iter().map(String::as_str).collect::<Vec<_>>(), false)
                .map_err(|e| Error::Msg(format!("tokenizer ({}): {e}", tok.origin)))?;
            for (f, enc) in chunk.iter().zip(encodings) {
                let ids = enc.get_ids();
                if ids.is_empty() {
                    meta.skipped_empty += 1;
                    continue;
                }
                let (w, counts, split) = match held_out(doc, args.val_fraction) {
                    true => {
                        val_files.push_str(&format!("{}\n", f.display()));
                        (&mut val, &mut meta.val, Split::Val)
                    }
                    false => (&mut train, &mut meta.train, Split::Train),
                };
                let bytes: Vec<u8> = ids
                    .iter()
                    .chain([&sep])
                    .flat_map(|t| t.to_le_bytes())
                    .collect();
                w.write_all(&bytes).map_err(|e| {
                    Error::file(
                        out.join(split.file()),
                        format!("write failed ({}): {e}", f.display()),
                    )
                })?;
                counts.documents += 1;
                counts.tokens += ids.len() + 1;
                doc += 1;
            }
        }
        for (w, s) in [(train, Split::Train), (val, Split::Val)] {
            w.into_inner()
                .map_err(|e| e.into_error())
                .and_then(|f| f.sync_all())
                .map_err(|e| Error::file(out.join(s.file()), format!("write failed: {e}")))?;
        }
        if meta.train.documents == 0 {
            return Err(Error::Usage(
                "every input file is empty or held out: nothing to train on".into(),
            ));
        }
        // Pretraining evaluates on val.bin: an empty one would only fail there, after the work.
        if args.val_fraction > 0.0 && meta.val.documents == 0 {
            return Err(Error::Usage(format!(
                "--val-fraction {} holds out none of the {} documents: raise it to at least {:.3}",
                args.val_fraction,
                meta.train.documents,
                1.0 / meta.train.documents as f64
            )));
        }
        let body = serde_json::to_string_pretty(&meta).map_err(|e| Error::file(out, e))?;
        write_atomic(&tmp.join(META), body.as_bytes())?;
        write_atomic(&tmp.join(VAL_FILES), val_files.as_bytes())?;
        write_tokenizer(tok, bos, sep, tmp)
    })?;
    Ok(meta)
}

/// The tokenizer files of a corpus: BOS first in every encoding, and a tokenizer_config.json
/// that says so (eabfit's own windows follow `add_bos_token`).
fn write_tokenizer(tok: &Tok, bos: u32, sep: u32, dir: &Path) -> Result<()> {
    let path = dir.join("tokenizer.json");
    let inner = tok.with_bos_first(bos).map_err(|e| Error::file(&path, e))?;
    inner
        .save(&path, false)
        .map_err(|e| Error::file(&path, e))?;
    let text = |id: u32| tok.inner.id_to_token(id);
    let mut tc = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": true,
        "add_eos_token": false,
        "bos_token": text(bos),
        "eos_token": text(sep),
        "clean_up_tokenization_spaces": false,
    });
    if let Some(t) = &tok.chat_template {
        tc["chat_template"] = t.clone().into();
    }
    let body = serde_json::to_string_pretty(&tc).map_err(|e| Error::file(dir, e))?;
    write_atomic(&dir.join("tokenizer_config.json"), body.as_bytes())
}

/// A corpus folder, opened and checked.
pub struct Corpus {
    pub dir: PathBuf,
    pub meta: CorpusMeta,
}

impl Corpus {
    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.join(META);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            Error::file(
                &path,
                format!("not a corpus folder (eabfit tokenize makes one): {e}"),
            )
        })?;
        let meta: CorpusMeta = serde_json::from_str(&text).map_err(|e| Error::file(&path, e))?;
        if meta.format_version != FORMAT_VERSION {
            return Err(Error::file(
                &path,
                format!(
                    "format_version {} is not supported (this eabfit reads {FORMAT_VERSION})",
                    meta.format_version
                ),
            ));
        }
        for (id, what) in [(meta.bos_id, "bos_id"), (meta.sep_id, "sep_id")] {
            if id as usize >= meta.vocab_size {
                return Err(Error::file(
                    &path,
                    format!(
                        "{what} {id} is outside the vocabulary ({})",
                        meta.vocab_size
                    ),
                ));
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            meta,
        })
    }

    /// The corpus's own tokenizer (BOS first).
    pub fn tokenizer(&self) -> Result<Tok> {
        Tok::open(&self.dir)
    }

    /// Every token of a split, checked against the vocabulary and the count in corpus.json.
    pub fn tokens(&self, split: Split) -> Result<Vec<u32>> {
        let path = self.dir.join(split.file());
        let bytes = std::fs::read(&path).map_err(|e| Error::file(&path, e))?;
        let want = match split {
            Split::Train => self.meta.train.tokens,
            Split::Val => self.meta.val.tokens,
        };
        if bytes.len() != 4 * want {
            return Err(Error::file(
                &path,
                format!(
                    "{} bytes, corpus.json says {want} tokens ({} bytes): truncated or replaced",
                    bytes.len(),
                    4 * want
                ),
            ));
        }
        let ids: Vec<u32> = bytes
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        if let Some((i, id)) = ids
            .iter()
            .enumerate()
            .find(|(_, &id)| id as usize >= self.meta.vocab_size)
        {
            return Err(Error::file(
                &path,
                format!(
                    "token {i} is id {id}, outside the vocabulary ({})",
                    self.meta.vocab_size
                ),
            ));
        }
        Ok(ids)
    }
}

/// Non-overlapping windows of `width` tokens over a split: BOS, then `width - 1` tokens of
/// the split, consecutive from its start.
#[derive(Debug)]
pub struct TokenWindows {
    tokens: Vec<u32>,
    bos: u32,
    width: usize,
}

impl TokenWindows {
    /// `origin` names the split in the error when it is shorter than one window.
    pub fn new(tokens: Vec<u32>, bos: u32, width: usize, origin: &Path) -> Result<Self> {
        if width < 2 {
            return Err(Error::Usage(format!(
                "a window needs at least 2 tokens (BOS and one more), got {width}"
            )));
        }
        let w = Self { tokens, bos, width };
        if w.is_empty() {
            return Err(Error::file(
                origin,
                format!(
                    "{} tokens, fewer than one window of {} after BOS",
                    w.tokens.len(),
                    width - 1
                ),
            ));
        }
        Ok(w)
    }

    pub fn len(&self) -> usize {
        self.tokens.len() / (self.width - 1)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn width(&self) -> usize {
        self.width
    }

    /// Window `i`: BOS and the split's tokens `i * (width - 1)..(i + 1) * (width - 1)`.
    pub fn window(&self, i: usize) -> Vec<u32> {
        let n = self.width - 1;
        std::iter::once(self.bos)
            .chain(self.tokens[i * n..(i + 1) * n].iter().copied())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_out_documents_are_spread_evenly() {
        let picked: Vec<usize> = (0..20).filter(|&i| held_out(i, 0.25)).collect();
        assert_eq!(picked, [3, 7, 11, 15, 19]);
        assert!(!(0..1000).any(|i| held_out(i, 0.0)));
        assert_eq!((0..1000).filter(|&i| held_out(i, 0.01)).count(), 10);
    }

    #[test]
    fn windows_start_with_bos_and_tile_the_split() {
        let w = TokenWindows::new((10..20).collect(), 1, 4, Path::new("t")).unwrap();
        assert_eq!(w.len(), 3);
        assert_eq!(w.window(0), [1, 10, 11, 12]);
        assert_eq!(w.window(2), [1, 16, 17, 18]);
        let e = TokenWindows::new(vec![5, 6], 1, 4, Path::new("val.bin")).unwrap_err();
        assert!(e.to_string().starts_with("val.bin: 2 tokens"), "{e}");
    }
}
