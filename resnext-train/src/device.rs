//! `--device`: where a subcommand computes. The CPU always; a CUDA GPU when the program
//! was built with `--features cuda` (otherwise `--device cuda` is an error saying how to
//! build it).

use anyhow::Result;
use resnext_core::backend::device::{DeviceSpec, GpuError, Precision};
use resnext_core::model::{Network, TrainOutput};
use resnext_core::ops::Targets;
use resnext_core::optim::Optimizer;

/// An opened device.
pub enum Compute {
    /// The CPU.
    Cpu,
    /// A CUDA GPU.
    #[cfg(feature = "cuda")]
    Gpu(resnext_core::backend::cuda::Gpu),
}

impl Compute {
    /// Opens `spec` to compute in `precision`: an error (never a panic) when it names a
    /// GPU this build or this machine cannot use, or mixed precision on the CPU.
    pub fn open(spec: DeviceSpec, precision: Precision) -> Result<Self> {
        match spec {
            DeviceSpec::Cpu if precision != Precision::Fp32 => Err(anyhow::anyhow!(
                "--precision {precision} runs on a GPU only (--device cuda); the CPU computes in fp32"
            )),
            DeviceSpec::Cpu => Ok(Compute::Cpu),
            DeviceSpec::Cuda(index) => Ok(open_gpu(index, precision)?),
        }
    }

    /// What runs the work, for the program's first lines.
    pub fn describe(&self) -> String {
        match self {
            Compute::Cpu => format!("cpu ({} threads)", rayon::current_num_threads()),
            #[cfg(feature = "cuda")]
            Compute::Gpu(g) => format!("cuda:{} ({}, {})", g.index(), g.name(), g.precision()),
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

    /// Opens `spec` for this process of the group: in a group of several, `cuda:N` is the
    /// GPU `N` + this process's [local rank](crate::dist::local_rank) (one process per
    /// GPU), and a GPU joins the group as an NCCL communicator, so each training step
    /// averages its gradients over the GPUs (and, with `sync_bn`, its batch norms use the
    /// whole group's batch).
    pub fn open_in_group(spec: DeviceSpec, precision: Precision, sync_bn: bool) -> Result<Self> {
        let (_, world) = crate::dist::rank_world();
        let spec = match spec {
            DeviceSpec::Cuda(i) if world > 1 => DeviceSpec::Cuda(i + crate::dist::local_rank()),
            s => s,
        };
        let c = Self::open(spec, precision)?;
        if world > 1 && c.is_gpu() {
            c.join_group(sync_bn)?;
        }
        Ok(c)
    }

    /// Joins the installed process group as an NCCL communicator (a GPU), with
    /// synchronised batch norm when `sync_bn`; nothing otherwise.
    fn join_group(&self, sync_bn: bool) -> Result<()> {
        match self {
            Compute::Cpu => {
                let _ = sync_bn;
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Compute::Gpu(g) => match resnext_core::dist::group() {
                Some(c) => {
                    g.join_group(c.as_ref())?;
                    Ok(g.set_sync_bn(sync_bn)?)
                }
                None => Ok(()),
            },
        }
    }

    /// Whether this is a GPU.
    pub fn is_gpu(&self) -> bool {
        !matches!(self, Compute::Cpu)
    }

    /// One training step of `net` on an `(n, C, h, w)` batch on this device. On a GPU the
    /// weights and the optimiser state stay there between steps: [`Compute::sync`] copies
    /// them back.
    pub fn train_step(
        &self,
        net: &mut dyn Network,
        x: Vec<f32>,
        shape: [usize; 4],
        targets: Targets<'_>,
        opt: &mut Optimizer,
    ) -> resnext_core::Result<TrainOutput> {
        match self {
            Compute::Cpu => net.train_step_on(x, shape, targets, opt),
            #[cfg(feature = "cuda")]
            Compute::Gpu(g) => net.train_step_gpu(g, &x, shape, targets, opt),
        }
    }

    /// Copies what training on this device changed (weights, running statistics, and
    /// `opt`'s state when given) into `net`, before it is saved, averaged or evaluated:
    /// nothing to do on the CPU.
    pub fn sync(
        &self,
        net: &mut dyn Network,
        opt: Option<&mut Optimizer>,
    ) -> resnext_core::Result<()> {
        match self {
            Compute::Cpu => {
                let _ = (net, opt);
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Compute::Gpu(g) => net.sync_from_gpu(g, opt),
        }
    }
}

#[cfg(feature = "cuda")]
fn open_gpu(index: usize, precision: Precision) -> Result<Compute, GpuError> {
    resnext_core::backend::cuda::Gpu::open_with(index, precision).map(Compute::Gpu)
}

#[cfg(not(feature = "cuda"))]
fn open_gpu(_index: usize, _precision: Precision) -> Result<Compute, GpuError> {
    Err(GpuError::NotBuilt)
}
