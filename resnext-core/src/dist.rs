//! Data-parallel training: the collective operations a group of processes offers
//! ([`Collective`]), and what training does with them when one is installed
//! ([`install`]): gradients averaged over the group before each update
//! ([`average_gradients`]), and, with synchronised batch norm, batch statistics and their
//! gradient sums taken over the whole group's batch.
//!
//! The gradients travel in buckets, as DistributedDataParallel sends them: the backward
//! pass of each op that owns parameters hands their finished gradients over
//! ([`grad_ready`]), they are copied into the current bucket, and a full bucket's sum is
//! started at once ([`Collective::start_all_reduce_f32`]), so communication runs while the
//! backward pass computes the layers below. Backward runs from the classifier to the stem,
//! so the first buckets hold the last layers' gradients.
//!
//! The group is process-wide, as `torch.distributed`'s default group is: a program
//! installs it once at start (MPI on CPUs; NCCL would implement the same trait on GPUs).
//! Nothing changes for a program that installs none.

use std::cell::RefCell;
use std::collections::HashMap;
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
    /// Starts the element-wise sum over the group of `buf` and returns it as a
    /// [`Reduction`] to wait for. An implementation that can run it while this process
    /// computes returns at once; this default sums before it returns. Started sums and the
    /// blocking calls above may interleave: they do not share an order.
    fn start_all_reduce_f32(&self, mut buf: Vec<f32>) -> Box<dyn Reduction> {
        self.all_reduce_f32(&mut buf);
        Box::new(Done(buf))
    }
}

/// A sum over the group that was started ([`Collective::start_all_reduce_f32`]) and may
/// still be running. Dropped unfinished (after an error), it leaks its buffers rather
/// than free memory the communication may still write.
pub trait Reduction {
    /// Lets it progress (MPI moves a started collective on only inside its calls);
    /// whether it has finished.
    fn test(&mut self) -> bool;
    /// Waits for it to finish: the sum.
    fn wait(self: Box<Self>) -> Vec<f32>;
}

/// A finished [`Reduction`].
struct Done(Vec<f32>);

impl Reduction for Done {
    fn test(&mut self) -> bool {
        true
    }
    fn wait(self: Box<Self>) -> Vec<f32> {
        self.0
    }
}

/// DistributedDataParallel's default bucket size (its `bucket_cap_mb`, 25 MiB).
pub const DEFAULT_BUCKET_BYTES: usize = 25 << 20;

/// How training uses the group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupConfig {
    /// Training-mode batch norms use the whole group's batch (torch's SyncBatchNorm).
    pub sync_bn: bool,
    /// Gradient bucket size in bytes: each bucket's sum starts as soon as the backward pass
    /// has filled it. 0: one sum of every gradient after the backward pass.
    pub bucket_bytes: usize,
}

impl Default for GroupConfig {
    fn default() -> Self {
        Self {
            sync_bn: false,
            bucket_bytes: DEFAULT_BUCKET_BYTES,
        }
    }
}

struct Group {
    comm: Arc<dyn Collective>,
    cfg: GroupConfig,
}

static GROUP: OnceLock<Group> = OnceLock::new();

/// Installs the process group for the rest of the process, used as `cfg` says. Returns
/// false (and changes nothing) when one is installed already.
pub fn install(comm: Arc<dyn Collective>, cfg: GroupConfig) -> bool {
    GROUP.set(Group { comm, cfg }).is_ok()
}

/// The installed group, if any.
pub fn group() -> Option<&'static Arc<dyn Collective>> {
    GROUP.get().map(|g| &g.comm)
}

/// The group when batch norm is synchronised over it and it has more than one process.
pub(crate) fn bn_group() -> Option<&'static Arc<dyn Collective>> {
    GROUP
        .get()
        .filter(|g| g.cfg.sync_bn && g.comm.world() > 1)
        .map(|g| &g.comm)
}

thread_local! {
    /// The buckets of the backward pass running on this thread, when it is a training
    /// step's in a group with bucketing on.
    static BUCKETS: RefCell<Option<Buckets>> = const { RefCell::new(None) };
}

/// Values a bucket reserves up front at most (16 MiB); a larger one grows as it fills.
const RESERVE: usize = 1 << 22;

/// The gradients handed over during one backward pass: copied into buckets whose sums are
/// started as they fill.
struct Buckets {
    comm: Arc<dyn Collective>,
    /// Values per bucket.
    cap: usize,
    cur: Vec<f32>,
    /// Where each gradient went, by the address of its buffer (which stays in the
    /// gradients until the update): bucket, offset, length. A gradient handed over again
    /// (a tensor used twice) is sent again, and the newer copy is the one read back.
    at: HashMap<usize, (usize, usize, usize)>,
    started: Vec<Box<dyn Reduction>>,
    /// The first started sum not known to be finished.
    open: usize,
}

impl Buckets {
    fn add(&mut self, g: &[f32]) {
        self.at.insert(
            g.as_ptr() as usize,
            (self.started.len(), self.cur.len(), g.len()),
        );
        self.cur.extend_from_slice(g);
        if self.cur.len() >= self.cap {
            self.flush();
        }
        while self.open < self.started.len() && self.started[self.open].test() {
            self.open += 1;
        }
    }

