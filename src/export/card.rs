//! The README.md an export carries: what is in it, how to run it, how it was made, and the
//! adapter's verification when a `verify.json` sits beside it.

use super::files::absolute;
use super::{remote_code, Ctx};
use crate::recipe::ExportFormat;
use candle_core::DType;
use serde_json::Value;
use std::path::{Path, PathBuf};

impl Ctx<'_> {
    pub(super) fn model_card(&self, format: &str, peft_dir: Option<&Path>) -> String {
        let c = &self.ckpt.config;
        let m = &self.set.meta;
        let tok = &self.ckpt.tokenizer;
        let src_name = self
            .ckpt
            .source
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| self.ckpt.source.display().to_string());
        let arch = c.model_type.as_deref().unwrap_or("llama");
        let mut s = format!("# {src_name} + EAB ({format} export)\n\n");
        s += &format!(
            "`{src_name}` ({arch}, {} layers, hidden {}, {} query / {} KV heads of {}) retrofitted by \
             eabfit with Explicit Attention Bias: per layer and KV head one extra key/value \
             slot `(k', v')` (f32, never rotated) that every query attends to, \
             `softmax([Q K^T, Q k'] / sqrt(d)) [V; v']`, so that the model no longer needs massive activations \
             to make an attention sink.\n\n",
            c.num_hidden_layers,
            c.hidden_size,
            c.num_attention_heads,
            c.n_kv_heads(),
            c.head_dim()
        );
        s += "## What is in it\n\n";
        if self.slot_layers.is_empty() {
            s += "- No EAB slots: the adapter only carried LoRA.\n";
        } else {
            s += &format!(
                "- EAB slots in layers {:?}; mask_first_token = {} ({}).\n",
                self.slot_layers,
                self.adapters.mask_first_token,
                if self.adapters.mask_first_token {
                    "position 0 is hidden from every query, the slot stands in for it"
                } else {
                    "position 0 stays visible"
                }
            );
        }
        if self.changed_lora.is_empty() {
            s += "- No LoRA update (all B were zero).\n";
        } else {
            s += &format!(
                "- LoRA (rank {}, alpha {}, scale {}) merged into {} projection(s): `W + scale * B A`, computed in f32: {}.\n",
                m.lora_rank,
                m.lora_alpha,
                m.lora_scale(),
                self.changed_lora.len(),
                self.changed_lora.join(", ")
            );
        }
        s += &format!(
            "- Weights in {}.\n\n",
            match self.plan.dtype {
                DType::BF16 => "bf16 (merged in f32, then rounded); slot tensors stay f32",
                _ => "f32",
            }
        );
        if format == "hf" && self.slot_layers.is_empty() {
            s += "## Running it\n\nNo slots: a plain Hugging Face checkpoint for any runtime.\n\n";
        } else if format == "hf" {
            let family = self.family.expect("an export with slots has a family");
            s += &format!(
                "## Running it\n\nThe model must run with its EAB slots: the tensors \
                 `model.layers.{{i}}.self_attn.eab_k` / `eab_v` of shape [n_kv_heads, head_dim], listed by \
                 the `eab` block of config.json.\n\n\
                 - eabfit loads this folder directly:\n\n```sh\neabfit generate --model THIS_FOLDER --prompt \"...\"\n\
                 eabfit ppl --model THIS_FOLDER --text FILE\n```\n\n\
                 - transformers runs it with the code beside the weights (`{}`, `{}`: {}'s classes with \
                 only the attention changed; model_type `{}`), under `sdpa` (the default), `eager` or \
                 `flash_attention_2`, batched `generate()` and the KV cache included:\n\n\
                 ```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\
                 model = AutoModelForCausalLM.from_pretrained(\"THIS_FOLDER\", trust_remote_code=True)\n\
                 tokenizer = AutoTokenizer.from_pretrained(\"THIS_FOLDER\", trust_remote_code=True)\n```\n\n\
                 Without `trust_remote_code` transformers refuses the folder (AutoTokenizer reads the \
                 model's configuration too; the tokenizer itself runs no custom code). Loading it with `{}` by \
                 name drops the slots (transformers warns about unexpected keys) and computes a \
                 different, wrong model; so do runtimes without a KV slot (llama.cpp, vLLM).\n\n",
                remote_code::CONFIGURATION_FILE,
                remote_code::MODELING_FILE,
                family.base_architecture(),
                family.model_type(),
                family.base_architecture(),
            );
        } else {
            let dir = peft_dir.map_or("THIS_FOLDER".into(), |d| d.display().to_string());
            s += &format!(
                "## Running it\n\nThe weights here are a plain Hugging Face checkpoint (LoRA merged, no slots). \
                 The slots are `peft_adapter/`, a PEFT prefix-tuning adapter of one virtual token whose \
                 per-layer key/value is the slot:\n\n```python\nimport torch\nfrom transformers import AutoModelForCausalLM\nfrom peft import PeftModel\n\
                 base = AutoModelForCausalLM.from_pretrained(\"{dir}\", dtype=torch.float32)\n\
                 model = PeftModel.from_pretrained(base, \"{dir}/peft_adapter\")\n```\n\n\
                 Without the adapter the model is wrong. Positions: PEFT puts the prefix at position 0 and \
                 the tokens at 1..T; the stored prefix key is the slot key rotated (RoPE) to position 1, \
                 which makes every attention score equal eabfit's, where tokens sit at 0..T-1 and the slot \
                 key is never rotated. `prompt_embeddings` is [1, num_layers * 2 * n_kv_heads * head_dim]: \
                 per layer the key, then the value, each [n_kv_heads, head_dim].\n\n"
            );
            if let Some(w) = c.window() {
                s += &format!(
                    "Sliding window {w}: transformers hides the prefix from queries {w} or more positions \
                     after it; eabfit never hides the slot. Outputs match eabfit on sequences shorter than {w} tokens.\n\n"
                );
            }
        }
        s += &format!(
            "## BOS\n\nadd_bos = {}: {}\n\n",
            tok.add_bos,
            match (tok.add_bos, tok.bos) {
                (true, Some(b)) => format!(
                    "every sequence starts with BOS {b} ({:?}), as in training.",
                    tok.token_text(b)
                ),
                (true, None) => "BOS is expected but the tokenizer names none.".into(),
                (false, _) => "no BOS is prepended.".into(),
            }
        );
        s += &format!(
            "## How it was made\n\n- Base: `{}` ({})\n- Adapter: `{}` (base recorded in the adapter: `{}`)\n- \
             `eabfit export --format {} --dtype {}` (eabfit {})\n",
            absolute(&self.ckpt.source).unwrap_or_else(|_| self.ckpt.source.clone()).display(),
            self.ckpt.format,
            absolute(&self.plan.adapter).unwrap_or_else(|_| self.plan.adapter.clone()).display(),
            m.base_model,
            match self.plan.format {
                ExportFormat::Hf => "hf",
                ExportFormat::Peft => "peft",
                ExportFormat::Both => "both",
            },
            if self.plan.dtype == DType::BF16 { "bf16" } else { "f32" },
            env!("CARGO_PKG_VERSION")
        );
        for (path, v) in absolute(&self.plan.adapter)
            .map(|a| find_verify(&a))
            .unwrap_or_default()
        {
            s += &verify_section(&path, &v);
        }
        s
    }
}

