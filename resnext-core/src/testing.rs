//! Deterministic inputs for tests and benchmarks.

/// `n` pseudo-random values in [-1, 1) from `seed` (xorshift): the same on every machine.
///
/// ```
/// let a = resnext_core::testing::values(7, 4);
/// assert_eq!(a, resnext_core::testing::values(7, 4));
/// assert!(a.iter().all(|v| (-1.0..1.0).contains(v)));
/// ```
pub fn values(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}
