//! Datasets for resnext-rs: files on disk (or compiled in) → augmented `f32` batches in
//! `(N, C, H, W)` layout plus labels, ready for a `Tensor<(usize, Const<C>, usize, usize)>`.
//!
//! - [`Source`]: random access to `(image, label)` pairs; [`InMemory`] holds decoded 8-bit
//!   images (the embedded [`digits`], and the binary formats).
//! - [`transforms`]: seeded, composable augmentation and normalisation.
//! - [`loader`]: epoch shuffling, batching, worker threads with bounded prefetch;
//!   the same seed gives the same batches whatever the number of threads.
//! - Formats: [`cifar`] (binary, folder or `.tar.gz`), [`mnist`] (IDX, plain or `.gz`),
//!   [`folder`] (JPEG/PNG class folders, lazily decoded), [`download`] (checked, atomic).
//! - [`npy`]: NumPy `.npy` arrays.

pub mod archive;
pub mod cifar;
pub mod digits;
pub mod download;
pub mod folder;
pub mod loader;
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
    #[error("cannot read `{path}`: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
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
}
