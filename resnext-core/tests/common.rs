//! Helpers shared by the test modules.

#![allow(dead_code)]

use dfdx::prelude::*;

/// Max relative error `|a - b| / max(|b|, floor)`.
pub fn max_rel_err(a: &[f32], b: &[f32], floor: f32) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / y.abs().max(floor))
        .fold(0.0, f32::max)
}

/// A seeded CPU device.
pub fn dev(seed: u64) -> Cpu {
    Cpu::seed_from_u64(seed)
}

/// Relative error in the max norm: `max |a - b| / max |b|`.
pub fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let scale = b
        .iter()
        .fold(0.0f32, |m, v| m.max(v.abs()))
        .max(f32::MIN_POSITIVE);
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
        / scale
}

pub use resnext_core::testing::values;
