//! Batches for training and evaluation: epoch shuffling from a seed, optional `drop_last`,
//! decoding and augmentation on worker threads with bounded prefetch.
//!
//! Sample `i` of epoch `e` is augmented with an RNG seeded from `(seed, e, i)`, and
//! batches are handed out in order, so the same seed gives the same batches whatever the
//! number of threads. Workers take batch numbers in increasing order and block on a
//! channel of `prefetch` slots, so at most `prefetch + threads` batches exist ahead of the
//! consumer.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::transforms::Pipeline;
use crate::{DataError, Source};

/// One batch: `(N, C, H, W)` values and `N` labels.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// Row-major `(N, C, H, W)` values.
    pub data: Vec<f32>,
    /// `[N, C, H, W]`.
    pub shape: [usize; 4],
    /// Class index per image.
    pub labels: Vec<usize>,
    /// Dataset index per image.
    pub indices: Vec<usize>,
    /// Samples left out because they could not be read (sources that skip unreadable
    /// samples only); `shape[0]` counts the others, and may be 0.
    pub skipped: usize,
}

/// Loader settings.
#[derive(Clone, Debug)]
pub struct LoaderConfig {
    /// Images per batch.
    pub batch_size: usize,
    /// Shuffle every epoch (from `seed` and the epoch number).
    pub shuffle: bool,
    /// Drop a last, smaller batch.
    pub drop_last: bool,
    /// Seed of shuffling and augmentation.
    pub seed: u64,
    /// Worker threads; 0 loads on the calling thread.
    pub threads: usize,
    /// Batches that may wait ready ahead of the consumer.
    pub prefetch: usize,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        Self {
            batch_size: 64,
            shuffle: true,
            drop_last: false,
            seed: 0,
            threads: 2,
            prefetch: 4,
        }
    }
}

/// Turns a [`Source`] and a [`Pipeline`] into batches.
pub struct Loader {
    source: Arc<dyn Source>,
    pipeline: Arc<Pipeline>,
    cfg: LoaderConfig,
    /// `(rank, world)`: this process's share of each step's batches ([`Loader::sharded`]).
    shard: (usize, usize),
}

fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.wrapping_mul(0x9E3779B97F4A7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
    z ^ (z >> 31)
}

fn build_batch(
    source: &dyn Source,
    pipeline: &Pipeline,
    seed: u64,
    epoch: u64,
    indices: &[usize],
) -> Result<Batch, DataError> {
    let mut data = Vec::new();
    let mut labels = Vec::with_capacity(indices.len());
    let mut kept = Vec::with_capacity(indices.len());
    let mut shape = [0; 4];
    for &i in indices {
        let (img, label) = match source.get(i) {
            Ok(s) => s,
            Err(e) if source.skips_unreadable() => {
                eprintln!("warning: {e}; sample {i} left out of its batch");
                continue;
            }
            Err(e) => return Err(e),
        };
        let mut rng = StdRng::seed_from_u64(mix(mix(seed, epoch), i as u64));
        let s = pipeline.run(&img, &mut rng);
        if kept.is_empty() {
            shape[1..].copy_from_slice(&[s.channels, s.height, s.width]);
            data.reserve(indices.len() * s.data.len());
        } else if [s.channels, s.height, s.width] != shape[1..] {
            return Err(DataError::Format {
                path: source.info().name.clone().into(),
                msg: format!(
                    "sample {i} is {}x{}x{} after the transforms, the batch is {}x{}x{}: add a resize/crop",
                    s.channels, s.height, s.width, shape[1], shape[2], shape[3]
                ),
            });
        }
        data.extend_from_slice(&s.data);
        labels.push(label);
        kept.push(i);
    }
    shape[0] = kept.len();
    Ok(Batch {
        data,
        shape,
        labels,
        skipped: indices.len() - kept.len(),
        indices: kept,
    })
}

impl Loader {
    /// A loader over `source` with the given transforms.
    pub fn new(source: Arc<dyn Source>, pipeline: Pipeline, cfg: LoaderConfig) -> Self {
        assert!(cfg.batch_size > 0, "batch size must be positive");
        Self {
            source,
            pipeline: Arc::new(pipeline),
            cfg,
            shard: (0, 1),
        }
    }

