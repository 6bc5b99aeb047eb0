//! The caching allocator: device blocks are rounded to a size class and, once freed, kept
//! on a free list of that class for the next request of the same class, so a training or
//! inference loop whose shapes repeat allocates from the driver only in its first step.
//! When the driver has no room, every cached block is given back and the allocation tried
//! once more before it is an out-of-memory error.
//!
//! The bookkeeping is generic over [`RawAlloc`], so it is tested on the host.

use std::collections::BTreeMap;

use crate::backend::device::GpuError;

/// Requests up to this size are rounded to [`SMALL_ROUND`] bytes, larger ones to
/// [`LARGE_ROUND`] (the split PyTorch's CUDA allocator makes).
pub const SMALL_LIMIT: usize = 1 << 20;
/// Rounding of small requests, in bytes.
pub const SMALL_ROUND: usize = 512;
/// Rounding of large requests, in bytes.
pub const LARGE_ROUND: usize = 2 << 20;

/// The size class of a request of `bytes` bytes: what is allocated and cached for it.
pub fn size_class(bytes: usize) -> usize {
    let round = if bytes <= SMALL_LIMIT {
        SMALL_ROUND
    } else {
        LARGE_ROUND
    };
    bytes.max(1).div_ceil(round) * round
}

/// Where blocks come from: the driver on a GPU, a counter in the tests.
pub trait RawAlloc {
    /// A block of device memory.
    type Block;
    /// A new block of exactly `bytes` bytes. Out of memory is
    /// [`GpuError::OutOfMemory`]; other failures any other [`GpuError`].
    fn alloc(&mut self, bytes: usize) -> Result<Self::Block, GpuError>;
    /// Gives `block` back to the driver.
    fn release(&mut self, block: Self::Block);
}

/// What the allocator holds, in bytes, and how often the cache served a request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Bytes in blocks handed out and not yet given back.
    pub in_use: usize,
    /// The most `in_use` has been.
    pub peak_in_use: usize,
    /// Bytes held from the driver: in use plus cached.
    pub reserved: usize,
    /// Requests served from the cache.
    pub hits: u64,
    /// Requests that went to the driver.
    pub misses: u64,
    /// Times the cache was emptied to retry an allocation the driver refused.
    pub retries: u64,
}

/// Free lists of blocks by size class over a [`RawAlloc`].
pub struct CachingPool<R: RawAlloc> {
    raw: R,
    free: BTreeMap<usize, Vec<R::Block>>,
    stats: PoolStats,
}

impl<R: RawAlloc> CachingPool<R> {
    /// An empty pool drawing from `raw`.
    pub fn new(raw: R) -> Self {
        Self {
            raw,
            free: BTreeMap::new(),
            stats: PoolStats::default(),
        }
    }

    /// A block for `bytes` bytes, with its size class (give both back with
    /// [`CachingPool::give_back`]). `what` names the allocation in an out-of-memory error.
    pub fn take(&mut self, bytes: usize, what: &str) -> Result<(R::Block, usize), GpuError> {
        let class = size_class(bytes);
        let block = match self.free.get_mut(&class).and_then(Vec::pop) {
            Some(b) => {
                self.stats.hits += 1;
                b
            }
            None => {
                self.stats.misses += 1;
                let b = match self.raw.alloc(class) {
                    Err(e) if e.is_out_of_memory() && !self.free.is_empty() => {
                        self.stats.retries += 1;
                        self.empty_cache();
                        self.raw.alloc(class)
                    }
                    r => r,
                };
                let b = b.map_err(|e| match e {
                    GpuError::OutOfMemory { .. } => GpuError::OutOfMemory {
                        what: what.to_string(),
                        bytes: class,
                    },
                    e => e,
                })?;
                self.stats.reserved += class;
                b
            }
        };
        self.stats.in_use += class;
        self.stats.peak_in_use = self.stats.peak_in_use.max(self.stats.in_use);
        Ok((block, class))
    }

    /// Returns a block of size class `class` (from [`CachingPool::take`]) to the cache.
    pub fn give_back(&mut self, block: R::Block, class: usize) {
        self.stats.in_use -= class;
        self.free.entry(class).or_default().push(block);
    }

    /// Gives every cached block back to the driver.
    pub fn empty_cache(&mut self) {
        for (class, blocks) in std::mem::take(&mut self.free) {
            for b in blocks {
                self.stats.reserved -= class;
                self.raw.release(b);
            }
        }
    }

    /// The counters.
    pub fn stats(&self) -> PoolStats {
        self.stats
    }
}

