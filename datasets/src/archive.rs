//! Reading a dataset's member files from a folder or straight from a `.tar.gz`, and plain
//! or gzip-compressed single files.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::DataError;

fn read_err(path: &Path, error: std::io::Error) -> DataError {
    DataError::Read {
        path: path.into(),
        error,
    }
}

/// Reads `path`, or `path.gz` (gunzipped) when `path` does not exist; returns the bytes and
/// the file actually read.
pub fn read_maybe_gz(path: &Path) -> Result<(Vec<u8>, PathBuf), DataError> {
    if path.exists() {
        let bytes = resnext_fs::read_at_most(path, MAX_DECOMPRESSED)?;
        if path.extension().is_some_and(|e| e == "gz") {
            return Ok((gunzip(&bytes, path)?, path.into()));
        }
        return Ok((bytes, path.into()));
    }
    let gz = PathBuf::from(format!("{}.gz", path.display()));
    let bytes = resnext_fs::read_at_most(&gz, MAX_DECOMPRESSED)?;
    Ok((gunzip(&bytes, &gz)?, gz))
}

/// The most bytes a gzip file may decompress to (MNIST's largest file is 47 MB): a bound
/// on the memory a small, hostile file can make the readers take.
pub const MAX_DECOMPRESSED: u64 = 1 << 30;

/// Decompresses gzip bytes, at most [`MAX_DECOMPRESSED`] of them; `path` labels errors.
pub fn gunzip(bytes: &[u8], path: &Path) -> Result<Vec<u8>, DataError> {
    gunzip_at_most(bytes, path, MAX_DECOMPRESSED)
}

/// Decompresses gzip bytes, refusing output beyond `limit` bytes.
pub fn gunzip_at_most(bytes: &[u8], path: &Path, limit: u64) -> Result<Vec<u8>, DataError> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .take(limit + 1)
        .read_to_end(&mut out)
        .map_err(|e| DataError::Format {
            path: path.into(),
            msg: format!("corrupt gzip data: {e}"),
        })?;
    if out.len() as u64 > limit {
        return Err(DataError::Format {
            path: path.into(),
            msg: format!("decompresses to more than {limit} bytes, the limit for one file"),
        });
    }
    Ok(out)
}

/// The members of a `.tar.gz` whose names end with one of `suffixes`, as `(name, bytes)`.
pub fn tar_gz_members(path: &Path, suffixes: &[&str]) -> Result<Vec<(String, Vec<u8>)>, DataError> {
    let file = std::fs::File::open(path).map_err(|e| read_err(path, e))?;
    let bad = |e: std::io::Error| DataError::Format {
        path: path.into(),
        msg: format!("corrupt .tar.gz archive: {e}"),
    };
    let mut archive =
        tar::Archive::new(flate2::read::GzDecoder::new(std::io::BufReader::new(file)));
    let mut out = Vec::new();
    for entry in archive.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        let name = entry.path().map_err(bad)?.to_string_lossy().into_owned();
        if suffixes.iter().any(|s| name.ends_with(s)) {
            let mut bytes = Vec::new();
            (&mut entry)
                .take(MAX_DECOMPRESSED + 1)
                .read_to_end(&mut bytes)
                .map_err(bad)?;
            if bytes.len() as u64 > MAX_DECOMPRESSED {
                return Err(DataError::Format {
                    path: path.into(),
                    msg: format!(
                        "member `{name}` is larger than {MAX_DECOMPRESSED} bytes, the limit for one file"
                    ),
                });
            }
            out.push((name, bytes));
        }
    }
    Ok(out)
}
