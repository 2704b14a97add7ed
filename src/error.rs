//! The library's error type: every variant names the file, field or tensor at fault.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },
    #[error("tensor `{name}`: {msg}")]
    Tensor { name: String, msg: String },
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{0}")]
    Msg(String),
}

impl Error {
    pub fn file(path: impl Into<PathBuf>, msg: impl std::fmt::Display) -> Self {
        Error::File {
            path: path.into(),
            msg: msg.to_string(),
        }
    }
    pub fn tensor(name: impl Into<String>, msg: impl std::fmt::Display) -> Self {
        Error::Tensor {
            name: name.into(),
            msg: msg.to_string(),
        }
    }
    /// Usage errors (bad flags, bad recipe) exit with code 2 at the binary edge.
    pub fn is_usage(&self) -> bool {
        matches!(self, Error::Usage(_))
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// `s` with control characters escaped: text read from a corrupt file (a tensor name, a
/// merge) keeps an error message on one line.
pub fn escape_controls(s: &str) -> String {
    s.chars()
        .map(|c| match c.is_control() {
            true => c.escape_default().to_string(),
            false => c.to_string(),
        })
        .collect()
}

/// Whether an error is the device running out of memory: candle passes the CUDA driver's
/// `CUDA_ERROR_OUT_OF_MEMORY` (or cuBLAS's `CUBLAS_STATUS_ALLOC_FAILED`) through as text.
pub fn is_out_of_memory(e: &Error) -> bool {
    let msg = e.to_string();
    msg.contains("OUT_OF_MEMORY")
        || msg.contains("ALLOC_FAILED")
        || msg.to_lowercase().contains("out of memory")
}

/// Turns an out-of-memory error into one that names the batch and sequence length in use and
/// what to lower (`lower`, in the command's own terms); other errors pass through unchanged.
pub fn explain_oom(e: Error, what: &str, batch: usize, seq_len: usize, lower: &str) -> Error {
    if !is_out_of_memory(&e) {
        return e;
    }
    let first = e.to_string();
    let first = first.lines().next().unwrap_or_default().to_string();
    Error::Msg(format!(
        "out of memory in {what} at batch {batch} x seq_len {seq_len}: lower {lower} ({first})"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuda_out_of_memory_names_batch_seq_len_and_what_to_lower() {
        // The text candle 0.11 gives for a failed cudaMalloc, wrapped as our errors wrap it.
        let cuda = Error::Candle(candle_core::Error::Msg(
            "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")".into(),
        ));
        let e = explain_oom(cuda, "train", 512, 2048, "data.batch_size or data.seq_len");
        let msg = e.to_string();
        assert!(
            msg.starts_with("out of memory in train at batch 512 x seq_len 2048"),
            "{msg}"
        );
        assert!(
            msg.contains("lower data.batch_size or data.seq_len"),
            "{msg}"
        );
        assert!(msg.contains("CUDA_ERROR_OUT_OF_MEMORY"), "{msg}");
        assert!(!msg.contains('\n'));
        let cublas = Error::Msg("cublas: CUBLAS_STATUS_ALLOC_FAILED".into());
        assert!(explain_oom(cublas, "scan", 1, 512, "--seq-len")
            .to_string()
            .contains("scan at batch 1"));
    }

    #[test]
    fn other_errors_pass_through_unchanged() {
        let e = explain_oom(Error::tensor("w", "bad shape"), "train", 8, 64, "x");
        assert_eq!(e.to_string(), "tensor `w`: bad shape");
    }
}
