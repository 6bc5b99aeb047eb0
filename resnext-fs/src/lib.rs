//! File helpers shared by every crate of the workspace.
//!
//! Everything the programs write (weights, optimiser state, run state, `.npy` arrays,
//! downloads) goes through [`write_atomic`] or [`write_atomic_with`]: the bytes go to a
//! temporary file beside the destination, are flushed to disk, and the temporary file is
//! renamed over the destination. A crash leaves either the old file or the new one, never
//! half of one; a failed write removes its temporary file. [`read`] and [`write`] report
//! failures as a [`FileError`] that names the file.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// A file could not be read or written; names the file.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The file could not be opened or read.
    #[error("cannot read `{path}`: {error}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error (in the message, so not also given as the error's source).
        error: io::Error,
    },
    /// The file could not be written.
    #[error("cannot write `{path}`: {error}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The OS error (in the message, so not also given as the error's source).
        error: io::Error,
    },
    /// The file is larger than the reader accepts.
    #[error("`{path}` is larger than {limit} bytes, the most this reader accepts")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// The most bytes accepted.
        limit: u64,
    },
}

/// The whole contents of `path`.
pub fn read(path: &Path) -> Result<Vec<u8>, FileError> {
    std::fs::read(path).map_err(|error| FileError::Read {
        path: path.into(),
        error,
    })
}

/// The whole contents of `path`, refused when it holds more than `limit` bytes. The limit is
/// enforced while reading, so a device or pipe that never ends (`/dev/zero`, a FIFO) is
/// refused too instead of filling memory.
pub fn read_at_most(path: &Path, limit: u64) -> Result<Vec<u8>, FileError> {
    use std::io::Read;
    let read_err = |error| FileError::Read {
        path: path.into(),
        error,
    };
    let file = File::open(path).map_err(read_err)?;
    let hint = file.metadata().map(|m| m.len()).unwrap_or(0);
    if hint > limit {
        return Err(FileError::TooLarge {
            path: path.into(),
            limit,
        });
    }
    let mut bytes = Vec::with_capacity(hint as usize);
    file.take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > limit {
        return Err(FileError::TooLarge {
            path: path.into(),
            limit,
        });
    }
    Ok(bytes)
}

/// Writes `bytes` to `path` atomically ([`write_atomic`]).
pub fn write(path: &Path, bytes: &[u8]) -> Result<(), FileError> {
    write_atomic(path, bytes).map_err(|error| FileError::Write {
        path: path.into(),
        error,
    })
}

/// The temporary file [`write_atomic_with`] writes before renaming it to `path`: a hidden
/// file in the same folder (so the rename stays on one file system), named after `path`
/// and this process.
pub fn temp_path(path: &Path) -> PathBuf {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dir.join(format!(".{name}.tmp-{}", std::process::id()))
}

/// Writes `bytes` to `path` atomically (see the crate docs).
///
/// ```
/// let dir = std::env::temp_dir().join(format!("resnext-fs-doc-{}", std::process::id()));
/// std::fs::create_dir_all(&dir)?;
/// let path = dir.join("state.json");
/// resnext_fs::write_atomic(&path, b"{}")?;
/// assert_eq!(std::fs::read(&path)?, b"{}");
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok::<(), std::io::Error>(())
/// ```
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_atomic_with(path, |f| f.write_all(bytes))
}

/// Writes `path` atomically with `fill`, which streams the contents into the temporary
/// file; the rename happens only when `fill` succeeds. `E` is the caller's error type, so
/// `fill` can refuse the contents (a checksum mismatch) as well as fail to write them.
pub fn write_atomic_with<E: From<io::Error>>(
    path: &Path,
    fill: impl FnOnce(&mut File) -> Result<(), E>,
) -> Result<(), E> {
    let tmp = temp_path(path);
    let result = (|| {
        let mut f = File::create(&tmp)?;
        fill(&mut f)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("resnext-fs-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Writes `path` (holding "old") with `fill`; returns whether it succeeded and what
    /// `path` then holds, and checks that no temporary file is left.
    fn replace_old(name: &str, fill: impl FnOnce(&mut File) -> io::Result<()>) -> (bool, Vec<u8>) {
        let dir = scratch(name);
        let path = dir.join("a.bin");
        std::fs::write(&path, b"old").unwrap();
        let ok = write_atomic_with(&path, fill).is_ok();
        let now = std::fs::read(&path).unwrap();
        assert!(!temp_path(&path).exists(), "temporary file left behind");
        std::fs::remove_dir_all(&dir).unwrap();
        (ok, now)
    }

    #[test]
    fn write_atomic_replaces_the_file_and_leaves_no_temporary() {
        assert_eq!(
            replace_old("replace", |f| f.write_all(b"new")),
            (true, b"new".to_vec())
        );
    }

    #[test]
    fn a_refused_fill_keeps_the_old_file_and_removes_the_temporary() {
        let refuse = |f: &mut File| {
            f.write_all(b"half")?;
            Err(io::Error::other("checksum mismatch"))
        };
        assert_eq!(replace_old("refuse", refuse), (false, b"old".to_vec()));
    }

    #[test]
    fn errors_name_the_file() {
        let dir = scratch("missing");
        let path = dir.join("no/such/folder/a.bin");
        let w = write(&path, b"x").unwrap_err().to_string();
        assert!(
            w.starts_with("cannot write `") && w.contains("no/such/folder/a.bin"),
            "{w}"
        );
        let r = read(&path).unwrap_err().to_string();
        assert!(
            r.starts_with("cannot read `") && r.contains("no/such/folder/a.bin"),
            "{r}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn read_at_most_refuses_files_and_endless_devices_past_the_limit() {
        let dir = scratch("at-most");
        let path = dir.join("a.bin");
        std::fs::write(&path, b"12345").unwrap();
        assert_eq!(read_at_most(&path, 5).unwrap(), b"12345");
        let e = read_at_most(&path, 4).unwrap_err().to_string();
        assert!(
            e.contains("a.bin") && e.contains("larger than 4 bytes"),
            "{e}"
        );
        // a device that never ends: its length says 0, the read stops at the limit
        let zero = Path::new("/dev/zero");
        if zero.exists() {
            let e = read_at_most(zero, 1000).unwrap_err().to_string();
            assert!(
                e.contains("/dev/zero") && e.contains("larger than 1000"),
                "{e}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
