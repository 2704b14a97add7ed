//! `eabfit export`: an adapted model as files other tools read.
//!
//! - `hf`: LoRA merged into the base weights (`W + scale * B A`, in f32, then cast), the EAB
//!   slots as extra tensors `model.layers.{i}.self_attn.eab_k` / `eab_v` (KV, hd), an `eab`
//!   block in config.json, and the transformers code that runs them ([`remote_code`]). eabfit
//!   loads such a folder as `--model` with its slots.
//! - `peft`: the merged base without slots (a plain Hugging Face checkpoint) plus `peft_adapter/`,
//!   a PEFT `PREFIX_TUNING` adapter of one virtual token whose per-layer key/value is the slot.
//! - `both`: `OUT/hf` and `OUT/peft`, merged once (peft's base is read back from hf's shards).
//!
//! Why the prefix key is the slot key rotated to position 1: a slot key is never rotated, while
//! queries are, by their position p. PEFT's prefix occupies cache position 0, so transformers
//! gives the real tokens positions 1..T (PEFT even adds `num_virtual_tokens` to explicit
//! `position_ids`). A query then scores `(R(p+1) q) . k = (R(p) q) . (R(-1) k)`, which equals
//! the slot score `(R(p) q) . k'` exactly when `k = R(1) k'`; token-to-token scores depend on
//! relative positions only, so they do not move. Values are never rotated.
//!
//! The merge streams ([`merge`]): each output shard's tensors are read, merged on the device
//! `--device-map` gives their layer (the host without one), written and dropped before the next
//! shard's, so a model larger than host memory exports. Everything is built in a temporary
//! folder beside `--out` and renamed into place.

mod card;
mod files;
mod logits;
mod merge;
pub mod remote_code;

pub use logits::{logits_cmd, LogitsArgs};

use crate::adapters::{slot_names, AdapterSet, Adapters};
use crate::checkpoint::{effective_adapters, Checkpoint, EabExport, Format};
use crate::model::Config;
use crate::model_args::ModelArgs;
use crate::recipe::ExportFormat;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use files::{
    absolute, guard_paths, mkdir, write_file, write_json, write_weights, TempDir, WrittenWeights,
};
use merge::Merger;
use remote_code::Family;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The prefix position PEFT gives the slot (num_virtual_tokens = 1).
pub const PREFIX_POSITION: f64 = 1.0;
/// Files of a Hugging Face folder that travel with the weights.
const TOKENIZER_FILES: [&str; 6] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "generation_config.json",
    "chat_template.jinja",
];

#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// Base model: Hugging Face folder, hub id or .gguf [default: the fetched SmolLM2-135M GGUF]
    #[arg(long)]
    pub model: Option<String>,
    /// Adapter folder (adapter.safetensors + adapter_config.json), e.g. a run's best/ or final/
    #[arg(long)]
    pub adapter: PathBuf,
    /// Output folder; written whole or not at all
    #[arg(long)]
    pub out: PathBuf,
    /// hf (merged + EAB slots), peft (merged + PEFT prefix adapter) or both (OUT/hf, OUT/peft)
    #[arg(long, default_value = "hf")]
    pub format: String,
    /// Replace an existing --out
    #[arg(long)]
    pub force: bool,
    /// dtype of the written weights, f32 or bf16 (the merge runs in f32; slots stay f32)
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Split the weights into model-0000k-of-0000n.safetensors + index above this size: bytes,
    /// or with a unit as transformers writes it (`5GB`, `500MB`; `GiB`, `MiB` for powers of 2)
    #[arg(long, default_value = "2GB", value_parser = parse_size)]
    pub max_shard_size: u64,
    /// Merge each layer on its device, e.g. `cuda:0=0-39,cuda:1=40-79` (embed=DEV, head=DEV), or
    /// `auto`; without it, on the CPU. Either way one output shard at a time
    #[arg(long)]
    pub device_map: Option<String>,
}

/// A size in bytes: `2000000000`, `2GB`, `1.5GiB`, `500 MB` (at least 1 byte).
fn parse_size(text: &str) -> std::result::Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = (&t[..split], t[split..].trim());
    let scale: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        _ => {
            return Err(format!(
                "unit `{unit}`: expected B, KB, MB, GB, KiB, MiB or GiB"
            ))
        }
    };
    let n: f64 = number
        .parse()
        .map_err(|_| format!("`{text}`: expected a number of bytes, e.g. 2GB or 500MB"))?;
    let bytes = (n * scale as f64).round();
    if !(1.0..=u64::MAX as f64).contains(&bytes) {
        return Err(format!("`{text}`: must be at least 1 byte"));
    }
    Ok(bytes as u64)
}

