//! eabfit: retrofit Explicit Attention Bias (EAB) onto frozen LLaMA and Mistral checkpoints.
//!
//! Modules follow the data flow: checkpoint -> model (+ adapters, on `ops`) -> data ->
//! perplexity -> metrics -> plot, with `runtime` holding the flags every command shares;
//! `corpus` and `pretrain` train a model from scratch instead of adapting one.

pub mod ablate;
pub mod adapters;
pub mod bench;
pub mod checkpoint;
pub mod commands;
pub mod corpus;
pub mod data;
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
pub mod ops;
pub mod optim;
pub mod perplexity;
pub mod plot;
pub mod plot_gaps;
pub mod plot_stream;
pub mod pretrain;
pub mod quant;
pub mod quant_eval;
pub mod recipe;
pub mod resume;
pub mod runtime;
pub mod scan;
pub mod stream;
pub mod train;
pub mod verify;

pub use error::{Error, Result};
