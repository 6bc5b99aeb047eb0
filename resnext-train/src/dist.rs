//! The process group of a data-parallel run: this process's rank and the group size, and
//! (with the `mpi` feature) the MPI implementation of [`resnext_core::dist::Collective`].
//! A build without the feature, or a run not started by `mpirun`, is a group of one.

use resnext_core::dist;

/// This process's rank and the group size (0 of 1 without a group).
pub fn rank_world() -> (usize, usize) {
    dist::group().map_or((0, 1), |g| (g.rank(), g.world()))
}

/// This process's index among the group's processes on this machine: what MPI launchers
/// set (Open MPI's `OMPI_COMM_WORLD_LOCAL_RANK`, MPICH's `MPI_LOCALRANKID`, Slurm's
/// `SLURM_LOCALID`), else the rank (every process on one machine).
pub fn local_rank() -> usize {
    [
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "MPI_LOCALRANKID",
        "SLURM_LOCALID",
    ]
    .iter()
    .find_map(|v| std::env::var(v).ok()?.trim().parse().ok())
    .unwrap_or(rank_world().0)
}

/// `--bucket-mb` (MiB, 0 to 1024) in bytes; out of range is an error naming the flag.
pub fn bucket_bytes(mb: f32) -> anyhow::Result<usize> {
    if !(0.0..=1024.0).contains(&mb) {
        anyhow::bail!("--bucket-mb {mb} is out of range: 0 to 1024");
    }
    Ok((f64::from(mb) * f64::from(1u32 << 20)) as usize)
}

/// Whether this process writes the run folder and prints progress: rank 0.
pub fn is_leader() -> bool {
    rank_world().0 == 0
}

/// Sums `buf` over the group (nothing for a group of one).
pub fn sum_f64(buf: &mut [f64]) {
    if let Some(g) = dist::group().filter(|g| g.world() > 1) {
        g.all_reduce_f64(buf);
    }
}

/// Whether any process of the group has `flag` set: every process gets the same answer,
/// so they all stop at the same step.
pub fn any(flag: bool) -> bool {
    let mut v = [f64::from(u8::from(flag))];
    sum_f64(&mut v);
    v[0] > 0.0
}

/// Ends every process of the group after an error on this one (a return would leave the
/// others waiting in a collective for ever).
pub fn abort_group(code: i32) {
    #[cfg(feature = "mpi")]
    if rank_world().1 > 1 {
        mpi_group::abort(code);
    }
    let _ = code;
}

#[cfg(feature = "mpi")]
pub mod mpi_group {
    //! MPI (`mpirun -np N`): the group is `MPI_COMM_WORLD`.

    use std::sync::{Arc, Mutex, MutexGuard};

    use mpi::collective::SystemOperation;
    use mpi::request::{Request, StaticScope};
    use mpi::topology::SimpleCommunicator;
    use mpi::traits::*;
    use resnext_core::dist::Reduction;

    /// `MPI_COMM_WORLD`, and a duplicate of it for the gradient buckets' sums: those run
    /// while the backward pass makes blocking calls (synchronised batch norm) on the
    /// first, and collectives on two communicators need no common order.
    struct Comms {
        world: SimpleCommunicator,
        grads: SimpleCommunicator,
    }

    // SAFETY: the communicators are handles valid on any thread; every use goes through
    // the mutex around them, as MPI_THREAD_SERIALIZED requires.
    unsafe impl Send for Comms {}

    /// The communicators behind a lock: MPI is initialised with `MPI_THREAD_SERIALIZED`,
    /// so one thread at a time may call it.
    type Shared = Arc<Mutex<Comms>>;

    fn lock(c: &Shared) -> MutexGuard<'_, Comms> {
        c.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The MPI job's processes (`MPI_COMM_WORLD`).
    pub struct MpiGroup {
        comms: Shared,
        rank: usize,
        world: usize,
    }

