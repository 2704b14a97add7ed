//! Tokenizers from `tokenizer.json`, or rebuilt from a GGUF's own vocabulary and merges.

use crate::model::Config;
use crate::{Error, Result};
use candle_core::quantized::gguf_file;
use std::collections::HashMap;
use std::path::Path;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::{byte_level::ByteLevel, digits::Digits, sequence::Sequence};
use tokenizers::SplitDelimiterBehavior;
use tokenizers::{AddedToken, PreTokenizerWrapper, Tokenizer};

pub struct Tok {
    pub inner: Tokenizer,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    /// Whether the model expects BOS at the start of every sequence (its tokenizer config says so).
    pub add_bos: bool,
    /// Where the vocabulary came from, for `info`.
    pub origin: String,
    /// The Jinja chat template (tokenizer_config.json `chat_template`, `chat_template.jinja`,
    /// or the GGUF's `tokenizer.chat_template`), when the model has one.
    pub chat_template: Option<String>,
}

impl Tok {
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids of `text` without special tokens; callers add BOS per window.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Msg(format!("tokenizer ({}): {e}", self.origin)))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The tokenizer with a post-processor that puts `bos` first in every encoding, as
    /// transformers expects of a model trained with BOS at position 0.
    pub fn with_bos_first(&self, bos: u32) -> std::result::Result<Tokenizer, String> {
        use tokenizers::processors::template::TemplateProcessing;
        let text = self
            .inner
            .id_to_token(bos)
            .ok_or_else(|| format!("BOS id {bos} is not in the vocabulary"))?;
        let tp = TemplateProcessing::builder()
            .try_single(vec![format!("{text}:0"), "$A:0".into()])
            .and_then(|b| {
                b.try_pair(vec![
                    format!("{text}:0"),
                    "$A:0".into(),
                    format!("{text}:1"),
                    "$B:1".into(),
                ])
            })
            .map_err(|e| e.to_string())?
            .special_tokens(vec![(text, bos)])
            .build()
            .map_err(|e| e.to_string())?;
        let mut inner = self.inner.clone();
        inner.with_post_processor(Some(tp));
        Ok(inner)
    }

    /// The printable form of one token (for tables: which token carries a massive activation).
    pub fn token_text(&self, id: u32) -> String {
        self.inner
            .decode(&[id], false)
            .unwrap_or_else(|_| format!("<{id}>"))
    }

    pub(super) fn from_hf_dir(dir: &Path, cfg: &Config) -> Result<Self> {
        let eos = cfg.eos_token_id.as_ref().and_then(first_id);
        Self::read_dir(dir, cfg.bos_token_id, eos)
    }

    /// A tokenizer on its own: `tokenizer.json` (a file, or a folder holding it) with the
    /// BOS/EOS of the `tokenizer_config.json` beside it, if any.
    pub fn open(path: &Path) -> Result<Self> {
        let dir = match path.file_name() {
            Some(n) if path.is_file() && n == "tokenizer.json" => {
                path.parent().unwrap_or(Path::new("."))
            }
            _ if path.is_file() => {
                return Err(Error::file(
                    path,
                    "expected a tokenizer.json or a folder holding one",
                ))
            }
            _ => path,
        };
        Self::read_dir(dir, None, None)
    }

    /// `tokenizer.json` and `tokenizer_config.json` of `dir`; ids from a model's config win.
    fn read_dir(dir: &Path, bos_id: Option<u32>, eos_id: Option<u32>) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(Error::file(
                &path,
                "missing (a Hugging Face folder needs its tokenizer.json)",
            ));
        }
        let text = std::fs::read_to_string(&path).map_err(|e| Error::file(&path, e))?;
        // tokenizers 0.22 panics, rather than failing, on a syntax error inside `decoder`:
        // check the syntax first (and name the line).
        serde_json::from_str::<serde::de::IgnoredAny>(&text)
            .map_err(|e| Error::file(&path, format!("invalid JSON: {e}")))?;
        let inner: Tokenizer = text
            .parse()
            .map_err(|e| Error::file(&path, format!("unreadable tokenizer: {e}")))?;
        let tc_path = dir.join("tokenizer_config.json");
        let tc: serde_json::Value = match std::fs::read_to_string(&tc_path) {
            Ok(s) => serde_json::from_str(&s)
                .map_err(|e| Error::file(&tc_path, format!("invalid JSON: {e}")))?,
            Err(_) => serde_json::Value::Null,
        };
        let special = |key: &str| -> Option<u32> {
            let v = &tc[key];
            let s = v.as_str().or_else(|| v["content"].as_str())?;
            inner.token_to_id(s)
        };
        let bos = bos_id.or_else(|| special("bos_token"));
        let eos = eos_id.or_else(|| special("eos_token"));
        // tokenizer_config's flag wins; otherwise ask the post-processor what it does.
        let add_bos = match tc["add_bos_token"].as_bool() {
            Some(b) => b,
            None => match (bos, inner.encode("a", true)) {
                (Some(b), Ok(enc)) => enc.get_ids().first() == Some(&b),
                _ => false,
            },
        };
        // A list of named templates (older tokenizer configs) offers its `default` one.
        let chat_template = match &tc["chat_template"] {
            serde_json::Value::String(t) => Some(t.clone()),
            serde_json::Value::Array(named) => named
                .iter()
                .find(|t| t["name"] == "default")
                .and_then(|t| t["template"].as_str().map(String::from)),
            _ => std::fs::read_to_string(dir.join("chat_template.jinja")).ok(),
        };
        Ok(Self {
            inner,
            bos,
            eos,
            add_bos,
            origin: path.display().to_string(),
            chat_template,
        })
    }

    /// A byte-level BPE (`tokenizer.ggml.model = gpt2`) built from the GGUF metadata.
    pub(super) fn from_gguf(path: &Path, md: &HashMap<String, gguf_file::Value>) -> Result<Self> {
        let err = |msg: String| Error::file(path, crate::error::escape_controls(&msg));
        let get = |k: &str| {
            md.get(k)
                .ok_or_else(|| err(format!("missing metadata `{k}`")))
        };
        let model = get("tokenizer.ggml.model")?
            .to_string()
            .map_err(|e| err(e.to_string()))?
            .clone();
        if model != "gpt2" {
            return Err(err(format!(
                "tokenizer.ggml.model `{model}` is not supported (byte-level BPE `gpt2` is)"
            )));
        }
        let strings = |k: &str| -> Result<Vec<String>> {
            get(k)?
                .to_vec()
                .map_err(|e| err(format!("`{k}`: {e}")))?
                .iter()
                .map(|v| {
                    v.to_string()
                        .cloned()
                        .map_err(|e| err(format!("`{k}`: {e}")))
                })
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges: Vec<(String, String)> = strings("tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| match m.split_once(' ') {
                Some((a, b)) => Ok((a.to_string(), b.to_string())),
                None => Err(err(format!("malformed merge `{m}`"))),
            })
            .collect::<Result<_>>()?;
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| err(format!("cannot build BPE: {e}")))?;
        let mut inner = Tokenizer::new(bpe);
        let pre = md
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        inner.with_pre_tokenizer(Some(pre_tokenizer(&pre).map_err(err)?));
        let byte_level = ByteLevel::new(false, true, true);
        inner.with_decoder(Some(byte_level));
        // Control (3) and user-defined (4) tokens must match whole, never through merges.
        if let Some(types) = md
            .get("tokenizer.ggml.token_type")
            .and_then(|v| v.to_vec().ok())
        {
            let specials: Vec<AddedToken> = types
                .iter()
                .zip(&tokens)
                .filter(|(t, _)| matches!(t.to_i32(), Ok(3) | Ok(4)))
                .map(|(_, s)| AddedToken::from(s.clone(), true))
                .collect();
            inner.add_special_tokens(&specials);
        }
        let id = |k: &str| md.get(k).and_then(|v| v.to_u32().ok());
        let add_bos = md
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(false);
        Ok(Self {
            inner,
            bos: id("tokenizer.ggml.bos_token_id"),
            eos: id("tokenizer.ggml.eos_token_id"),
            add_bos,
            origin: format!(
                "{} (GGUF vocabulary, pre-tokenizer `{pre}`)",
                path.display()
            ),
            chat_template: md
                .get("tokenizer.chat_template")
                .and_then(|v| v.to_string().ok())
                .cloned(),
        })
    }
}

