//! The typed pretraining recipe. It is read by the same loader as the training recipe
//! ([`crate::recipe::load_typed`]): unknown keys are refused with the nearest valid name,
//! `key.sub=value` overrides apply, and errors name the file, line and field path.
//!
//! Defaults are the GPU target of issue 14 (a 122.7M-parameter LLaMA: 12 layers, d 768, 12
//! heads, SwiGLU 2048, RoPE, tied embeddings; T 1024, batch 32, AdamW 1e-3 with betas
//! (0.9, 0.95), weight decay 0.1, warmup 300, cosine).

use crate::model::Config;
use crate::recipe::{
    at_least_one, check, check_device, check_run_devices, non_negative, positive, Dtype,
    EvalSection, LogSection, TrainSection, Typed,
};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PretrainRecipe {
    #[serde(default)]
    pub model: ModelSection,
    pub data: DataSection,
    #[serde(default)]
    pub eab: SlotSection,
    #[serde(default)]
    pub optim: OptimSection,
    #[serde(default)]
    pub train: TrainSection,
    #[serde(default)]
    pub eval: EvalSection,
    #[serde(default)]
    pub log: LogSection,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSection {
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// The compute dtype; `None`: f32 on CPU, bf16 on CUDA. Master weights are f32
    /// (f64 with `f64`, a CPU-only dtype for exactness tests).
    pub dtype: Option<Dtype>,
    pub arch: ArchSection,
    /// Std of the normal init of every matrix; the residual projections (o_proj, down_proj)
    /// get it divided by sqrt(2 * layers), as in GPT-2, so the residual stream does not grow
    /// with depth at init.
    pub init_std: f64,
}

impl Default for ModelSection {
    fn default() -> Self {
        Self {
            device: "cpu".into(),
            dtype: None,
            arch: ArchSection::default(),
            init_std: 0.02,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Llama,
    Mistral,
}

/// The architecture, in Hugging Face config.json names; the vocabulary comes from the corpus
/// and the context from `data.seq_len`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ArchSection {
    pub model_type: Family,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// `None`: as many as the query heads.
    pub num_key_value_heads: Option<usize>,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    /// Mistral's sliding attention window.
    pub sliding_window: Option<usize>,
}

impl Default for ArchSection {
    fn default() -> Self {
        Self {
            model_type: Family::Llama,
            hidden_size: 768,
            intermediate_size: 2048,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_key_value_heads: None,
            rope_theta: 10_000.0,
            rms_norm_eps: 1e-5,
            tie_word_embeddings: true,
            sliding_window: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// A folder written by `eabfit tokenize`.
    pub corpus: PathBuf,
    /// Tokens per window, BOS included (also the model's max_position_embeddings).
    #[serde(default = "default_seq_len")]
    pub seq_len: usize,
    /// Windows per micro-batch.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Held-out windows of each evaluation (from the start of val.bin; fewer if it is short).
    #[serde(default = "default_eval_windows")]
    pub eval_windows: usize,
}

fn default_seq_len() -> usize {
    1024
}
fn default_batch_size() -> usize {
    32
}
fn default_eval_windows() -> usize {
    16
}

/// One EAB (k', v') slot per KV head in every layer, trained from the start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SlotSection {
    pub enabled: bool,
    pub k_init: SlotInit,
    pub v_init: SlotInit,
    /// Std of a `normal` init.
    pub init_std: f64,
    /// The slots' learning rate as a multiple of optim.lr.
    pub lr_scale: f64,
    /// Decoupled weight decay of the slots (matrices use optim.weight_decay).
    pub weight_decay: f64,
    /// Hide position 0 (the BOS every window starts with) from every query, so that the slot is
    /// the only key all queries share: a constant first token is where a sink forms otherwise.
    pub mask_first_token: bool,
}

impl Default for SlotSection {
    fn default() -> Self {
        Self {
            enabled: false,
            k_init: SlotInit::Normal,
            v_init: SlotInit::Zeros,
            init_std: 0.02,
            lr_scale: 1.0,
            weight_decay: 0.0,
            mask_first_token: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SlotInit {
    Zeros,
    Normal,
}

/// Pretraining's optimizer section: the fine-tuning recipe's fields and rules, its own
/// defaults.
pub type OptimSection = crate::recipe::Optim<crate::recipe::Pretrain>;

impl PretrainRecipe {
    /// Every default around the one path a recipe must name.
    pub fn new(corpus: impl Into<PathBuf>) -> Self {
        Self {
            model: ModelSection::default(),
            data: DataSection {
                corpus: corpus.into(),
                seq_len: default_seq_len(),
                batch_size: default_batch_size(),
                eval_windows: default_eval_windows(),
            },
            eab: SlotSection::default(),
            optim: OptimSection::default(),
            train: TrainSection::default(),
            eval: EvalSection::default(),
            log: LogSection::default(),
        }
    }

    /// The resolved recipe, saved with every run and checkpoint.
    pub fn to_yaml(&self) -> String {
        serde_norway::to_string(self).expect("a recipe holds only string-keyed YAML data")
    }

    /// The model's config.json for a vocabulary of `vocab_size` with the corpus's BOS and
    /// separator.
    pub fn config(&self, vocab_size: usize, bos: u32, sep: u32) -> Config {
        let a = &self.model.arch;
        Config {
            model_type: Some(
                match a.model_type {
                    Family::Llama => "llama",
                    Family::Mistral => "mistral",
                }
                .into(),
            ),
            hidden_size: a.hidden_size,
            intermediate_size: a.intermediate_size,
            num_hidden_layers: a.num_hidden_layers,
            num_attention_heads: a.num_attention_heads,
            num_key_value_heads: a.num_key_value_heads,
            head_dim: None,
            rms_norm_eps: a.rms_norm_eps,
            rope_theta: a.rope_theta,
            vocab_size,
            max_position_embeddings: self.data.seq_len,
            tie_word_embeddings: a.tie_word_embeddings,
            rope_scaling: None,
            sliding_window: a.sliding_window,
            bos_token_id: Some(bos),
            eos_token_id: Some(sep.into()),
            ..Default::default()
        }
    }
}

impl Typed for PretrainRecipe {
    fn skeleton() -> Self {
        Self::new("")
    }

    fn check(&self) -> Result<(), String> {
        check_device("model.device", &self.model.device)?;
        check_run_devices(
            &self.model.device,
            self.model.dtype,
            self.train.devices.as_deref(),
        )?;
        positive("model.init_std", self.model.init_std)?;
        let a = &self.model.arch;
        at_least_one("model.arch.hidden_size", a.hidden_size)?;
        at_least_one("model.arch.intermediate_size", a.intermediate_size)?;
        at_least_one("model.arch.num_hidden_layers", a.num_hidden_layers)?;
        at_least_one("model.arch.num_attention_heads", a.num_attention_heads)?;
        positive("model.arch.rope_theta", a.rope_theta)?;
        positive("model.arch.rms_norm_eps", a.rms_norm_eps)?;
        if let Some(w) = a.sliding_window {
            at_least_one("model.arch.sliding_window", w)?;
            // transformers' LLaMA has no window: its folder would load as another model.
            check(
                a.model_type == Family::Mistral,
                "model.arch.sliding_window",
                "unset unless model.arch.model_type is mistral",
                w,
            )?;
        }
        // The remaining shape rules are the model's own; the vocabulary does not matter here.
        self.config(1, 0, 0)
            .validate()
            .map_err(|e| format!("model.arch: {e}"))?;
        let d = &self.data;
        check(
            d.seq_len >= 2,
            "data.seq_len",
            ">= 2 (BOS and one token)",
            d.seq_len,
        )?;
        at_least_one("data.batch_size", d.batch_size)?;
        at_least_one("data.eval_windows", d.eval_windows)?;
        let s = &self.eab;
        non_negative("eab.init_std", s.init_std)?;
        non_negative("eab.lr_scale", s.lr_scale)?;
        non_negative("eab.weight_decay", s.weight_decay)?;
        check(
            s.enabled || !s.mask_first_token,
            "eab.mask_first_token",
            "false when eab.enabled is false (position 0 hidden, a query would have no slot to \
             attend to)",
            true,
        )?;
        self.optim.check()?;
        at_least_one("train.steps", self.train.steps)?;
        at_least_one("train.checkpoint_every", self.train.checkpoint_every)?;
        // A recomputed block hands its weights to the backward as constants: right for a
        // frozen model, silently wrong when they are trained.
        check(
            !self.train.recompute,
            "train.recompute",
            "false for pretraining (recomputation treats the block's weights as frozen)",
            true,
        )?;
        at_least_one("eval.every", self.eval.every)?;
        non_negative("eval.abs", self.eval.abs)?;
        non_negative("eval.ratio", self.eval.ratio)?;
        at_least_one("log.every", self.log.every)?;
        Ok(())
    }
}
