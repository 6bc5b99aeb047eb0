//! `throughput`: images per second of a named network, eval or training, on the CPU or on
//! a CUDA GPU (`--device cuda` in a build with `--features cuda`).
//!
//! `cargo run --release -p resnext-bench --bin throughput -- --arch resnext50_32x4d --batch 8 --size 224 --mode eval`
//! prints per-iteration times, then `peak_rss_mb: …` and, last, `img/s: X`.

use std::time::Instant;

use anyhow::{bail, Result};
use clap::Parser;
use dfdx::prelude::*;
use resnext_core::backend::device::{DeviceSpec, Precision};
use resnext_core::model::Arch;
use resnext_core::ops::Targets;
use resnext_core::optim::{OptimConfig, Optimizer};
use resnext_train::device::Compute;

/// Measure eval or training throughput.
#[derive(Parser, Debug)]
struct Args {
    /// Architecture.
    #[arg(long, default_value = "resnext50_32x4d")]
    arch: String,
    /// Batch size.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Input height and width.
    #[arg(long, default_value_t = 224)]
    size: usize,
    /// eval (forward with running statistics) or train (forward, backward, SGD update).
    #[arg(long, value_enum, default_value_t = Mode::Eval)]
    mode: Mode,
    /// Timed iterations (after one warm-up).
    #[arg(long, default_value_t = 5)]
    iters: usize,
    /// Threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Classes.
    #[arg(long, default_value_t = 1000)]
    classes: usize,
    /// `cpu`, or `cuda` / `cuda:N` (a build with `--features cuda`).
    #[arg(long, default_value_t = DeviceSpec::Cpu)]
    device: DeviceSpec,
    /// GPU number format: `fp32` (the default; the CPU's numbers), or `bf16` (mixed
    /// precision: bf16 activations and tensor-core convolutions, f32 weights, optimiser
    /// and batch-norm statistics).
    #[arg(long, default_value_t = Precision::Fp32)]
    precision: Precision,
    /// Under `mpirun` (`--mode train`): gradient bucket size in MiB, 0 to 1024; 0 sums
    /// every gradient after the backward pass.
    #[cfg(feature = "mpi")]
    #[arg(long, default_value_t = 25.0)]
    bucket_mb: f32,
}

/// Out of memory is an error line naming the batch and image size, and exit status 1.
#[global_allocator]
static ALLOCATOR: resnext_core::oom::ReportingAllocator = resnext_core::oom::ReportingAllocator;

fn main() -> std::process::ExitCode {
    match run(Args::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// What a step measures.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum Mode {
    /// The forward pass with running statistics.
    Eval,
    /// Forward, backward and an SGD update.
    Train,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Eval => "eval",
            Mode::Train => "train",
        })
    }
}

impl Args {
    /// Every flag against its range; the error names the flag and the range.
    fn validate(&self) -> Result<()> {
        let within = |flag: &str, v: usize, lo: usize, hi: usize| {
            if !(lo..=hi).contains(&v) {
                bail!("--{flag} {v} is out of range: {lo} to {hi}");
            }
            Ok(())
        };
        within("batch", self.batch, 1, 65_536)?;
        resnext_train::data::check_size("size", Some(self.size))?;
        within("iters", self.iters, 1, 100_000)?;
        within("threads", self.threads, 0, 1024)?;
        Ok(())
    }
}

fn run(a: Args) -> Result<()> {
    a.validate()?;
    resnext_core::keep_freed_memory();
    // under mpirun: each training step averages its gradients over the group
    #[cfg(feature = "mpi")]
    let _universe = {
        let (universe, group) = resnext_train::dist::mpi_group::init()?;
        if let Some(g) = group {
            let cfg = resnext_core::dist::GroupConfig {
                sync_bn: false,
                bucket_bytes: resnext_train::dist::bucket_bytes(a.bucket_mb)?,
            };
            resnext_core::dist::install(g, cfg);
        }
        universe
    };
    let world = resnext_core::dist::group().map_or(1, |g| g.world());
    let leader = resnext_core::dist::group().is_none_or(|g| g.rank() == 0);
    // RESNEXT_ISA=avx2 (or avx512, neon, scalar): the kernels at a lower instruction set
    let isa = resnext_core::kernels::isa::init_from_env().map_err(anyhow::Error::msg)?;
    let isa = isa.unwrap_or_else(resnext_core::kernels::isa::detected);
    if a.threads > 0 {
        rayon::ThreadPoolBuilder::new()
            .num_threads(a.threads)
            .build_global()?;
    }
    let arch: Arch = a.arch.parse()?;
    resnext_core::oom::set_context(format!(
        "timing {arch} ({}) at --batch {} and --size {}: lower them",
        a.mode, a.batch, a.size
    ));
    // under mpirun with a GPU: one GPU a process, gradients averaged with NCCL
    let device = Compute::open_in_group(a.device, a.precision, false)?;
    let dev = Cpu::seed_from_u64(0);
    let mut net = arch.build(&dev, 3, a.classes)?;
    let shape = [a.batch, 3, a.size, a.size];
    let x = resnext_bench::values(1, shape.iter().product());
    let labels: Vec<usize> = (0..a.batch).map(|i| i % a.classes).collect();
    let mut opt = Optimizer::new(OptimConfig {
        lr: 1e-4,
        ..Default::default()
    });
    let mut step = || -> Result<()> {
        match a.mode {
            // on a GPU the logits come back to the host: the time includes the copies
            Mode::Eval => {
                device.forward_eval(&*net, x.clone(), shape)?;
            }
            // the loss comes back to the host each step, so a GPU's time is the whole step
            Mode::Train => {
                let targets = Targets::hard(&labels, 0.0);
                device.train_step(net.as_mut(), x.clone(), shape, targets, &mut opt)?;
            }
        }
        Ok(())
    };
    step()?;
    let mut times = Vec::new();
    for i in 0..a.iters {
        let t = Instant::now();
        step()?;
        let s = t.elapsed().as_secs_f64();
        if leader {
            println!(
                "iter {i}: {:.3} s ({:.2} img/s)",
                s,
                (a.batch * world) as f64 / s
            );
        }
        times.push(s);
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    if !leader {
        return Ok(());
    }
    let on = if matches!(device, Compute::Cpu) {
        format!("threads {} isa {isa}", rayon::current_num_threads())
    } else {
        format!("device {}", device.describe())
    };
    println!(
        "{} {} batch {} size {} {on}: median {:.3} s",
        arch, a.mode, a.batch, a.size, median
    );
    let prof = resnext_core::profile::report();
    if !prof.is_empty() {
        let total: f64 = prof.iter().map(|p| p.1.as_secs_f64()).sum();
        println!("profile over {} iterations (RESNEXT_PROFILE):", a.iters + 1);
        for (name, d, n) in prof {
            println!(
                "  {name:<24} {:>8.3} s {:>5.1}% {n:>6} calls",
                d.as_secs_f64(),
                100.0 * d.as_secs_f64() / total
            );
        }
    }
    if let Some(b) = resnext_bench::peak_rss_bytes() {
        println!("peak_rss_mb: {:.0}", b as f64 / 1e6);
    }
    if world > 1 {
        println!("processes: {world} (global batch {})", a.batch * world);
    }
    println!("img/s: {:.2}", (a.batch * world) as f64 / median);
    Ok(())
}
