//! The typed training recipe: one YAML file whose sections follow the pipeline, every
//! field defaulted except the model and data paths.
//!
//! Loading goes text -> `serde_yaml::Value` -> `a.b.c=value` overrides -> `Recipe` ->
//! [`Recipe::validate`]. A recipe is written by hand and a typo in it should cost seconds,
//! not a failed run, so every problem becomes an [`Error::Usage`] (exit 2) that starts
//! with the file path, then `line:column` when the file has the key, then the dotted
//! field path, and suggests the nearest valid name for unknown keys and words.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_yaml::{Mapping, Value};

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
}

impl Dtype {
    /// The spelling `runtime::parse_dtype` takes.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
            Dtype::F16 => "f16",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// Text file or folder of `*.txt`.
    pub train: PathBuf,
    pub eval: PathBuf,
    #[serde(default = "default_seq_len")]
    pub seq_len: usize,
    /// Windows per micro-batch.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    #[serde(default)]
    pub max_train_windows: Option<usize>,
    #[serde(default = "default_eval_windows")]
    pub eval_windows: usize,
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
}

impl Default for EabSection {
    fn default() -> Self {
        Self {
            enabled: true,
            init: EabInit::FirstToken,
            init_std: 0.02,
            mask_first_token: true,
            calib_windows: 4,
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimSection {
    pub lr: f64,
    pub weight_decay: f64,
    pub betas: [f64; 2],
    pub eps: f64,
    pub warmup_steps: usize,
    /// Floor of the learning-rate decay, as a fraction of `lr`.
    pub min_lr_ratio: f64,
    /// Global gradient-norm clip; 0 = off.
    pub grad_clip: f64,
    pub grad_accum: usize,
}

impl Default for OptimSection {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            weight_decay: 0.0,
            betas: [0.9, 0.999],
            eps: 1e-8,
            warmup_steps: 10,
            min_lr_ratio: 0.1,
            grad_clip: 1.0,
            grad_accum: 1,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainSection {
    pub steps: usize,
    pub seed: u64,
    pub out_dir: PathBuf,
    pub checkpoint_every: usize,
    /// Recompute each decoder block in the backward pass instead of keeping its activations
    /// (about a third more compute, a fraction of the memory).
    pub recompute: bool,
}

impl Default for TrainSection {
    fn default() -> Self {
        Self {
            steps: 100,
            seed: 0,
            out_dir: "runs/default".into(),
            checkpoint_every: 25,
            recompute: false,
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VerifySection {
    pub max_massive: usize,
    /// Allowed relative perplexity increase over the base model.
    pub max_ppl_increase: f64,
    /// Text to verify on [default: data.eval]; text the run never saw is the honest test.
    pub text: Option<PathBuf>,
    /// Long by default: massive activations on mid-window tokens (LLaMA-2's "." and "\n"
    /// kind) only show in windows long enough to hold such tokens.
    pub seq_len: usize,
    pub windows: usize,
    pub quant: QuantCheck,
}

impl Default for VerifySection {
    fn default() -> Self {
        Self {
            max_massive: 0,
            max_ppl_increase: 0.01,
            text: None,
            seq_len: 512,
            windows: 10,
            quant: QuantCheck::default(),
        }
    }
}

/// Optional check that the adapted model quantizes well: its perplexity under the setting
/// (w, a, kv, act_scale; see `eabfit quant`) at most `max_gap` above its float perplexity
/// (0.1 = +10%). No check while `max_gap` is unset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QuantCheck {
    pub max_gap: Option<f64>,
    pub w: u32,
    pub a: u32,
    pub kv: u32,
    pub act_scale: crate::quant::ActScale,
}

impl Default for QuantCheck {
    fn default() -> Self {
        Self {
            max_gap: None,
            w: 8,
            a: 8,
            kv: 16,
            act_scale: crate::quant::ActScale::Tensor,
        }
    }
}

impl QuantCheck {
    pub fn setting(&self) -> crate::quant::Setting {
        crate::quant::Setting {
            w: self.w,
            a: self.a,
            kv: self.kv,
            act_scale: self.act_scale,
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
    pub fn new(
        model: impl Into<String>,
        train: impl Into<PathBuf>,
        eval: impl Into<PathBuf>,
    ) -> Self {
        Self {
            model: ModelSection {
                path: model.into(),
                device: default_device(),
                dtype: None,
            },
            data: DataSection {
                train: train.into(),
                eval: eval.into(),
                seq_len: default_seq_len(),
                batch_size: default_batch_size(),
                max_train_windows: None,
                eval_windows: default_eval_windows(),
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
        serde_yaml::to_string(self).expect("a recipe holds only string-keyed YAML data")
    }

    /// Range and cross-field rules serde cannot express. The message starts with the
    /// dotted path of the field at fault, which `parse_str` uses to find its line.
    pub fn validate(&self) -> Result<(), String> {
        check_device("model.device", &self.model.device)?;

        let data = &self.data;
        at_least_one("data.seq_len", data.seq_len)?;
        at_least_one("data.batch_size", data.batch_size)?;
        if let Some(n) = data.max_train_windows {
            at_least_one("data.max_train_windows", n)?;
        }
        at_least_one("data.eval_windows", data.eval_windows)?;

        let eab = &self.adapters.eab;
        non_negative("adapters.eab.init_std", eab.init_std)?;
        if eab.enabled && eab.init == EabInit::FirstToken {
            at_least_one("adapters.eab.calib_windows", eab.calib_windows)?;
        }
        if !eab.enabled && eab.mask_first_token {
            return Err(
                "adapters.eab.mask_first_token must be false when adapters.eab.enabled \
                        is false: without a slot nothing stands in for the masked first token"
                    .into(),
            );
        }

        let lora = &self.adapters.lora;
        positive("adapters.lora.alpha", lora.alpha)?;
        non_negative("adapters.lora.init_std", lora.init_std)?;
        if lora.rank > 0 {
            let why = "non-empty when adapters.lora.rank > 0";
            check(!lora.targets.is_empty(), "adapters.lora.targets", why, "[]")?;
            let no_layers = lora.layers == LoraLayers::List(Vec::new());
            check(!no_layers, "adapters.lora.layers", why, "[]")?;
        }

        let hold = &self.loss.hold;
        non_negative("loss.hold.weight", hold.weight)?;
        positive("loss.hold.temperature", hold.temperature)?;
        let ma = &self.loss.ma;
        non_negative("loss.ma.weight", ma.weight)?;
        positive("loss.ma.threshold", ma.threshold)?;
        match ma.ratio {
            Some(ratio) => positive("loss.ma.ratio", ratio)?,
            None if ma.target == MaTarget::Ratio => {
                return Err("loss.ma.ratio must be set when loss.ma.target is `ratio`".into())
            }
            None => {}
        }

        let optim = &self.optim;
        positive("optim.lr", optim.lr)?;
        non_negative("optim.weight_decay", optim.weight_decay)?;
        for (i, beta) in optim.betas.into_iter().enumerate() {
            check(
                (0.0..1.0).contains(&beta),
                &format!("optim.betas[{i}]"),
                "in [0, 1)",
                beta,
            )?;
        }
        positive("optim.eps", optim.eps)?;
        let ratio = optim.min_lr_ratio;
        check(
            (0.0..=1.0).contains(&ratio),
            "optim.min_lr_ratio",
            "in [0, 1]",
            ratio,
        )?;
        non_negative("optim.grad_clip", optim.grad_clip)?;
        at_least_one("optim.grad_accum", optim.grad_accum)?;

        at_least_one("train.steps", self.train.steps)?;
        at_least_one("train.checkpoint_every", self.train.checkpoint_every)?;
        at_least_one("eval.every", self.eval.every)?;
        non_negative("eval.abs", self.eval.abs)?;
        non_negative("eval.ratio", self.eval.ratio)?;
        at_least_one("log.every", self.log.every)?;
        let v = &self.verify;
        non_negative("verify.max_ppl_increase", v.max_ppl_increase)?;
        at_least_one("verify.seq_len", v.seq_len)?;
        at_least_one("verify.windows", v.windows)?;
        if let Some(gap) = v.quant.max_gap {
            non_negative("verify.quant.max_gap", gap)?;
        }
        for (path, bits) in [
            ("verify.quant.w", v.quant.w),
            ("verify.quant.a", v.quant.a),
            ("verify.quant.kv", v.quant.kv),
        ] {
            check(
                (2..=16).contains(&bits),
                path,
                "in 2..=16 (16 = float)",
                bits,
            )?;
        }

        // Checked here so that a misspelt grid key fails before the first of many runs.
        let fields = field_paths();
        for (key, values) in &self.ablate.grid {
            check_ablate_key("ablate.grid", key, &fields)?;
            check(
                !values.is_empty(),
                &format!("ablate.grid.{key}"),
                "a non-empty list",
                "[]",
            )?;
        }
        for (i, point) in self.ablate.points.iter().enumerate() {
            for key in point.keys() {
                check_ablate_key(&format!("ablate.points[{i}]"), key, &fields)?;
            }
        }
        Ok(())
    }
}

pub(crate) fn check_device(path: &str, device: &str) -> Result<(), String> {
    let device_ok = device == "cpu"
        || device == "cuda"
        || device
            .strip_prefix("cuda:")
            .is_some_and(|n| n.parse::<usize>().is_ok());
    check(
        device_ok,
        path,
        "`cpu`, `cuda` or `cuda:N`",
        format!("`{device}`"),
    )
}

pub(crate) fn check(ok: bool, path: &str, rule: &str, got: impl Display) -> Result<(), String> {
    if ok {
        Ok(())
    } else {
        Err(format!("{path} must be {rule}, got {got}"))
    }
}

// `is_finite` because YAML accepts `.inf` and `.nan`, which no rule below means.
pub(crate) fn positive(path: &str, v: f64) -> Result<(), String> {
    check(v > 0.0 && v.is_finite(), path, "> 0", v)
}

pub(crate) fn non_negative(path: &str, v: f64) -> Result<(), String> {
    check(v >= 0.0 && v.is_finite(), path, ">= 0", v)
}

pub(crate) fn at_least_one(path: &str, v: usize) -> Result<(), String> {
    check(v >= 1, path, ">= 1", v)
}

fn check_ablate_key(at: &str, key: &str, fields: &[String]) -> Result<(), String> {
    if key.starts_with("ablate.") {
        return Err(format!("{at}: `{key}` cannot vary the ablation itself"));
    }
    if !fields.iter().any(|f| f == key) {
        return Err(format!("{at}: {}", unknown_path(key, fields)));
    }
    Ok(())
}

fn unknown_path(path: &str, fields: &[String]) -> String {
    match near_miss(path, fields.iter().map(String::as_str)) {
        Some(best) => format!(
            "unknown recipe field `{}`; did you mean `{best}`?",
            shown(path)
        ),
        None => format!("unknown recipe field `{}`", shown(path)),
    }
}

/// A recipe type the loader below can read: typed by serde (unknown fields denied), with
/// defaults for every field it may leave out and rules serde cannot express. `train` reads
/// [`Recipe`], `pretrain` reads `crate::pretrain::recipe::PretrainRecipe`.
pub trait Typed: Serialize + DeserializeOwned {
    /// A value with every field present; its leaves are the paths overrides may set.
    fn skeleton() -> Self;
    /// Range and cross-field rules; the message starts with the dotted path at fault.
    fn check(&self) -> Result<(), String>;
}

impl Typed for Recipe {
    fn skeleton() -> Self {
        Recipe::new("", "", "")
    }
    fn check(&self) -> Result<(), String> {
        self.validate()
    }
}

/// Reads, overrides, types and validates a recipe file; see [`parse_str`].
pub fn load(path: &Path, overrides: &[String]) -> crate::Result<Recipe> {
    load_typed(path, overrides)
}

/// [`load`] for any [`Typed`] recipe.
pub fn load_typed<T: Typed>(path: &Path, overrides: &[String]) -> crate::Result<T> {
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Usage(format!("{origin}: cannot read recipe: {e}")))?;
    parse_typed(&text, &origin, overrides)
}

/// Parses recipe `text`, applies `overrides` (`dotted.path=value`, the value read as YAML),
/// types and validates it. `origin` names the text in errors, normally its file path.
pub fn parse_str(text: &str, origin: &str, overrides: &[String]) -> crate::Result<Recipe> {
    parse_typed(text, origin, overrides)
}

/// [`parse_str`] for any [`Typed`] recipe.
pub fn parse_typed<T: Typed>(text: &str, origin: &str, overrides: &[String]) -> crate::Result<T> {
    let usage = |at: Option<(usize, usize)>, msg: String| {
        Error::Usage(match at {
            Some((line, column)) => format!("{origin}:{line}:{column}: {msg}"),
            None => format!("{origin}: {msg}"),
        })
    };

    let mut value: Value = serde_yaml::from_str(text).map_err(|e| match e.location() {
        // The location leads the message, so drop serde_yaml's own copy of it.
        Some(l) => {
            let own = format!(" at line {} column {}", l.line(), l.column());
            usage(
                Some((l.line(), l.column())),
                e.to_string().replacen(&own, "", 1),
            )
        }
        None => usage(None, e.to_string()),
    })?;
    // An empty file should report the missing sections, not "expected struct Recipe".
    if value.is_null() {
        value = Value::Mapping(Mapping::new());
    }

    let fields = leaf_paths::<T>();
    let mut set = Vec::new();
    for raw in overrides {
        let pair = parse_override(raw)
            .and_then(|pair| {
                set_paths(&mut value, std::slice::from_ref(&pair), &fields).map(|()| pair)
            })
            .map_err(|e| usage(None, format!("override `{}`: {e}", shown(raw))))?;
        set.push((raw, pair.0));
    }

    // A bad value that an override wrote is blamed on the override: its line in the file,
    // if any, holds a value that is no longer used.
    let report = |keys: &[String], msg: String| {
        let dotted = keys.join(".");
        let by_override = set.iter().find(|(_, path)| {
            dotted == *path
                || dotted
                    .strip_prefix(path.as_str())
                    .is_some_and(|rest| rest.starts_with('.'))
        });
        match by_override {
            Some((raw, _)) => usage(None, format!("override `{}`: {msg}", shown(raw))),
            None => usage(locate(text, keys), msg),
        }
    };

    let recipe: T = serde_path_to_error::deserialize(value).map_err(|e| {
        let mut path = e.path().to_string();
        // Locating stops at the first list index: list items have no key to find.
        let mut keys: Vec<String> = e
            .path()
            .iter()
            .map_while(|segment| match segment {
                serde_path_to_error::Segment::Map { key } => Some(key.clone()),
                _ => None,
            })
            .collect();
        let (msg, unknown_field) = explain(&e.inner().to_string());
        if let Some(name) = unknown_field {
            // The path ends at the unknown key, which the message already names: name the
            // mapping it sits in (only structs reached by keys have fields), point at the key.
            if keys.last() == Some(&name) {
                keys.pop();
            }
            path = keys.join(".");
            keys.push(name);
        }
        report(
            &keys,
            if path.is_empty() || path == "." {
                msg
            } else {
                format!("{path}: {msg}")
            },
        )
    })?;

    recipe.check().map_err(|msg| {
        let path = msg.split([' ', ':', '[']).next().unwrap_or_default();
        let keys: Vec<String> = path.split('.').map(String::from).collect();
        report(&keys, msg)
    })?;
    Ok(recipe)
}

/// An override as typed, with control characters escaped so the error stays one line.
fn shown(raw: &str) -> String {
    crate::error::escape_controls(raw)
}

fn parse_override(raw: &str) -> Result<(String, Value), String> {
    let (path, value) = raw.split_once('=').ok_or("expected `dotted.path=value`")?;
    let value = serde_yaml::from_str(value).map_err(|e| format!("value is not YAML: {e}"))?;
    Ok((path.trim().to_string(), value))
}

/// Sets each dotted leaf path in a recipe tree, creating absent sections on the way.
/// Paths must be recipe fields (see [`field_paths`]), so a typo cannot slip in as a new key.
pub fn apply_overrides(value: &mut Value, overrides: &[(String, Value)]) -> Result<(), String> {
    set_paths(value, overrides, &field_paths())
}

/// [`apply_overrides`] against the leaf paths `fields` of some recipe type.
fn set_paths(
    value: &mut Value,
    overrides: &[(String, Value)],
    fields: &[String],
) -> Result<(), String> {
    for (path, new) in overrides {
        if !fields.contains(path) {
            return Err(unknown_path(path, fields));
        }
        let keys: Vec<&str> = path.split('.').collect();
        let mut node = &mut *value;
        for (depth, key) in keys.iter().enumerate() {
            if node.is_null() {
                *node = Value::Mapping(Mapping::new());
            }
            let Value::Mapping(map) = node else {
                let parent = if depth == 0 {
                    "the recipe".into()
                } else {
                    keys[..depth].join(".")
                };
                return Err(format!("{parent} is not a mapping, cannot set `{path}`"));
            };
            node = map.entry(Value::from(*key)).or_insert(Value::Null);
        }
        *node = new.clone();
    }
    Ok(())
}

/// Every dotted leaf path a recipe has, read off the default recipe so that it cannot
/// drift from the structs. Lists, nulls and empty maps (`ablate.grid`) are leaves.
pub fn field_paths() -> Vec<String> {
    leaf_paths::<Recipe>()
}

/// Every dotted leaf path of a [`Typed`] recipe, read off its skeleton.
pub fn leaf_paths<T: Typed>() -> Vec<String> {
    fn walk(value: &Value, prefix: String, out: &mut Vec<String>) {
        match value {
            Value::Mapping(map) if !map.is_empty() => {
                for (key, child) in map {
                    let key = key.as_str().expect("recipe keys are field names");
                    let path = if prefix.is_empty() {
                        key.to_string()
                    } else {
                        format!("{prefix}.{key}")
                    };
                    walk(child, path, out);
                }
            }
            _ => out.push(prefix),
        }
    }
    let defaults = serde_yaml::to_value(T::skeleton()).expect("a recipe serializes");
    let mut paths = Vec::new();
    walk(&defaults, String::new(), &mut paths);
    paths
}

/// Rewrites serde's "unknown field `x`, expected one of `a`, `b`" (or "unknown variant")
/// into "unknown field `x`; did you mean `a`?" when a name is close enough. Also returns
/// the unknown field's name, whose own line is the one to point at.
fn explain(msg: &str) -> (String, Option<String>) {
    let is_field = msg.starts_with("unknown field `");
    if !is_field && !msg.starts_with("unknown variant `") {
        return (msg.to_string(), None);
    }
    // serde backtick-quotes the offending name first, then every expected one.
    let quoted: Vec<&str> = msg.split('`').skip(1).step_by(2).collect();
    let (unknown, expected) = quoted
        .split_first()
        .expect("the prefix holds one quoted name");
    let msg = match (
        near_miss(unknown, expected.iter().copied()),
        msg.split_once(", "),
    ) {
        (Some(best), Some((head, _))) => format!("{head}; did you mean `{best}`?"),
        _ => msg.to_string(),
    };
    (msg, is_field.then(|| unknown.to_string()))
}

/// The closest candidate within rustc's typo budget (a third of the word's length).
fn near_miss<'a>(word: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let budget = word.chars().count().max(3) / 3;
    candidates
        .map(|c| (edit_distance(word, c), c))
        .filter(|&(d, _)| d <= budget)
        .min_by_key(|&(d, _)| d)
        .map(|(_, c)| c)
}

/// Levenshtein distance with an adjacent swap counted as one edit, the commonest typo.
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    // d[i][j]: distance between the first i chars of a and the first j of b.
    let mut d: Vec<Vec<usize>> = (0..=a.len()).map(|i| (i..=i + b.len()).collect()).collect();
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let substitute = d[i - 1][j - 1] + usize::from(a[i - 1] != b[j - 1]);
            d[i][j] = substitute.min(d[i - 1][j] + 1).min(d[i][j - 1] + 1);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d[i][j] = d[i][j].min(d[i - 2][j - 2] + 1);
            }
        }
    }
    d[a.len()][b.len()]
}

/// 1-based line and column of the key at `keys` in block-style YAML, found by indentation.
/// Flow mappings are not followed, so this falls back to the deepest key found.
fn locate(text: &str, keys: &[String]) -> Option<(usize, usize)> {
    let mut keys = keys.iter();
    let mut want = keys.next()?;
    let mut found = None;
    let mut parent_indent = None;
    // Indentation of the keys in the current block, taken from its first line.
    let mut block_indent = None;
    for (i, line) in text.lines().enumerate() {
        let content = line.trim_start();
        if content.is_empty() || content.starts_with('#') {
            continue;
        }
        let indent = line.len() - content.len();
        if parent_indent.is_some_and(|p| indent <= p) {
            break;
        }
        if indent != *block_indent.get_or_insert(indent) {
            continue;
        }
        let key = content
            .split_once(':')
            .filter(|(_, rest)| rest.is_empty() || rest.starts_with([' ', '\t']));
        if key.is_some_and(|(k, _)| k.trim().trim_matches(['"', '\'']) == want.as_str()) {
            found = Some((i + 1, indent + 1));
            parent_indent = Some(indent);
            block_indent = None;
            match keys.next() {
                Some(next) => want = next,
                None => break,
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "model:\n  path: m.gguf\ndata:\n  train: t.txt\n  eval: e.txt\n";

    fn parse(text: &str, overrides: &[&str]) -> crate::Result<Recipe> {
        let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        parse_str(text, "recipes/x.yaml", &overrides)
    }

    /// The usage message for a recipe that must fail.
    fn fails(text: &str, overrides: &[&str]) -> String {
        match parse(text, overrides) {
            Err(Error::Usage(msg)) => msg,
            other => panic!("expected a usage error, got {other:?}"),
        }
    }

    #[test]
    fn minimal_recipe_takes_every_default() {
        assert_eq!(
            parse(MINIMAL, &[]).unwrap(),
            Recipe::new("m.gguf", "t.txt", "e.txt")
        );
    }

    #[test]
    fn default_round_trips_through_yaml() {
        let recipe = Recipe::new("m.gguf", "t.txt", "e.txt");
        let yaml = recipe.to_yaml();
        assert_eq!(parse(&yaml, &[]).unwrap(), recipe);
        let sections: Vec<&str> = yaml.lines().filter(|l| !l.starts_with(' ')).collect();
        assert_eq!(
            sections,
            [
                "model:",
                "data:",
                "adapters:",
                "loss:",
                "optim:",
                "train:",
                "eval:",
                "log:",
                "verify:",
                "export:",
                "ablate:"
            ]
        );
    }

    #[test]
    fn verify_quant_check_is_typed() {
        let r = parse(
            &format!(
                "{MINIMAL}verify:\n  quant:\n    max_gap: 0.25\n    a: 6\n    act_scale: token\n"
            ),
            &["verify.seq_len=256"],
        )
        .unwrap();
        let q = &r.verify.quant;
        assert_eq!((q.max_gap, q.w, q.a, q.kv), (Some(0.25), 8, 6, 16));
        assert_eq!(q.act_scale, crate::quant::ActScale::Token);
        assert_eq!((r.verify.seq_len, r.verify.windows), (256, 10));
        let msg = fails(
            &format!("{MINIMAL}verify:\n  quant:\n    max_gapp: 0.1\n"),
            &[],
        );
        assert!(
            msg.contains("unknown field `max_gapp`; did you mean `max_gap`?"),
            "{msg}"
        );
        let msg = fails(&format!("{MINIMAL}verify:\n  quant:\n    a: 1\n"), &[]);
        assert!(msg.contains("verify.quant.a must be in 2..=16"), "{msg}");
        let msg = fails(
            &format!("{MINIMAL}verify:\n  quant:\n    act_scale: row\n"),
            &[],
        );
        assert!(msg.contains("act_scale"), "{msg}");
        let msg = fails(MINIMAL, &["verify.quant.max_gap=-1"]);
        assert!(msg.contains("verify.quant.max_gap must be >= 0"), "{msg}");
    }

    #[test]
    fn non_default_values_round_trip() {
        let mut recipe = Recipe::new("org/model", "train/", "e.txt");
        recipe.model.dtype = Some(Dtype::Bf16);
        recipe.data.max_train_windows = Some(64);
        recipe.adapters.lora.rank = 8;
        recipe.adapters.lora.targets = vec![LoraTarget::Q, LoraTarget::Gate];
        recipe.adapters.lora.layers = LoraLayers::List(vec![1, 3]);
        recipe.loss.ma.ratio = Some(50.0);
        recipe.loss.ma.target = MaTarget::Ratio;
        recipe.optim.lr = 3e-4;
        recipe.log.name = Some("sweep".into());
        recipe.ablate.grid.insert(
            "optim.lr".into(),
            vec![Value::from(1e-3), Value::from(1e-4)],
        );
        let yaml = recipe.to_yaml();
        assert!(yaml.contains("  layers:\n    - 1\n    - 3\n"), "{yaml}");
        assert_eq!(parse(&yaml, &[]).unwrap(), recipe);
    }

    #[test]
    fn unknown_key_names_file_line_path_and_near_miss() {
        let text = format!("{MINIMAL}adapters:\n  lora:\n    rnak: 8\n");
        assert_eq!(
            fails(&text, &[]),
            "recipes/x.yaml:8:5: adapters.lora: unknown field `rnak`; did you mean `rank`?"
        );
    }

    #[test]
    fn unknown_key_without_near_miss_lists_the_fields() {
        let msg = fails(&format!("{MINIMAL}optim:\n  zzzzzz: 1\n"), &[]);
        assert!(
            msg.starts_with(
                "recipes/x.yaml:7:3: optim: unknown field `zzzzzz`, expected one of `lr`"
            ),
            "{msg}"
        );
    }

    #[test]
    fn unknown_section_is_found_at_top_level() {
        let msg = fails(&format!("{MINIMAL}optm:\n  lr: 1\n"), &[]);
        assert!(
            msg.starts_with("recipes/x.yaml:6:1: unknown field `optm`; did you mean `optim`?"),
            "{msg}"
        );
    }

    #[test]
    fn wrong_type_names_path_and_line() {
        let msg = fails(
            &format!("{MINIMAL}optim:\n  warmup_steps: 3\n  lr: fast\n"),
            &[],
        );
        assert_eq!(
            msg,
            "recipes/x.yaml:8:3: optim.lr: invalid type: string \"fast\", expected f64"
        );
    }

    #[test]
    fn unknown_enum_word_suggests_the_variant() {
        let msg = fails(&format!("{MINIMAL}loss:\n  hold:\n    kind: kll\n"), &[]);
        assert_eq!(
            msg,
            "recipes/x.yaml:8:5: loss.hold.kind: unknown variant `kll`; did you mean `kl`?"
        );
        let msg = fails(
            &format!("{MINIMAL}adapters:\n  lora:\n    targets: [down, upp]\n"),
            &[],
        );
        assert_eq!(msg, "recipes/x.yaml:8:5: adapters.lora.targets[1]: unknown variant `upp`; did you mean `up`?");
    }

    #[test]
    fn layer_selectors_accept_their_words_and_lists_only() {
        let msg = fails(
            &format!("{MINIMAL}adapters:\n  lora:\n    layers: brith\n"),
            &[],
        );
        assert_eq!(msg, "recipes/x.yaml:8:5: adapters.lora.layers: unknown variant `brith`; did you mean `birth`?");
        let msg = fails(&format!("{MINIMAL}loss:\n  ma:\n    layers: birth\n"), &[]);
        assert!(
            msg.contains("loss.ma.layers: unknown variant `birth`, expected `all`"),
            "{msg}"
        );
        let msg = fails(
            &format!("{MINIMAL}loss:\n  ma:\n    layers: {{a: 1}}\n"),
            &[],
        );
        assert!(
            msg.ends_with("loss.ma.layers: expected a layer keyword or a list of layer indices"),
            "{msg}"
        );
        let recipe = parse(&format!("{MINIMAL}loss:\n  ma:\n    layers: [0, 2]\n"), &[]).unwrap();
        assert_eq!(recipe.loss.ma.layers, MaLayers::List(vec![0, 2]));
    }

    #[test]
    fn missing_required_fields_are_named() {
        let msg = fails("model:\n  device: cpu\ndata:\n  train: t\n  eval: e\n", &[]);
        assert_eq!(msg, "recipes/x.yaml:1:1: model: missing field `path`");
        assert_eq!(fails("", &[]), "recipes/x.yaml: missing field `model`");
    }

    #[test]
    fn yaml_syntax_error_has_a_location() {
        let msg = fails("model:\n  path: [m\ndata: {}\n", &[]);
        assert!(
            msg.starts_with("recipes/x.yaml:3:5: did not find expected ',' or ']', while"),
            "{msg}"
        );
    }

    #[test]
    fn validation_errors_start_with_the_field_and_point_at_its_line() {
        let msg = fails(&format!("{MINIMAL}optim:\n  lr: -1\n"), &[]);
        assert_eq!(msg, "recipes/x.yaml:7:3: optim.lr must be > 0, got -1");
        let msg = fails(&format!("{MINIMAL}optim:\n  betas: [0.9, 1.0]\n"), &[]);
        assert_eq!(
            msg,
            "recipes/x.yaml:7:3: optim.betas[1] must be in [0, 1), got 1"
        );
        let msg = fails(&format!("{MINIMAL}model2: 1\n"), &[]);
        assert!(msg.contains("did you mean `model`?"), "{msg}");
    }

    #[test]
    fn cross_field_rules() {
        let msg = fails(
            &format!("{MINIMAL}adapters:\n  eab:\n    enabled: false\n"),
            &[],
        );
        assert!(
            msg.starts_with("recipes/x.yaml:7:3: adapters.eab.mask_first_token must be false"),
            "{msg}"
        );
        parse(
            &format!(
                "{MINIMAL}adapters:\n  eab:\n    enabled: false\n    mask_first_token: false\n"
            ),
            &[],
        )
        .unwrap();

        let msg = fails(
            &format!("{MINIMAL}adapters:\n  lora:\n    rank: 4\n    targets: []\n"),
            &[],
        );
        assert_eq!(msg, "recipes/x.yaml:9:5: adapters.lora.targets must be non-empty when adapters.lora.rank > 0, got []");
        parse(
            &format!("{MINIMAL}adapters:\n  lora:\n    targets: []\n"),
            &[],
        )
        .unwrap();

        let msg = fails(&format!("{MINIMAL}loss:\n  ma:\n    target: ratio\n"), &[]);
        assert!(
            msg.contains("loss.ma.ratio must be set when loss.ma.target is `ratio`"),
            "{msg}"
        );

        let msg = fails(&format!("{MINIMAL}model:\n  path: m\n  device: gpu\n"), &[]);
        assert!(msg.contains("duplicate"), "{msg}");
        let msg = fails(
            "model:\n  path: m\n  device: gpu\ndata:\n  train: t\n  eval: e\n",
            &[],
        );
        assert_eq!(
            msg,
            "recipes/x.yaml:3:3: model.device must be `cpu`, `cuda` or `cuda:N`, got `gpu`"
        );
        parse(
            "model:\n  path: m\n  device: cuda:1\ndata:\n  train: t\n  eval: e\n",
            &[],
        )
        .unwrap();
    }

    #[test]
    fn overrides_set_nested_scalars_lists_and_absent_sections() {
        let recipe = parse(
            MINIMAL,
            &[
                "optim.lr=3e-4",
                "adapters.lora.targets=[down,up]",
                "adapters.lora.layers=[1, 2]",
                "train.steps=7",
                "log.name=run-a",
            ],
        )
        .unwrap();
        assert_eq!(recipe.optim.lr, 3e-4);
        assert_eq!(
            recipe.adapters.lora.targets,
            [LoraTarget::Down, LoraTarget::Up]
        );
        assert_eq!(recipe.adapters.lora.layers, LoraLayers::List(vec![1, 2]));
        assert_eq!(recipe.train.steps, 7);
        assert_eq!(recipe.log.name.as_deref(), Some("run-a"));
        // The override wins over the file, and `=null` clears an optional field.
        let text = format!("{MINIMAL}optim:\n  lr: 0.5\nloss:\n  ma:\n    ratio: 2.0\n");
        let recipe = parse(&text, &["optim.lr=0.25", "loss.ma.ratio=null"]).unwrap();
        assert_eq!((recipe.optim.lr, recipe.loss.ma.ratio), (0.25, None));
    }

    #[test]
    fn bad_overrides_are_blamed_on_the_override() {
        assert_eq!(
            fails(MINIMAL, &["adapters.lora.rnak=4"]),
            "recipes/x.yaml: override `adapters.lora.rnak=4`: unknown recipe field `adapters.lora.rnak`; did you mean `adapters.lora.rank`?"
        );
        assert_eq!(
            fails(MINIMAL, &["adapters.lora"]),
            "recipes/x.yaml: override `adapters.lora`: expected `dotted.path=value`"
        );
        // The file's `lr:` line is not the culprit, so no line number.
        let text = format!("{MINIMAL}optim:\n  lr: 0.5\n");
        assert_eq!(
            fails(&text, &["optim.lr=fast"]),
            "recipes/x.yaml: override `optim.lr=fast`: optim.lr: invalid type: string \"fast\", expected f64"
        );
        assert_eq!(
            fails(&text, &["optim.lr=-1"]),
            "recipes/x.yaml: override `optim.lr=-1`: optim.lr must be > 0, got -1"
        );
    }

    #[test]
    fn apply_overrides_refuses_to_replace_a_non_mapping_section() {
        let mut value: Value = serde_yaml::from_str("optim: 3").unwrap();
        let err =
            apply_overrides(&mut value, &[("optim.lr".into(), Value::from(0.1))]).unwrap_err();
        assert_eq!(err, "optim is not a mapping, cannot set `optim.lr`");
    }

    #[test]
    fn field_paths_lists_every_leaf() {
        let paths = field_paths();
        for expected in [
            "model.path",
            "loss.ma.weight",
            "adapters.lora.rank",
            "adapters.lora.targets",
            "data.max_train_windows",
            "ablate.grid",
            "ablate.points",
        ] {
            assert!(
                paths.iter().any(|p| p == expected),
                "{expected} missing from {paths:?}"
            );
        }
        assert!(
            !paths
                .iter()
                .any(|p| p == "adapters" || p == "adapters.lora"),
            "{paths:?}"
        );
    }

    #[test]
    fn ablate_keys_are_checked_up_front() {
        let ok = format!("{MINIMAL}ablate:\n  grid:\n    optim.lr: [1.0e-3, 1.0e-4]\n  points:\n    - {{adapters.lora.rank: 4}}\n");
        let recipe = parse(&ok, &[]).unwrap();
        assert_eq!(recipe.ablate.grid["optim.lr"].len(), 2);
        let msg = fails(
            &format!("{MINIMAL}ablate:\n  grid:\n    optim.lrr: [1]\n"),
            &[],
        );
        assert_eq!(msg, "recipes/x.yaml:7:3: ablate.grid: unknown recipe field `optim.lrr`; did you mean `optim.lr`?");
        let msg = fails(
            &format!("{MINIMAL}ablate:\n  grid:\n    optim.lr: []\n"),
            &[],
        );
        assert!(
            msg.contains("ablate.grid.optim.lr must be a non-empty list"),
            "{msg}"
        );
        let msg = fails(
            &format!("{MINIMAL}ablate:\n  points:\n    - {{ablate.grid: {{}}}}\n"),
            &[],
        );
        assert!(
            msg.contains("ablate.points[0]: `ablate.grid` cannot vary the ablation itself"),
            "{msg}"
        );
    }

    #[test]
    fn load_reports_a_missing_file_as_usage() {
        let err = load(Path::new("recipes/nope.yaml"), &[]).unwrap_err();
        assert!(err.is_usage());
        assert!(
            err.to_string()
                .starts_with("recipes/nope.yaml: cannot read recipe:"),
            "{err}"
        );
    }

    #[test]
    fn load_reads_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.yaml");
        std::fs::write(&path, MINIMAL).unwrap();
        assert_eq!(load(&path, &["train.seed=3".into()]).unwrap().train.seed, 3);
    }

    #[test]
    fn near_miss_counts_a_swap_as_one_edit() {
        assert_eq!(edit_distance("rnak", "rank"), 1);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(near_miss("lr", ["eps", "lr2"].into_iter()), Some("lr2"));
        assert_eq!(near_miss("xyz", ["eps"].into_iter()), None);
    }
}
