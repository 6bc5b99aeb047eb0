//! CIFAR-10 and CIFAR-100, binary versions, read from the extracted folder or straight from
//! the `.tar.gz` as published (<https://www.cs.toronto.edu/~kriz/cifar.html>).
//!
//! CIFAR-10 records are `<1 label byte><3072 pixel bytes>` (1024 red, 1024 green, 1024 blue,
//! row-major 32×32) in `data_batch_1.bin` … `data_batch_5.bin` and `test_batch.bin`;
//! CIFAR-100 records are `<coarse label><fine label><3072 pixel bytes>` in `train.bin` and
//! `test.bin`.

use std::path::{Path, PathBuf};

use crate::archive::tar_gz_members;
use crate::transforms::constants::*;
use crate::Split;
use crate::{DataError, InMemory, Info};

/// Which CIFAR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cifar {
    /// 10 classes.
    Ten,
    /// 100 fine classes.
    Hundred,
    /// CIFAR-100 with its 20 coarse (superclass) labels.
    HundredCoarse,
}

impl Cifar {
    /// The published archive's file name.
    pub fn archive(self) -> &'static str {
        match self {
            Cifar::Ten => "cifar-10-binary.tar.gz",
            _ => "cifar-100-binary.tar.gz",
        }
    }
    /// The folder the archive extracts to.
    pub fn folder(self) -> &'static str {
        match self {
            Cifar::Ten => "cifar-10-batches-bin",
            _ => "cifar-100-binary",
        }
    }
    fn files(self, split: Split) -> Vec<&'static str> {
        match (self, split) {
            (Cifar::Ten, Split::Train) => vec![
                "data_batch_1.bin",
                "data_batch_2.bin",
                "data_batch_3.bin",
                "data_batch_4.bin",
                "data_batch_5.bin",
            ],
            (Cifar::Ten, Split::Test) => vec!["test_batch.bin"],
            (_, Split::Train) => vec!["train.bin"],
            (_, Split::Test) => vec!["test.bin"],
        }
    }
    fn names_file(self) -> &'static str {
        match self {
            Cifar::Ten => "batches.meta.txt",
            Cifar::Hundred => "fine_label_names.txt",
            Cifar::HundredCoarse => "coarse_label_names.txt",
        }
    }
    fn classes(self) -> usize {
        match self {
            Cifar::Ten => 10,
            Cifar::Hundred => 100,
            Cifar::HundredCoarse => 20,
        }
    }
    fn info(self, names: Vec<String>) -> Info {
        let (mean, std) = if self == Cifar::Ten {
            (CIFAR10_MEAN, CIFAR10_STD)
        } else {
            (CIFAR100_MEAN, CIFAR100_STD)
        };
        Info {
            name: match self {
                Cifar::Ten => "cifar10",
                Cifar::Hundred => "cifar100",
                Cifar::HundredCoarse => "cifar100-coarse",
            }
            .into(),
            channels: 3,
            height: 32,
            width: 32,
            classes: names,
            max_value: 255.0,
            mean: mean.to_vec(),
            std: std.to_vec(),
        }
    }
}

const PIXELS: usize = 3 * 32 * 32;

/// CIFAR-10 class names in label order (as in `batches.meta.txt`).
pub const CIFAR10_CLASSES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

/// Parses the records of one binary file; `path` labels errors.
pub fn parse_records(
    kind: Cifar,
    bytes: &[u8],
    path: &Path,
    pixels: &mut Vec<u8>,
    labels: &mut Vec<u16>,
) -> Result<(), DataError> {
    let head = if kind == Cifar::Ten { 1 } else { 2 };
    let rec = head + PIXELS;
    if bytes.is_empty() || !bytes.len().is_multiple_of(rec) {
        return Err(DataError::Format {
            path: path.into(),
            msg: format!("{} bytes is not a whole number of {rec}-byte records: truncated or corrupt record at byte {}", bytes.len(), bytes.len() / rec * rec),
        });
    }
    for (i, r) in bytes.chunks_exact(rec).enumerate() {
        let label = match kind {
            Cifar::Ten => r[0],
            Cifar::Hundred => r[1],
            Cifar::HundredCoarse => r[0],
        } as usize;
        if label >= kind.classes() {
            return Err(DataError::Format {
                path: path.into(),
                msg: format!(
                    "record {i} (byte {}): label {label} is out of range for {} classes",
                    i * rec,
                    kind.classes()
                ),
            });
        }
        labels.push(label as u16);
        pixels.extend_from_slice(&r[head..]);
    }
    Ok(())
}

fn names_from(text: &str, n: usize) -> Vec<String> {
    let names: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    if names.len() == n {
        names
    } else {
        (0..n).map(|i| i.to_string()).collect()
    }
}

/// Loads a split from `dir`, which holds the extracted folder, the folder's files, or the
/// `.tar.gz` archive.
pub fn load(kind: Cifar, dir: &Path, split: Split) -> Result<InMemory, DataError> {
    let (mut pixels, mut labels) = (Vec::new(), Vec::new());
    let folder = [dir.join(kind.folder()), dir.to_path_buf()]
        .into_iter()
        .find(|d| d.join(kind.files(split)[0]).exists());
    let names;
    if let Some(folder) = folder {
        for f in kind.files(split) {
            let path = folder.join(f);
            // CIFAR's files are 30 MB (a batch of 10,000) to 150 MB (CIFAR-100's train)
            let bytes = resnext_fs::read_at_most(&path, 256 << 20)?;
            parse_records(kind, &bytes, &path, &mut pixels, &mut labels)?;
        }
        // the class names are optional (the classes stay numbered without them)
        names = resnext_fs::read_at_most(&folder.join(kind.names_file()), 1 << 20)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
    } else {
        let archive = dir.join(kind.archive());
        if !archive.exists() {
            return Err(DataError::Read {
                path: dir.join(kind.folder()),
                error: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!(
                        "neither `{}` nor `{}` is here; pass --download to fetch it",
                        kind.folder(),
                        kind.archive()
                    ),
                ),
            });
        }
        let mut wanted: Vec<&str> = kind.files(split);
        wanted.push(kind.names_file());
        let members = tar_gz_members(&archive, &wanted)?;
        names = members
            .iter()
            .find(|(n, _)| n.ends_with(kind.names_file()))
            .map(|(_, b)| String::from_utf8_lossy(b).into_owned())
            .unwrap_or_default();
        for f in kind.files(split) {
            let (name, bytes) = members
                .iter()
                .find(|(n, _)| n.ends_with(f))
                .ok_or_else(|| DataError::Format {
                    path: archive.clone(),
                    msg: format!("the archive has no `{f}`"),
                })?;
            parse_records(
                kind,
                bytes,
                &PathBuf::from(format!("{}:{name}", archive.display())),
                &mut pixels,
                &mut labels,
            )?;
        }
    }
    Ok(InMemory::new(
        kind.info(names_from(&names, kind.classes())),
        pixels,
        labels,
    ))
}
