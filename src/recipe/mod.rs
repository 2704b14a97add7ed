//! The typed training recipe: one YAML file whose sections follow the pipeline, every
//! field defaulted except the model and data paths.
//!
//! Loading goes text -> `serde_norway::Value` -> `a.b.c=value` overrides -> `Recipe` ->
//! [`Recipe::validate`]. A recipe is written by hand and a typo in it should cost seconds,
//! not a failed run, so every problem becomes an [`Error::Usage`] (exit 2) that starts
//! with the file path, then `line:column` when the file has the key, then the dotted
//! field path, and suggests the nearest valid name for unknown keys and words.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_norway::{Mapping, Value};

use crate::Error;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    pub model: ModelSection,
    pub data: DataSection,
    #[serde(default)]
    pub adapters: AdaptersSection,
    #[serde(default)]
    pub loss: LossSection,
    #[serde(default)]
    pub optim: OptimSection,
    #[serde(default)]
    pub train: TrainSection,
    #[serde(default)]
    pub eval: EvalSection,
    #[serde(default)]
    pub log: LogSection,
    #[serde(default)]
    pub verify: VerifySection,
    #[serde(default)]
    pub export: ExportSection,
    #[serde(default)]
    pub ablate: AblateSection,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// Hugging Face folder, hub id or `.gguf` file.
    pub path: String,
    /// `cpu`, `cuda` or `cuda:N`.
    #[serde(default = "default_device")]
    pub device: String,
    /// Layers over several devices, replacing `device`: `cuda:0=0-39,cuda:1=40-79` or
    /// `auto` (see [`crate::device_map`]).
    #[serde(default)]
    pub device_map: Option<String>,
    /// `None` leaves the choice to the device (f32 on CPU, bf16 on CUDA).
    #[serde(default)]
    pub dtype: Option<Dtype>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    F32,
    Bf16,
    F16,
    /// CPU only: weights, adapters and moments in f64, for tests that compare runs to 1e-12.
    F64,
}

impl Dtype {
    /// The spelling `device::parse_dtype` takes.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
            Dtype::F16 => "f16",
            Dtype::F64 => "f64",
        }
    }
}

/// One text (a file, or a folder of `*.txt`) or a list of them. Each text gets its own windows,
/// so none straddles two texts, and per-text limits (`eval_windows`, `verify.windows`) apply to
/// each text of a list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Texts {
    One(PathBuf),
    Many(Vec<PathBuf>),
}

impl Texts {
    pub fn paths(&self) -> &[PathBuf] {
        match self {
            Texts::One(p) => std::slice::from_ref(p),
            Texts::Many(v) => v,
        }
    }
}

impl<T: Into<PathBuf>> From<T> for Texts {
    fn from(p: T) -> Self {
        Texts::One(p.into())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    pub train: Texts,
    pub eval: Texts,
    #[serde(default = "default_seq_len")]
    pub seq_len: usize,
    /// Windows per micro-batch.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    #[serde(default)]
    pub max_train_windows: Option<usize>,
    /// Eval windows per eval text.
    #[serde(default = "default_eval_windows")]
    pub eval_windows: usize,
    /// Long training windows mixed into the short ones, so that the hold term also sees
    /// positions far past `seq_len`.
    #[serde(default)]
    pub long: Option<LongWindows>,
}

/// Every `every`-th micro-batch is one window of `seq_len` tokens, taken in turn from up to
/// `windows` long windows of each training text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LongWindows {
    pub seq_len: usize,
    pub windows: usize,
    pub every: usize,
}