/// What one export wrote.
#[derive(Debug, Clone)]
pub struct Exported {
    pub format: &'static str,
    pub dir: PathBuf,
    pub shards: usize,
    pub bytes: u64,
}

pub fn export_cmd(args: &ExportArgs) -> Result<()> {
    let format = match args.format.as_str() {
        "hf" => ExportFormat::Hf,
        "peft" => ExportFormat::Peft,
        "both" => ExportFormat::Both,
        other => {
            return Err(Error::Usage(format!(
                "--format `{other}`: expected hf, peft or both"
            )))
        }
    };
    let dtype = match args.dtype.as_str() {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        other => {
            return Err(Error::Usage(format!(
                "--dtype `{other}`: expected f32 or bf16"
            )))
        }
    };
    let model = ModelArgs::on_cpu(args.model.clone()).model_spec()?;
    let plan = ExportPlan {
        model,
        adapter: args.adapter.clone(),
        out: args.out.clone(),
        format,
        force: args.force,
        dtype,
        max_shard_size: args.max_shard_size,
        device_map: args.device_map.clone(),
    };
    for e in export(&plan)? {
        println!(
            "{:<4} {} ({} shard{}, {:.1} MB)",
            e.format,
            e.dir.display(),
            e.shards,
            if e.shards == 1 { "" } else { "s" },
            e.bytes as f64 / 1e6
        );
    }
    Ok(())
}

pub struct ExportPlan {
    pub model: String,
    pub adapter: PathBuf,
    pub out: PathBuf,
    pub format: ExportFormat,
    pub force: bool,
    pub dtype: DType,
    pub max_shard_size: u64,
    /// A `--device-map` text; `None` merges on the CPU.
    pub device_map: Option<String>,
}

/// Checks everything, builds the export in a temporary folder beside `plan.out`, then moves it
/// into place (replacing an old one only with `force`).
pub fn export(plan: &ExportPlan) -> Result<Vec<Exported>> {
    let ckpt = Checkpoint::open(&plan.model)?;
    // The merge runs in f32 whatever the output dtype; `auto` sizes its plan by the output's.
    let dtype_name = if plan.dtype == DType::BF16 {
        "bf16"
    } else {
        "f32"
    };
    let (placement, _) = crate::model_args::placement(
        "--device-map",
        "cpu",
        plan.device_map.as_deref(),
        Some(dtype_name),
        &ckpt.config,
    )?;
    let out = absolute(&plan.out)?;
    guard_paths(&ckpt, &plan.adapter, &out, plan.force)?;
    let set = AdapterSet::load(&plan.adapter, &ckpt.config, &Device::Cpu)?;
    let reader = ckpt.reader()?;
    let adapters = effective_adapters(reader.eab_slots()?.as_ref(), &set.adapters());
    let slot_layers: Vec<usize> = (0..ckpt.config.num_hidden_layers)
        .filter(|&l| adapters.slots.get(l).is_some_and(Option::is_some))
        .collect();
    let changed_lora = lora_changes(&adapters)?;
    if slot_layers.is_empty() && changed_lora.is_empty() {
        return Err(Error::file(
            &plan.adapter,
            "the adapter changes nothing: every LoRA B is zero and it has no EAB slots",
        ));
    }
    let peft = matches!(plan.format, ExportFormat::Peft | ExportFormat::Both);
    if peft {
        check_peft(&plan.adapter, &adapters, &ckpt.config)?;
        if let Some(w) = ckpt.config.window() {
            eprintln!("warning: sliding_window {w}: transformers hides the PEFT prefix from queries {w} or more tokens after it, eabfit never hides the slot; the peft export matches eabfit on sequences shorter than {w} tokens");
        }
    }
    let hf = matches!(plan.format, ExportFormat::Hf | ExportFormat::Both);
    let family = match Family::of(ckpt.config.model_type.as_deref(), ckpt.config.window()) {
        Ok(f) => Some(f),
        // Only an export with slots needs transformers code of its own.
        Err(e) if hf && !slot_layers.is_empty() => {
            return Err(Error::file(&ckpt.source, e.to_string()))
        }
        Err(_) => None,
    };
    let merger = Merger::new(&reader, ckpt.source.clone(), placement, &adapters)?;
    let ctx = Ctx {
        family,
        ckpt: &ckpt,
        set: &set,
        adapters: &adapters,
        slot_layers: &slot_layers,
        changed_lora: &changed_lora,
        merger: &merger,
        plan,
    };

    let parent = out
        .parent()
        .ok_or_else(|| Error::file(&out, "--out must name a folder"))?
        .to_path_buf();
    let name = out
        .file_name()
        .ok_or_else(|| Error::file(&out, "--out must name a folder"))?
        .to_string_lossy()
        .into_owned();
    std::fs::create_dir_all(&parent)
        .map_err(|e| Error::file(&parent, format!("cannot create the folder of --out: {e}")))?;
    let tmp = TempDir::new(parent.join(format!(".{name}.eabfit-tmp-{}", std::process::id())))?;
    let mut done = vec![];
    let dir_of = |sub: &str| -> PathBuf {
        if plan.format == ExportFormat::Both {
            tmp.0.join(sub)
        } else {
            tmp.0.clone()
        }
    };
    let final_of = |sub: &str| -> PathBuf {
        if plan.format == ExportFormat::Both {
            out.join(sub)
        } else {
            out.clone()
        }
    };
    if hf {
        let (shards, bytes) = ctx.write_hf(&dir_of("hf"))?;
        done.push(Exported {
            format: "hf",
            dir: final_of("hf"),
            shards,
            bytes,
        });
    }
    if peft {
        // `both`: the base tensors were merged once, into hf/ just written.
        let merged = hf.then(|| dir_of("hf"));
        let (shards, bytes) =
            ctx.write_peft(&dir_of("peft"), &final_of("peft"), merged.as_deref())?;
        done.push(Exported {
            format: "peft",
            dir: final_of("peft"),
            shards,
            bytes,
        });
    }
    if plan.format == ExportFormat::Both {
        let readme = "# eabfit export\n\n- `hf/`: merged weights with the EAB slots; eabfit loads it as `--model`.\n- `peft/`: merged weights without slots plus `peft_adapter/` (PEFT prefix tuning) for transformers + PEFT.\n\nEach folder has its own README.md.\n";
        std::fs::write(tmp.0.join("README.md"), readme).map_err(|e| Error::file(&tmp.0, e))?;
    }
    tmp.commit(&out)?;
    Ok(done)
}