    /// Starts the sum of the current bucket (when it holds anything).
    fn flush(&mut self) {
        if !self.cur.is_empty() {
            let next = Vec::with_capacity(self.cap.min(RESERVE));
            let full = std::mem::replace(&mut self.cur, next);
            self.started.push(self.comm.start_all_reduce_f32(full));
        }
    }
}

/// Starts collecting the gradients of the backward pass about to run on this thread into
/// buckets, when the installed group has two or more processes and bucketing is on.
/// [`average_gradients`] ends it. Without a group this does nothing.
pub(crate) fn begin_backward() {
    let Some((comm, cfg)) = training_group().filter(|(_, c)| c.bucket_bytes > 0) else {
        return;
    };
    let cap = (cfg.bucket_bytes / size_of::<f32>()).max(1);
    let b = Buckets {
        comm,
        cap,
        cur: Vec::with_capacity(cap.min(RESERVE)),
        at: HashMap::new(),
        started: Vec::new(),
        open: 0,
    };
    // (buckets left by a step that failed are dropped: their sums are abandoned)
    BUCKETS.with_borrow_mut(|slot| *slot = Some(b));
}

/// The gradient bucket size of the installed group ([`GroupConfig::bucket_bytes`];
/// DDP's default without one).
#[cfg(feature = "cuda")]
pub(crate) fn bucket_bytes() -> usize {
    GROUP
        .get()
        .map_or(DEFAULT_BUCKET_BYTES, |g| g.cfg.bucket_bytes)
}

/// The group training averages over (two or more processes), and how.
fn training_group() -> Option<(Arc<dyn Collective>, GroupConfig)> {
    #[cfg(test)]
    if let Some(g) = tests::GROUP_HERE.with_borrow(Clone::clone) {
        return Some(g);
    }
    GROUP
        .get()
        .filter(|g| g.comm.world() > 1)
        .map(|g| (g.comm.clone(), g.cfg))
}

/// Called by the backward pass of an op that owns parameters with the finished gradient
/// of one of them (nothing more is added to it in this pass): copies it into the current
/// bucket when a bucketed backward pass runs on this thread. Otherwise nothing.
pub(crate) fn grad_ready(g: &[f32]) {
    BUCKETS.with_borrow_mut(|slot| {
        if let Some(b) = slot {
            b.add(g);
        }
    });
}

/// Averages the gradients of `model`'s trainable tensors (those `cfg` does not freeze)
/// over the group. With buckets ([`begin_backward`] before the backward pass), the sums
/// started during the backward pass are waited for and read back; whatever was not handed
/// over goes into one more sum. Without synchronised batch norm that last sum also gives
/// every process rank 0's buffers (running statistics), as DistributedDataParallel
/// broadcasts them, so the processes evaluate and save the same model. Does nothing
/// without a group of two or more.
pub fn average_gradients<M: Params>(
    model: &mut M,
    grads: &mut Gradients<f32, Cpu>,
    cfg: &OptimConfig,
) -> Result<()> {
    let Some((comm, group)) = training_group() else {
        return Ok(());
    };
    let buffers = !group.sync_bn;
    let buckets = BUCKETS.with_borrow_mut(Option::take);
    let (sums, at) = match buckets {
        Some(mut b) => {
            b.flush();
            let _t = crate::profile::scope(crate::profile::Label::AllReduce);
            let sums: Vec<Vec<f32>> = b.started.into_iter().map(|r| r.wait()).collect();
            (sums, b.at)
        }
        None => (Vec::new(), HashMap::new()),
    };
    let leader = comm.rank() == 0;
    let mut flat = Vec::new();
    let mut v = Flatten {
        cfg,
        grads,
        flat: &mut flat,
        sums: &sums,
        at: &at,
        back: false,
        pos: 0,
        buffers,
        leader,
        scale: 1.0,
    };
    model.visit_params_mut("", &mut v)?;
    if !flat.is_empty() {
        let _t = crate::profile::scope(crate::profile::Label::AllReduce);
        comm.all_reduce_f32(&mut flat);
    }
    let mut v = Flatten {
        cfg,
        grads,
        flat: &mut flat,
        sums: &sums,
        at: &at,
        back: true,
        pos: 0,
        buffers,
        leader,
        scale: 1.0 / comm.world() as f32,
    };
    model.visit_params_mut("", &mut v)
}

