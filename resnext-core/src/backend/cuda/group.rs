//! Data parallelism across GPUs: the GPU joins a process group (one process per GPU, the
//! group MPI's, say) as an NCCL communicator, and each training step then sums every
//! gradient over the group on the GPU, bucket by bucket while the backward pass goes on
//! ([`GradSync`]), before the optimiser divides by the group's size, as
//! DistributedDataParallel averages them.

use std::collections::HashMap;
use std::ffi::c_char;
use std::ops::Range;

use super::gpu::{call_err, guarded, Gpu};
use super::train::Trained;
use crate::backend::device::GpuError;
use crate::dist::Collective;
use crate::error::Result;
use cudarc::driver::DevicePtrMut;
use cudarc::nccl::{group_end, group_start, Comm, Id, NcclType, ReduceOp};

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
        // the sums run on a stream of their own, beside the backward pass
        let stream = self
            .inner
            .stream
            .fork()
            .map_err(call_err("creating the NCCL stream"))?;
        let comm = guarded("creating the NCCL communicator", || {
            Comm::from_rank(stream, rank, world, Id::uninit(internal))
                .map_err(call_err("creating the NCCL communicator"))
        })?;
        *self.inner.group.borrow_mut() = Some(comm);
        self.set_bucket_bytes(crate::dist::bucket_bytes());
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

    /// The gradient sums of one training step over the group, for `params` (every rank
    /// lists the same ones in the same order: [`Gpu::trained`]); nothing to do outside a
    /// group.
    pub(super) fn gradient_sync(&self, params: Vec<Trained>) -> GradSync<'_> {
        let sizes: Vec<_> = params.iter().map(|t| (t.p.key, t.p.len * 4)).collect();
        GradSync {
            gpu: self,
            joined: self.inner.group.borrow().is_some(),
            world: self.group_world(),
            plan: BucketPlan::new(&sizes, self.inner.bucket_bytes.get()),
            params,
        }
    }

    /// Makes training-mode batch norms use the whole group's batch (as `--sync-bn` on the
    /// CPU and torch's SyncBatchNorm; every GPU's batch of the same size): the channel
    /// sums of the statistics and of their backward are summed over the group. An error
    /// before [`Gpu::join_group`].
    pub fn set_sync_bn(&self, on: bool) -> Result<(), GpuError> {
        if on && self.inner.group.borrow().is_none() {
            return Err(GpuError::Call {
                what: "synchronised batch norm".into(),
                msg: "the GPU has not joined a group (Gpu::join_group)".into(),
            });
        }
        self.inner.sync_bn.set(on);
        Ok(())
    }

    /// Whether training-mode batch norms use the whole group's batch.
    pub(super) fn syncs_bn(&self) -> bool {
        self.inner.sync_bn.get()
    }

    /// Sums `buf` over the group in place, on the group's stream (the GPU's stream waits
    /// for it through the buffer's events before it reads `buf` again).
    pub(super) fn group_sum<T: NcclType>(&self, buf: &mut impl DevicePtrMut<T>) -> Result<()> {
        let group = self.inner.group.borrow();
        let Some(comm) = group.as_ref() else {
            return Ok(());
        };
        comm.all_reduce_in_place(buf, &ReduceOp::Sum)
            .map(drop)
            .map_err(call_err(
                "summing batch-norm statistics over the GPUs (NCCL)",
            ))?;
        Ok(())
    }

    /// The size of the gradient buckets summed over a group of GPUs, in bytes (0: one
    /// bucket, summed after the backward pass). [`Gpu::join_group`] sets the group's
    /// ([`GroupConfig::bucket_bytes`](crate::dist::GroupConfig::bucket_bytes)).
    pub fn set_bucket_bytes(&self, bytes: usize) {
        self.inner.bucket_bytes.set(bytes);
    }
}