    /// This loader as process `rank` of `world` processes of a data-parallel run (a
    /// distributed sampler): every process draws the same epoch order, cuts it into global
    /// batches of `world × batch_size` and takes the `rank`-th `batch_size` slice of each,
    /// so the processes' step-`k` batches together are exactly the step-`k` batch of one
    /// process with a `world` times larger batch size, and an epoch covers each sample
    /// once. With `drop_last` an incomplete global batch is dropped; without, the last one
    /// is shared as far as it goes (a process may get a smaller or an empty batch).
    pub fn sharded(mut self, rank: usize, world: usize) -> Self {
        assert!(
            world > 0 && rank < world,
            "rank {rank} of {world} processes"
        );
        self.shard = (rank, world);
        self
    }

    /// The sample order of `epoch`.
    pub fn order(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.source.len()).collect();
        if self.cfg.shuffle {
            order.shuffle(&mut StdRng::seed_from_u64(mix(
                self.cfg.seed ^ 0x5EED,
                epoch,
            )));
        }
        order
    }

    /// Number of batches per epoch.
    pub fn batches_per_epoch(&self) -> usize {
        let n = self.source.len();
        let global = self.cfg.batch_size * self.shard.1;
        if self.cfg.drop_last {
            n / global
        } else {
            n.div_ceil(global)
        }
    }

    /// The source.
    pub fn source(&self) -> &Arc<dyn Source> {
        &self.source
    }

    /// Iterates over the batches of `epoch`, skipping the first `skip` (to resume).
    pub fn epoch(&self, epoch: u64, skip: usize) -> Batches {
        let order = self.order(epoch);
        let (rank, world) = self.shard;
        let b = self.cfg.batch_size;
        let chunks: Vec<Vec<usize>> = order
            .chunks(b * world)
            .take(self.batches_per_epoch())
            .skip(skip)
            .map(|global| {
                global[(rank * b).min(global.len())..((rank + 1) * b).min(global.len())].to_vec()
            })
            .collect();
        let chunks = Arc::new(chunks);
        if self.cfg.threads == 0 {
            return Batches {
                inner: Inner::Sync {
                    source: self.source.clone(),
                    pipeline: self.pipeline.clone(),
                    seed: self.cfg.seed,
                    epoch,
                    chunks,
                    next: 0,
                },
            };
        }
        let next_job = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = sync_channel(self.cfg.prefetch.max(1));
        let workers = (0..self.cfg.threads)
            .map(|_| {
                let (source, pipeline, chunks, next_job, stop, tx) = (
                    self.source.clone(),
                    self.pipeline.clone(),
                    chunks.clone(),
                    next_job.clone(),
                    stop.clone(),
                    tx.clone(),
                );
                let seed = self.cfg.seed;
                std::thread::spawn(move || loop {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let j = next_job.fetch_add(1, Ordering::Relaxed);
                    if j >= chunks.len() {
                        return;
                    }
                    let b = build_batch(source.as_ref(), &pipeline, seed, epoch, &chunks[j]);
                    if tx.send((j, b)).is_err() {
                        return;
                    }
                })
            })
            .collect();
        Batches {
            inner: Inner::Threads {
                rx: Some(rx),
                workers,
                stop,
                pending: BTreeMap::new(),
                next: 0,
                total: chunks.len(),
            },
        }
    }
}

enum Inner {
    Sync {
        source: Arc<dyn Source>,
        pipeline: Arc<Pipeline>,
        seed: u64,
        epoch: u64,
        chunks: Arc<Vec<Vec<usize>>>,
        next: usize,
    },
    Threads {
        rx: Option<Receiver<(usize, Result<Batch, DataError>)>>,
        workers: Vec<JoinHandle<()>>,
        stop: Arc<AtomicBool>,
        pending: BTreeMap<usize, Result<Batch, DataError>>,
        next: usize,
        total: usize,
    },
}

/// The batches of one epoch, in order.
pub struct Batches {
    inner: Inner,
}

impl Iterator for Batches {
    type Item = Result<Batch, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        match &mut self.inner {
            Inner::Sync {
                source,
                pipeline,
                seed,
                epoch,
                chunks,
                next,
            } => {
                let c = chunks.get(*next)?;
                *next += 1;
                Some(build_batch(source.as_ref(), pipeline, *seed, *epoch, c))
            }
            Inner::Threads {
                rx,
                pending,
                next,
                total,
                ..
            } => {
                if *next >= *total {
                    return None;
                }
                loop {
                    if let Some(b) = pending.remove(next) {
                        *next += 1;
                        return Some(b);
                    }
                    match rx.as_ref()?.recv() {
                        Ok((j, b)) => {
                            pending.insert(j, b);
                        }
                        Err(_) => return None,
                    }
                }
            }
        }
    }
}

