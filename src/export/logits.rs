//! `eabfit logits` (hidden): one sequence's logits as JSON, the reference the transformers
//! round-trip scripts (`scripts/lib/peft_compare.py`, `scripts/lib/remote_code_compare.py`) hold against.

use crate::adapters::{AdapterSet, Adapters};
use crate::fsio::write_atomic;
use crate::model_args::ModelArgs;
use crate::{Error, Result};
use candle_core::{DType, Tensor};
use serde_json::json;
use std::path::PathBuf;

/// `eabfit logits` (hidden): one sequence's logits as JSON, the reference that
/// `scripts/lib/peft_compare.py` holds transformers + PEFT against.
#[derive(Debug, clap::Args)]
pub struct LogitsArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Adapter folder to run on the model
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Token ids, comma-separated
    #[arg(long, value_delimiter = ',', conflicts_with = "text")]
    pub ids: Vec<u32>,
    /// Text to tokenize instead (BOS prepended when the tokenizer config says so)
    #[arg(long)]
    pub text: Option<String>,
    /// Where the JSON goes: {"ids": [...], "logits": [[...] per position], ...}
    #[arg(long)]
    pub json: PathBuf,
}

pub fn logits_cmd(args: &LogitsArgs) -> Result<()> {
    let ckpt = args.model.open()?;
    let base = args.model.base(&ckpt)?;
    let device = base.device.clone();
    let adapters = match &args.adapter {
        Some(d) => AdapterSet::load(d, &ckpt.config, &device)?.adapters(),
        None => Adapters::none(),
    };
    let ids = match (&args.text, args.ids.is_empty()) {
        (Some(t), _) => {
            let mut ids = vec![];
            if let (true, Some(b)) = (ckpt.tokenizer.add_bos, ckpt.tokenizer.bos) {
                ids.push(b);
            }
            ids.extend(ckpt.tokenizer.encode(t)?);
            ids
        }
        (None, false) => args.ids.clone(),
        (None, true) => return Err(Error::Usage("logits needs --ids or --text".into())),
    };
    if ids.is_empty() {
        return Err(Error::Usage("no tokens to run".into()));
    }
    if let Some(&bad) = ids.iter().find(|&&i| i as usize >= ckpt.config.vocab_size) {
        return Err(Error::Usage(format!(
            "token id {bad} is outside the vocabulary ({})",
            ckpt.config.vocab_size
        )));
    }
    let effective = base.effective_adapters(&adapters);
    let model = base.model(&adapters)?;
    let logits = model
        .logits(&Tensor::new(ids.as_slice(), &device)?.unsqueeze(0)?)?
        .squeeze(0)?
        .to_dtype(DType::F32)?
        .to_vec2::<f32>()?;
    let v = json!({
        "model": ckpt.source.display().to_string(),
        "adapter": args.adapter.as_ref().map(|p| p.display().to_string()),
        "dtype": format!("{:?}", model.dtype()).to_lowercase(),
        "slot_layers": (0..ckpt.config.num_hidden_layers)
            .filter(|&l| effective.slots.get(l).is_some_and(Option::is_some))
            .collect::<Vec<_>>(),
        "mask_first_token": effective.mask_first_token,
        "ids": ids,
        "logits": logits,
    });
    let body = serde_json::to_string(&v).map_err(|e| Error::file(&args.json, e))?;
    write_atomic(&args.json, body.as_bytes())?;
    println!(
        "{} positions x {} logits -> {}",
        ids.len(),
        ckpt.config.vocab_size,
        args.json.display()
    );
    Ok(())
}
