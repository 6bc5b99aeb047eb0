//! Dataset selection for the command line: names, sources, transforms and defaults.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use datasets::cifar::{self, Cifar};
use datasets::digits::{self, Split};
use datasets::download::{self, Remote};
use datasets::folder::ImageFolder;
use datasets::mnist::{self, Idx};
use datasets::transforms::{
    CenterCrop, Normalize, Pipeline, RandomCrop, RandomHorizontalFlip, RandomResizedCrop, Resize,
};
use datasets::{Info, Source};

/// The datasets `--dataset` accepts.
pub const NAMES: &[&str] = &[
    "digits",
    "cifar10",
    "cifar100",
    "mnist",
    "fashion-mnist",
    "folder",
];

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

fn remote(name: &str) -> Option<(&'static str, &'static [Remote])> {
    match name {
        "cifar10" => Some(download::CIFAR10),
        "cifar100" => Some(download::CIFAR100),
        "mnist" => Some(download::MNIST),
        "fashion-mnist" => Some(download::FASHION_MNIST),
        _ => None,
    }
}

fn data_dir(name: &str, given: Option<&Path>) -> PathBuf {
    given
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("data").join(name))
}

/// Loads `name` from `data_dir` (default `data/<name>`), downloading first when asked.
/// `image_size` is the training crop of image folders.
pub fn prepare(
    name: &str,
    data_dir_arg: Option<&Path>,
    download: bool,
    image_size: usize,
) -> Result<Prepared> {
    if !NAMES.contains(&name) {
        bail!(
            "unknown dataset `{name}`; valid names: {}",
            NAMES.join(", ")
        );
    }
    if name == "digits" {
        let (train, test) = (digits::load(Split::Train), digits::load(Split::Test));
        let info = train.info().clone();
        return Ok(Prepared {
            train_pipeline: Pipeline::new(info.max_value)
                .then(RandomCrop {
                    size: 8,
                    padding: 1,
                })
                .then(norm(&info)),
            test_pipeline: Pipeline::new(info.max_value).then(norm(&info)),
            info,
            train: Arc::new(train),
            test: Arc::new(test),
        });
    }
    let dir = data_dir(name, data_dir_arg);
    if download {
        let Some((base, files)) = remote(name) else {
            bail!("--download is not available for `{name}`: point --data-dir at your image folder")
        };
        let base = std::env::var("RESNEXT_DATA_MIRROR").unwrap_or_else(|_| base.to_string());
        let n = download::fetch_all(&base, files, &dir)?;
        if n > 0 {
            eprintln!("downloaded {n} file(s) into `{}`", dir.display());
        }
    }
    let hint = |e: datasets::DataError| -> anyhow::Error {
        match remote(name) {
            Some(_) => anyhow::Error::new(e).context(format!("cannot load `{name}` from `{}`; add --download to fetch it, or pass --data-dir", dir.display())),
            None => anyhow::Error::new(e).context(format!("cannot load the image folder `{}` (expected train/<class>/*.jpg and val/<class>/*.jpg)", dir.display())),
        }
    };
    let (train, test): (Arc<dyn Source>, Arc<dyn Source>) = match name {
        "cifar10" | "cifar100" => {
            let kind = if name == "cifar10" {
                Cifar::Ten
            } else {
                Cifar::Hundred
            };
            (
                Arc::new(cifar::load(kind, &dir, Split::Train).map_err(hint)?),
                Arc::new(cifar::load(kind, &dir, Split::Test).map_err(hint)?),
            )
        }
        "mnist" | "fashion-mnist" => {
            let kind = if name == "mnist" {
                Idx::Mnist
            } else {
                Idx::FashionMnist
            };
            (
                Arc::new(mnist::load(kind, &dir, Split::Train).map_err(hint)?),
                Arc::new(mnist::load(kind, &dir, Split::Test).map_err(hint)?),
            )
        }
        _ => {
            let train = ImageFolder::open(&dir.join("train"), None, true).map_err(hint)?;
            let classes = train.info().classes.clone();
            let val = ImageFolder::open(&dir.join("val"), Some(&classes), true)
                .with_context(|| format!("cannot load `{}`", dir.join("val").display()))?;
            (Arc::new(train), Arc::new(val))
        }
    };
    let info = train.info().clone();
    let (train_pipeline, test_pipeline) = match name {
        "cifar10" | "cifar100" => (
            Pipeline::new(255.0)
                .then(RandomCrop {
                    size: 32,
                    padding: 4,
                })
                .then(RandomHorizontalFlip { p: 0.5 })
                .then(norm(&info)),
            Pipeline::new(255.0).then(norm(&info)),
        ),
        "mnist" | "fashion-mnist" => (
            Pipeline::new(255.0)
                .then(RandomCrop {
                    size: info.height,
                    padding: 2,
                })
                .then(norm(&info)),
            Pipeline::new(255.0).then(norm(&info)),
        ),
        _ => (
            Pipeline::new(255.0)
                .then(RandomResizedCrop::new(image_size))
                .then(RandomHorizontalFlip { p: 0.5 })
                .then(norm(&info)),
            Pipeline::new(255.0)
                .then(Resize {
                    shorter: image_size * 256 / 224,
                })
                .then(CenterCrop { size: image_size })
                .then(norm(&info)),
        ),
    };
    Ok(Prepared {
        info,
        train,
        test,
        train_pipeline,
        test_pipeline,
    })
}
