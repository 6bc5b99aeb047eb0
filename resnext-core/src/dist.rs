//! Data-parallel training: the collective operations a group of processes offers
//! ([`Collective`]), and what training does with them when one is installed
//! ([`install`]): gradients averaged over the group before each update
//! ([`average_gradients`]), and, with synchronised batch norm, batch statistics and their
//! gradient sums taken over the whole group's batch.
//!
//! The group is process-wide, as `torch.distributed`'s default group is: a program
//! installs it once at start (MPI on CPUs; NCCL would implement the same trait on GPUs).
//! Nothing changes for a program that installs none.

use std::sync::{Arc, OnceLock};

use dfdx::prelude::*;

use crate::error::Result;
use crate::optim::OptimConfig;
use crate::params::{ParamKind, ParamVisitorMut, Params};

/// The collective operations of a fixed group of processes. Every process of the group
/// must make the same calls in the same order with buffers of the same length.
pub trait Collective: Send + Sync {
    /// This process's index in the group, from 0.
    fn rank(&self) -> usize;
    /// The number of processes.
    fn world(&self) -> usize;
    /// Element-wise sum over the group, in place.
    fn all_reduce_f32(&self, buf: &mut [f32]);
    /// Element-wise sum over the group, in place.
    fn all_reduce_f64(&self, buf: &mut [f64]);
    /// Every process's `local` (the same length everywhere), concatenated in rank order.
    fn all_gather_f64(&self, local: &[f64]) -> Vec<f64>;
}

struct Group {
    comm: Arc<dyn Collective>,
    sync_bn: bool,
}

static GROUP: OnceLock<Group> = OnceLock::new();

/// Installs the process group for the rest of the process; `sync_bn` makes training-mode
/// batch norms use the whole group's batch. Returns false (and changes nothing) when one
/// is installed already.
pub fn install(comm: Arc<dyn Collective>, sync_bn: bool) -> bool {
    GROUP.set(Group { comm, sync_bn }).is_ok()
}

/// The installed group, if any.
pub fn group() -> Option<&'static Arc<dyn Collective>> {
    GROUP.get().map(|g| &g.comm)
}

/// The group when batch norm is synchronised over it and it has more than one process.
pub(crate) fn bn_group() -> Option<&'static Arc<dyn Collective>> {
    GROUP
        .get()
        .filter(|g| g.sync_bn && g.comm.world() > 1)
        .map(|g| &g.comm)
}

/// Averages the gradients of `model`'s trainable tensors (those `cfg` does not freeze)
/// over the group: one all-reduce of one flat buffer, then division by the group size.
/// Without synchronised batch norm the same all-reduce also gives every process rank 0's
/// buffers (running statistics), as DistributedDataParallel broadcasts them, so the
/// processes evaluate and save the same model. Does nothing without a group of two or more.
pub fn average_gradients<M: Params>(
    model: &mut M,
    grads: &mut Gradients<f32, Cpu>,
    cfg: &OptimConfig,
) -> Result<()> {
    let Some(comm) = group().filter(|c| c.world() > 1) else {
        return Ok(());
    };
    let buffers = bn_group().is_none();
    let leader = comm.rank() == 0;
    let mut flat = Vec::new();
    let mut v = Flatten {
        cfg,
        grads,
        flat: &mut flat,
        back: false,
        at: 0,
        buffers,
        leader,
        scale: 1.0,
    };
    model.visit_params_mut("", &mut v)?;
    {
        let _t = crate::profile::scope(crate::profile::Label::AllReduce);
        comm.all_reduce_f32(&mut flat);
    }
    let mut v = Flatten {
        cfg,
        grads,
        flat: &mut flat,
        back: true,
        at: 0,
        buffers,
        leader,
        scale: 1.0 / comm.world() as f32,
    };
    model.visit_params_mut("", &mut v)
}

/// Copies the trainable gradients (and, with `buffers`, the buffers: rank 0's values,
/// zeros elsewhere, so the sum is rank 0's) into `flat` (`back == false`) or back out of
/// it, the gradients times `scale`.
struct Flatten<'a> {
    cfg: &'a OptimConfig,
    grads: &'a mut Gradients<f32, Cpu>,
    flat: &'a mut Vec<f32>,
    back: bool,
    at: usize,
    buffers: bool,
    leader: bool,
    scale: f32,
}

impl ParamVisitorMut for Flatten<'_> {
    type Error = crate::Error;
    fn tensor<S: Shape>(
        &mut self,
        name: &str,
        t: &mut Tensor<S, f32, Cpu>,
        kind: ParamKind,
    ) -> Result<()> {
        if kind == ParamKind::Buffer {
            if !self.buffers {
                return Ok(());
            }
            let n = t.shape().num_elements();
            if self.back {
                t.copy_from(&self.flat[self.at..self.at + n]);
                self.at += n;
            } else if self.leader {
                self.flat.extend(t.as_vec());
            } else {
                self.flat.extend(std::iter::repeat_n(0.0, n));
            }
            return Ok(());
        }
        if !self.cfg.updates(name, kind) {
            return Ok(());
        }
        let g = self.grads.get_or_alloc_mut(t)?;
        if self.back {
            let n = g.len();
            for (d, s) in g.iter_mut().zip(&self.flat[self.at..self.at + n]) {
                *d = s * self.scale;
            }
            self.at += n;
        } else {
            self.flat.extend_from_slice(g);
        }
        Ok(())
    }
}

/// A group of one process that records nothing: for tests of code written against
/// [`Collective`], and what a single process is.
#[derive(Clone, Copy, Debug, Default)]
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn all_reduce_f32(&self, _: &mut [f32]) {}
    fn all_reduce_f64(&self, _: &mut [f64]) {}
    fn all_gather_f64(&self, local: &[f64]) -> Vec<f64> {
        local.to_vec()
    }
}
