//! Datasets for resnext-rs: files on disk (or compiled in) → augmented `f32` batches in
//! `(N, C, H, W)` layout plus labels, ready for a `Tensor<(usize, Const<C>, usize, usize)>`.
//!
//! - [`Source`]: random access to `(image, label)` pairs; [`InMemory`] holds decoded 8-bit
//!   images (the embedded [`digits`], and the binary formats).
//! - [`transforms`]: seeded, composable augmentation and normalisation; [`augment`]:
//!   TrivialAugmentWide and random erasing.
//! - [`loader`]: epoch shuffling, batching, worker threads with bounded prefetch;
//!   the same seed gives the same batches whatever the number of threads.
//! - Formats: [`cifar`] (binary, folder or `.tar.gz`), [`mnist`] (IDX, plain or `.gz`),
//!   [`folder`] (JPEG/PNG class folders, lazily decoded), [`download`] (checked, atomic).
//! - [`mix`]: mixup and cutmix of whole batches.
//! - [`npy`]: NumPy `.npy` arrays.

pub mod archive;
pub mod augment;
pub mod cifar;
pub mod digits;
pub mod download;
pub mod folder;
pub mod loader;
pub mod mix;
pub mod mnist;
pub mod npy;
pub mod transforms;

use std::path::PathBuf;

/// Which part of a dataset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// Training images.
    Train,
    /// Held-out test images.
    Test,
}

/// Why data could not be read; names the file (and record or offset where it helps).
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file could not be opened or read.
    #[error("cannot read `{path}`: {error}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error (in the message, so not also given as the error's source).
        error: std::io::Error,
    },
    /// A file's contents are not what its format requires.
    #[error("`{path}`: {msg}")]
    Format {
        /// The file (or a name for embedded data).
        path: PathBuf,
        /// What is wrong, with record or byte offset.
        msg: String,
    },
    /// A sample index beyond the dataset.
    #[error("sample {index} is out of range for a dataset of {len}")]
    OutOfRange {
        /// The index asked for.
        index: usize,
        /// The dataset size.
        len: usize,
    },
}

impl From<resnext_fs::FileError> for DataError {
    fn from(e: resnext_fs::FileError) -> Self {
        use resnext_fs::FileError as F;
        match e {
            F::Read { path, error } | F::Write { path, error } => DataError::Read { path, error },
            F::TooLarge { path, limit } => DataError::Format {
                path,
                msg: format!("larger than {limit} bytes, the most this reader accepts"),
            },
        }
    }
}

/// An 8-bit image in channels-first `(C, H, W)` layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    /// Channels (1 or 3).
    pub channels: usize,
    /// Height.
    pub height: usize,
    /// Width.
    pub width: usize,
    /// `channels * height * width` values.
    pub data: Vec<u8>,
}

/// What a dataset holds.
#[derive(Clone, Debug, PartialEq)]
pub struct Info {
    /// A short name (`digits`, `cifar10`, …).
    pub name: String,
    /// Image channels.
    pub channels: usize,
    /// Native height (0 when images differ in size).
    pub height: usize,
    /// Native width (0 when images differ in size).
    pub width: usize,
    /// Class names; their count is the number of classes.
    pub classes: Vec<String>,
    /// The pixel value that maps to 1.0 (255 for 8-bit images, 16 for the digits).
    pub max_value: f32,
    /// Per-channel mean of the training images after scaling to [0, 1].
    pub mean: Vec<f32>,
    /// Per-channel standard deviation of the training images after scaling to [0, 1].
    pub std: Vec<f32>,
}

/// Random access to labelled images.
pub trait Source: Send + Sync {
    /// What the dataset holds.
    fn info(&self) -> &Info;
    /// Number of samples.
    fn len(&self) -> usize;
    /// Whether there are no samples.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Sample `index`: its image and class index.
    fn get(&self, index: usize) -> Result<(Image, usize), DataError>;
    /// The class index of sample `index` (sources that know it without decoding the image
    /// override this).
    fn label(&self, index: usize) -> Result<usize, DataError> {
        Ok(self.get(index)?.1)
    }
    /// Whether a sample that cannot be read is left out of its batch (with a warning)
    /// rather than an error: image folders opened with `skip_unreadable`.
    fn skips_unreadable(&self) -> bool {
        false
    }
}

