//! NumPy `.npy` files (format versions 1–3) holding little-endian `float32` or `float64`
//! arrays in C order. Reading checks every header field and the data length; writing is
//! atomic (temporary file, then rename).

use std::path::{Path, PathBuf};

const MAGIC: &[u8] = b"\x93NUMPY";

/// Why an `.npy` file could not be read or written; names the file.
#[derive(Debug, thiserror::Error)]
pub enum NpyError {
    /// The file could not be read or written.
    #[error(transparent)]
    File(#[from] resnext_fs::FileError),
    /// The file is not a valid `.npy` array we can read.
    #[error("`{path}`: {msg}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the byte offset where it helps.
        msg: String,
    },
}

/// An `f32` array with its shape (C order).
#[derive(Clone, Debug, PartialEq)]
pub struct Array {
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Values, row-major.
    pub data: Vec<f32>,
}

fn field<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let at = header.find(&format!("'{key}'"))?;
    let rest = &header[at + key.len() + 2..];
    let rest = rest.trim_start().strip_prefix(':')?.trim_start();
    Some(rest)
}

/// Parses `.npy` bytes; `path` only labels errors.
pub fn parse(bytes: &[u8], path: &Path) -> Result<Array, NpyError> {
    let err = |msg: String| NpyError::Format {
        path: path.into(),
        msg,
    };
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err(err(
            "not a .npy file (missing the \\x93NUMPY magic at byte 0)".into(),
        ));
    }
    let major = bytes[6];
    let (hlen, start) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err(err("truncated header".into()));
            }
            (
                u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
                12,
            )
        }
        v => {
            return Err(err(format!(
                "unsupported .npy format version {v} at byte 6"
            )))
        }
    };
    let header = bytes.get(start..start + hlen).ok_or_else(|| {
        err(format!(
            "header of {hlen} bytes is truncated at byte {}",
            bytes.len()
        ))
    })?;
    let header = std::str::from_utf8(header).map_err(|_| err("header is not text".into()))?;
    let descr = field(header, "descr").ok_or_else(|| err("header has no 'descr'".into()))?;
    let width = if descr.starts_with("'<f4'") || descr.starts_with("'float32'") {
        4
    } else if descr.starts_with("'<f8'") {
        8
    } else {
        let d: String = descr.chars().take_while(|c| *c != ',').collect();
        return Err(err(format!(
            "dtype {d} is not supported (need little-endian float32 '<f4' or float64 '<f8')"
        )));
    };
    let fortran = field(header, "fortran_order")
        .ok_or_else(|| err("header has no 'fortran_order'".into()))?;
    if fortran.starts_with("True") {
        return Err(err(
            "Fortran-ordered arrays are not supported; save with np.ascontiguousarray".into(),
        ));
    }
    let shape_txt = field(header, "shape").ok_or_else(|| err("header has no 'shape'".into()))?;
    let inner = shape_txt
        .strip_prefix('(')
        .and_then(|s| s.split(')').next())
        .ok_or_else(|| err(format!("malformed shape in header: {header}")))?;
    let shape = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| err(format!("malformed shape entry `{s}`")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    // every dim counts, zeros aside: a shape like (0, 2^40, 2^40) describes no data here
    // but would size buffers downstream
    let too_large = || err(format!("shape {shape:?} is too large"));
    let nonzero = shape
        .iter()
        .filter(|&&d| d > 0)
        .try_fold(width, |acc: usize, &d| acc.checked_mul(d))
        .filter(|&b| b <= isize::MAX as usize)
        .ok_or_else(too_large)?;
    let need = if shape.contains(&0) { 0 } else { nonzero };
    let data = &bytes[start + hlen..];
    if data.len() != need {
        return Err(err(format!(
            "shape {shape:?} needs {need} data bytes after the header at byte {}, found {}",
            start + hlen,
            data.len()
        )));
    }
    let data = if width == 4 {
        data.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    } else {
        data.chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
            .collect()
    };
    Ok(Array { shape, data })
}

/// The largest `.npy` file read (4 GiB).
pub const MAX_FILE_BYTES: u64 = 4 << 30;

