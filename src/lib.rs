//! eabfit: retrofit Explicit Attention Bias (EAB) onto frozen LLaMA and Mistral checkpoints.
//!
//! Modules follow the data flow: checkpoint -> model (+ adapters) -> data -> perplexity
//! -> metrics -> plot, with `runtime` holding the flags every command shares.

pub mod error;
pub mod runtime;
pub mod checkpoint;
pub mod adapters;
pub mod model;
pub mod data;
pub mod perplexity;
pub mod scan;
pub mod intervene;
pub mod metrics;
pub mod plot;
pub mod commands;

pub use error::{Error, Result};
