//! The process group of a data-parallel run: this process's rank and the group size, and
//! (with the `mpi` feature) the MPI implementation of [`resnext_core::dist::Collective`].
//! A build without the feature, or a run not started by `mpirun`, is a group of one.

use resnext_core::dist;

/// This process's rank and the group size (0 of 1 without a group).
pub fn rank_world() -> (usize, usize) {
    dist::group().map_or((0, 1), |g| (g.rank(), g.world()))
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

    use std::sync::{Arc, Mutex};

    use mpi::collective::SystemOperation;
    use mpi::topology::SimpleCommunicator;
    use mpi::traits::*;

    /// `MPI_COMM_WORLD` behind a lock: MPI is initialised with `MPI_THREAD_SERIALIZED`,
    /// so one thread at a time may call it.
    pub struct MpiGroup {
        comm: Mutex<SimpleCommunicator>,
        rank: usize,
        world: usize,
    }

    // SAFETY: the communicator is a handle to MPI_COMM_WORLD, valid on any thread; every
    // call goes through the mutex, as MPI_THREAD_SERIALIZED requires.
    unsafe impl Send for MpiGroup {}
    // SAFETY: as above.
    unsafe impl Sync for MpiGroup {}

    impl resnext_core::dist::Collective for MpiGroup {
        fn rank(&self) -> usize {
            self.rank
        }
        fn world(&self) -> usize {
            self.world
        }
        fn all_reduce_f32(&self, buf: &mut [f32]) {
            let send = buf.to_vec();
            let c = self.comm.lock().unwrap_or_else(|e| e.into_inner());
            c.all_reduce_into(&send[..], buf, SystemOperation::sum());
        }
        fn all_reduce_f64(&self, buf: &mut [f64]) {
            let send = buf.to_vec();
            let c = self.comm.lock().unwrap_or_else(|e| e.into_inner());
            c.all_reduce_into(&send[..], buf, SystemOperation::sum());
        }
        fn all_gather_f64(&self, local: &[f64]) -> Vec<f64> {
            let mut out = vec![0.0; local.len() * self.world];
            let c = self.comm.lock().unwrap_or_else(|e| e.into_inner());
            c.all_gather_into(local, &mut out[..]);
            out
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
        Ok((
            universe,
            Some(Arc::new(MpiGroup {
                comm: Mutex::new(world),
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
