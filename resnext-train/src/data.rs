//! Dataset selection for the command line: names, sources, transforms and defaults.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use datasets::augment::{RandomErasing, TrivialAugmentWide};
use datasets::cifar::{self, Cifar};
use datasets::digits;
use datasets::download::{self, Remote};
use datasets::folder::ImageFolder;
use datasets::mnist::{self, Idx};
use datasets::transforms::{
    CenterCrop, Normalize, Pipeline, RandomCrop, RandomHorizontalFlip, RandomResizedCrop, Resize,
};
use datasets::{Info, Source, Split};
use serde::{Deserialize, Serialize};

/// The datasets `--dataset` accepts (also how a run's `state.json` names its dataset).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
pub enum Dataset {
    /// The embedded UCI handwritten digits.
    #[value(name = "digits")]
    #[serde(rename = "digits")]
    Digits,
    /// CIFAR-10.
    #[value(name = "cifar10")]
    #[serde(rename = "cifar10")]
    Cifar10,
    /// CIFAR-100 (fine labels).
    #[value(name = "cifar100")]
    #[serde(rename = "cifar100")]
    Cifar100,
    /// MNIST.
    #[value(name = "mnist")]
    #[serde(rename = "mnist")]
    Mnist,
    /// Fashion-MNIST.
    #[value(name = "fashion-mnist")]
    #[serde(rename = "fashion-mnist")]
    FashionMnist,
    /// An image folder: `train/<class>/*` and `val/<class>/*`.
    #[value(name = "folder")]
    #[serde(rename = "folder")]
    Folder,
}

impl Dataset {
    /// The name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Dataset::Digits => "digits",
            Dataset::Cifar10 => "cifar10",
            Dataset::Cifar100 => "cifar100",
            Dataset::Mnist => "mnist",
            Dataset::FashionMnist => "fashion-mnist",
            Dataset::Folder => "folder",
        }
    }

    /// Where `--download` fetches it from, if anywhere.
    fn remote(self) -> Option<(&'static str, &'static [Remote])> {
        match self {
            Dataset::Cifar10 => Some(download::CIFAR10),
            Dataset::Cifar100 => Some(download::CIFAR100),
            Dataset::Mnist => Some(download::MNIST),
            Dataset::FashionMnist => Some(download::FASHION_MNIST),
            Dataset::Digits | Dataset::Folder => None,
        }
    }
}

impl std::fmt::Display for Dataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The optional parts of the transforms: per-image augmentation of the training images and
/// the evaluation resize of image folders.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Augment {
    /// TrivialAugmentWide on each training image (before normalisation).
    pub trivial_augment: bool,
    /// Probability of random erasing on each training image (after normalisation).
    pub random_erase: f64,
    /// Image folders' evaluation: resize the shorter side to this [default: crop · 256 / 224].
    pub val_resize: Option<usize>,
    /// Image folders' evaluation: central crop of this size [default: the training size].
    pub val_crop: Option<usize>,
}

/// Train and test data with their transforms.
pub struct Prepared {
    /// What the data holds (classes, channels).
    pub info: Info,
    /// Training images.
    pub train: Arc<dyn Source>,
    /// Test images.
    pub test: Arc<dyn Source>,
    /// Augmentation + normalisation for training.
    pub train_pipeline: Pipeline,
    /// Normalisation (and resizing) for evaluation.
    pub test_pipeline: Pipeline,
}

fn norm(info: &Info) -> Normalize {
    Normalize {
        mean: info.mean.clone(),
        std: info.std.clone(),
    }
}

/// Training: random crop of `size` with `padding` (and a horizontal flip when `flip`), then
/// normalisation; test: normalisation only. Pixel values run up to `max`.
fn crop_pipelines(
    info: &Info,
    max: f32,
    size: usize,
    padding: usize,
    flip: bool,
    aug: &Augment,
) -> (Pipeline, Pipeline) {
    let train = Pipeline::new(max).then(RandomCrop { size, padding });
    let train = if flip {
        train.then(RandomHorizontalFlip { p: 0.5 })
    } else {
        train
    };
    (
        finish(train, info, aug),
        Pipeline::new(max).then(norm(info)),
    )
}

/// The end of a training pipeline: TrivialAugmentWide, normalisation, random erasing.
fn finish(train: Pipeline, info: &Info, aug: &Augment) -> Pipeline {
    let train = if aug.trivial_augment {
        train.then(TrivialAugmentWide::default())
    } else {
        train
    };
    let train = train.then(norm(info));
    if aug.random_erase > 0.0 {
        train.then(RandomErasing::new(aug.random_erase))
    } else {
        train
    }
}

/// The largest image size `--image-size` accepts.
pub const MAX_IMAGE_SIZE: usize = 2048;

