//! MNIST and Fashion-MNIST in the IDX format as published, plain or `.gz`:
//! `train-images-idx3-ubyte`, `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte`,
//! `t10k-labels-idx1-ubyte`. IDX: big-endian magic `0x00000803` (u8, 3 dims) or
//! `0x00000801` (u8, 1 dim), then one big-endian u32 per dim, then the data.

use std::path::Path;

use crate::archive::read_maybe_gz;
use crate::transforms::constants::*;
use crate::Split;
use crate::{DataError, InMemory, Info};

/// Which IDX dataset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Idx {
    /// Handwritten digits.
    Mnist,
    /// Zalando's clothing images.
    FashionMnist,
}

/// Base names of the four files (the published ones end in `.gz`).
pub const FILES: [&str; 4] = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
];

/// Fashion-MNIST class names in label order.
pub const FASHION_CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

fn be(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Parses an IDX file of `dims` dimensions; returns the dims and the data.
pub fn parse_idx<'a>(
    bytes: &'a [u8],
    dims: usize,
    path: &Path,
) -> Result<(Vec<usize>, &'a [u8]), DataError> {
    let err = |msg: String| DataError::Format {
        path: path.into(),
        msg,
    };
    let header = 4 + 4 * dims;
    if bytes.len() < header {
        return Err(err(format!(
            "{} bytes is shorter than the {header}-byte IDX header",
            bytes.len()
        )));
    }
    let magic = be(bytes, 0);
    let want = 0x0800 + dims as u32;
    if magic != want {
        return Err(err(format!(
            "wrong magic number 0x{magic:08x} at byte 0, expected 0x{want:08x}"
        )));
    }
    let shape: Vec<usize> = (0..dims).map(|d| be(bytes, 4 + 4 * d) as usize).collect();
    let data = &bytes[header..];
    let n = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
    if n != Some(data.len()) {
        let need = n.map_or("more than 2^64".to_string(), |n| n.to_string());
        return Err(err(format!(
            "dims {shape:?} need {need} data bytes after byte {header}, found {}",
            data.len()
        )));
    }
    Ok((shape, data))
}

/// Loads a split from `dir` (plain or `.gz` files).
pub fn load(kind: Idx, dir: &Path, split: Split) -> Result<InMemory, DataError> {
    let (img, lab) = match split {
        Split::Train => (FILES[0], FILES[1]),
        Split::Test => (FILES[2], FILES[3]),
    };
    let (ib, ipath) = read_maybe_gz(&dir.join(img))?;
    let (lb, lpath) = read_maybe_gz(&dir.join(lab))?;
    let (ishape, pixels) = parse_idx(&ib, 3, &ipath)?;
    let (lshape, labels) = parse_idx(&lb, 1, &lpath)?;
    if ishape[0] != lshape[0] {
        return Err(DataError::Format {
            path: lpath,
            msg: format!(
                "{} labels for {} images in `{}`",
                lshape[0],
                ishape[0],
                ipath.display()
            ),
        });
    }
    if let Some(i) = labels.iter().position(|&l| l > 9) {
        return Err(DataError::Format {
            path: lpath,
            msg: format!(
                "record {i} (byte {}): label {} is out of range for 10 classes",
                8 + i,
                labels[i]
            ),
        });
    }
    let (mean, std, classes) = match kind {
        Idx::Mnist => (
            MNIST_MEAN,
            MNIST_STD,
            (0..10).map(|d| d.to_string()).collect(),
        ),
        Idx::FashionMnist => (
            FASHION_MNIST_MEAN,
            FASHION_MNIST_STD,
            FASHION_CLASSES.iter().map(|s| s.to_string()).collect(),
        ),
    };
    let info = Info {
        name: if kind == Idx::Mnist {
            "mnist"
        } else {
            "fashion-mnist"
        }
        .into(),
        channels: 1,
        height: ishape[1],
        width: ishape[2],
        classes,
        max_value: 255.0,
        mean: mean.to_vec(),
        std: std.to_vec(),
    };
    Ok(InMemory::new(
        info,
        pixels.to_vec(),
        labels.iter().map(|&l| l as u16).collect(),
    ))
}
