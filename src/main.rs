//! The `eabfit` command line: parse, hand off to the library, map errors to exit codes.

use clap::{Parser, Subcommand};
use eabfit::commands;

#[derive(Parser)]
#[command(name = "eabfit", version, about = "Retrofit Explicit Attention Bias onto frozen LLaMA/Mistral checkpoints")]
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
}

fn main() {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Info(a) => commands::info(a),
        Command::Ppl(a) => commands::ppl(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(if e.is_usage() { 2 } else { 1 });
    }
}