fn default_device() -> String {
    "cpu".into()
}
fn default_seq_len() -> usize {
    128
}
fn default_batch_size() -> usize {
    4
}
fn default_eval_windows() -> usize {
    4
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdaptersSection {
    pub eab: EabSection,
    pub lora: LoraSection,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EabSection {
    pub enabled: bool,
    pub init: EabInit,
    pub init_std: f64,
    /// Hide position 0 from every query; only sound when a slot stands in for it.
    pub mask_first_token: bool,
    /// Windows averaged for the `first_token` init.
    pub calib_windows: usize,
    /// Train the student under a sliding window of this many tokens (the teacher stays dense):
    /// queries past it cannot see the first tokens, so the slot has to become their sink, as
    /// a rolling cache without sink tokens needs (docs/streaming.md). Training only: the
    /// adapter then runs dense, or streams with `--cache`.
    pub window: Option<usize>,
}

impl Default for EabSection {
    fn default() -> Self {
        Self {
            enabled: true,
            init: EabInit::FirstToken,
            init_std: 0.02,
            mask_first_token: true,
            calib_windows: 4,
            window: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EabInit {
    Zeros,
    Normal,
    FirstToken,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraSection {
    /// 0 = no LoRA.
    pub rank: usize,
    pub alpha: f64,
    pub targets: Vec<LoraTarget>,
    pub layers: LoraLayers,
    pub init_std: f64,
}

impl Default for LoraSection {
    fn default() -> Self {
        Self {
            rank: 0,
            alpha: 16.0,
            targets: vec![LoraTarget::Down],
            layers: LoraLayers::Birth,
            init_std: 0.01,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LoraTarget {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl LoraTarget {
    /// The short name `adapters::TARGETS` is keyed by.
    pub fn name(self) -> &'static str {
        match self {
            LoraTarget::Q => "q",
            LoraTarget::K => "k",
            LoraTarget::V => "v",
            LoraTarget::O => "o",
            LoraTarget::Gate => "gate",
            LoraTarget::Up => "up",
            LoraTarget::Down => "down",
        }
    }
}

/// Layers that get LoRA: where massive activations are born, all of them, or a list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "LayerSpec", into = "LayerSpec")]
pub enum LoraLayers {
    Birth,
    All,
    List(Vec<usize>),
}

/// Layers the massive-activation loss watches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "LayerSpec", into = "LayerSpec")]
pub enum MaLayers {
    All,
    List(Vec<usize>),
}

/// The YAML shape both layer selectors share (a word or a list); each typed enum decides
/// which words it accepts, in serde's own "unknown variant" wording so that the
/// did-you-mean rewrite applies to it too.
#[derive(Clone, Serialize, Deserialize)]
#[serde(
    untagged,
    expecting = "expected a layer keyword or a list of layer indices"
)]
enum LayerSpec {
    Word(String),
    List(Vec<usize>),
}

impl TryFrom<LayerSpec> for LoraLayers {
    type Error = String;
    fn try_from(spec: LayerSpec) -> Result<Self, String> {
        match spec {
            LayerSpec::Word(w) if w == "birth" => Ok(Self::Birth),
            LayerSpec::Word(w) if w == "all" => Ok(Self::All),
            LayerSpec::Word(w) => Err(format!(
                "unknown variant `{w}`, expected `birth`, `all` or a list of layer indices"
            )),
            LayerSpec::List(layers) => Ok(Self::List(layers)),
        }
    }
}

impl From<LoraLayers> for LayerSpec {
    fn from(layers: LoraLayers) -> Self {
        match layers {
            LoraLayers::Birth => LayerSpec::Word("birth".into()),
            LoraLayers::All => LayerSpec::Word("all".into()),
            LoraLayers::List(layers) => LayerSpec::List(layers),
        }
    }
}

impl TryFrom<LayerSpec> for MaLayers {
    type Error = String;
    fn try_from(spec: LayerSpec) -> Result<Self, String> {
        match spec {
            LayerSpec::Word(w) if w == "all" => Ok(Self::All),
            LayerSpec::Word(w) => Err(format!(
                "unknown variant `{w}`, expected `all` or a list of layer indices"
            )),
            LayerSpec::List(layers) => Ok(Self::List(layers)),
        }
    }
}

impl From<MaLayers> for LayerSpec {
    fn from(layers: MaLayers) -> Self {
        match layers {
            MaLayers::All => LayerSpec::Word("all".into()),
            MaLayers::List(layers) => LayerSpec::List(layers),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LossSection {
    pub hold: HoldLoss,
    pub ma: MaLoss,
}

/// Keeps the adapted model's predictions close to the frozen base.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HoldLoss {
    pub kind: HoldKind,
    pub weight: f64,
    pub temperature: f64,
}

impl Default for HoldLoss {
    fn default() -> Self {
        Self {
            kind: HoldKind::Kl,
            weight: 1.0,
            temperature: 1.0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HoldKind {
    /// KL divergence to the base model's next-token distribution.
    Kl,
    /// Plain language-modelling loss on the text.
    Lm,
}

/// Penalises massive activations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MaLoss {
    pub weight: f64,
    /// Penalise |h| above this.
    pub threshold: f64,
    /// When set, also require |h| >= ratio * median.
    pub ratio: Option<f64>,
    pub target: MaTarget,
    pub layers: MaLayers,
}

impl Default for MaLoss {
    fn default() -> Self {
        Self {
            weight: 1e-4,
            threshold: 100.0,
            ratio: None,
            target: MaTarget::Flagged,
            layers: MaLayers::All,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MaTarget {
    Flagged,
    Ratio,
    All,
}

/// The optimizer section of a fine-tuning recipe (`D` = [`FineTune`]) and of a pretraining one
/// ([`Pretrain`]): one set of fields and rules ([`Optim::check`]); the marker picks the
/// defaults, which differ (fine-tuning a few adapters vs training every weight from scratch).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Optim<D> {
    pub lr: f64,
    /// Decoupled weight decay (in pretraining, of the matrices; norms never decay).
    pub weight_decay: f64,
    pub betas: [f64; 2],
    pub eps: f64,
    pub warmup_steps: usize,
    /// Floor of the learning-rate decay, as a fraction of `lr`.
    pub min_lr_ratio: f64,
    /// Global gradient-norm clip; 0 = off.
    pub grad_clip: f64,
    pub grad_accum: usize,
    #[serde(skip)]
    defaults: std::marker::PhantomData<D>,
}

/// Fine-tuning's optimizer defaults: lr 1e-3, no weight decay, betas (0.9, 0.999), warmup 10.
#[derive(Debug, Clone, PartialEq)]
pub struct FineTune;
/// Pretraining's: lr 1e-3, weight decay 0.1, betas (0.9, 0.95), warmup 300.
#[derive(Debug, Clone, PartialEq)]
pub struct Pretrain;

pub type OptimSection = Optim<FineTune>;

impl<D> Optim<D> {
    fn with(weight_decay: f64, beta2: f64, warmup_steps: usize) -> Self {
        Self {
            lr: 1e-3,
            weight_decay,
            betas: [0.9, beta2],
            eps: 1e-8,
            warmup_steps,
            min_lr_ratio: 0.1,
            grad_clip: 1.0,
            grad_accum: 1,
            defaults: std::marker::PhantomData,
        }
    }
}

impl Default for Optim<FineTune> {
    fn default() -> Self {
        Self::with(0.0, 0.999, 10)
    }
}

impl Default for Optim<Pretrain> {
    fn default() -> Self {
        Self::with(0.1, 0.95, 300)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainSection {
    pub steps: usize,
    pub seed: u64,
    pub out_dir: PathBuf,
    pub checkpoint_every: usize,
    /// How many of the newest checkpoints to keep (0: all). Each holds the trained weights and
    /// the optimizer's state, so a long pretraining run's would otherwise fill the disk.
    pub keep_checkpoints: usize,
    /// Recompute each decoder block in the backward pass instead of keeping its activations
    /// (about a third more compute, a fraction of the memory).
    pub recompute: bool,
    /// Data parallel: one replica per device, e.g. `cpu*2`, `cuda:0,cuda:1` or `cuda*4`
    /// (`--devices` sets it too). `data.batch_size` is then per device, so a step sees
    /// `devices x batch_size` windows. Unset: `model.device` alone.
    pub devices: Option<String>,
}

impl Default for TrainSection {
    fn default() -> Self {
        Self {
            steps: 100,
            seed: 0,
            out_dir: "runs/default".into(),
            checkpoint_every: 25,
            keep_checkpoints: 0,
            recompute: false,
            devices: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalSection {
    pub every: usize,
    /// The scan's flagging rule: |h| >= abs and |h| >= ratio * median (abs = 0: ratio only).
    pub abs: f64,
    pub ratio: f64,
}

impl Default for EvalSection {
    fn default() -> Self {
        Self {
            every: 25,
            abs: 100.0,
            ratio: 1000.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSection {
    /// TensorBoard root.
    pub dir: PathBuf,
    pub name: Option<String>,
    pub every: usize,
}

impl Default for LogSection {
    fn default() -> Self {
        Self {
            dir: "runs/tb".into(),
            name: None,
            every: 1,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExportSection {
    pub out: Option<PathBuf>,
    pub format: ExportFormat,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExportFormat {
    #[default]
    Hf,
    Peft,
    Both,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AblateSection {
    /// Dotted field path -> values; runs the cross product.
    pub grid: BTreeMap<String, Vec<Value>>,
    /// Extra runs, each a set of dotted field path -> value.
    pub points: Vec<BTreeMap<String, Value>>,
}

impl Recipe {
    /// Every default, around the three paths a recipe must name.
    pub fn new(model: impl Into<String>, train: impl Into<Texts>, eval: impl Into<Texts>) -> Self {
        Self {
            model: ModelSection {
                path: model.into(),
                device: default_device(),
                device_map: None,
                dtype: None,
            },
            data: DataSection {
                train: train.into(),
                eval: eval.into(),
                seq_len: default_seq_len(),
                batch_size: default_batch_size(),
                max_train_windows: None,
                eval_windows: default_eval_windows(),
                long: None,
            },
            adapters: AdaptersSection::default(),
            loss: LossSection::default(),
            optim: OptimSection::default(),
            train: TrainSection::default(),
            eval: EvalSection::default(),
            log: LogSection::default(),
            verify: VerifySection::default(),
            export: ExportSection::default(),
            ablate: AblateSection::default(),
        }
    }

    /// The resolved recipe, saved with every run so that it can be replayed as is.
    pub fn to_yaml(&self) -> String {
        serde_norway::to_string(self).expect("a recipe holds only string-keyed YAML data")
    }
}

mod check;
mod load;
#[cfg(test)]
mod tests;
mod verify;

pub(crate) use check::{
    at_least_one, check, check_device, check_run_devices, non_negative, positive,
};
pub use load::{
    apply_overrides, field_paths, leaf_paths, load, load_typed, parse_str, parse_typed, Typed,
};
pub use verify::{QuantCheck, StreamCheck, VerifySection, VerifyWindows};