impl Drop for Batches {
    fn drop(&mut self) {
        if let Inner::Threads {
            rx, workers, stop, ..
        } = &mut self.inner
        {
            stop.store(true, Ordering::Relaxed);
            drop(rx.take());
            for w in workers.drain(..) {
                let _ = w.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transforms::{RandomCrop, RandomHorizontalFlip};
    use crate::{Image, InMemory, Info};
    use proptest::prelude::*;

    fn toy(n: usize) -> Arc<dyn Source> {
        let info = Info {
            name: "toy".into(),
            channels: 1,
            height: 4,
            width: 4,
            classes: vec!["a".into(), "b".into()],
            max_value: 255.0,
            mean: vec![0.5],
            std: vec![0.25],
        };
        let pixels: Vec<u8> = (0..n * 16).map(|i| (i % 251) as u8).collect();
        Arc::new(InMemory::new(
            info,
            pixels,
            (0..n).map(|i| (i % 2) as u16).collect(),
        ))
    }

    fn pipeline() -> Pipeline {
        Pipeline::new(255.0)
            .then(RandomCrop {
                size: 4,
                padding: 1,
            })
            .then(RandomHorizontalFlip { p: 0.5 })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]
        #[test]
        fn any_thread_count_gives_the_same_batches_and_each_sample_once(n in 1usize..60, bs in 1usize..9, threads in 0usize..5, seed in any::<u64>(), epoch in 0u64..3, drop_last in any::<bool>()) {
            let cfg = |threads| LoaderConfig { batch_size: bs, shuffle: true, drop_last, seed, threads, prefetch: 2 };
            let a: Vec<Batch> = Loader::new(toy(n), pipeline(), cfg(0)).epoch(epoch, 0).map(Result::unwrap).collect();
            let b: Vec<Batch> = Loader::new(toy(n), pipeline(), cfg(threads)).epoch(epoch, 0).map(Result::unwrap).collect();
            prop_assert_eq!(&a, &b);
            let mut seen: Vec<usize> = a.iter().flat_map(|b| b.indices.clone()).collect();
            seen.sort_unstable();
            seen.dedup();
            let expect = if drop_last { n / bs * bs } else { n };
            prop_assert_eq!(seen.len(), expect);
            prop_assert_eq!(a.iter().map(|b| b.labels.len()).sum::<usize>(), expect);
            for b in &a {
                prop_assert_eq!(b.shape, [b.labels.len(), 1, 4, 4]);
                for (&i, &l) in b.indices.iter().zip(&b.labels) {
                    prop_assert_eq!(l, i % 2);
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 32, .. ProptestConfig::default() })]
        /// The shards of one step together are the step of one loader with a `world` times
        /// larger batch, sample for sample (data included); an epoch covers each sample once.
        #[test]
        fn shards_together_are_the_larger_batch(n in 1usize..60, bs in 1usize..6, world in 1usize..4, seed in any::<u64>(), drop_last in any::<bool>(), skip in 0usize..3) {
            let cfg = |batch_size| LoaderConfig { batch_size, shuffle: true, drop_last, seed, threads: 0, prefetch: 2 };
            let whole: Vec<Batch> = Loader::new(toy(n), pipeline(), cfg(bs * world)).epoch(1, skip).map(Result::unwrap).collect();
            let shards: Vec<Vec<Batch>> = (0..world)
                .map(|r| Loader::new(toy(n), pipeline(), cfg(bs)).sharded(r, world).epoch(1, skip).map(Result::unwrap).collect())
                .collect();
            let per_epoch = Loader::new(toy(n), pipeline(), cfg(bs)).sharded(0, world).batches_per_epoch();
            prop_assert_eq!(per_epoch, Loader::new(toy(n), pipeline(), cfg(bs * world)).batches_per_epoch());
            for (k, w) in whole.iter().enumerate() {
                let (mut idx, mut data): (Vec<usize>, Vec<f32>) = (Vec::new(), Vec::new());
                for s in &shards {
                    prop_assert!(s[k].labels.len() <= bs);
                    idx.extend_from_slice(&s[k].indices);
                    data.extend_from_slice(&s[k].data);
                }
                prop_assert_eq!(&idx, &w.indices);
                prop_assert_eq!(&data, &w.data);
            }
            prop_assert!(shards.iter().all(|s| s.len() == whole.len()));
        }
    }

    #[test]
    fn epochs_differ_and_skip_resumes_mid_epoch() {
        let l = Loader::new(
            toy(40),
            pipeline(),
            LoaderConfig {
                batch_size: 8,
                threads: 2,
                ..Default::default()
            },
        );
        assert_ne!(l.order(0), l.order(1));
        let all: Vec<Batch> = l.epoch(3, 0).map(Result::unwrap).collect();
        let rest: Vec<Batch> = l.epoch(3, 2).map(Result::unwrap).collect();
        assert_eq!(&all[2..], &rest[..]);
    }

    #[test]
    fn dropping_an_epoch_early_stops_the_workers() {
        let l = Loader::new(
            toy(1000),
            pipeline(),
            LoaderConfig {
                batch_size: 4,
                threads: 3,
                prefetch: 1,
                ..Default::default()
            },
        );
        let mut it = l.epoch(0, 0);
        assert!(it.next().is_some());
        drop(it);
    }

    /// What the hand-made test sources hold: one grey channel, one class.
    fn one_channel_info() -> &'static Info {
        static INFO: std::sync::OnceLock<Info> = std::sync::OnceLock::new();
        INFO.get_or_init(|| Info {
            name: "test".into(),
            channels: 1,
            height: 0,
            width: 0,
            classes: vec!["x".into()],
            max_value: 255.0,
            mean: vec![0.0],
            std: vec![1.0],
        })
    }

    #[test]
    fn samples_of_different_sizes_are_an_error_naming_the_sample() {
        struct Mixed;
        impl Source for Mixed {
            fn info(&self) -> &Info {
                one_channel_info()
            }
            fn len(&self) -> usize {
                2
            }
            fn get(&self, i: usize) -> Result<(Image, usize), DataError> {
                Ok((
                    Image {
                        channels: 1,
                        height: 2 + i,
                        width: 2,
                        data: vec![0; 2 * (2 + i)],
                    },
                    0,
                ))
            }
        }
        let l = Loader::new(
            Arc::new(Mixed),
            Pipeline::new(255.0),
            LoaderConfig {
                batch_size: 2,
                shuffle: false,
                threads: 0,
                ..Default::default()
            },
        );
        let err = l.epoch(0, 0).next().unwrap().unwrap_err().to_string();
        assert!(err.contains("sample 1 is 1x3x2"), "{err}");
    }

    #[test]
    fn an_unreadable_sample_is_left_out_only_where_the_source_skips_them() {
        // samples 1 and 3 fail to decode
        struct Flaky(bool);
        impl Source for Flaky {
            fn info(&self) -> &Info {
                one_channel_info()
            }
            fn len(&self) -> usize {
                4
            }
            fn get(&self, i: usize) -> Result<(Image, usize), DataError> {
                if i % 2 == 1 {
                    return Err(DataError::Format {
                        path: format!("img{i}.png").into(),
                        msg: "unreadable image".into(),
                    });
                }
                let data = vec![i as u8; 4];
                Ok((
                    Image {
                        channels: 1,
                        height: 2,
                        width: 2,
                        data,
                    },
                    0,
                ))
            }
            fn skips_unreadable(&self) -> bool {
                self.0
            }
        }
        let loader = |skip| {
            let cfg = LoaderConfig {
                batch_size: 4,
                shuffle: false,
                threads: 0,
                ..Default::default()
            };
            Loader::new(Arc::new(Flaky(skip)), Pipeline::new(255.0), cfg)
        };
        let b = loader(true).epoch(0, 0).next().unwrap().unwrap();
        assert_eq!(
            (b.shape, b.indices.clone(), b.skipped),
            ([2, 1, 2, 2], vec![0, 2], 1 + 1)
        );
        assert_eq!(b.data.len(), 2 * 4);
        let err = loader(false).epoch(0, 0).next().unwrap().unwrap_err();
        assert!(err.to_string().contains("img1.png"), "{err}");
    }
}