/// Everything one export writes from.
struct Ctx<'a> {
    /// `None` only for a model_type no transformers code here covers (then nothing has slots).
    family: Option<Family>,
    ckpt: &'a Checkpoint,
    set: &'a AdapterSet,
    adapters: &'a Adapters,
    slot_layers: &'a [usize],
    changed_lora: &'a [String],
    merger: &'a Merger<'a>,
    plan: &'a ExportPlan,
}

impl Ctx<'_> {
    fn write_hf(&self, dir: &Path) -> Result<(usize, u64)> {
        mkdir(dir)?;
        let mut slots = HashMap::new();
        for &l in self.slot_layers {
            let slot = self.adapters.slots[l].as_ref().expect("slot layer");
            let (kn, vn) = slot_names(l);
            slots.insert(kn, slot.k.to_dtype(DType::F32)?);
            slots.insert(vn, slot.v.to_dtype(DType::F32)?);
        }
        let mut sizes = self.merger.sizes(self.plan.dtype);
        sizes.extend(slots.iter().map(|(n, t)| {
            (
                n.clone(),
                (t.elem_count() * t.dtype().size_in_bytes()) as u64,
            )
        }));
        let written = write_weights(dir, sizes, self.plan.max_shard_size, |name| {
            match slots.get(name) {
                Some(t) => Ok(t.clone()),
                None => self.merger.tensor(name, self.plan.dtype),
            }
        })?;
        let eab = (!self.slot_layers.is_empty()).then(|| EabExport {
            slot_tensors: EabExport::SLOT_TENSORS.into(),
            layers: self.slot_layers.to_vec(),
            mask_first_token: self.adapters.mask_first_token,
            n_kv_heads: self.ckpt.config.n_kv_heads(),
            head_dim: self.ckpt.config.head_dim(),
            format_version: EabExport::FORMAT_VERSION,
        });
        write_json(&dir.join("config.json"), &self.config_json(eab.as_ref())?)?;
        if eab.is_some() {
            let family = self.family.expect("checked in export()");
            for (name, source) in family.files() {
                write_file(&dir.join(name), source.as_bytes())?;
            }
        }
        self.write_tokenizer(dir)?;
        write_file(
            &dir.join("README.md"),
            self.model_card("hf", None).as_bytes(),
        )?;
        Ok(written)
    }

    /// `merged`: an hf folder this export wrote, whose base tensors are read back instead of
    /// merged again; a copy from the page cache costs less than the base's second read (a
    /// GGUF's dequantization, a device map's transfers) and every LoRA product.
    fn write_peft(
        &self,
        dir: &Path,
        final_dir: &Path,
        merged: Option<&Path>,
    ) -> Result<(usize, u64)> {
        mkdir(dir)?;
        let merged = merged.map(WrittenWeights::open).transpose()?;
        let written = write_weights(
            dir,
            self.merger.sizes(self.plan.dtype),
            self.plan.max_shard_size,
            |name| match &merged {
                Some(w) => w.read(name),
                None => self.merger.tensor(name, self.plan.dtype),
            },
        )?;
        write_json(&dir.join("config.json"), &self.config_json(None)?)?;
        self.write_tokenizer(dir)?;
        let cfg = &self.ckpt.config;
        let adapter_dir = dir.join("peft_adapter");
        mkdir(&adapter_dir)?;
        let token_dim = cfg.n_kv_heads() * cfg.head_dim();
        let adapter_config = json!({
            "peft_type": "PREFIX_TUNING",
            "task_type": "CAUSAL_LM",
            "num_virtual_tokens": 1,
            "token_dim": token_dim,
            "num_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.n_kv_heads(),
            "num_transformer_submodules": 1,
            "encoder_hidden_size": token_dim,
            "prefix_projection": false,
            "init_weights": null,
            "inference_mode": true,
            "modules_to_save": null,
            "auto_mapping": null,
            "revision": null,
            "base_model_name_or_path": final_dir.display().to_string(),
        });
        write_json(&adapter_dir.join("adapter_config.json"), &adapter_config)?;
        let pe = prompt_embeddings(self.adapters, cfg)?;
        let st = adapter_dir.join("adapter_model.safetensors");
        crate::fsio::save_safetensors(&HashMap::from([("prompt_embeddings", pe)]), &st)?;
        write_file(
            &dir.join("README.md"),
            self.model_card("peft", Some(final_dir)).as_bytes(),
        )?;
        Ok(written)
    }

    /// The source's config.json (or the one built from GGUF metadata), `eab` block replaced;
    /// with slots, the model_type and `auto_map` of [`remote_code`].
    fn config_json(&self, eab: Option<&EabExport>) -> Result<Value> {
        let mut c = self.ckpt.raw_config.clone();
        let obj = c
            .as_object_mut()
            .ok_or_else(|| Error::file(&self.ckpt.source, "config is not a JSON object"))?;
        obj.remove("eab");
        if self.ckpt.format == Format::Gguf {
            obj.retain(|_, v| !v.is_null());
            let arch = match self.ckpt.config.model_type.as_deref() {
                Some("mistral") => "MistralForCausalLM",
                _ => "LlamaForCausalLM",
            };
            obj.entry("architectures").or_insert(json!([arch]));
            obj.entry("hidden_act").or_insert(json!("silu"));
        }
        let dtype = json!(match self.plan.dtype {
            DType::BF16 => "bfloat16",
            _ => "float32",
        });
        let mut set_dtype = false;
        for key in ["torch_dtype", "dtype"] {
            if let Some(v) = obj.get_mut(key) {
                *v = dtype.clone();
                set_dtype = true;
            }
        }
        if !set_dtype {
            obj.insert("torch_dtype".into(), dtype);
        }
        if let Some(e) = eab {
            obj.insert(
                "eab".into(),
                serde_json::to_value(e).map_err(|e| Error::Msg(e.to_string()))?,
            );
        }
        match (self.family, eab) {
            (Some(f), Some(_)) => f.mark(obj),
            (Some(f), None) => f.unmark(obj),
            (None, _) => {}
        }
        Ok(c)
    }

    /// Copies a folder's tokenizer files; a GGUF's rebuilt tokenizer is saved as tokenizer.json.
    fn write_tokenizer(&self, dir: &Path) -> Result<()> {
        let tok = &self.ckpt.tokenizer;
        if self.ckpt.format == Format::HfDir {
            for f in TOKENIZER_FILES {
                let src = self.ckpt.source.join(f);
                if src.is_file() {
                    std::fs::copy(&src, dir.join(f)).map_err(|e| Error::file(&src, e))?;
                }
            }
            return Ok(());
        }
        let text = |id: Option<u32>| id.and_then(|i| tok.inner.id_to_token(i));
        let mut inner = tok.inner.clone();
        if let (true, Some(id)) = (tok.add_bos, tok.bos) {
            match tok.with_bos_first(id) {
                Ok(t) => inner = t,
                Err(e) => eprintln!("warning: tokenizer.json will not add BOS itself: {e}"),
            }
        }
        let path = dir.join("tokenizer.json");
        inner
            .save(&path, false)
            .map_err(|e| Error::file(&path, e))?;
        let mut tc = json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": tok.add_bos,
            "add_eos_token": false,
            "bos_token": text(tok.bos),
            "eos_token": text(tok.eos),
            "model_max_length": self.ckpt.config.max_position_embeddings,
            "clean_up_tokenization_spaces": false,
        });
        if let Some(t) = &tok.chat_template {
            tc["chat_template"] = json!(t);
        }
        write_json(&dir.join("tokenizer_config.json"), &tc)
    }
}

