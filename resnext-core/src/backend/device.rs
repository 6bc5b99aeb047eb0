//! Which device computes, as a user names it (`cpu`, `cuda`, `cuda:N`), and the errors of
//! opening a GPU. Compiled with or without the `cuda` feature, so a program can parse
//! `--device cuda` either way and say precisely why it cannot run there.

use std::fmt;
use std::str::FromStr;

/// A device named on the command line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceSpec {
    /// The CPU (every core rayon is given).
    #[default]
    Cpu,
    /// The CUDA GPU with this index (`cuda` is `cuda:0`).
    Cuda(usize),
}

impl DeviceSpec {
    /// Whether this names a GPU.
    pub fn is_cuda(self) -> bool {
        matches!(self, DeviceSpec::Cuda(_))
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// The largest GPU index accepted (CUDA numbers a machine's GPUs from 0).
pub const MAX_GPU_INDEX: usize = 1023;

impl FromStr for DeviceSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "device `{s}`: expected `cpu`, `cuda` or `cuda:N` with N a GPU index from 0 to {MAX_GPU_INDEX}"
            )
        };
        match s.trim().to_ascii_lowercase().as_str() {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" | "gpu" => Ok(DeviceSpec::Cuda(0)),
            other => {
                let index = other.strip_prefix("cuda:").ok_or_else(bad)?;
                match index.parse::<usize>() {
                    Ok(i) if i <= MAX_GPU_INDEX => Ok(DeviceSpec::Cuda(i)),
                    _ => Err(bad()),
                }
            }
        }
    }
}

/// The number format of a GPU's computation (`--precision`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    /// float32 throughout, convolutions without TF32 rounding: the CPU's numbers.
    #[default]
    Fp32,
    /// Mixed precision: activations and their gradients in bfloat16 and tensor-core
    /// convolutions (accumulating in float32); weights, their gradients, the optimiser
    /// and the batch-norm statistics in float32.
    Bf16,
}

impl Precision {
    /// Bytes an activation value takes.
    pub fn act_bytes(self) -> usize {
        match self {
            Precision::Fp32 => 4,
            Precision::Bf16 => 2,
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
        })
    }
}

impl FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "fp32" | "f32" | "float32" => Ok(Precision::Fp32),
            "bf16" | "bfloat16" => Ok(Precision::Bf16),
            _ => Err(format!("precision `{s}`: expected `fp32` or `bf16`")),
        }
    }
}

/// Why a GPU could not be opened or could not run an operation. Every message says what
/// to do about it.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// The binary was built without the `cuda` feature.
    #[error(
        "this build has no CUDA support: rebuild it with `--features cuda` (`cargo build --release -p resnext-train --features cuda`, or `-p resnext-bench` for the benchmarks) or run with --device cpu"
    )]
    NotBuilt,
    /// `libcuda.so` (the NVIDIA driver's library) could not be loaded.
    #[error(
        "no CUDA driver found (libcuda.so could not be loaded): install the NVIDIA driver, or run with --device cpu"
    )]
    NoDriver,
    /// The driver is there but reports no GPU with the index asked for.
    #[error("no CUDA GPU with index {index}: the driver reports {count} GPU(s){}", if *.count > 0 { format!(", indices 0 to {}", .count - 1) } else { String::new() })]
    NoDevice {
        /// The index asked for.
        index: usize,
        /// How many GPUs the driver reports.
        count: usize,
    },
    /// A CUDA library the backend loads at run time is missing.
    #[error("{lib} not found (looked for {names}): put the folder holding it on LD_LIBRARY_PATH")]
    MissingLibrary {
        /// The library (`cuDNN`, `cuBLAS`, `NVRTC`).
        lib: &'static str,
        /// The file names that were tried.
        names: String,
    },
    /// The GPU has no room for an allocation, even after the cached blocks were freed.
    #[error("the GPU ran out of memory allocating {} for {what}", human_bytes(*.bytes))]
    OutOfMemory {
        /// What the memory was for.
        what: String,
        /// The size of the allocation that failed.
        bytes: usize,
    },
    /// NVRTC rejected the backend's own kernels.
    #[error("compiling the GPU kernels with NVRTC failed:\n{log}")]
    Compile {
        /// NVRTC's log.
        log: String,
    },
    /// A CUDA, cuDNN or cuBLAS call failed.
    #[error("{what}: {msg}")]
    Call {
        /// The operation.
        what: String,
        /// The library's error.
        msg: String,
    },
}

impl GpuError {
    /// Whether this is an out-of-memory error (a program names the batch size it tried).
    pub fn is_out_of_memory(&self) -> bool {
        matches!(self, GpuError::OutOfMemory { .. })
    }
}

/// `bytes` as KiB/MiB/GiB for messages.
pub fn human_bytes(bytes: usize) -> String {
    const UNITS: [&str; 4] = ["bytes", "KiB", "MiB", "GiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} bytes")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_parse_and_print_back() {
        for (s, d) in [
            ("cpu", DeviceSpec::Cpu),
            ("CPU", DeviceSpec::Cpu),
            ("cuda", DeviceSpec::Cuda(0)),
            ("cuda:0", DeviceSpec::Cuda(0)),
            ("cuda:3", DeviceSpec::Cuda(3)),
        ] {
            assert_eq!(s.parse::<DeviceSpec>(), Ok(d), "{s}");
            assert_eq!(d.to_string().parse::<DeviceSpec>(), Ok(d));
        }
    }

    #[test]
    fn precisions_parse_and_print_back() {
        for (s, p) in [
            ("fp32", Precision::Fp32),
            ("Float32", Precision::Fp32),
            ("bf16", Precision::Bf16),
            ("bfloat16", Precision::Bf16),
        ] {
            assert_eq!(s.parse::<Precision>(), Ok(p), "{s}");
            assert_eq!(p.to_string().parse::<Precision>(), Ok(p));
        }
        for s in ["", "fp16", "bf", "tf32"] {
            let e = s.parse::<Precision>().unwrap_err();
            assert!(
                e.contains(&format!("`{s}`")) && e.contains("bf16"),
                "{s}: {e}"
            );
        }
        assert_eq!(Precision::default(), Precision::Fp32);
    }

    #[test]
    fn a_bad_device_name_says_what_is_accepted() {
        for s in [
            "",
            "cuda:",
            "cuda:-1",
            "cuda:x",
            "cuda:1024",
            "tpu",
            "cuda0",
        ] {
            let e = s.parse::<DeviceSpec>().unwrap_err();
            assert!(
                e.contains(&format!("`{s}`")) && e.contains("cuda:N"),
                "{s}: {e}"
            );
        }
    }

    #[test]
    fn gpu_errors_say_what_to_do() {
        assert!(GpuError::NoDriver
            .to_string()
            .contains("no CUDA driver found"));
        assert!(GpuError::NotBuilt.to_string().contains("--features cuda"));
        let e = GpuError::NoDevice { index: 2, count: 2 }.to_string();
        assert!(e.contains("index 2") && e.contains("0 to 1"), "{e}");
        let e = GpuError::NoDevice { index: 0, count: 0 }.to_string();
        assert!(e.contains("0 GPU(s)") && !e.contains("indices"), "{e}");
        let e = GpuError::OutOfMemory {
            what: "a batch of 256".into(),
            bytes: 3 << 29,
        };
        assert!(e.is_out_of_memory());
        assert!(e.to_string().contains("1.5 GiB"), "{e}");
        assert_eq!(human_bytes(512), "512 bytes");
    }
}