/// Which gradients go in which bucket, and which buckets the backward pass has completed:
/// DDP's buckets, filled from the last parameter back (the order the backward pass
/// writes them) up to the cap, and handed out in order, so every rank sums the same
/// buckets in the same order whatever order the gradients come in.
#[derive(Debug)]
pub struct BucketPlan {
    /// Indices into the parameters, by bucket.
    buckets: Vec<Vec<usize>>,
    /// The bucket of each parameter not written yet, by key.
    of: HashMap<usize, usize>,
    /// Gradients each bucket still waits for.
    pending: Vec<usize>,
    /// The first bucket not handed out.
    next: usize,
}

impl BucketPlan {
    /// Buckets for parameters of `(key, bytes)`, in the model's order: a bucket is closed
    /// once it holds `cap` bytes or more (0: one bucket).
    pub fn new(params: &[(usize, usize)], cap: usize) -> Self {
        let mut buckets: Vec<Vec<usize>> = Vec::new();
        let mut bytes = 0;
        for (i, &(_, size)) in params.iter().enumerate().rev() {
            if buckets.is_empty() || (cap > 0 && bytes >= cap) {
                buckets.push(Vec::new());
                bytes = 0;
            }
            buckets.last_mut().expect("a bucket").push(i);
            bytes += size;
        }
        let of = buckets
            .iter()
            .enumerate()
            .flat_map(|(b, m)| m.iter().map(move |&i| (params[i].0, b)))
            .collect();
        let pending = buckets.iter().map(Vec::len).collect();
        Self {
            buckets,
            of,
            pending,
            next: 0,
        }
    }

    /// The buckets: indices into the parameters.
    pub fn buckets(&self) -> &[Vec<usize>] {
        &self.buckets
    }

    /// The gradients of the parameters with these keys are written (a key seen before,
    /// or of no parameter, counts for nothing): the buckets now complete, in order.
    pub fn written(&mut self, keys: &[usize]) -> Range<usize> {
        for k in keys {
            if let Some(b) = self.of.remove(k) {
                self.pending[b] -= 1;
            }
        }
        let first = self.next;
        while self.next < self.buckets.len() && self.pending[self.next] == 0 {
            self.next += 1;
        }
        first..self.next
    }

    /// Every bucket not handed out yet, in order (the backward pass is over).
    pub fn rest(&mut self) -> Range<usize> {
        let first = self.next;
        self.next = self.buckets.len();
        first..self.next
    }
}

/// One training step's gradient sums over the GPUs' group, by the buckets of a
/// [`BucketPlan`]: each bucket's NCCL sum is queued on the group's own stream as soon as
/// the backward pass has written every gradient in it, so it runs while the GPU's stream
/// goes on with the backward pass. (cudarc's event tracking orders the two streams: a sum
/// waits for the kernels that wrote its gradients, the optimiser for the sum.)
pub(super) struct GradSync<'a> {
    gpu: &'a Gpu,
    joined: bool,
    world: usize,
    plan: BucketPlan,
    params: Vec<Trained>,
}

impl GradSync<'_> {
    /// The backward operation that writes the gradients of the parameters with these keys
    /// has run (or had nothing to do): sums the buckets that are now complete.
    pub(super) fn written(&mut self, keys: &[usize]) -> Result<()> {
        if self.joined {
            for b in self.plan.written(keys) {
                self.sum(b)?;
            }
        }
        Ok(())
    }

    /// Sums the buckets left (gradients the backward pass did not reach are zeros), and
    /// gives back the parameters and the group's size (1 outside a group).
    pub(super) fn finish(mut self) -> Result<(Vec<Trained>, usize)> {
        if self.joined {
            for b in self.plan.rest() {
                self.sum(b)?;
            }
        }
        Ok((self.params, self.world))
    }

    /// Queues the sum of bucket `b`: one NCCL group call.
    fn sum(&self, b: usize) -> Result<()> {
        let group = self.gpu.inner.group.borrow();
        let Some(comm) = group.as_ref() else {
            return Ok(());
        };
        let mut grads: Vec<_> = self.plan.buckets[b]
            .iter()
            .map(|&i| self.params[i].p.grad().borrow_mut())
            .collect();
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
        Ok(())
    }
}
