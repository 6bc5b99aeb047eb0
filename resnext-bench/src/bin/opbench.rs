//! `opbench`: speed of one convolution at a `resnext50_32x4d` stage shape, for comparing
//! op by op with PyTorch (`tools/compare_pytorch.py --ops`).
//!
//! `cargo run --release -p resnext-bench --bin opbench -- --op grouped3x3 --stage 1 --pass fwd`
//! prints per-iteration times and, last, `GFLOP/s: X` (a multiply-add counts as 2 FLOPs; the
//! backward pass, input and weight gradient, counts twice the forward's FLOPs; `--pass wgrad`,
//! the weight gradient alone, as many as the forward). The backward writes the input
//! gradient into new memory, as the network's backward does where nothing was accumulated
//! yet (and PyTorch's autograd always).

use std::time::Instant;

use anyhow::{bail, Result};
use clap::Parser;
use resnext_bench::{grouped3x3, pointwise, stage_size, stage_width, values, BnCase};
use resnext_core::kernels::conv::{self, Conv2dGeom};

/// Measure one convolution, forward or backward.
#[derive(Parser, Debug)]
struct Args {
    /// grouped3x3 (the block's 3×3 conv, 32 groups), 1x1 (the block's first 1×1 conv),
    /// 1x1-expand (its last) or bn (the training batch norm + ReLU after the block's 1×1
    /// expansion, at 2 × width channels; reported in GB/s of the values it must move).
    #[arg(long, default_value = "grouped3x3")]
    op: String,
    /// Stage of resnext50_32x4d, 1 to 4 (56, 28, 14, 7 pixels; width 128 to 1024).
    #[arg(long, default_value_t = 1)]
    stage: usize,
    /// Stride of the 3×3 conv (2 is the first block of stages 2 to 4, on the previous
    /// stage's spatial size).
    #[arg(long, default_value_t = 1)]
    stride: usize,
    /// fwd, bwd (input and weight gradients) or wgrad (the weight gradient alone; the
    /// input gradient's time is bwd's less this).
    #[arg(long, default_value = "fwd")]
    pass: String,
    /// Batch size.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Timed iterations (after one warm-up).
    #[arg(long, default_value_t = 20)]
    iters: usize,
    /// Threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

/// The convolution geometry `opbench` measures.
fn geometry(a: &Args) -> Result<Conv2dGeom> {
    if !(1..=4).contains(&a.stage) {
        bail!("--stage {}: valid stages are 1 to 4", a.stage);
    }
    if !(1..=2).contains(&a.stride) {
        bail!("--stride {}: valid strides are 1 and 2", a.stride);
    }
    let width = stage_width(a.stage);
    let g = match a.op.as_str() {
        "grouped3x3" => grouped3x3(a.stage, a.batch, a.stride),
        "1x1" => pointwise(a.stage, a.batch, 2 * width, width),
        "1x1-expand" => pointwise(a.stage, a.batch, width, 2 * width),
        o => bail!("--op {o}: valid ops are grouped3x3, 1x1, 1x1-expand, bn"),
    };
    g.validate().map_err(anyhow::Error::msg)?;
    Ok(g)
}

/// `--op bn`: the training-mode batch norm + ReLU at `2 × width` channels, forward
/// (statistics and normalisation) or backward (in place, as the fused block runs it).
/// Reports the bandwidth of the passes' minimal traffic: forward reads the input twice
/// and writes the output; backward reads input and gradient twice and writes the gradient.
fn batch_norm(a: &Args) -> Result<()> {
    use resnext_core::kernels::batchnorm::{self as bn, BnGeom};
    let (hw, width) = (stage_size(a.stage), stage_width(a.stage));
    let case = BnCase::new(BnGeom {
        batch: a.batch,
        channels: 2 * width,
        spatial: hw * hw,
    });
    let (g, ch) = (case.geom, case.channels());
    let (mut y, mut d) = (vec![0.0; g.len()], case.dy.clone());
    let (mut dg, mut db) = (vec![0.0; g.channels], vec![0.0; g.channels]);
    let median = match a.pass.as_str() {
        "fwd" => median_secs(a.iters, &mut y, |y| drop(case.forward(y)), |_| {}),
        "bwd" => median_secs(
            a.iters,
            &mut d,
            |d| bn::bn_backward_in_place(&g, &case.x, &ch, d, &mut dg, &mut db),
            |d| d.copy_from_slice(&case.dy),
        ),
        p => bail!("--pass {p}: valid passes for --op bn are fwd, bwd"),
    };
    let bytes = if a.pass == "fwd" { 3 } else { 5 } * 4 * g.len();
    println!(
        "bn stage {} {} batch {} ({} x {} x {hw}x{hw}) threads {}: median {:.3} ms",
        a.stage,
        a.pass,
        a.batch,
        a.batch,
        g.channels,
        rayon::current_num_threads(),
        median * 1e3
    );
    println!("GB/s: {:.2}", bytes as f64 / median / 1e9);
    Ok(())
}

/// The median time in seconds of `iters` (at least 1) calls of `run` on `state` after one
/// warm-up call, `reset` run on it untimed after each.
fn median_secs<S>(
    iters: usize,
    state: &mut S,
    mut run: impl FnMut(&mut S),
    mut reset: impl FnMut(&mut S),
) -> f64 {
    run(state);
    reset(state);
    let mut times: Vec<f64> = (0..iters.max(1))
        .map(|_| {
            let t = Instant::now();
            run(state);
            let dt = t.elapsed().as_secs_f64();
            reset(state);
            dt
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn main() -> Result<()> {
    let a = Args::parse();
    // RESNEXT_ISA=avx2 (or avx512, neon, scalar): the kernels at a lower instruction set
    let isa = resnext_core::kernels::isa::init_from_env().map_err(anyhow::Error::msg)?;
    let isa = isa.unwrap_or_else(resnext_core::kernels::isa::detected);
    if a.threads > 0 {
        rayon::ThreadPoolBuilder::new()
            .num_threads(a.threads)
            .build_global()?;
    }
    if a.op == "bn" {
        return batch_norm(&a);
    }
    let g = geometry(&a)?;
    let x = values(1, g.input_len());
    let w = values(2, g.weight_len());
    let dy = values(3, g.output_len());
    let mut y = vec![0.0; g.output_len()];
    let mut dw = vec![0.0; w.len()];
    let flops = match a.pass.as_str() {
        "fwd" => 2.0 * g.macs() as f64,
        "bwd" => 4.0 * g.macs() as f64,
        "wgrad" => 2.0 * g.macs() as f64,
        p => bail!("--pass {p}: valid passes are fwd, bwd, wgrad"),
    };
    let run = |_: &mut ()| match a.pass.as_str() {
        "fwd" => conv::conv2d_forward(&g, &x, &w, &mut y),
        "wgrad" => conv::conv2d_backward(&g, &x, &w, &dy, None, &mut dw),
        _ => drop(conv::conv2d_backward_new(&g, &x, &w, &dy, &mut dw)),
    };
    let median = median_secs(a.iters, &mut (), run, |_| {});
    let algorithm = match a.pass.as_str() {
        "fwd" => format!("{:?}", conv::Algorithm::forward(&g)),
        "wgrad" => format!("{:?}", conv::Algorithm::weight_grad(&g)),
        _ => match (
            conv::Algorithm::weight_grad(&g),
            conv::Algorithm::input_grad(&g),
        ) {
            (w, x) if w == x => format!("{w:?}"),
            (w, x) => format!("{w:?}, input gradient {x:?}"),
        },
    };
    println!(
        "{} stage {} stride {} {} batch {} threads {} isa {} ({algorithm}): median {:.3} ms",
        a.op,
        a.stage,
        a.stride,
        a.pass,
        a.batch,
        rayon::current_num_threads(),
        isa,
        median * 1e3
    );
    println!("GFLOP/s: {:.2}", flops / median / 1e9);
    Ok(())
}