/// The `verify.json` beside the (absolute) adapter path: in it, its `verify/`, its parent or
/// the parent's `verify/`; where that `verify/` holds one folder per pass (several texts or
/// window lengths), every pass's, in name order.
fn find_verify(adapter: &Path) -> Vec<(PathBuf, Value)> {
    let read = |p: PathBuf| {
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&p).ok()?).ok()?;
        v.is_object().then_some((p, v))
    };
    let dirs: Vec<&Path> = std::iter::once(adapter).chain(adapter.parent()).collect();
    for d in dirs {
        if let Some(one) = [d.join("verify.json"), d.join("verify").join("verify.json")]
            .into_iter()
            .find_map(read)
        {
            return vec![one];
        }
        let mut passes: Vec<PathBuf> = std::fs::read_dir(d.join("verify"))
            .map(|it| {
                it.filter_map(|e| Some(e.ok()?.path().join("verify.json")))
                    .collect()
            })
            .unwrap_or_default();
        passes.sort();
        let found: Vec<(PathBuf, Value)> = passes.into_iter().filter_map(read).collect();
        if !found.is_empty() {
            return found;
        }
    }
    vec![]
}

fn verify_section(path: &Path, v: &Value) -> String {
    let f = |x: &Value| x.as_f64().map_or("-".to_string(), |x| format!("{x:.4}"));
    let massive = |r: &Value| -> String {
        r["layers"].as_array().map_or("-".into(), |ls| {
            ls.iter()
                .filter_map(|l| l["massive_count"].as_u64())
                .sum::<u64>()
                .to_string()
        })
    };
    let mut s = format!("\n## Verification\n\nFrom `{}`:\n\n", path.display());
    s += "| | base | adapted |\n|---|---|---|\n";
    s += &format!(
        "| perplexity | {} | {} |\n",
        f(&v["base"]["ppl"]),
        f(&v["adapted"]["ppl"])
    );
    s += &format!(
        "| massive activations | {} | {} |\n",
        massive(&v["base"]),
        massive(&v["adapted"])
    );
    s += &format!(
        "\nppl increase {}, KL(base || adapted) {}, verdict: {}\n",
        v["ppl_increase"]
            .as_f64()
            .map_or("-".into(), |x| format!("{:+.2}%", 100.0 * x)),
        f(&v["kl"]),
        match v["pass"].as_bool() {
            Some(true) => "pass",
            Some(false) => "FAIL",
            None => "-",
        }
    );
    if let Some(checks) = v["checks"].as_array() {
        for c in checks {
            s += &format!(
                "- {}: {} (limit {}) {}\n",
                c["name"].as_str().unwrap_or("?"),
                f(&c["value"]),
                f(&c["limit"]),
                if c["pass"].as_bool() == Some(true) {
                    "pass"
                } else {
                    "FAIL"
                }
            );
        }
    }
    s
}
