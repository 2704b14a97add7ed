//! eabfit: retrofit Explicit Attention Bias (EAB) onto frozen LLaMA and Mistral checkpoints.
//!
//! A retrofit flows through the modules in this order:
//! recipe -> checkpoint -> model (+ adapters) -> data -> loss -> train -> metrics -> verify -> export.
//!
//! - [`recipe`]: the typed YAML recipe that names everything a run does.
//! - [`checkpoint`]: a Hugging Face folder, hub id or GGUF file, read into a validated config,
//!   named weights and a tokenizer.
//! - [`model`] (+ [`adapters`]): the decoder, on the custom ops of [`ops`]; the trainable EAB
//!   slots and LoRA pairs enter it through its constructor.
//! - [`data`]: text in, token windows out.
//! - [`loss`]: the hold term and the suppression term, on [`scan`] (the massive-activation rule)
//!   and [`perplexity`].
//! - [`train`]: the loop, with [`optim`], [`resume`] (its checkpoints), [`lock`] and [`killpoint`].
//! - [`metrics`]: TensorBoard events written during training, and a reader for them.
//! - [`verify`]: base and adapted model side by side.
//! - [`export`]: the adapted model as files other tools load.
//!
//! Beside that flow: the paper's measurements ([`scan`], [`intervene`], [`plot`]), quantization
//! ([`quant`], [`quant_eval`], [`plot_gaps`]), [`generate`], [`ablate`] (many training runs),
//! [`bench`], and training from scratch ([`corpus`] -> [`pretrain`]). Small shared rooms:
//! [`model_args`] (the `--model/--device/--device-map/--dtype` flags), [`device`],
//! [`device_map`] (layers over several devices), [`assets`] (the fetched
//! defaults), [`fsio`] (atomic writes), [`memory`], [`error`]; [`commands`] runs the commands
//! that read a model without training it. No module imports one that imports it back
//! (`tests/layout.rs` checks it).

pub mod ablate;
pub mod adapters;
pub mod assets;
pub mod bench;
pub mod checkpoint;
pub mod commands;
pub mod corpus;
pub mod data;
pub mod device;
pub mod device_map;
pub mod error;
pub mod export;
pub mod fsio;
pub mod generate;
pub mod intervene;
pub mod killpoint;
pub mod lock;
pub mod loss;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod model_args;
pub mod ops;
pub mod optim;
pub mod perplexity;
pub mod plot;
pub mod plot_gaps;
pub mod pretrain;
pub mod quant;
pub mod quant_eval;
pub mod recipe;
pub mod resume;
pub mod scan;
pub mod train;
pub mod verify;

pub use error::{Error, Result};
