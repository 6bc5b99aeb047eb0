//! `resnext-train`: inspect, run and train ResNeXt models.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod info;
mod predict;

/// Train, evaluate, inspect and run ResNeXt models (Xie et al. 2017) on the CPU.
#[derive(Parser, Debug)]
#[command(name = "resnext-train", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Per-stage summary of an architecture: output shape, parameters and MACs.
    Info(info::InfoArgs),
    /// Eval-mode forward of an `(N, C, H, W)` float32 .npy batch with saved weights.
    Predict(predict::PredictArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Info(a) => info::run(a),
        Command::Predict(a) => predict::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
