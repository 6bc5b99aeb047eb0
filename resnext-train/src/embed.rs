//! `resnext-train embed`: the pooled features of a network (the classifier's input) for a
//! dataset split, image files or a `.npy` batch, written as `.npy` for other tools.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, ValueEnum};
use datasets::loader::{Loader, LoaderConfig};
use dfdx::prelude::*;
use resnext_core::model::{Arch, Network};

use crate::data::{self, Dataset};
use crate::predict;

/// Which split of `--dataset` to embed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Split {
    /// The training images (without augmentation: the evaluation transform).
    Train,
    /// The test (validation) images.
    Test,
}

/// The largest `--batch-size` `embed` accepts.
const MAX_BATCH: usize = 4096;

/// Arguments of `embed`.
#[derive(Args, Debug)]
pub struct EmbedArgs {
    /// Architecture the weights belong to.
    #[arg(long)]
    arch: String,
    /// Torchvision-named safetensors weights (a torchvision file or one of our runs).
    #[arg(long)]
    weights: PathBuf,
    /// Embed a dataset's split (labels are written too).
    #[arg(long, value_enum, conflicts_with_all = ["images", "npy_input"])]
    dataset: Option<Dataset>,
    /// Folder holding the dataset's files.
    #[arg(long, requires = "dataset")]
    data_dir: Option<PathBuf>,
    /// The split of --dataset.
    #[arg(long, value_enum, default_value_t = Split::Test, requires = "dataset")]
    split: Split,
    /// Image files (JPEG or PNG), resized, cropped and normalised as for `predict`.
    images: Vec<PathBuf>,
    /// Input batch instead: float32 .npy of shape (N, C, H, W), already normalised.
    #[arg(long, conflicts_with = "images")]
    npy_input: Option<PathBuf>,
    /// Output: float32 .npy of shape (N, channels), one row per input in input order.
    #[arg(long)]
    out: PathBuf,
    /// Labels of --dataset as int64 .npy of shape (N,) [default: beside --out, with
    /// `.labels.npy` for `.npy`].
    #[arg(long, requires = "dataset")]
    labels_out: Option<PathBuf>,
    /// Input size [default: the dataset's, else the training run's, else the architecture's].
    #[arg(long)]
    image_size: Option<usize>,
    /// Inputs per forward pass (1 to 4096).
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
}

/// Where the labels go when `--labels-out` is not given: `x.npy` → `x.labels.npy`.
fn default_labels_path(out: &Path) -> PathBuf {
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "embeddings".into());
    out.with_file_name(format!("{stem}.labels.npy"))
}

/// The pooled features of `data` (`shape` is the whole batch), `batch` inputs at a time;
/// a non-finite value is an error naming the input.
fn embed_all(
    net: &dyn Network,
    data: &[f32],
    shape: [usize; 4],
    batch: usize,
    names: &dyn Fn(usize) -> String,
) -> Result<Vec<f32>> {
    let per = shape[1] * shape[2] * shape[3];
    let dim = net.embed_dim();
    let mut out = Vec::with_capacity(shape[0] * dim);
    for (b, chunk) in data.chunks(batch * per.max(1)).enumerate() {
        let n = chunk.len() / per.max(1);
        let rows = net.embed(chunk.to_vec(), [n, shape[1], shape[2], shape[3]])?;
        check_finite(&rows, dim, b * batch, names)?;
        out.extend(rows);
    }
    Ok(out)
}

fn check_finite(
    rows: &[f32],
    dim: usize,
    first: usize,
    names: &dyn Fn(usize) -> String,
) -> Result<()> {
    match rows.iter().position(|v| !v.is_finite()) {
        Some(i) => bail!(
            "the embedding of input {} holds a non-finite value ({}): the weights or the \
             input are broken",
            names(first + i / dim),
            rows[i]
        ),
        None => Ok(()),
    }
}

