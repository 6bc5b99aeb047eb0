//! Dataset selection for the command line: names, sources, transforms and defaults.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Result};
use datasets::digits::{self, Split};
use datasets::transforms::{Normalize, Pipeline, RandomCrop};
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

/// Loads `name` from `data_dir` (downloading when asked).
pub fn prepare(name: &str, data_dir: Option<&Path>, download: bool) -> Result<Prepared> {
    let _ = (data_dir, download);
    match name {
        "digits" => {
            let (train, test) = (digits::load(Split::Train), digits::load(Split::Test));
            let info = train.info().clone();
            let norm = Normalize {
                mean: info.mean.clone(),
                std: info.std.clone(),
            };
            Ok(Prepared {
                train_pipeline: Pipeline::new(info.max_value)
                    .then(RandomCrop {
                        size: 8,
                        padding: 1,
                    })
                    .then(norm.clone()),
                test_pipeline: Pipeline::new(info.max_value).then(norm),
                info,
                train: Arc::new(train),
                test: Arc::new(test),
            })
        }
        "cifar10" | "cifar100" | "mnist" | "fashion-mnist" | "folder" => {
            bail!("dataset `{name}` is not available in this build yet; use `digits` (see the README's 'What does not work yet')")
        }
        other => bail!(
            "unknown dataset `{other}`; valid names: {}",
            NAMES.join(", ")
        ),
    }
}
