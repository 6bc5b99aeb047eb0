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

    /// The allocator the blocks come from.
    pub fn raw(&self) -> &R {
        &self.raw
    }
}

impl<R: RawAlloc> Drop for CachingPool<R> {
    fn drop(&mut self) {
        self.empty_cache();
    }
}
