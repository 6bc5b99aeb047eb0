//! Evaluation: loss, top-1 and top-5 over a loader; the `eval` subcommand.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use datasets::loader::{Loader, LoaderConfig};
use dfdx::prelude::*;
use resnext_core::model::{Arch, Network};

use crate::data::{self, Dataset};
use crate::device::Compute;
use resnext_core::backend::device::{DeviceSpec, Precision};

/// Test images a batch.
const EVAL_BATCH: usize = 256;

/// Test-set numbers.
pub struct EvalResult {
    /// Mean cross-entropy.
    pub loss: f64,
    /// Top-1 accuracy (fraction).
    pub top1: f64,
    /// Top-5 accuracy (fraction).
    pub top5: f64,
}

/// The label's rank among the logits of `row`: how many other classes score at least as
/// high as the label. A tie is not a win and a NaN logit beats the label, so a model that
/// outputs constants or NaN ranks no label first. `None` when the label's own logit is not
/// finite.
pub fn rank(row: &[f32], label: usize) -> Option<usize> {
    let l = *row.get(label)?;
    if !l.is_finite() {
        return None;
    }
    let ahead = row
        .iter()
        .enumerate()
        // at least as high, or not comparable (NaN)
        .filter(|&(j, &v)| j != label && v.partial_cmp(&l) != Some(std::cmp::Ordering::Less))
        .count();
    Some(ahead)
}

/// Eval-mode pass over every batch of `loader`. Non-finite logits are an error naming the
/// sample: no metric is reported for a model that produces them.
pub fn evaluate(net: &dyn Network, loader: &Loader) -> Result<EvalResult> {
    evaluate_on(&Compute::Cpu, net, loader)
}

/// [`evaluate`] on `device`.
pub fn evaluate_on(device: &Compute, net: &dyn Network, loader: &Loader) -> Result<EvalResult> {
    let classes = net.classes();
    let (mut loss, mut top1, mut top5, mut n) = (0.0f64, 0usize, 0usize, 0usize);
    for batch in loader.epoch(0, 0) {
        let batch = batch?;
        if batch.labels.is_empty() {
            continue; // every image of the batch was unreadable (and left out)
        }
        let logits = device.forward_eval(net, batch.data, batch.shape)?;
        for (row, &label) in logits.chunks(classes).zip(&batch.labels) {
            if let Some(v) = row.iter().find(|v| !v.is_finite()) {
                bail!(
                    "evaluation: the model gives a non-finite logit ({v}) for test sample {n}; its weights or its input are broken"
                );
            }
            let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = max
                + row
                    .iter()
                    .map(|&v| (v as f64 - max).exp())
                    .sum::<f64>()
                    .ln();
            loss += lse - row[label] as f64;
            let r = rank(row, label);
            top1 += usize::from(r == Some(0));
            top5 += usize::from(r.is_some_and(|r| r < 5));
            n += 1;
        }
    }
    // a data-parallel run evaluates a shard per process: the group's sums
    let mut sums = [loss, top1 as f64, top5 as f64, n as f64];
    crate::dist::sum_f64(&mut sums);
    let [loss, top1, top5, n] = sums;
    if n == 0.0 {
        bail!("the evaluation set is empty");
    }
    Ok(EvalResult {
        loss: loss / n,
        top1: top1 / n,
        top5: top5 / n,
    })
}

/// Arguments of `eval`.
#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Architecture the weights belong to.
    #[arg(long, default_value = "resnext11_8x8d")]
    arch: String,
    /// Torchvision-named safetensors weights.
    #[arg(long)]
    weights: PathBuf,
    /// Dataset whose test split to evaluate.
    #[arg(long, value_enum, default_value_t = Dataset::Digits)]
    dataset: Dataset,
    /// Folder holding the dataset's files.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Evaluation crop size for image folders [default: the architecture's].
    #[arg(long)]
    image_size: Option<usize>,
    /// Image folders: resize the shorter side to this before the crop [default: crop ·
    /// 256 / 224; torchvision's V2 weights are evaluated at 232 for a 224 crop].
    #[arg(long)]
    val_resize: Option<usize>,
    /// Where to compute: `cpu`, or `cuda` / `cuda:N` (a build with `--features cuda`).
    #[arg(long, default_value_t = DeviceSpec::Cpu)]
    device: DeviceSpec,
    /// GPU number format: `fp32` (the default; the CPU's numbers), or `bf16` (mixed
    /// precision: bf16 activations and tensor-core convolutions, f32 weights, optimiser
    /// and batch-norm statistics).
    #[arg(long, default_value_t = Precision::Fp32)]
    precision: Precision,
}

/// Prints top-1 and top-5; the last line is `top1: X top5: Y`. When the weights are a
/// run's `model.safetensors` or `best.safetensors` and the run kept an average of its
/// weights (`ema.safetensors` beside them), that one is evaluated and printed first.
pub fn run(a: EvalArgs) -> Result<()> {
    let arch: Arch = a.arch.parse()?;
    let device = Compute::open(a.device, a.precision)?;
    data::check_image_size(a.image_size)?;
    data::check_size("val-resize", a.val_resize)?;
    let size = a.image_size.unwrap_or(arch.default_size());
    resnext_core::oom::set_context(format!(
        "evaluating {arch} on {size}×{size} images, {EVAL_BATCH} at a time: lower --image-size"
    ));
    let data = data::prepare(
        a.dataset,
        a.data_dir.as_deref(),
        false,
        size,
        &data::Augment {
            val_resize: a.val_resize,
            ..Default::default()
        },
    )?;
    let dev = Cpu::default();
    let mut net = arch.build(&dev, data.info.channels, data.info.classes.len())?;
    net.load_safetensors(&a.weights)?;
    let loader = Loader::new(
        data.test,
        data.test_pipeline,
        LoaderConfig {
            batch_size: EVAL_BATCH,
            shuffle: false,
            drop_last: false,
            seed: 0,
            threads: 1,
            prefetch: 2,
        },
    );
    let ema = a
        .weights
        .file_name()
        .filter(|n| *n == "model.safetensors" || *n == "best.safetensors")
        .and_then(|_| a.weights.parent())
        .map(|dir| dir.join("ema.safetensors"))
        .filter(|p| p.is_file());
    if let Some(path) = ema {
        let mut avg = arch.build(&dev, data.info.channels, data.info.classes.len())?;
        avg.load_safetensors(&path)
            .with_context(|| "the run's weight average".to_string())?;
        let r = evaluate_on(&device, avg.as_ref(), &loader)?;
        println!(
            "ema ({}): loss {:.4} top1: {:.4} top5: {:.4}",
            path.display(),
            r.loss,
            r.top1,
            r.top5
        );
    }
    let r = evaluate_on(&device, net.as_ref(), &loader)?;
    println!("{arch} on {} test: loss {:.4}", a.dataset, r.loss);
    println!("top1: {:.4} top5: {:.4}", r.top1, r.top5);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::rank;

    #[test]
    fn a_tie_with_the_label_is_not_a_win() {
        assert_eq!(rank(&[0.0; 10], 3), Some(9));
        assert_eq!(rank(&[1.0, 2.0, 2.0], 1), Some(1));
        assert_eq!(rank(&[1.0, 2.0, 0.5], 1), Some(0));
    }

    #[test]
    fn a_nan_logit_is_never_correct() {
        assert_eq!(rank(&[0.0, f32::NAN, 1.0], 1), None);
        assert_eq!(rank(&[f32::NAN, 0.5, 0.0], 1), Some(1));
        assert_eq!(rank(&[f32::INFINITY, 0.5], 0), None);
    }
}
