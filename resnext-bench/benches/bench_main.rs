//! Criterion benchmarks (filled in by the speed work).

fn main() {}
