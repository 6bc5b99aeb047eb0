//! Helpers shared by the test modules.

#![allow(dead_code)]

use dfdx::prelude::*;
use proptest::prelude::*;
use resnext_core::kernels::conv::Conv2dGeom;

/// `len` values from few distinct ones (`cells[i % cells.len()]`: 0–3 map to −1..2, 4 to
/// NaN): ties and NaNs everywhere, for max pooling's choice of input.
pub fn ties_and_nans(cells: &[u8], len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| match cells[i % cells.len()] {
            4 => f32::NAN,
            c => c as f32 - 1.0,
        })
        .collect()
}

/// Max relative error `|a - b| / max(|b|, floor)`.
pub fn max_rel_err(a: &[f32], b: &[f32], floor: f32) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / y.abs().max(floor))
        .fold(0.0, f32::max)
}

/// `n`, or 17 on aarch64 (run under qemu in CI, 10–45× slower than native).
pub const fn qemu_or(n: usize) -> usize {
    if cfg!(target_arch = "aarch64") {
        17
    } else {
        n
    }
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
    a.iter().zip(b).map(abs_diff).fold(0.0, f32::max) / scale
}

/// `|x − y|`: 0 where both are NaN, infinite where one is (which `f32::max` would
/// otherwise drop, passing a value never computed).
fn abs_diff((x, y): (&f32, &f32)) -> f32 {
    match (x.is_nan(), y.is_nan()) {
        (true, true) => 0.0,
        (false, false) => (x - y).abs(),
        _ => f32::INFINITY,
    }
}

pub use resnext_core::testing::values;

/// `max |a - b| / scale`: the error against the size of the terms that were summed rather
/// than of the result, for sums that may cancel (a 1×1 output of two products of opposite
/// sign is 1e-5 of its terms, and `rel_err` would count the terms' rounding as its own).
pub fn err_in_scale(a: &[f32], b: &[f32], scale: f32) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter().zip(b).map(abs_diff).fold(0.0, f32::max) / scale.max(f32::MIN_POSITIVE)
}

/// Whether `a` is within `tol` of `b`: by [`rel_err`], or failing that (a result that
/// cancelled), by [`err_in_scale`] against `scale()`, computed only then. The same verdict
/// as [`err_in_scale`] alone (its scale is at least `max |b|`), without the cost of the
/// scale where the result is the larger of the two.
pub fn close(a: &[f32], b: &[f32], tol: f32, scale: impl FnOnce() -> f32) -> bool {
    rel_err(a, b) <= tol || err_in_scale(a, b, scale()) <= tol
}

/// The largest sum of absolute terms behind each of a convolution's results: the reference
/// output, input gradient and weight gradient of `|x|`, `|w|` and `|dy|`, each's maximum.
/// The scale for [`err_in_scale`].
pub fn conv_term_scales(g: &Conv2dGeom, x: &[f32], w: &[f32], dy: &[f32]) -> (f32, f32, f32) {
    use resnext_core::kernels::conv;
    let abs = |v: &[f32]| v.iter().map(|a| a.abs()).collect::<Vec<f32>>();
    let (x, w, dy) = (abs(x), abs(w), abs(dy));
    let mut y = vec![0.0; g.output_len()];
    conv::conv2d_forward_ref(g, &x, &w, &mut y);
    let (mut dx, mut dw) = (vec![0.0; x.len()], vec![0.0; w.len()]);
    conv::conv2d_backward_ref(g, &x, &w, &dy, &mut dx, &mut dw);
    let max = |v: &[f32]| v.iter().fold(0.0f32, |m, &a| m.max(a));
    (max(&y), max(&dx), max(&dw))
}

/// A convolution test case: inputs drawn from `seed` and what the reference kernels give
/// for them (output, input gradient, weight gradient).
pub struct ConvCase {
    /// The geometry it was drawn for.
    pub g: Conv2dGeom,
    /// Input.
    pub x: Vec<f32>,
    /// Weight.
    pub w: Vec<f32>,
    /// Output gradient.
    pub dy: Vec<f32>,
    /// Reference output.
    pub y: Vec<f32>,
    /// Reference input gradient.
    pub dx: Vec<f32>,
    /// Reference weight gradient.
    pub dw: Vec<f32>,
}

impl ConvCase {
    /// [`conv_term_scales`] of this case's inputs.
    pub fn term_scales(&self) -> (f32, f32, f32) {
        conv_term_scales(&self.g, &self.x, &self.w, &self.dy)
    }

    /// The case for `g` from `seed`.
    pub fn new(g: &Conv2dGeom, seed: u64) -> Self {
        use resnext_core::kernels::conv;
        let (x, w, dy) = (
            values(seed, g.input_len()),
            values(seed ^ 1, g.weight_len()),
            values(seed ^ 2, g.output_len()),
        );
        let mut y = vec![0.0; g.output_len()];
        conv::conv2d_forward_ref(g, &x, &w, &mut y);
        let (mut dx, mut dw) = (vec![0.0; x.len()], vec![0.0; w.len()]);
        conv::conv2d_backward_ref(g, &x, &w, &dy, &mut dx, &mut dw);
        ConvCase {
            g: *g,
            x,
            w,
            dy,
            y,
            dx,
            dw,
        }
    }
}

/// 3×3 stride-1 grouped convolutions with one of `chans` channels per group on each side
/// (the Winograd shapes): `batches` images, 2–3 groups, paddings 0–2, odd and even sizes
/// from 1 up to (not including) `hw` (tiles cut by the edge).
pub fn winograd_geom(
    batches: std::ops::Range<usize>,
    chans: Vec<usize>,
    hw: usize,
) -> impl Strategy<Value = Conv2dGeom> {
    (
        (batches, 2usize..4),
        prop::sample::select(chans.clone()),
        prop::sample::select(chans),
        (1usize..hw, 1usize..hw, 0usize..3),
    )
        .prop_filter_map(
            "valid geometry",
            |((batch, groups), ipg, opg, (in_h, in_w, padding))| {
                let g = Conv2dGeom {
                    batch,
                    in_channels: groups * ipg,
                    out_channels: groups * opg,
                    in_h,
                    in_w,
                    kernel: 3,
                    stride: 1,
                    padding,
                    groups,
                };
                g.validate().ok().map(|_| g)
            },
        )
}