/// Decoded images of one size held in memory.
#[derive(Clone, Debug)]
pub struct InMemory {
    info: Info,
    pixels: Vec<u8>,
    labels: Vec<u16>,
}

impl InMemory {
    /// Wraps `labels.len()` images of `info`'s size stored back to back in `pixels`.
    pub fn new(info: Info, pixels: Vec<u8>, labels: Vec<u16>) -> Self {
        assert_eq!(
            pixels.len(),
            labels.len() * info.channels * info.height * info.width,
            "pixels do not match labels and image size"
        );
        Self {
            info,
            pixels,
            labels,
        }
    }
    /// The labels, in sample order.
    pub fn labels(&self) -> &[u16] {
        &self.labels
    }
}

impl Source for InMemory {
    fn info(&self) -> &Info {
        &self.info
    }
    fn len(&self) -> usize {
        self.labels.len()
    }
    fn get(&self, index: usize) -> Result<(Image, usize), DataError> {
        let n = self.info.channels * self.info.height * self.info.width;
        let data = self
            .pixels
            .get(index * n..(index + 1) * n)
            .ok_or(DataError::OutOfRange {
                index,
                len: self.len(),
            })?;
        Ok((
            Image {
                channels: self.info.channels,
                height: self.info.height,
                width: self.info.width,
                data: data.to_vec(),
            },
            self.labels[index] as usize,
        ))
    }
    fn label(&self, index: usize) -> Result<usize, DataError> {
        self.labels
            .get(index)
            .map(|&l| l as usize)
            .ok_or(DataError::OutOfRange {
                index,
                len: self.len(),
            })
    }
}

/// Some classes of a source, relabelled `0..classes.len()` in the order given, with at
/// most `per_class` samples of each (the first ones in index order): a dataset for
/// fine-tuning on a few labelled images, or for pre-training on part of the classes.
pub struct Subset {
    inner: std::sync::Arc<dyn Source>,
    info: Info,
    /// `(index in inner, new label)`.
    samples: Vec<(usize, usize)>,
}

impl Subset {
    /// Keeps the samples of `classes` (indices into `inner`'s classes, no repeats), at most
    /// `per_class` of each.
    pub fn new(
        inner: std::sync::Arc<dyn Source>,
        classes: &[usize],
        per_class: Option<usize>,
    ) -> Result<Self, String> {
        let all = inner.info().classes.len();
        let mut new_label = vec![None; all];
        for (i, &c) in classes.iter().enumerate() {
            match new_label.get_mut(c) {
                None => {
                    return Err(format!(
                        "class {c} is out of range: the dataset has {all} (0 to {})",
                        all.saturating_sub(1)
                    ))
                }
                Some(Some(_)) => return Err(format!("class {c} is listed twice")),
                Some(slot) => *slot = Some(i),
            }
        }
        if classes.is_empty() {
            return Err("no classes given".into());
        }
        let mut taken = vec![0usize; classes.len()];
        let mut samples = Vec::new();
        for index in 0..inner.len() {
            let label = inner.label(index).map_err(|e| e.to_string())?;
            if let Some(Some(l)) = new_label.get(label) {
                if per_class.is_none_or(|m| taken[*l] < m) {
                    taken[*l] += 1;
                    samples.push((index, *l));
                }
            }
        }
        let mut info = inner.info().clone();
        info.classes = classes.iter().map(|&c| info.classes[c].clone()).collect();
        Ok(Subset {
            inner,
            info,
            samples,
        })
    }
}

impl Source for Subset {
    fn info(&self) -> &Info {
        &self.info
    }
    fn len(&self) -> usize {
        self.samples.len()
    }
    fn get(&self, index: usize) -> Result<(Image, usize), DataError> {
        let &(i, label) = self.samples.get(index).ok_or(DataError::OutOfRange {
            index,
            len: self.samples.len(),
        })?;
        Ok((self.inner.get(i)?.0, label))
    }
    fn label(&self, index: usize) -> Result<usize, DataError> {
        self.samples
            .get(index)
            .map(|s| s.1)
            .ok_or(DataError::OutOfRange {
                index,
                len: self.samples.len(),
            })
    }
    fn skips_unreadable(&self) -> bool {
        self.inner.skips_unreadable()
    }
}