/// Prefixes of LoRA pairs whose update is not exactly zero.
fn lora_changes(adapters: &Adapters) -> Result<Vec<String>> {
    let mut v = vec![];
    for (prefix, l) in &adapters.lora {
        let nonzero = |t: &Tensor| -> Result<bool> {
            Ok(t.abs()?
                .max_all()?
                .to_dtype(DType::F32)?
                .to_scalar::<f32>()?
                > 0.0)
        };
        if l.scale != 0.0 && nonzero(&l.a)? && nonzero(&l.b)? {
            v.push(prefix.clone());
        }
    }
    v.sort();
    Ok(v)
}

fn check_peft(adapter: &Path, adapters: &Adapters, cfg: &Config) -> Result<()> {
    if adapters.mask_first_token {
        return Err(Error::file(
            adapter,
            "--format peft needs mask_first_token = false, the adapter has mask_first_token = true \
             (a PEFT prefix cannot hide position 0); use --format hf, which eabfit runs",
        ));
    }
    let missing: Vec<usize> = (0..cfg.num_hidden_layers)
        .filter(|&l| adapters.slots.get(l).is_none_or(Option::is_none))
        .collect();
    if missing.len() == cfg.num_hidden_layers {
        return Err(Error::file(
            adapter,
            "--format peft needs EAB slots, the adapter has none; use --format hf (the merged model is then a plain Hugging Face checkpoint)",
        ));
    }
    if !missing.is_empty() {
        return Err(Error::file(
            adapter,
            format!("--format peft needs an EAB slot in every layer (a PEFT prefix reaches all of them), layers {missing:?} have none; use --format hf"),
        ));
    }
    Ok(())
}

