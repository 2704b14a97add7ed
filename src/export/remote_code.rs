//! The transformers code an `hf` export with EAB slots carries beside its weights, so that
//! `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` runs the slots, and a
//! load without `trust_remote_code` fails with transformers' own error instead of silently
//! giving the base model: config.json gets a `model_type` transformers does not know
//! (`eab_llama`, `eab_mistral`, `eab_qwen2`, `eab_qwen3`) and an `auto_map` naming the two files
//! written here.
//!
//! Both files come from templates in `templates/` (valid Python themselves, every family
//! alike): `__Family__` / `__family__` become the family's class prefix / module name. Qwen2's
//! biases live in transformers' own projections; Qwen3's head norms are its attention's
//! `q_norm` / `k_norm`, which the template applies wherever the base class has them.

use crate::{Error, Result};
use serde_json::{json, Map, Value};

pub const CONFIGURATION_FILE: &str = "configuration_eab.py";
pub const MODELING_FILE: &str = "modeling_eab.py";
const CONFIGURATION_TEMPLATE: &str = include_str!("templates/configuration_eab.py");
const MODELING_TEMPLATE: &str = include_str!("templates/modeling_eab.py");
const MODEL_TYPE_PREFIX: &str = "eab_";

/// The transformers model family an export subclasses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
}

impl Family {
    /// The family of a config's `model_type` (an earlier export's `eab_*` included); the
    /// message names the field. A LLaMA with a window is refused: transformers' LLaMA has none.
    /// `window` is the one the model runs ([`crate::model::Config::window`]).
    pub fn of(model_type: Option<&str>, window: Option<usize>) -> Result<Self> {
        let base = model_type.map(|t| t.strip_prefix(MODEL_TYPE_PREFIX).unwrap_or(t));
        match (base, window) {
            (Some("mistral"), _) => Ok(Self::Mistral),
            (Some("qwen2"), None) => Ok(Self::Qwen2),
            (Some("qwen3"), None) => Ok(Self::Qwen3),
            (None | Some("llama"), None) => Ok(Self::Llama),
            (None | Some("llama"), Some(w)) => Err(Error::Msg(format!(
                "config.json: `sliding_window` {w} with model_type llama: transformers' LLaMA has no window, so its code would run a different model; set model_type to mistral"
            ))),
            (Some(other), _) => Err(Error::Msg(format!(
                "config.json: model_type `{other}` with sliding_window {window:?}: the hf export's transformers code covers llama, mistral, and qwen2/qwen3 without a window"
            ))),
        }
    }

    /// transformers' module name: `transformers.models.<module>`.
    pub fn module(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Mistral => "mistral",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
        }
    }

    fn class_prefix(self) -> &'static str {
        match self {
            Self::Llama => "Llama",
            Self::Mistral => "Mistral",
            Self::Qwen2 => "Qwen2",
            Self::Qwen3 => "Qwen3",
        }
    }

    pub fn model_type(self) -> String {
        format!("{MODEL_TYPE_PREFIX}{}", self.module())
    }

    pub fn config_class(self) -> String {
        format!("Eab{}Config", self.class_prefix())
    }

    pub fn model_class(self) -> String {
        format!("Eab{}ForCausalLM", self.class_prefix())
    }

    /// transformers' own class for the family, what a slot-free export names.
    pub fn base_architecture(self) -> String {
        format!("{}ForCausalLM", self.class_prefix())
    }

    fn render(self, template: &str) -> String {
        template
            .replace("__Family__", self.class_prefix())
            .replace("__family__", self.module())
    }

    /// (file name, Python source) of the configuration and the modeling file.
    pub fn files(self) -> [(&'static str, String); 2] {
        [
            (CONFIGURATION_FILE, self.render(CONFIGURATION_TEMPLATE)),
            (MODELING_FILE, self.render(MODELING_TEMPLATE)),
        ]
    }

    /// config.json of an export with slots: its own model_type, architecture and `auto_map`.
    pub fn mark(self, config: &mut Map<String, Value>) {
        let module = |file: &str| file.trim_end_matches(".py").to_string();
        // eabfit reads a missing window as none, transformers' MistralConfig as 4096.
        if self == Self::Mistral {
            config.entry("sliding_window").or_insert(Value::Null);
        }
        config.insert("model_type".into(), json!(self.model_type()));
        config.insert("architectures".into(), json!([self.model_class()]));
        config.insert(
            "auto_map".into(),
            json!({
                "AutoConfig": format!("{}.{}", module(CONFIGURATION_FILE), self.config_class()),
                "AutoModelForCausalLM": format!("{}.{}", module(MODELING_FILE), self.model_class()),
            }),
        );
    }

    /// config.json of an export without slots (`peft`, or LoRA only): transformers' own
    /// model_type and class again when the source was itself an export with slots.
    pub fn unmark(self, config: &mut Map<String, Value>) {
        if config.remove("auto_map").is_some()
            || config
                .get("model_type")
                .and_then(Value::as_str)
                .is_some_and(|t| t.starts_with(MODEL_TYPE_PREFIX))
        {
            config.insert("model_type".into(), json!(self.module()));
            config.insert("architectures".into(), json!([self.base_architecture()]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_from_model_type() {
        assert_eq!(Family::of(Some("llama"), None).unwrap(), Family::Llama);
        assert_eq!(Family::of(None, None).unwrap(), Family::Llama);
        assert_eq!(Family::of(Some("eab_llama"), None).unwrap(), Family::Llama);
        assert_eq!(
            Family::of(Some("mistral"), Some(4096)).unwrap(),
            Family::Mistral
        );
        assert_eq!(
            Family::of(Some("eab_mistral"), None).unwrap(),
            Family::Mistral
        );
        assert_eq!(Family::of(Some("qwen2"), None).unwrap(), Family::Qwen2);
        assert_eq!(Family::of(Some("eab_qwen3"), None).unwrap(), Family::Qwen3);
        let e = Family::of(Some("gemma"), None).unwrap_err().to_string();
        assert!(e.contains("model_type `gemma`"), "{e}");
        let e = Family::of(Some("llama"), Some(8)).unwrap_err().to_string();
        assert!(e.contains("sliding_window"), "{e}");
    }

    #[test]
    fn rendering_leaves_no_placeholder() {
        for f in [Family::Llama, Family::Mistral, Family::Qwen2, Family::Qwen3] {
            for (name, src) in f.files() {
                assert!(
                    !src.contains("__Family__") && !src.contains("__family__"),
                    "{name}"
                );
                assert!(
                    src.contains(&format!("transformers.models.{}.", f.module())),
                    "{name}"
                );
            }
        }
    }

    #[test]
    fn mark_then_unmark_restores_the_base() {
        let mut c = Map::new();
        c.insert("model_type".into(), json!("mistral"));
        c.insert("architectures".into(), json!(["MistralForCausalLM"]));
        Family::Mistral.mark(&mut c);
        assert_eq!(c["model_type"], "eab_mistral");
        assert!(c["sliding_window"].is_null(), "an absent window stays none");
        assert_eq!(c["architectures"], json!(["EabMistralForCausalLM"]));
        assert_eq!(
            c["auto_map"]["AutoModelForCausalLM"],
            "modeling_eab.EabMistralForCausalLM"
        );
        Family::Mistral.unmark(&mut c);
        assert_eq!(c["model_type"], "mistral");
        assert_eq!(c["architectures"], json!(["MistralForCausalLM"]));
        assert!(!c.contains_key("auto_map"));
    }
}
