//! Data parallelism across GPUs: the GPU joins a process group (one process per GPU, the
//! group MPI's, say) as an NCCL communicator, and each training step then sums every
//! gradient over the group on the GPU (one NCCL group call after the backward pass, on the
//! GPU's stream) before the optimiser divides by the group's size, as DistributedDataParallel
//! averages them.

use std::ffi::c_char;

use super::gpu::{call_err, guarded, Gpu};
use super::train::Trained;
use crate::backend::device::GpuError;
use crate::dist::Collective;
use crate::error::Result;
use cudarc::nccl::{group_end, group_start, Comm, Id, ReduceOp};

/// Whether NCCL's library can be loaded.
pub fn nccl_present() -> bool {
    // SAFETY: only tries to open the library by its usual names.
    unsafe { cudarc::nccl::sys::is_culib_present() }
}

/// The bytes of an NCCL unique id as the values of an f64 sum: rank 0 gives them, the
/// others zeros, so the sum over the group is rank 0's id everywhere. A rank 0 that could
/// not make one gives -1s, which every rank reads as that failure.
pub fn id_as_values(id: Option<&[c_char; 128]>) -> Vec<f64> {
    match id {
        Some(id) => id.iter().map(|&c| c as u8 as f64).collect(),
        None => vec![-1.0; 128],
    }
}

/// The id back from the group's sum of [`id_as_values`]: none when rank 0 failed (or the
/// sum is not the bytes of one id).
pub fn id_from_values(v: &[f64]) -> Option<[c_char; 128]> {
    if v.len() != 128
        || v.iter()
            .any(|&b| !(0.0..=255.0).contains(&b) || b.fract() != 0.0)
    {
        return None;
    }
    let mut id = [0 as c_char; 128];
    for (c, &b) in id.iter_mut().zip(v) {
        *c = b as u8 as c_char;
    }
    Some(id)
}

impl Gpu {
    /// Joins `group` (this process is its rank `group.rank()`, every other rank one process
    /// on its own GPU) as an NCCL communicator: from then on each training step on this
    /// GPU averages its gradients over the group. Every rank must call it, in the same
    /// order relative to the group's other collectives.
    pub fn join_group(&self, group: &dyn Collective) -> Result<(), GpuError> {
        let (rank, world) = (group.rank(), group.world());
        let present = nccl_present();
        // every rank takes part in the sum, even one that will fail, so none waits for ever
        let id = if rank == 0 && present {
            guarded("making an NCCL id", || {
                Id::new().map_err(call_err("making an NCCL id"))
            })
            .ok()
        } else {
            None
        };
        let mut values = if rank == 0 {
            id_as_values(id.as_ref().map(|i| i.internal()))
        } else {
            vec![0.0; 128]
        };
        group.all_reduce_f64(&mut values);
        if !present {
            return Err(GpuError::MissingLibrary {
                lib: "NCCL",
                names: "libnccl.so, libnccl.so.2 (link it as libnccl.so)".into(),
            });
        }
        let Some(internal) = id_from_values(&values) else {
            return Err(GpuError::Call {
                what: "joining the GPUs' group".into(),
                msg: "rank 0 could not make an NCCL id".into(),
            });
        };
        let stream = self.inner.stream.clone();
        let comm = guarded("creating the NCCL communicator", || {
            Comm::from_rank(stream, rank, world, Id::uninit(internal))
                .map_err(call_err("creating the NCCL communicator"))
        })?;
        *self.inner.group.borrow_mut() = Some(comm);
        Ok(())
    }

    /// The number of processes whose gradients this GPU averages: 1 outside a group.
    pub fn group_world(&self) -> usize {
        self.inner
            .group
            .borrow()
            .as_ref()
            .map_or(1, Comm::world_size)
    }

    /// Sums over the group the gradients of `params` (every rank lists the same ones in the
    /// same order: [`Gpu::trained`]): the group's size, 1 outside a group.
    pub(super) fn sum_gradients(&self, params: &[Trained]) -> Result<usize> {
        let group = self.inner.group.borrow();
        // a group of one sums too: it is how a single GPU checks this path
        let Some(comm) = group.as_ref() else {
            return Ok(1);
        };
        let mut grads: Vec<_> = params.iter().map(|t| t.p.grad().borrow_mut()).collect();
        let err = call_err("summing the gradients over the GPUs (NCCL)");
        group_start().map_err(&err)?;
        let mut sent = Ok(());
        for g in grads.iter_mut() {
            if let Err(e) = comm.all_reduce_in_place(&mut **g, &ReduceOp::Sum) {
                sent = Err(e);
                break;
            }
        }
        // the group call is closed whatever happened inside it
        let ended = group_end();
        sent.map_err(&err)?;
        ended.map_err(&err)?;
        Ok(comm.world_size())
    }
}