/// Per-layer slots as PEFT's `prompt_embeddings` [1, L * 2 * KV * hd]: PEFT views it as
/// (batch, 1, L*2, KV, hd) and permutes to per-layer (key, value) of (batch, KV, 1, hd), so the
/// flat index is ((l * 2 + kv) * KV + h) * hd + d. Keys rotated to [`PREFIX_POSITION`].
pub fn prompt_embeddings(adapters: &Adapters, cfg: &Config) -> Result<Tensor> {
    let inv = cfg.inv_freq();
    let (n_layers, kv, hd) = (cfg.num_hidden_layers, cfg.n_kv_heads(), cfg.head_dim());
    let mut flat = Vec::with_capacity(n_layers * 2 * kv * hd);
    for l in 0..n_layers {
        let slot = adapters.slots[l]
            .as_ref()
            .ok_or_else(|| Error::Msg(format!("layer {l} has no EAB slot")))?;
        for row in slot.k.to_dtype(DType::F32)?.to_vec2::<f32>()? {
            flat.extend(rope_rotate(&row, &inv, PREFIX_POSITION));
        }
        for row in slot.v.to_dtype(DType::F32)?.to_vec2::<f32>()? {
            flat.extend(row);
        }
    }
    let n = flat.len();
    Ok(Tensor::from_vec(flat, (1, n), &Device::Cpu)?)
}

/// Rotate-half RoPE (the Hugging Face layout) of one head vector to position `pos`.
pub fn rope_rotate(x: &[f32], inv_freq: &[f64], pos: f64) -> Vec<f32> {
    let half = x.len() / 2;
    let mut out = vec![0f32; x.len()];
    for i in 0..half {
        let (s, c) = (pos * inv_freq[i]).sin_cos();
        let (x1, x2) = (x[i] as f64, x[i + half] as f64);
        out[i] = (x1 * c - x2 * s) as f32;
        out[i + half] = (x2 * c + x1 * s) as f32;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn shard_sizes_read_as_transformers_writes_them() {
        assert_eq!(parse_size("6000"), Ok(6000));
        assert_eq!(parse_size("2GB"), Ok(2_000_000_000));
        assert_eq!(parse_size("500 mb"), Ok(500_000_000));
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        for bad in ["0", "0.1", "", "GB", "5 TB", "-3MB", "1.2.3GB"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