/// Reads an `.npy` file of at most [`MAX_FILE_BYTES`].
pub fn read(path: impl AsRef<Path>) -> Result<Array, NpyError> {
    let path = path.as_ref();
    parse(&resnext_fs::read_at_most(path, MAX_FILE_BYTES)?, path)
}

/// The `.npy` (version 1.0) header for `descr` and `shape`, padded so that the data starts
/// at a multiple of 64 bytes.
fn header(descr: &str, shape: &[usize], values: usize, elem: usize) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_txt = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut header =
        format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape_txt}, }}");
    let total = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - total % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + values * elem);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out
}

/// Encodes a `float32` array as `.npy` (version 1.0) bytes.
pub fn encode(shape: &[usize], data: &[f32]) -> Vec<u8> {
    assert_eq!(
        shape.iter().product::<usize>(),
        data.len(),
        "npy: shape does not match data length"
    );
    let mut out = header("<f4", shape, data.len(), 4);
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Encodes a one-dimensional `int64` array (labels, indices) as `.npy` (version 1.0) bytes.
pub fn encode_i64(data: &[i64]) -> Vec<u8> {
    let mut out = header("<i8", &[data.len()], data.len(), 8);
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Writes a `float32` array atomically: a temporary file beside `path`, then a rename.
pub fn write(path: impl AsRef<Path>, shape: &[usize], data: &[f32]) -> Result<(), NpyError> {
    let path = path.as_ref();
    let bytes = encode(shape, data);
    Ok(resnext_fs::write(path, &bytes)?)
}

/// Writes a one-dimensional `int64` array atomically, as [`write`] does.
pub fn write_i64(path: impl AsRef<Path>, data: &[i64]) -> Result<(), NpyError> {
    Ok(resnext_fs::write(path.as_ref(), &encode_i64(data))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn encode_then_parse_round_trips(shape in prop::collection::vec(0usize..5, 0..5), seed in any::<u32>()) {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = (0..n).map(|i| (i as f32 + seed as f32).sin()).collect();
            let bytes = encode(&shape, &data);
            prop_assert_eq!((10 + u16::from_le_bytes([bytes[8], bytes[9]]) as usize) % 64, 0);
            let a = parse(&bytes, Path::new("x.npy")).unwrap();
            prop_assert_eq!(a.shape, shape);
            prop_assert_eq!(a.data, data);
        }
    }

    #[test]
    fn reads_what_numpy_writes() {
        // np.save(f, np.arange(6, dtype=np.float32).reshape(2, 3)), byte for byte (numpy 2)
        let header = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }";
        let mut bytes = b"\x93NUMPY\x01\x00v\x00".to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend(std::iter::repeat_n(b' ', 0x76 - header.len() - 1));
        bytes.push(b'\n');
        for i in 0..6 {
            bytes.extend_from_slice(&(i as f32).to_le_bytes());
        }
        assert_eq!(bytes.len(), 152);
        let a = parse(&bytes, Path::new("a.npy")).unwrap();
        assert_eq!(a.shape, vec![2, 3]);
        assert_eq!(a.data, vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        assert_eq!(
            encode(&[2, 3], &a.data)[..],
            bytes[..],
            "we write what numpy writes"
        );
    }

    fn replace(bytes: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
        let at = bytes
            .windows(from.len())
            .position(|w| w == from)
            .expect("pattern present");
        [&bytes[..at], to, &bytes[at + from.len()..]].concat()
    }

    #[test]
    fn bad_files_give_errors_naming_the_file() {
        let good = encode(&[2, 2], &[1.0, 2.0, 3.0, 4.0]);
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"PK\x03\x04 zip".to_vec(), "magic"),
            (good[..good.len() - 3].to_vec(), "needs 16 data bytes"),
            (replace(&good, b"<f4", b"<i8"), "'<i8' is not supported"),
            (replace(&good, b"False", b"True "), "Fortran"),
        ];
        for (bytes, want) in cases {
            let msg = parse(&bytes, Path::new("in.npy")).unwrap_err().to_string();
            assert!(msg.contains("`in.npy`") && msg.contains(want), "{msg}");
        }
    }
}
