//! The embedded default dataset: the UCI optical recognition of handwritten digits
//! (E. Alpaydin, C. Kaynak; <https://doi.org/10.24432/C50P49>, CC BY 4.0), 1,797 grey 8×8
//! images with values 0..16 in 10 classes, as scikit-learn's wheel ships them, converted
//! by `tools/make_digits.py` and compiled into the crate (117 KB). No download needed.
//!
//! Fixed split: sample `i` is in the test set when `i % 5 == 0` (360 test, 1,437 train
//! images), so every run and every tool sees the same split.

use std::path::PathBuf;

use crate::{DataError, InMemory, Info, Split};

static DIGITS: &[u8] = include_bytes!("../data/digits.bin");

/// Mean of the training images after scaling to [0, 1] (pixel / 16).
pub const DIGITS_MEAN: f32 = 0.3052;
/// Standard deviation of the training images after scaling to [0, 1].
pub const DIGITS_STD: f32 = 0.3763;

fn info() -> Info {
    Info {
        name: "digits".into(),
        channels: 1,
        height: 8,
        width: 8,
        classes: (0..10).map(|d| d.to_string()).collect(),
        max_value: 16.0,
        mean: vec![DIGITS_MEAN],
        std: vec![DIGITS_STD],
    }
}

/// Parses the `DIGITS01` format (see `tools/make_digits.py`); `name` labels errors.
pub fn parse(bytes: &[u8], name: &str, split: Split) -> Result<InMemory, DataError> {
    let err = |msg: String| DataError::Format {
        path: PathBuf::from(name),
        msg,
    };
    if bytes.len() < 12 || &bytes[..8] != b"DIGITS01" {
        return Err(err("missing the DIGITS01 magic at byte 0".into()));
    }
    let n = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize;
    if bytes.len() != 12 + n * 65 {
        return Err(err(format!(
            "{n} records need {} bytes, found {}",
            12 + n * 65,
            bytes.len()
        )));
    }
    let (mut pixels, mut labels) = (Vec::new(), Vec::new());
    for (i, rec) in bytes[12..].chunks_exact(65).enumerate() {
        if (i % 5 == 0) != (split == Split::Test) {
            continue;
        }
        if let Some(p) = rec[..64].iter().position(|&v| v > 16) {
            return Err(err(format!(
                "record {i}: pixel {p} is {} (> 16) at byte {}",
                rec[p],
                12 + i * 65 + p
            )));
        }
        if rec[64] > 9 {
            return Err(err(format!(
                "record {i}: label {} is out of range 0..10 at byte {}",
                rec[64],
                12 + i * 65 + 64
            )));
        }
        pixels.extend_from_slice(&rec[..64]);
        labels.push(rec[64] as u16);
    }
    Ok(InMemory::new(info(), pixels, labels))
}

/// The embedded digits, train or test split.
pub fn load(split: Split) -> InMemory {
    parse(DIGITS, "embedded digits.bin", split)
        .expect("the embedded digits file is valid (checked by tests)")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Source;

    #[test]
    fn embedded_digits_have_the_published_size_and_balance() {
        let (train, test) = (load(Split::Train), load(Split::Test));
        assert_eq!((train.len(), test.len()), (1437, 360));
        let mut counts = [0usize; 10];
        for &l in train.labels().iter().chain(test.labels()) {
            counts[l as usize] += 1;
        }
        // per-class counts of the UCI test set as scikit-learn ships it
        assert_eq!(counts, [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]);
        // the normalisation constants are the training set's
        let px: Vec<f32> = (0..train.len())
            .flat_map(|i| train.get(i).unwrap().0.data)
            .map(|v| v as f32 / 16.0)
            .collect();
        let mean = px.iter().sum::<f32>() / px.len() as f32;
        let std = (px.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / px.len() as f32).sqrt();
        assert!(
            (mean - info().mean[0]).abs() < 1e-3 && (std - info().std[0]).abs() < 1e-3,
            "{mean} {std}"
        );
    }

    #[test]
    fn corrupt_digits_files_are_errors() {
        let mut bad = DIGITS.to_vec();
        bad[12 + 65 * 3 + 64] = 12;
        assert!(parse(&bad, "d.bin", Split::Train)
            .unwrap_err()
            .to_string()
            .contains("record 3: label 12"));
        assert!(parse(&DIGITS[..100], "d.bin", Split::Train)
            .unwrap_err()
            .to_string()
            .contains("need"));
        assert!(parse(b"PNG....", "d.bin", Split::Test)
            .unwrap_err()
            .to_string()
            .contains("magic"));
    }
}
