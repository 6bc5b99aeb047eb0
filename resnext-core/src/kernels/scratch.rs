//! Per-thread scratch buffers that outlive one call.
//!
//! The convolution kernels need a few temporary buffers per task (packed inputs, tiles,
//! partial sums), tens of kilobytes to a megabyte each. Allocated and freed per task, they
//! make glibc trim the top of its per-thread heap (`madvise`) or `munmap` them, and the
//! next task page-faults the memory back in, with TLB shootdowns that stall the other
//! cores too: a fifth of a 7×7 grouped convolution's backward pass on our machine. Taken
//! from and returned to a per-thread pool instead, their memory stays mapped.
//!
//! A buffer can be returned under a key (say, the layout of a zero-padded packing) and
//! taken back by that key with its contents intact, so padding zeroed once stays zero.

use std::cell::RefCell;

/// Buffers above this many values are freed instead of pooled, so a one-off large call
/// does not pin its memory to the thread for the life of the process.
const KEEP_MAX: usize = 1 << 22;
/// At most this many buffers per thread.
const KEEP_COUNT: usize = 32;

/// What identifies a buffer's contents: the numbers that define a layout, compared
/// exactly (so two layouts never share padding by accident).
pub type Key = [usize; 10];

/// The first number of each kind of keyed buffer's [`Key`], so that two kinds never share a
/// key whatever their other numbers.
pub mod tag {
    /// `direct::FwdLayout`'s packed input (the direct and lanes kernels' forward, the lanes
    /// kernel's weight gradient).
    pub const FWD_INPUT: usize = 1;
    /// `direct::BwdLayout`'s padded output gradient.
    pub const BWD_PADDED: usize = 2;
    /// The direct kernel's weight gradient: the packed inputs of a chunk of images…
    pub const WG_INPUT: usize = 3;
    /// … and their output gradients, in the same layout.
    pub const WG_OUTPUT_GRAD: usize = 4;
    /// The Winograd kernel's padded position × channel input rows.
    pub const WINOGRAD_INPUT: usize = 5;
    /// `direct::FwdLayout::unsplit`'s packed input (the lanes kernel's stride-2 forward).
    pub const FWD_INPUT_UNSPLIT: usize = 6;
}

type Pool = Vec<(Option<Key>, Vec<f32>)>;

thread_local! {
    /// `(key, buffer)`; no key for contents nobody will ask for again.
    static POOL: RefCell<Pool> = const { RefCell::new(Vec::new()) };
}

fn pop(p: &mut Pool) -> Vec<f32> {
    // unkeyed buffers first, then the oldest keyed one
    match p.iter().rposition(|(k, _)| k.is_none()) {
        Some(i) => p.swap_remove(i).1,
        None if !p.is_empty() => p.remove(0).1,
        None => Vec::new(),
    }
}

/// `N` empty buffers (length 0; capacity from earlier calls on this thread).
pub fn take<const N: usize>() -> [Vec<f32>; N] {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        std::array::from_fn(|_| {
            let mut v = pop(&mut p);
            v.clear();
            v
        })
    })
}

/// A buffer of `len` values whose contents are unspecified (stale values from an earlier
/// use, or zeros): for a caller that overwrites all of it.
pub fn take_stale(len: usize) -> Vec<f32> {
    let mut v = POOL.with(|p| pop(&mut p.borrow_mut()));
    if v.len() >= len {
        v.truncate(len);
    } else {
        v.resize(len, 0.0);
    }
    v
}

/// The buffer last given back under `key` on this thread, contents intact, or an empty one.
pub fn take_keyed(key: &Key) -> Vec<f32> {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        match p.iter().position(|(k, _)| k.as_ref() == Some(key)) {
            Some(i) => p.swap_remove(i).1,
            None => {
                let mut v = pop(&mut p);
                v.clear();
                v
            }
        }
    })
}

/// Returns buffers to this thread's pool.
pub fn give<const N: usize>(bufs: [Vec<f32>; N]) {
    for v in bufs {
        put(None, v);
    }
}

/// Returns a buffer to this thread's pool under `key`, for [`take_keyed`].
pub fn give_keyed(key: Key, v: Vec<f32>) {
    put(Some(key), v);
}

fn put(key: Option<Key>, v: Vec<f32>) {
    if v.capacity() == 0 || v.capacity() > KEEP_MAX {
        return;
    }
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        if key.is_some() {
            p.retain(|(k, _)| *k != key);
        }
        if p.len() >= KEEP_COUNT {
            p.remove(0);
        }
        p.push((key, v));
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_buffers_come_back_intact_and_only_under_their_key() {
        let (a, b) = ([7; 10], [8; 10]);
        give_keyed(a, vec![1.0, 2.0, 3.0]);
        give_keyed(b, vec![4.0]);
        assert_eq!(take_keyed(&b), vec![4.0]);
        assert_eq!(take_keyed(&a), vec![1.0, 2.0, 3.0]);
        assert_eq!(take_keyed(&a), Vec::<f32>::new(), "taken once");
        // another key may reuse the memory, but never sees the contents
        give_keyed(a, vec![1.0, 2.0, 3.0]);
        assert_eq!(
            take_keyed(&[9; 10]),
            Vec::<f32>::new(),
            "unknown key: empty"
        );
        let [v] = take();
        assert!(v.is_empty(), "plain buffers come back cleared");
        let s = take_stale(5);
        assert_eq!(s.len(), 5);
    }
}
