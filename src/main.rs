//! The `eabfit` command line: parse, hand off to the library, map errors to exit codes.

use clap::{Parser, Subcommand};
use eabfit::commands;

#[derive(Parser)]
#[command(
    name = "eabfit",
    version,
    about = "Retrofit Explicit Attention Bias onto frozen LLaMA/Mistral checkpoints"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print a checkpoint's architecture, sizes, dtype, parameter count and tokenizer facts
    Info(commands::InfoArgs),
    /// Perplexity over consecutive non-overlapping windows of a text
    Ppl(commands::PplArgs),
    /// Find massive activations per layer (top-1/2/3, median, flagged entries, attention sink)
    Scan(commands::ScanArgs),
    /// Perplexity with the massive activations set to zero / to their mean (the paper's test)
    Intervene(commands::InterveneArgs),
    /// Draw one scan JSON, or overlay two (before / after)
    Plot(commands::PlotArgs),
    /// Fine-tune EAB slots (+ LoRA) on a frozen checkpoint from a YAML recipe
    Train(commands::TrainArgs),
    /// Base vs adapted on the same windows: massive activations gone, perplexity held?
    Verify(commands::VerifyArgs),
    /// Perplexity under fake-quantized weights / activations / KV, base vs adapted, one setting or a grid
    Quant(eabfit::quant_eval::QuantArgs),
    /// Run a recipe's ablation grid, one training run per point, and summarise them
    Ablate(commands::AblateArgs),
    /// Time a training step (or a forward pass) of a random LLaMA-shaped model with slots + LoRA
    Bench(eabfit::bench::BenchArgs),
    /// Write the adapted model as a Hugging Face folder (merged + EAB slots) and/or PEFT prefix adapter
    Export(eabfit::export::ExportArgs),
    /// Continue a prompt (chat template when the tokenizer has one), KV-cached, with the EAB slots
    Generate(eabfit::generate::GenerateArgs),
    /// Text files -> a token corpus (train.bin, val.bin, corpus.json, tokenizer) for pretrain
    Tokenize(eabfit::corpus::TokenizeArgs),
    /// Train a LLaMA/Mistral-family model from scratch on a token corpus, with or without EAB slots
    Pretrain(eabfit::pretrain::PretrainArgs),
    /// One sequence's logits as JSON (the reference of scripts/lib/peft_compare.py)
    #[command(hide = true)]
    Logits(eabfit::export::LogitsArgs),
}

fn main() {
    // candle attaches a backtrace to every error when RUST_BACKTRACE is set; users get one line
    // naming the file or tensor instead (EABFIT_BACKTRACE=1 keeps them for debugging).
    if std::env::var_os("EABFIT_BACKTRACE").is_none() {
        std::env::set_var("RUST_BACKTRACE", "0");
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
    quiet_on_broken_pipe();
    // A write past `ulimit -f` then fails with EFBIG, which names the file, instead of the
    // signal killing the process half-way through a checkpoint.
    #[cfg(unix)]
    // Safety: setting a signal's disposition to "ignore" at startup, before any threads.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Info(a) => commands::info(a),
        Command::Ppl(a) => commands::ppl(a),
        Command::Scan(a) => commands::scan_cmd(a),
        Command::Intervene(a) => commands::intervene_cmd(a),
        Command::Plot(a) => commands::plot_cmd(a),
        Command::Train(a) => commands::train_cmd(a),
        Command::Verify(a) => commands::verify_cmd(a),
        Command::Ablate(a) => commands::ablate_cmd(a),
        Command::Quant(a) => eabfit::quant_eval::quant_cmd(a),
        Command::Bench(a) => eabfit::bench::bench_cmd(a),
        Command::Export(a) => eabfit::export::export_cmd(a),
        Command::Generate(a) => eabfit::generate::generate_cmd(a),
        Command::Tokenize(a) => eabfit::corpus::tokenize_cmd(a),
        Command::Pretrain(a) => eabfit::pretrain::pretrain_cmd(a),
        Command::Logits(a) => eabfit::export::logits_cmd(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(if e.is_usage() { 2 } else { 1 });
    }
}

/// `eabfit info | head -1`: once the reader has gone, the next print fails with EPIPE and
/// `println!` panics; end quietly with success there, as `head`'s other writers do.
fn quiet_on_broken_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let p = info.payload();
        let msg = p
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| p.downcast_ref::<&str>().copied())
            .unwrap_or("");
        if msg.starts_with("failed printing to std") && msg.contains("Broken pipe") {
            std::process::exit(0);
        }
        default(info)
    }));
}
