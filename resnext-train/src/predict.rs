//! `resnext-train predict`: eval-mode forward of a `.npy` batch or of image files.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use datasets::transforms::constants::*;
use datasets::transforms::{CenterCrop, Normalize, Pipeline, Resize};
use dfdx::prelude::*;
use rand::SeedableRng;
use resnext_core::model::Arch;

use crate::data::Dataset;
use crate::device::Compute;
use resnext_core::backend::device::{DeviceSpec, Precision};

/// The largest `--classes` file read (one class name a line).
const MAX_CLASSES_BYTES: u64 = 16 << 20;

static IMAGENET_CLASSES: &str = include_str!("../data/imagenet_classes.txt");

/// Arguments of `predict`.
#[derive(Args, Debug)]
pub struct PredictArgs {
    /// Architecture the weights belong to.
    #[arg(long)]
    arch: String,
    /// Torchvision-named safetensors weights (the class count is read from `fc.weight`).
    #[arg(long)]
    weights: PathBuf,
    /// Image files (JPEG or PNG), resized, cropped and normalised as the model was trained.
    images: Vec<PathBuf>,
    /// Input batch instead of images: float32 .npy of shape (N, C, H, W), already normalised.
    #[arg(long, conflicts_with = "images")]
    npy_input: Option<PathBuf>,
    /// Write the logits here as float32 .npy of shape (N, classes).
    #[arg(long)]
    logits_out: Option<PathBuf>,
    /// How many classes to print per input.
    #[arg(long, default_value_t = 5)]
    topk: usize,
    /// Class names, one per line [default: ImageNet's for 1000 classes, the training
    /// dataset's when the weights sit in a run folder, else indices].
    #[arg(long)]
    classes: Option<PathBuf>,
    /// Input size for images [default: the training run's, else the architecture's].
    #[arg(long)]
    image_size: Option<usize>,
    /// Where to compute: `cpu`, or `cuda` / `cuda:N` (a build with `--features cuda`).
    #[arg(long, default_value_t = DeviceSpec::Cpu)]
    device: DeviceSpec,
    /// GPU number format: `fp32` (the default; the CPU's numbers), or `bf16` (mixed
    /// precision: bf16 activations and tensor-core convolutions, f32 weights, optimiser
    /// and batch-norm statistics).
    #[arg(long, default_value_t = Precision::Fp32)]
    precision: Precision,
}

/// The dataset a run folder was trained on (weights in `run/` or `run/checkpoint/`).
fn run_dataset(weights: &Path) -> Option<Dataset> {
    let dir = weights.parent()?;
    [dir.join("state.json"), dir.parent()?.join("state.json")]
        .iter()
        .find_map(|p| {
            let text = resnext_fs::read_at_most(p, crate::train::MAX_STATE_BYTES).ok()?;
            let v: serde_json::Value = serde_json::from_slice(&text).ok()?;
            serde_json::from_value(v["config"]["dataset"].clone()).ok()
        })
}

fn names_for(dataset: Option<Dataset>, classes: usize) -> Vec<String> {
    let list: Option<Vec<&str>> = match dataset {
        Some(Dataset::Cifar10) => Some(datasets::cifar::CIFAR10_CLASSES.to_vec()),
        Some(Dataset::FashionMnist) => Some(datasets::mnist::FASHION_CLASSES.to_vec()),
        _ if classes == 1000 => Some(IMAGENET_CLASSES.lines().collect()),
        _ => None,
    };
    match list {
        Some(l) if l.len() == classes => l.into_iter().map(String::from).collect(),
        _ => (0..classes).map(|i| i.to_string()).collect(),
    }
}

/// Normalisation constants, input size and whether to resize like ImageNet eval.
fn preprocessing(
    dataset: Option<Dataset>,
    channels: usize,
    arch: Arch,
) -> (Vec<f32>, Vec<f32>, usize, bool) {
    match dataset {
        Some(Dataset::Digits) => (
            vec![datasets::digits::DIGITS_MEAN],
            vec![datasets::digits::DIGITS_STD],
            8,
            false,
        ),
        Some(Dataset::Mnist) => (MNIST_MEAN.to_vec(), MNIST_STD.to_vec(), 28, false),
        Some(Dataset::FashionMnist) => (
            FASHION_MNIST_MEAN.to_vec(),
            FASHION_MNIST_STD.to_vec(),
            28,
            false,
        ),
        Some(Dataset::Cifar10) => (CIFAR10_MEAN.to_vec(), CIFAR10_STD.to_vec(), 32, false),
        Some(Dataset::Cifar100) => (CIFAR100_MEAN.to_vec(), CIFAR100_STD.to_vec(), 32, false),
        _ if channels == 1 => (
            MNIST_MEAN.to_vec(),
            MNIST_STD.to_vec(),
            arch.default_size(),
            !arch.is_cifar(),
        ),
        _ => (
            IMAGENET_MEAN.to_vec(),
            IMAGENET_STD.to_vec(),
            arch.default_size(),
            !arch.is_cifar(),
        ),
    }
}