/// Checks an `--image-size` flag: 8 to [`MAX_IMAGE_SIZE`] pixels.
pub fn check_image_size(size: Option<usize>) -> Result<()> {
    check_size("image-size", size)
}

/// Checks the size flag `--<flag>`: 8 to [`MAX_IMAGE_SIZE`] pixels.
pub fn check_size(flag: &str, size: Option<usize>) -> Result<()> {
    match size {
        Some(s) if !(8..=MAX_IMAGE_SIZE).contains(&s) => {
            bail!("--{flag} {s} is out of range: 8 to {MAX_IMAGE_SIZE}")
        }
        _ => Ok(()),
    }
}

fn data_dir(name: Dataset, given: Option<&Path>) -> PathBuf {
    given
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("data").join(name.name()))
}

/// Loads `name` from `data_dir` (default `data/<name>`), downloading first when asked.
/// `image_size` is the training crop of image folders; `aug` adds augmentation.
pub fn prepare(
    name: Dataset,
    data_dir_arg: Option<&Path>,
    download: bool,
    image_size: usize,
    aug: &Augment,
) -> Result<Prepared> {
    if name == Dataset::Digits {
        let (train, test) = (digits::load(Split::Train), digits::load(Split::Test));
        let info = train.info().clone();
        let (train_pipeline, test_pipeline) =
            crop_pipelines(&info, info.max_value, 8, 1, false, aug);
        return Ok(Prepared {
            train_pipeline,
            test_pipeline,
            info,
            train: Arc::new(train),
            test: Arc::new(test),
        });
    }
    let dir = data_dir(name, data_dir_arg);
    if download {
        let Some((base, files)) = name.remote() else {
            bail!("--download is not available for `{name}`: point --data-dir at your image folder")
        };
        let base = std::env::var("RESNEXT_DATA_MIRROR").unwrap_or_else(|_| base.to_string());
        let n = download::fetch_all(&base, files, &dir)?;
        if n > 0 {
            eprintln!("downloaded {n} file(s) into `{}`", dir.display());
        }
    }
    let hint = |e: datasets::DataError| -> anyhow::Error {
        match name.remote() {
            Some(_) => anyhow::Error::new(e).context(format!("cannot load `{name}` from `{}`; add --download to fetch it, or pass --data-dir", dir.display())),
            None => anyhow::Error::new(e).context(format!("cannot load the image folder `{}` (expected train/<class>/*.jpg and val/<class>/*.jpg)", dir.display())),
        }
    };
    let (train, test): (Arc<dyn Source>, Arc<dyn Source>) = match name {
        Dataset::Cifar10 | Dataset::Cifar100 => {
            let kind = if name == Dataset::Cifar10 {
                Cifar::Ten
            } else {
                Cifar::Hundred
            };
            (
                Arc::new(cifar::load(kind, &dir, Split::Train).map_err(hint)?),
                Arc::new(cifar::load(kind, &dir, Split::Test).map_err(hint)?),
            )
        }
        Dataset::Mnist | Dataset::FashionMnist => {
            let kind = if name == Dataset::Mnist {
                Idx::Mnist
            } else {
                Idx::FashionMnist
            };
            (
                Arc::new(mnist::load(kind, &dir, Split::Train).map_err(hint)?),
                Arc::new(mnist::load(kind, &dir, Split::Test).map_err(hint)?),
            )
        }
        Dataset::Digits | Dataset::Folder => {
            let train = ImageFolder::open(&dir.join("train"), None, true).map_err(hint)?;
            let classes = train.info().classes.clone();
            let val = ImageFolder::open(&dir.join("val"), Some(&classes), true)
                .with_context(|| format!("cannot load `{}`", dir.join("val").display()))?;
            (Arc::new(train), Arc::new(val))
        }
    };
    let info = train.info().clone();
    let (train_pipeline, test_pipeline) = match name {
        Dataset::Cifar10 | Dataset::Cifar100 => crop_pipelines(&info, 255.0, 32, 4, true, aug),
        Dataset::Mnist | Dataset::FashionMnist => {
            crop_pipelines(&info, 255.0, info.height, 2, false, aug)
        }
        Dataset::Digits | Dataset::Folder => {
            let crop = aug.val_crop.unwrap_or(image_size);
            (
                finish(
                    Pipeline::new(255.0)
                        .then(RandomResizedCrop::new(image_size))
                        .then(RandomHorizontalFlip { p: 0.5 }),
                    &info,
                    aug,
                ),
                Pipeline::new(255.0)
                    .then(Resize {
                        shorter: aug.val_resize.unwrap_or(crop * 256 / 224),
                    })
                    .then(CenterCrop { size: crop })
                    .then(norm(&info)),
            )
        }
    };
    Ok(Prepared {
        info,
        train,
        test,
        train_pipeline,
        test_pipeline,
    })
}
