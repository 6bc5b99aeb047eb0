//! `resnext-train predict`.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use dfdx::prelude::*;
use resnext_core::model::Arch;

/// Arguments of `predict`.
#[derive(Args, Debug)]
pub struct PredictArgs {
    /// Architecture the weights belong to.
    #[arg(long)]
    arch: String,
    /// Torchvision-named safetensors weights (the class count is read from `fc.weight`).
    #[arg(long)]
    weights: PathBuf,
    /// Input batch: float32 .npy of shape (N, C, H, W), already normalised.
    #[arg(long)]
    npy_input: PathBuf,
    /// Write the logits here as float32 .npy of shape (N, classes).
    #[arg(long)]
    logits_out: Option<PathBuf>,
    /// How many classes to print per row.
    #[arg(long, default_value_t = 5)]
    topk: usize,
}

/// Runs the eval-mode forward and prints the top-k classes per row.
pub fn run(a: PredictArgs) -> Result<()> {
    let arch: Arch = a.arch.parse()?;
    let tensors = resnext_core::weights::inspect(&a.weights)?;
    let (classes, in_channels) = match (tensors.get("fc.weight"), tensors.get("conv1.weight")) {
        (Some((_, fc)), Some((_, c1))) if fc.len() == 2 && c1.len() == 4 => (fc[0], c1[1]),
        _ => bail!(
            "`{}` has no 2-D `fc.weight` and 4-D `conv1.weight`: not ResNeXt weights",
            a.weights.display()
        ),
    };
    let input = datasets::npy::read(&a.npy_input)?;
    let shape: [usize; 4] = input.shape.as_slice().try_into().map_err(|_| {
        anyhow::anyhow!(
            "`{}` has shape {:?}; expected 4 dims (N, C, H, W)",
            a.npy_input.display(),
            input.shape
        )
    })?;
    if shape[1] != in_channels {
        bail!(
            "`{}` has {} channels (shape {:?}) but the weights expect {in_channels}",
            a.npy_input.display(),
            shape[1],
            shape
        );
    }
    let dev = Cpu::default();
    let mut net = arch.build(&dev, in_channels, classes)?;
    net.load_safetensors(&a.weights)?;
    let logits = net
        .forward_eval(input.data, shape)
        .with_context(|| format!("running {arch} on `{}`", a.npy_input.display()))?;
    if let Some(out) = &a.logits_out {
        datasets::npy::write(out, &[shape[0], classes], &logits)?;
    }
    let k = a.topk.min(classes);
    for (row, l) in logits.chunks(classes).enumerate() {
        let max = l.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let z: f64 = l.iter().map(|v| ((v - max) as f64).exp()).sum();
        let mut idx: Vec<usize> = (0..classes).collect();
        idx.sort_by(|&i, &j| l[j].total_cmp(&l[i]));
        let top: Vec<String> = idx[..k]
            .iter()
            .map(|&i| format!("{i} ({:.4})", ((l[i] - max) as f64).exp() / z))
            .collect();
        println!("{row}: {}", top.join(", "));
    }
    Ok(())
}