/// Writes the embeddings (and labels) and prints what was written.
pub fn run(a: EmbedArgs) -> Result<()> {
    let arch: Arch = a.arch.parse()?;
    data::check_image_size(a.image_size)?;
    if !(1..=MAX_BATCH).contains(&a.batch_size) {
        bail!(
            "--batch-size {} is out of range: 1 to {MAX_BATCH}",
            a.batch_size
        );
    }
    resnext_core::oom::set_context(format!(
        "embedding with {arch} at --batch-size {}: lower it",
        a.batch_size
    ));
    let (classes, in_channels) = predict::weights_shape(&a.weights)?;
    let dev = Cpu::default();
    let mut net = arch.build(&dev, in_channels, classes)?;
    net.load_safetensors(&a.weights)?;
    let dim = net.embed_dim();

    let (rows, n) = match (a.dataset, &a.npy_input, a.images.is_empty()) {
        (Some(dataset), _, _) => {
            let size = a.image_size.unwrap_or(arch.default_size());
            let prepared = data::prepare(
                dataset,
                a.data_dir.as_deref(),
                false,
                size,
                &data::Augment::default(),
            )?;
            if prepared.info.channels != in_channels {
                bail!(
                    "`{dataset}` has {} channel(s) but the weights `{}` expect {in_channels}",
                    prepared.info.channels,
                    a.weights.display()
                );
            }
            let source = match a.split {
                Split::Train => prepared.train,
                Split::Test => prepared.test,
            };
            let loader = Loader::new(
                source,
                prepared.test_pipeline,
                LoaderConfig {
                    batch_size: a.batch_size,
                    shuffle: false,
                    drop_last: false,
                    seed: 0,
                    threads: 1,
                    prefetch: 2,
                },
            );
            let (mut rows, mut labels, mut skipped) = (Vec::new(), Vec::new(), 0usize);
            for batch in loader.epoch(0, 0) {
                let batch = batch?;
                skipped += batch.skipped;
                if batch.labels.is_empty() {
                    continue;
                }
                let e = net.embed(batch.data, batch.shape)?;
                let indices = batch.indices.clone();
                check_finite(&e, dim, 0, &|i| format!("#{}", indices[i]))?;
                rows.extend(e);
                labels.extend(batch.labels.iter().map(|&l| l as i64));
            }
            if labels.is_empty() {
                bail!("`{dataset}` {:?} split has no readable image", a.split);
            }
            if skipped > 0 {
                eprintln!("{skipped} unreadable image(s) left out");
            }
            let labels_out = a
                .labels_out
                .clone()
                .unwrap_or_else(|| default_labels_path(&a.out));
            if labels_out == a.out {
                bail!(
                    "--labels-out `{}` is the same file as --out",
                    labels_out.display()
                );
            }
            datasets::npy::write_i64(&labels_out, &labels)
                .with_context(|| "writing the labels".to_string())?;
            println!("labels: {} ({})", labels_out.display(), labels.len());
            let n = labels.len();
            (rows, n)
        }
        (None, Some(npy), _) => {
            let (data, shape) = predict::read_batch(npy, in_channels)?;
            let rows = embed_all(net.as_ref(), &data, shape, a.batch_size, &|i| i.to_string())?;
            (rows, shape[0])
        }
        (None, None, false) => {
            let (data, shape) =
                predict::load_images_for(&a.images, &a.weights, in_channels, arch, a.image_size)?;
            let names = |i: usize| a.images[i].display().to_string();
            let rows = embed_all(net.as_ref(), &data, shape, a.batch_size, &names)?;
            (rows, shape[0])
        }
        (None, None, true) => {
            bail!("nothing to embed: give --dataset, image files or --npy-input")
        }
    };
    datasets::npy::write(&a.out, &[n, dim], &rows)
        .map_err(|e| anyhow!(e))
        .context("writing the embeddings")?;
    println!("embeddings: {} ({n} x {dim})", a.out.display());
    Ok(())
}