/// Decodes, converts, resizes, crops and normalises `paths` into one `(N, C, S, S)` batch.
fn load_images(
    paths: &[PathBuf],
    channels: usize,
    mean: Vec<f32>,
    std: Vec<f32>,
    size: usize,
    imagenet_resize: bool,
) -> Result<(Vec<f32>, [usize; 4])> {
    let shorter = if imagenet_resize {
        size * 256 / 224
    } else {
        size
    };
    let pipe = Pipeline::new(255.0)
        .then(Resize { shorter })
        .then(CenterCrop { size })
        .then(Normalize { mean, std });
    let mut data = Vec::with_capacity(paths.len() * channels * size * size);
    for p in paths {
        let mut img = datasets::folder::decode_rgb(p)?;
        if channels == 1 {
            let hw = img.height * img.width;
            img.data = (0..hw)
                .map(|i| {
                    (0.299 * img.data[i] as f32
                        + 0.587 * img.data[hw + i] as f32
                        + 0.114 * img.data[2 * hw + i] as f32)
                        .round() as u8
                })
                .collect();
            img.channels = 1;
        }
        data.extend(
            pipe.run(&img, &mut rand::rngs::StdRng::seed_from_u64(0))
                .data,
        );
    }
    Ok((data, [paths.len(), channels, size, size]))
}

/// The class count (rows of `fc.weight`) and input channels (`conv1.weight`'s second dim)
/// of a weights file, read from its header.
pub(crate) fn weights_shape(weights: &Path) -> Result<(usize, usize)> {
    let tensors = resnext_core::weights::inspect(weights)?;
    match (tensors.get("fc.weight"), tensors.get("conv1.weight")) {
        (Some((_, fc)), Some((_, c1))) if fc.len() == 2 && c1.len() == 4 => Ok((fc[0], c1[1])),
        _ => bail!(
            "`{}` has no 2-D `fc.weight` and 4-D `conv1.weight`: not ResNeXt weights",
            weights.display()
        ),
    }
}

/// Reads an `(N, C, H, W)` float32 `.npy` batch whose `C` is `in_channels`.
pub(crate) fn read_batch(npy: &Path, in_channels: usize) -> Result<(Vec<f32>, [usize; 4])> {
    let input = datasets::npy::read(npy)?;
    let shape: [usize; 4] = input.shape.as_slice().try_into().map_err(|_| {
        anyhow!(
            "`{}` has shape {:?}; expected 4 dims (N, C, H, W)",
            npy.display(),
            input.shape
        )
    })?;
    if shape[1] != in_channels {
        bail!(
            "`{}` has {} channels (shape {:?}) but the weights expect {in_channels}",
            npy.display(),
            shape[1],
            shape
        );
    }
    if shape[0] == 0 {
        bail!(
            "`{}`: the input batch is empty (shape {shape:?})",
            npy.display()
        );
    }
    Ok((input.data, shape))
}

/// Loads image files preprocessed as the weights' training run did (or as the
/// architecture's evaluation does when the weights are not in a run folder).
pub(crate) fn load_images_for(
    images: &[PathBuf],
    weights: &Path,
    in_channels: usize,
    arch: Arch,
    image_size: Option<usize>,
) -> Result<(Vec<f32>, [usize; 4])> {
    let (mean, std, size, imagenet) = preprocessing(run_dataset(weights), in_channels, arch);
    load_images(
        images,
        in_channels,
        mean,
        std,
        image_size.unwrap_or(size),
        imagenet,
    )
}