    impl resnext_core::dist::Collective for MpiGroup {
        fn rank(&self) -> usize {
            self.rank
        }
        fn world(&self) -> usize {
            self.world
        }
        fn all_reduce_f32(&self, buf: &mut [f32]) {
            let send = buf.to_vec();
            lock(&self.comms)
                .world
                .all_reduce_into(&send[..], buf, SystemOperation::sum());
        }
        fn all_reduce_f64(&self, buf: &mut [f64]) {
            let send = buf.to_vec();
            lock(&self.comms)
                .world
                .all_reduce_into(&send[..], buf, SystemOperation::sum());
        }
        fn all_gather_f64(&self, local: &[f64]) -> Vec<f64> {
            let mut out = vec![0.0; local.len() * self.world];
            lock(&self.comms).world.all_gather_into(local, &mut out[..]);
            out
        }
        fn start_all_reduce_f32(&self, buf: Vec<f32>) -> Box<dyn Reduction> {
            // MPI_Iallreduce into a second buffer (MPI_IN_PLACE's value differs between
            // MPI implementations, and rsmpi does not export it). Both buffers are owned by
            // the request until it finishes: moved to the heap and out of Rust's sight.
            let n = buf.len();
            let send: *mut [f32] = Box::into_raw(buf.into_boxed_slice());
            let recv: *mut [f32] = Box::into_raw(vec![0.0f32; n].into_boxed_slice());
            let req = {
                let c = lock(&self.comms);
                // SAFETY: both pointers come from Box::into_raw above and are reclaimed
                // only once the request has finished (or never, after an error).
                let (s, r) = unsafe { (&*send, &mut *recv) };
                c.grads
                    .immediate_all_reduce_into(StaticScope, s, r, SystemOperation::sum())
            };
            Box::new(MpiReduction {
                comms: self.comms.clone(),
                req: Some(req),
                bufs: Some((send, recv)),
            })
        }
    }

    /// A started `MPI_Iallreduce`.
    struct MpiReduction {
        comms: Shared,
        /// None once finished.
        req: Option<Request<'static, [f32], StaticScope>>,
        /// The send and receive buffers (from `Box::into_raw`); None once reclaimed.
        bufs: Option<(*mut [f32], *mut [f32])>,
    }

    impl Reduction for MpiReduction {
        fn test(&mut self) -> bool {
            if let Some(req) = self.req.take() {
                let _c = lock(&self.comms);
                if let Err(req) = req.test() {
                    self.req = Some(req);
                }
            }
            self.req.is_none()
        }
        fn wait(mut self: Box<Self>) -> Vec<f32> {
            if let Some(req) = self.req.take() {
                let _c = lock(&self.comms);
                req.wait();
            }
            let (send, recv) = self.bufs.take().expect("buffers not yet reclaimed");
            // SAFETY: the request has finished: MPI no longer reads or writes them.
            unsafe {
                drop(Box::from_raw(send));
                Box::from_raw(recv).into_vec()
            }
        }
    }

    impl Drop for MpiReduction {
        fn drop(&mut self) {
            match self.req.take() {
                // unfinished (a step failed and the job is ending): MPI may still write
                // the buffers, so they stay allocated, and rsmpi's request (which panics
                // when dropped unfinished) is forgotten
                Some(req) => std::mem::forget(req),
                // finished but not waited for: the buffers are free to go
                None => {
                    if let Some((send, recv)) = self.bufs.take() {
                        // SAFETY: from Box::into_raw; MPI is done with them.
                        unsafe {
                            drop(Box::from_raw(send));
                            drop(Box::from_raw(recv));
                        }
                    }
                }
            }
        }
    }

    /// Initialises MPI. Returns the universe (MPI is finalised when it is dropped: keep it
    /// until the end of `main`) and, when the job has two or more processes, the group.
    pub fn init() -> anyhow::Result<(mpi::environment::Universe, Option<Arc<MpiGroup>>)> {
        let (universe, _) = mpi::initialize_with_threading(mpi::Threading::Serialized)
            .ok_or_else(|| anyhow::anyhow!("MPI was initialised already"))?;
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        if size < 2 {
            return Ok((universe, None));
        }
        // a panic on one rank must end the job, not leave the others in a collective
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            hook(info);
            eprintln!("rank {rank}: panicked; aborting the MPI job");
            abort(101);
        }));
        let grads = world.duplicate();
        Ok((
            universe,
            Some(Arc::new(MpiGroup {
                comms: Arc::new(Mutex::new(Comms { world, grads })),
                rank,
                world: size,
            })),
        ))
    }

    /// `MPI_Abort` on `MPI_COMM_WORLD`: ends every process of the job.
    pub fn abort(code: i32) {
        mpi::topology::SimpleCommunicator::world().abort(code);
    }
}
