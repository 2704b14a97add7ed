//! eabfit: retrofit Explicit Attention Bias (EAB) onto frozen LLaMA and Mistral checkpoints.
//!
//! Modules follow the data flow: recipe -> checkpoint -> model (+ adapters) -> data -> loss
//! -> train -> metrics -> verify -> export.

pub mod error;

pub use error::{Error, Result};
