//! `resnext-train`: train, evaluate, inspect and run ResNeXt models.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

use resnext_train::{embed, eval, info, predict, train};

/// Out of memory is an error line naming what was being done, and exit status 1.
#[global_allocator]
static ALLOCATOR: resnext_core::oom::ReportingAllocator = resnext_core::oom::ReportingAllocator;

/// Train, evaluate, inspect and run ResNeXt models (Xie et al. 2017) on the CPU.
/// Without a subcommand, trains the default model on the embedded digits dataset.
#[derive(Parser, Debug)]
#[command(name = "resnext-train", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train a model (the default).
    Train(Box<train::TrainArgs>),
    /// Top-1 / top-5 accuracy of saved weights on a dataset's test split.
    Eval(eval::EvalArgs),
    /// Per-stage summary of an architecture: output shape, parameters and MACs.
    Info(info::InfoArgs),
    /// Eval-mode forward of an `(N, C, H, W)` float32 .npy batch with saved weights.
    Predict(predict::PredictArgs),
    /// Pooled features (the classifier's input) of a dataset split, images or a .npy batch.
    Embed(embed::EmbedArgs),
}

fn main() -> ExitCode {
    resnext_core::keep_freed_memory();
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    // RESNEXT_ISA=avx2 (or avx512, neon, scalar) runs the kernels at a lower instruction
    // set than the CPU has
    if let Err(e) = resnext_core::kernels::isa::init_from_env() {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    let result = match cli.command {
        None => {
            let sub = train::TrainArgs::augment_args(clap::Command::new("train"))
                .get_matches_from(["train"]);
            train::TrainArgs::from_arg_matches(&sub)
                .map_err(anyhow::Error::from)
                .and_then(|a| train_with_ctrlc(a, &sub))
        }
        Some(Command::Train(a)) => {
            let sub = matches
                .subcommand_matches("train")
                .expect("train subcommand matched")
                .clone();
            train_with_ctrlc(*a, &sub)
        }
        Some(Command::Eval(a)) => eval::run(a),
        Some(Command::Info(a)) => info::run(a),
        Some(Command::Predict(a)) => predict::run(a),
        Some(Command::Embed(a)) => embed::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn train_with_ctrlc(args: train::TrainArgs, matches: &clap::ArgMatches) -> anyhow::Result<()> {
    let args = train::resolve(args, matches)?;
    // under mpirun: the process group (MPI is finalised when `_universe` is dropped, after
    // the run)
    #[cfg(feature = "mpi")]
    let _universe = {
        let (universe, group) = resnext_train::dist::mpi_group::init()?;
        if let Some(g) = group {
            let cfg = resnext_core::dist::GroupConfig {
                sync_bn: args.sync_bn,
                bucket_bytes: resnext_train::dist::bucket_bytes(args.bucket_mb)?,
            };
            resnext_core::dist::install(g, cfg);
        }
        universe
    };
    let result = train_in_group(args);
    if let Err(e) = &result {
        let (rank, world) = resnext_train::dist::rank_world();
        if world > 1 {
            // the other processes wait in a collective: end them all
            eprintln!("error on rank {rank} of {world}: {e:#}; ending the job");
            resnext_train::dist::abort_group(1);
        }
    }
    result
}

fn train_in_group(args: train::TrainArgs) -> anyhow::Result<()> {
    let interrupted = Arc::new(AtomicBool::new(false));
    let flag = interrupted.clone();
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            eprintln!("second interrupt: exiting without a checkpoint");
            std::process::exit(130);
        }
        eprintln!("interrupt: finishing the current step and writing a checkpoint (Ctrl-C again to abort)");
    })?;
    train::run(args, interrupted)
}
