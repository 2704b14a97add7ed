//! Mutation fuzzing of every file eabfit reads: GGUF headers and metadata, safetensors headers,
//! config.json, tokenizer.json, adapter folders, recipes and `key=value` overrides.
//!
//! Every case is a deterministic function of its index (seeded mutators written here: bit
//! flips, truncation, byte insertion and deletion, extreme numbers in length / count / dim
//! fields, JSON and YAML type swaps). Most cases call the library in-process under
//! `catch_unwind` (fast); a smaller set runs the binary for the exit-code contract. Each case
//! must end, within a time bound, either accepted or with a one-line error naming the file.
//!
//! One test binary, a module per input kind: `gguf`, `checkpoint` (Hugging Face folders and
//! adapter folders), `recipe` (recipes and overrides), `cli` (all of them through the binary);
//! the driver and the case body every model file goes through are here, the mutators in
//! `mutate`.

#[path = "../common/mod.rs"]
mod common;

mod checkpoint;
mod cli;
mod gguf;
mod mutate;
mod recipe;

use candle_core::{DType, Device, Tensor};
use eabfit::adapters::Adapters;
use eabfit::checkpoint::Checkpoint;
use rand::{rngs::StdRng, SeedableRng};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// CI runs the counts as written; `EABFIT_FUZZ_SCALE=K` runs K times as many (new seeds too)
/// for a deeper search by hand.
pub(crate) fn scaled(n: usize) -> usize {
    let k: usize = std::env::var("EABFIT_FUZZ_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    n * k.max(1)
}

/// A case that takes longer than this counts as a hang (the slowest real ones take ~50 ms).
pub(crate) const CASE_LIMIT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------
// The driver: cases run on a worker thread; the test thread watches the clock.

/// What one case ended with: `Ok` (the mutant was still valid) or the error message and the
/// text the message must name.
pub(crate) type Outcome = Result<(), (String, String)>;

/// Runs `n` cases of `body` and asserts the contract; returns the number of errors seen.
pub(crate) fn drive(
    name: &str,
    n: usize,
    body: impl Fn(usize) -> Outcome + Send + 'static,
) -> usize {
    quiet_backtraces();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for i in 0..n {
            let r = catch_unwind(AssertUnwindSafe(|| body(i)));
            if tx.send((i, r)).is_err() {
                return;
            }
        }
    });
    let start = Instant::now();
    let (mut errors, mut bad) = (0, vec![]);
    for expect in 0..n {
        let (i, r) = match rx.recv_timeout(CASE_LIMIT) {
            Ok(x) => x,
            Err(_) => panic!("{name} case {expect}: no answer within {CASE_LIMIT:?} (hang)"),
        };
        match r {
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                bad.push(format!("{name} case {i}: PANIC {msg}"));
            }
            Ok(Ok(())) => {}
            Ok(Err((msg, needle))) => {
                errors += 1;
                if msg.contains('\n') || msg.trim().is_empty() {
                    bad.push(format!("{name} case {i}: not one line: {msg:?}"));
                } else if !msg.contains(&needle) {
                    bad.push(format!("{name} case {i}: does not name `{needle}`: {msg}"));
                }
            }
        }
    }
    eprintln!(
        "fuzz {name}: {n} cases, {errors} rejected, {} accepted, {:.2} s",
        n - errors,
        start.elapsed().as_secs_f64()
    );
    assert!(
        bad.is_empty(),
        "{} failures:\n{}",
        bad.len(),
        bad.join("\n")
    );
    errors
}

/// The binary turns candle's backtraces off (main.rs); in-process cases need the same, or a
/// `RUST_BACKTRACE=1` in the environment makes every candle error many lines long.
pub(crate) fn quiet_backtraces() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        std::env::set_var("RUST_BACKTRACE", "0");
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    });
}

pub(crate) fn rng_for(target: &str, i: usize) -> StdRng {
    let salt = target
        .bytes()
        .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
    StdRng::seed_from_u64(salt ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// What every model-reading command does with a checkpoint: open, load, tokenize, run.
/// Load-time errors must name the checkpoint; a forward error (the input was accepted) only
/// has to be one clean line.
pub(crate) fn open_and_run(spec: &Path) -> Outcome {
    let name = spec.display().to_string();
    let err = |e: eabfit::Error| (e.to_string(), name.clone());
    let ckpt = Checkpoint::open(&name).map_err(err)?;
    let model = ckpt
        .load_model(DType::F32, &Device::Cpu, &Adapters::none())
        .map_err(err)?;
    let ids = ckpt
        .tokenizer
        .encode("the king and the queen")
        .map_err(err)?;
    let n = ids
        .len()
        .clamp(1, 4)
        .min(ckpt.config.max_position_embeddings.max(1));
    let ids: Vec<u32> = ids.into_iter().take(n).collect();
    if ids.is_empty() {
        return Ok(());
    }
    let t = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    model
        .logits(&t)
        .map(|_| ())
        .map_err(|e| (e.to_string(), String::new()))
}
