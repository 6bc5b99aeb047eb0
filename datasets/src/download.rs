//! `--download`: fetch a dataset's published files, check them against the published MD5
//! sums, and write them atomically (temporary file, then rename), so an interrupted
//! download never leaves a half file that later reads as data.

use std::io::{Read, Write};
use std::path::Path;

use md5::{Digest, Md5};

use crate::DataError;

/// One published file.
#[derive(Clone, Copy, Debug)]
pub struct Remote {
    /// File name, also the name under `--data-dir`.
    pub file: &'static str,
    /// Published MD5 (hex).
    pub md5: &'static str,
    /// An upper bound on the file's size (the published size, rounded up): a server that
    /// sends more is cut off there instead of filling the disk.
    pub max_bytes: u64,
}

/// A server that sends nothing for this long ends the download with an error.
pub const READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// CIFAR-10 (<https://www.cs.toronto.edu/~kriz/cifar.html>).
pub const CIFAR10: (&str, &[Remote]) = (
    "https://www.cs.toronto.edu/~kriz/",
    &[Remote {
        file: "cifar-10-binary.tar.gz",
        md5: "c32a1d4ab5d03f1284b67883e8d87530",
        max_bytes: 200 << 20,
    }],
);
/// CIFAR-100.
pub const CIFAR100: (&str, &[Remote]) = (
    "https://www.cs.toronto.edu/~kriz/",
    &[Remote {
        file: "cifar-100-binary.tar.gz",
        md5: "03b5dce01913d631647c71ecec9e9cb8",
        max_bytes: 200 << 20,
    }],
);
/// MNIST (the mirror torchvision uses).
pub const MNIST: (&str, &[Remote]) = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    &[
        Remote {
            file: "train-images-idx3-ubyte.gz",
            md5: "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            max_bytes: 32 << 20,
        },
        Remote {
            file: "train-labels-idx1-ubyte.gz",
            md5: "d53e105ee54ea40749a09fcbcd1e9432",
            max_bytes: 1 << 20,
        },
        Remote {
            file: "t10k-images-idx3-ubyte.gz",
            md5: "9fb629c4189551a2d022fa330f9573f3",
            max_bytes: 32 << 20,
        },
        Remote {
            file: "t10k-labels-idx1-ubyte.gz",
            md5: "ec29112dd5afa0611ce80d1b7f02629c",
            max_bytes: 1 << 20,
        },
    ],
);
/// Fashion-MNIST.
pub const FASHION_MNIST: (&str, &[Remote]) = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    &[
        Remote {
            file: "train-images-idx3-ubyte.gz",
            md5: "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            max_bytes: 32 << 20,
        },
        Remote {
            file: "train-labels-idx1-ubyte.gz",
            md5: "25c81989df183df01b3e8a0aad5dffbe",
            max_bytes: 1 << 20,
        },
        Remote {
            file: "t10k-images-idx3-ubyte.gz",
            md5: "bef4ecab320f06d8554ea6380940ec79",
            max_bytes: 32 << 20,
        },
        Remote {
            file: "t10k-labels-idx1-ubyte.gz",
            md5: "bb300cfdad3c16e7a12a480ee83cd310",
            max_bytes: 1 << 20,
        },
    ],
);

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// MD5 of a file, hex.
pub fn md5_file(path: &Path) -> Result<String, DataError> {
    let mut f = std::fs::File::open(path).map_err(|error| DataError::Read {
        path: path.into(),
        error,
    })?;
    let mut h = Md5::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).map_err(|error| DataError::Read {
            path: path.into(),
            error,
        })?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

/// Downloads every file that is missing (or whose checksum is wrong) from `base` into `dir`.
/// Returns how many files were fetched.
pub fn fetch_all(base: &str, files: &[Remote], dir: &Path) -> Result<usize, DataError> {
    std::fs::create_dir_all(dir).map_err(|error| DataError::Read {
        path: dir.into(),
        error,
    })?;
    let mut fetched = 0;
    for r in files {
        let dest = dir.join(r.file);
        let plausible = dest
            .metadata()
            .is_ok_and(|m| m.is_file() && m.len() <= r.max_bytes);
        if plausible && md5_file(&dest)? == r.md5 {
            continue;
        }
        fetch(&format!("{base}{}", r.file), r.md5, r.max_bytes, &dest)?;
        fetched += 1;
    }
    Ok(fetched)
}

/// Downloads `url` (at most `max_bytes` of it) to `dest` atomically and checks its MD5.
pub fn fetch(url: &str, md5: &str, max_bytes: u64, dest: &Path) -> Result<(), DataError> {
    let fail = |msg: String| DataError::Format {
        path: dest.into(),
        msg,
    };
    let agent = ureq::AgentBuilder::new()
        .timeout_connect(std::time::Duration::from_secs(30))
        .timeout_read(READ_TIMEOUT)
        .build();
    let resp = agent
        .get(url)
        .call()
        .map_err(|e| fail(format!("download from {url} failed: {e}")))?;
    let too_long = || {
        fail(format!(
            "download from {url} is longer than {max_bytes} bytes, more than the file can be"
        ))
    };
    if resp
        .header("Content-Length")
        .and_then(|l| l.parse::<u64>().ok())
        .is_some_and(|l| l > max_bytes)
    {
        return Err(too_long());
    }
    // what stops a download: the disk (an I/O error) or the bytes (a broken transfer,
    // a checksum mismatch)
    enum Stop {
        Io(std::io::Error),
        Bad(DataError),
    }
    impl From<std::io::Error> for Stop {
        fn from(e: std::io::Error) -> Self {
            Stop::Io(e)
        }
    }
    let mut reader = resp.into_reader();
    resnext_fs::write_atomic_with(dest, |out| {
        let mut h = Md5::new();
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0u64;
        loop {
            let n = reader
                .read(&mut buf)
                .map_err(|e| Stop::Bad(fail(format!("download from {url} broke off: {e}"))))?;
            if n == 0 {
                break;
            }
            total += n as u64;
            if total > max_bytes {
                return Err(Stop::Bad(too_long()));
            }
            h.update(&buf[..n]);
            out.write_all(&buf[..n])?;
        }
        let got = hex(&h.finalize());
        if got != md5 {
            return Err(Stop::Bad(fail(format!(
                "checksum mismatch for {url}: MD5 {got}, published {md5}"
            ))));
        }
        Ok(())
    })
    .map_err(|stop| match stop {
        Stop::Io(error) => DataError::Read {
            path: dest.into(),
            error,
        },
        Stop::Bad(e) => e,
    })
}
