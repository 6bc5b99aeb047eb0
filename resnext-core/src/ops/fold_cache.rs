//! Inference sessions: convolution weights with their batch norm folded in, prepared once
//! and reused by every later call of [`conv2d_bn_eval`](super::conv2d_bn_eval)/[`conv2d_bn_eval_raw`](super::conv2d_bn_eval_raw) on the same
//! weight tensor, instead of being folded and packed again per call (for ResNeXt-50 that
//! is 100 MB of weights read and written per forward pass: most of a batch-1 forward).

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use crate::kernels::conv::PreparedWeights;

pub(super) struct Folded {
    pub(super) w: PreparedWeights,
    pub(super) shift: Vec<f32>,
}

/// Folded weights keyed by the address of the weight tensor they came from.
///
/// Valid only while the modules it has seen are neither changed nor moved: whoever owns
/// the model clears it after any change (as [`crate::model::Network`]'s implementations
/// do after loading weights or a training step). Install it for a call with
/// [`with_fold_cache`].
pub struct FoldCache {
    map: Mutex<HashMap<usize, Arc<Folded>>>,
    /// Names the state of the model this cache serves: drawn anew at every
    /// [`FoldCache::clear`], never the same for two states or two caches.
    stamp: AtomicU64,
}

/// The next stamp of any [`FoldCache`].
fn next_stamp() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

impl Default for FoldCache {
    fn default() -> Self {
        Self {
            map: Mutex::default(),
            stamp: AtomicU64::new(next_stamp()),
        }
    }
}

impl std::fmt::Debug for FoldCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FoldCache")
            .field("entries", &self.len())
            .finish()
    }
}

impl FoldCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }
    /// Forgets every folded weight (call after the model changed).
    pub fn clear(&self) {
        self.stamp.store(next_stamp(), Ordering::Relaxed);
        self.map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }
    /// A number that names the model state this cache serves: it changes at every
    /// [`FoldCache::clear`] (after every change of the model) and no two caches share one,
    /// so another device's copy of the parameters can be keyed by it.
    pub fn stamp(&self) -> u64 {
        self.stamp.load(Ordering::Relaxed)
    }
    /// Number of cached convolutions.
    pub fn len(&self) -> usize {
        self.map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

thread_local! {
    static ACTIVE: RefCell<Option<Arc<FoldCache>>> = const { RefCell::new(None) };
}

/// Runs `f` with `cache` serving the eval-mode convolutions it calls on this thread.
pub fn with_fold_cache<R>(cache: &Arc<FoldCache>, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<Arc<FoldCache>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let prev = self.0.take();
            ACTIVE.with(|a| *a.borrow_mut() = prev);
        }
    }
    let _restore = Restore(ACTIVE.with(|a| a.borrow_mut().replace(cache.clone())));
    f()
}

/// The folded weights for `key` from the active cache (made with `make` on a miss), or
/// `None` when no cache is active.
pub(super) fn lookup(key: usize, make: impl FnOnce() -> Folded) -> Option<Arc<Folded>> {
    let cache = ACTIVE.with(|a| a.borrow().clone())?;
    if let Some(f) = cache
        .map
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(&key)
    {
        return Some(f.clone());
    }
    let folded = Arc::new(make());
    cache
        .map
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(key, folded.clone());
    Some(folded)
}
