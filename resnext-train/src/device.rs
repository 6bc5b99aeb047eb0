//! `--device`: where a subcommand computes. The CPU always; a CUDA GPU when the program
//! was built with `--features cuda` (otherwise `--device cuda` is an error saying how to
//! build it).

use anyhow::Result;
use resnext_core::backend::device::{DeviceSpec, GpuError};
use resnext_core::model::Network;

/// An opened device.
pub enum Compute {
    /// The CPU.
    Cpu,
    /// A CUDA GPU.
    #[cfg(feature = "cuda")]
    Gpu(resnext_core::backend::cuda::Gpu),
}

impl Compute {
    /// Opens `spec`: an error (never a panic) when it names a GPU this build or this
    /// machine cannot use.
    pub fn open(spec: DeviceSpec) -> Result<Self> {
        match spec {
            DeviceSpec::Cpu => Ok(Compute::Cpu),
            DeviceSpec::Cuda(index) => Ok(open_gpu(index)?),
        }
    }

    /// What runs the work, for the program's first lines.
    pub fn describe(&self) -> String {
        match self {
            Compute::Cpu => format!("cpu ({} threads)", rayon::current_num_threads()),
            #[cfg(feature = "cuda")]
            Compute::Gpu(g) => format!("cuda:{} ({})", g.index(), g.name()),
        }
    }

    /// Eval-mode logits `(n, classes)` of an `(n, C, h, w)` batch on this device.
    pub fn forward_eval(
        &self,
        net: &dyn Network,
        x: Vec<f32>,
        shape: [usize; 4],
    ) -> resnext_core::Result<Vec<f32>> {
        match self {
            Compute::Cpu => net.forward_eval(x, shape),
            #[cfg(feature = "cuda")]
            Compute::Gpu(g) => net.forward_eval_gpu(g, &x, shape),
        }
    }
}

#[cfg(feature = "cuda")]
fn open_gpu(index: usize) -> Result<Compute, GpuError> {
    resnext_core::backend::cuda::Gpu::open(index).map(Compute::Gpu)
}

#[cfg(not(feature = "cuda"))]
fn open_gpu(_index: usize) -> Result<Compute, GpuError> {
    Err(GpuError::NotBuilt)
}

/// An error unless `spec` is the CPU, for work that has no GPU implementation yet: after
/// opening the GPU, so that a missing driver or a build without CUDA is what is reported
/// first.
pub fn cpu_only(spec: DeviceSpec, what: &'static str) -> Result<()> {
    if spec.is_cuda() {
        Compute::open(spec)?;
        return Err(GpuError::Unsupported(what).into());
    }
    Ok(())
}