/// Copies the trainable gradients not summed in buckets (and, with `buffers`, the
/// buffers: rank 0's values, zeros elsewhere, so the sum is rank 0's) into `flat`
/// (`back == false`), or every gradient back from its bucket's sum or `flat`, times
/// `scale`.
struct Flatten<'a> {
    cfg: &'a OptimConfig,
    grads: &'a mut Gradients<f32, Cpu>,
    flat: &'a mut Vec<f32>,
    sums: &'a [Vec<f32>],
    at: &'a HashMap<usize, (usize, usize, usize)>,
    back: bool,
    pos: usize,
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
                t.copy_from(&self.flat[self.pos..self.pos + n]);
                self.pos += n;
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
        let n = g.len();
        let bucketed = self
            .at
            .get(&(g.as_ptr() as usize))
            .filter(|&&(_, _, len)| len == n)
            .map(|&(b, off, _)| &self.sums[b][off..off + n]);
        match (bucketed, self.back) {
            (Some(_), false) => {}
            (None, false) => self.flat.extend_from_slice(g),
            (src, true) => {
                let src = src.unwrap_or_else(|| {
                    self.pos += n;
                    &self.flat[self.pos - n..self.pos]
                });
                for (d, s) in g.iter_mut().zip(src) {
                    *d = s * self.scale;
                }
            }
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

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    use super::*;
    use crate::model::Arch;
    use crate::optim::Optimizer;

    thread_local! {
        /// A group for the training steps of this test thread only (the process-wide one
        /// can be installed once).
        pub(crate) static GROUP_HERE: RefCell<Option<(Arc<dyn Collective>, GroupConfig)>> =
            const { RefCell::new(None) };
    }

    /// Two processes computing the same: every sum is twice the values. Records the
    /// length of each started sum and counts the blocking ones.
    #[derive(Default)]
    struct Twin {
        started: Mutex<Vec<usize>>,
        blocking: AtomicUsize,
    }

    /// A started sum that reports itself unfinished until it is waited for.
    struct InFlight(Vec<f32>);

    impl Reduction for InFlight {
        fn test(&mut self) -> bool {
            false
        }
        fn wait(self: Box<Self>) -> Vec<f32> {
            self.0.iter().map(|v| v * 2.0).collect()
        }
    }

    impl Collective for Twin {
        fn rank(&self) -> usize {
            0
        }
        fn world(&self) -> usize {
            2
        }
        fn all_reduce_f32(&self, buf: &mut [f32]) {
            self.blocking.fetch_add(1, Ordering::SeqCst);
            buf.iter_mut().for_each(|v| *v *= 2.0);
        }
        fn all_reduce_f64(&self, buf: &mut [f64]) {
            buf.iter_mut().for_each(|v| *v *= 2.0);
        }
        fn all_gather_f64(&self, local: &[f64]) -> Vec<f64> {
            [local, local].concat()
        }
        fn start_all_reduce_f32(&self, buf: Vec<f32>) -> Box<dyn Reduction> {
            self.started.lock().unwrap().push(buf.len());
            Box::new(InFlight(buf))
        }
    }

    /// One training step of a small network, then its eval logits, with the group `twin`
    /// and `bucket_bytes` (None: no group).
    fn step(twin: Option<(Arc<Twin>, usize)>) -> (Vec<f32>, usize) {
        let dev = Cpu::seed_from_u64(11);
        let arch: Arch = "resnext11_8x8d".parse().unwrap();
        let mut net = arch.build(&dev, 3, 7).unwrap();
        let shape = [4, 3, 12, 12];
        let x = crate::testing::values(2, shape.iter().product());
        let mut opt = Optimizer::new(OptimConfig {
            lr: 0.1,
            ..Default::default()
        });
        GROUP_HERE.with_borrow_mut(|g| {
            *g = twin.map(|(t, bytes)| {
                let cfg = GroupConfig {
                    // each process keeps its own running statistics (the twin would
                    // double rank 0's)
                    sync_bn: true,
                    bucket_bytes: bytes,
                };
                (t as Arc<dyn Collective>, cfg)
            })
        });
        net.train_step(x.clone(), shape, &[0, 3, 6, 1], 0.0, &mut opt)
            .unwrap();
        GROUP_HERE.with_borrow_mut(|g| *g = None);
        (net.forward_eval(x, shape).unwrap(), net.num_params())
    }

    /// Averaged over two equal processes, the gradients are this process's, exactly:
    /// with buckets of any size the step equals one without a group. Every gradient goes
    /// into a bucket as the backward pass finishes it (none is left for the last sum),
    /// the classifier's first.
    #[test]
    fn bucketed_gradients_come_back_where_they_belong_whatever_the_bucket_size() {
        let (alone, params) = step(None);
        for bytes in [0, 4, 64 << 10, 1 << 30] {
            let twin = Arc::new(Twin::default());
            let (grouped, _) = step(Some((twin.clone(), bytes)));
            assert_eq!(grouped, alone, "buckets of {bytes} bytes");
            let started = twin.started.lock().unwrap().clone();
            let blocking = twin.blocking.load(Ordering::SeqCst);
            if bytes == 0 {
                assert_eq!((started.len(), blocking), (0, 1));
                continue;
            }
            assert_eq!(blocking, 0, "{bytes}: a gradient was not handed over");
            assert_eq!(started.iter().sum::<usize>(), params, "{bytes}");
            match bytes {
                // one gradient a bucket, from the end of the network: the classifier's
                // weight (7 × 512) and bias (7) first
                4 => assert_eq!(started[..2], [7 * 512, 7], "{started:?}"),
                b if b >= 1 << 30 => assert_eq!(started.len(), 1),
                _ => assert!(started.len() > 2, "{started:?}"),
            }
        }
    }
}