/// Runs the eval-mode forward and prints the top-k classes per input.
pub fn run(a: PredictArgs) -> Result<()> {
    let arch: Arch = a.arch.parse()?;
    let device = Compute::open(a.device, a.precision)?;
    crate::data::check_image_size(a.image_size)?;
    let (classes, in_channels) = weights_shape(&a.weights)?;
    let dataset = run_dataset(&a.weights);
    let (labels, data, shape): (Vec<String>, Vec<f32>, [usize; 4]) =
        match (&a.npy_input, a.images.is_empty()) {
            (Some(npy), _) => {
                let (data, shape) = read_batch(npy, in_channels)?;
                ((0..shape[0]).map(|i| i.to_string()).collect(), data, shape)
            }
            (None, false) => {
                let (data, shape) =
                    load_images_for(&a.images, &a.weights, in_channels, arch, a.image_size)?;
                (
                    a.images.iter().map(|p| p.display().to_string()).collect(),
                    data,
                    shape,
                )
            }
            (None, true) => bail!("nothing to predict: give image files or --npy-input"),
        };
    let names = match &a.classes {
        Some(f) => {
            let text = resnext_fs::read_at_most(f, MAX_CLASSES_BYTES)?;
            let text = String::from_utf8(text)
                .map_err(|_| anyhow!("--classes `{}` is not UTF-8 text", f.display()))?;
            let names: Vec<String> = text
                .lines()
                .map(|l| l.trim().to_string())
                .filter(|l| !l.is_empty())
                .collect();
            if names.len() != classes {
                bail!(
                    "`{}` lists {} class names, the weights have {classes} classes",
                    f.display(),
                    names.len()
                );
            }
            names
        }
        None => names_for(dataset, classes),
    };
    if shape[0] == 0 {
        bail!("the input batch is empty (shape {shape:?}): nothing to predict");
    }
    if let Some(i) = data.iter().position(|v| !v.is_finite()) {
        let per = data.len() / shape[0];
        bail!(
            "input {} holds a non-finite value ({}) at index {i}: refusing to predict from it",
            labels[i / per.max(1)],
            data[i]
        );
    }
    resnext_core::oom::set_context(format!(
        "running {arch} on {} inputs of {}×{}×{} at once: give fewer or smaller inputs",
        shape[0], shape[1], shape[2], shape[3]
    ));
    let dev = Cpu::default();
    let mut net = arch.build(&dev, in_channels, classes)?;
    net.load_safetensors(&a.weights)?;
    let per = data.len() / shape[0];
    let logits = device
        .forward_eval(net.as_ref(), data.clone(), shape)
        .with_context(|| format!("running {arch}"))?;
    if let Some(i) = logits.iter().position(|v| !v.is_finite()) {
        let n = i / classes;
        let one = data[n * per..(n + 1) * per].to_vec();
        bail!(
            "{arch} gives a non-finite logit ({}) for input {}; the first non-finite values \
             come out of {}: the weights `{}` overflow float32 on this input",
            logits[i],
            labels[n],
            first_non_finite(net.as_ref(), one, [1, shape[1], shape[2], shape[3]])?,
            a.weights.display()
        );
    }
    if let Some(out) = &a.logits_out {
        datasets::npy::write(out, &[shape[0], classes], &logits)?;
    }
    let k = a.topk.min(classes);
    for (label, l) in labels.iter().zip(logits.chunks(classes)) {
        let max = l.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let z: f64 = l.iter().map(|v| ((v - max) as f64).exp()).sum();
        let mut idx: Vec<usize> = (0..classes).collect();
        idx.sort_by(|&i, &j| l[j].total_cmp(&l[i]));
        let top: Vec<String> = idx[..k]
            .iter()
            .map(|&i| format!("{i} {} ({:.4})", names[i], ((l[i] - max) as f64).exp() / z))
            .collect();
        println!("{label}: {}", top.join(", "));
    }
    Ok(())
}

/// The first part of `net` (stem, a stage, or the head) whose output on the single input
/// `x` holds a non-finite value.
fn first_non_finite(
    net: &dyn resnext_core::model::Network,
    x: Vec<f32>,
    shape: [usize; 4],
) -> Result<String> {
    for map in net.feature_maps(x, shape)? {
        if let Some(i) = map.data.iter().position(|v| !v.is_finite()) {
            return Ok(format!(
                "`{}` (its output {:?} holds {} at index {i})",
                map.name, map.shape, map.data[i]
            ));
        }
    }
    Ok("the classifier `fc` (every feature map is finite)".into())
}