impl<R: RawAlloc> Drop for CachingPool<R> {
    fn drop(&mut self) {
        self.empty_cache();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A driver with `capacity` bytes that records what it handed out.
    struct Fake {
        capacity: usize,
        used: usize,
        next: u32,
        live: Vec<(u32, usize)>,
    }

    impl Fake {
        fn new(capacity: usize) -> Self {
            Self {
                capacity,
                used: 0,
                next: 0,
                live: Vec::new(),
            }
        }
    }

    impl RawAlloc for Fake {
        type Block = (u32, usize);
        fn alloc(&mut self, bytes: usize) -> Result<(u32, usize), GpuError> {
            if self.used + bytes > self.capacity {
                return Err(GpuError::OutOfMemory {
                    what: String::new(),
                    bytes,
                });
            }
            self.used += bytes;
            self.next += 1;
            self.live.push((self.next, bytes));
            Ok((self.next, bytes))
        }
        fn release(&mut self, b: (u32, usize)) {
            let i = self.live.iter().position(|&l| l == b).expect("live block");
            self.live.swap_remove(i);
            self.used -= b.1;
        }
    }

    #[test]
    fn size_classes_round_up_and_cover_the_request() {
        assert_eq!(size_class(0), 512);
        assert_eq!(size_class(1), 512);
        assert_eq!(size_class(512), 512);
        assert_eq!(size_class(513), 1024);
        assert_eq!(size_class(SMALL_LIMIT), SMALL_LIMIT);
        assert_eq!(size_class(SMALL_LIMIT + 1), LARGE_ROUND);
        assert_eq!(size_class(LARGE_ROUND + 1), 2 * LARGE_ROUND);
    }

    #[test]
    fn a_freed_block_serves_the_next_request_of_its_class() {
        let mut p = CachingPool::new(Fake::new(1 << 30));
        let (a, ca) = p.take(1000, "a").unwrap();
        p.give_back(a, ca);
        let (b, cb) = p.take(900, "b").unwrap();
        assert_eq!((a, ca), (b, cb), "same class: the cached block");
        let (c, _) = p.take(5000, "c").unwrap();
        assert_ne!(c.0, b.0);
        let s = p.stats();
        assert_eq!((s.hits, s.misses), (1, 2));
        assert_eq!(s.in_use, 1024 + 5120);
        assert_eq!(s.reserved, s.in_use);
    }

    #[test]
    fn out_of_memory_empties_the_cache_and_retries_once() {
        let mut p = CachingPool::new(Fake::new(6 << 20));
        let (a, ca) = p.take(3 << 20, "first").unwrap();
        assert_eq!(ca, 4 << 20);
        p.give_back(a, ca);
        // a 6 MiB class beside the 4 MiB cached one exceeds the capacity: the cached
        // block goes back to the driver, then it fits
        let (b, cb) = p.take(5 << 20, "second").unwrap();
        assert_eq!(p.stats().retries, 1);
        assert_eq!(p.stats().reserved, cb);
        p.give_back(b, cb);
        let e = p.take(7 << 20, "a batch of 64").unwrap_err();
        assert!(e.is_out_of_memory());
        let msg = e.to_string();
        assert!(
            msg.contains("a batch of 64") && msg.contains("8.0 MiB"),
            "{msg}"
        );
        assert_eq!(
            p.stats().reserved,
            0,
            "the cache was emptied before giving up"
        );
    }

    proptest! {
        /// Whatever the order of takes and gives, the counters agree with the driver.
        #[test]
        fn the_counters_agree_with_the_driver(ops in proptest::collection::vec((0usize..3 << 21, any::<bool>()), 1..60)) {
            let mut p = CachingPool::new(Fake::new(usize::MAX));
            let mut held = Vec::new();
            for (bytes, give) in ops {
                if give && !held.is_empty() {
                    let (b, c) = held.swap_remove(bytes % held.len());
                    p.give_back(b, c);
                } else {
                    let (b, c) = p.take(bytes, "x").unwrap();
                    prop_assert!(c >= bytes);
                    held.push((b, c));
                }
                let s = p.stats();
                prop_assert_eq!(s.in_use, held.iter().map(|h| h.1).sum::<usize>());
                prop_assert_eq!(s.reserved, p.raw.used);
                prop_assert!(s.peak_in_use >= s.in_use);
            }
            for (b, c) in held.drain(..) {
                p.give_back(b, c);
            }
            p.empty_cache();
            prop_assert_eq!(p.raw.used, 0);
            prop_assert_eq!(p.stats().reserved, 0);
        }
    }
}