/// The pre-tokenizer llama.cpp's `tokenizer.ggml.pre` names, as the model's tokenizer.json has
/// it; an unknown name is refused (another split would give other token ids).
fn pre_tokenizer(pre: &str) -> std::result::Result<PreTokenizerWrapper, String> {
    // GPT-2's own regex, inside ByteLevel.
    let gpt2 = ByteLevel::new(false, true, true);
    // LLaMA-3 and Qwen2 split with their own regex first, then map bytes without one; they
    // differ in digits: runs of up to three (llama-bpe) or one at a time (qwen2).
    let split_then_bytes = |digits: &str| -> std::result::Result<PreTokenizerWrapper, String> {
        let re = format!(
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{{L}}\p{{N}}]?\p{{L}}+|\p{{N}}{digits}| ?[^\s\p{{L}}\p{{N}}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
        );
        let split = Split::new(
            SplitPattern::Regex(re),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| format!("pre-tokenizer `{pre}`: {e}"))?;
        Ok(PreTokenizerWrapper::Sequence(Sequence::new(vec![
            PreTokenizerWrapper::Split(split),
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, false)),
        ])))
    };
    match pre {
        "" | "default" | "gpt2" | "gpt-2" => Ok(PreTokenizerWrapper::ByteLevel(gpt2)),
        // SmolLM's splits every digit before the GPT-2 regex.
        "smollm" => Ok(PreTokenizerWrapper::Sequence(Sequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            PreTokenizerWrapper::ByteLevel(gpt2),
        ]))),
        // llama.cpp's converter names the DeepSeek-R1 Qwen distills' own, and runs it as qwen2's.
        "qwen2" | "deepseek-r1-qwen" => split_then_bytes(""),
        "llama-bpe" => split_then_bytes("{1,3}"),
        other => Err(format!(
            "metadata `tokenizer.ggml.pre` `{other}` is not supported (default, gpt2, smollm, qwen2, deepseek-r1-qwen, llama-bpe)"
        )),
    }
}

fn first_id(v: &serde_json::Value) -> Option<u32> {
    v.as_u64()
        .or_else(|| v.as_array()?.first()?.as_u64())
        .map(|x| x as u32)
}
