//! The fully connected layer: [`linear`].

use dfdx::prelude::*;

use super::{read, record, Mat, ParamGrad};
use crate::error::{shape_err, Result};
use crate::kernels::elementwise as ew;
use crate::profile::Label;

/// Dense layer `x · weightᵀ + bias` with weight `(O, F)`; `O` may be a runtime dim.
pub fn linear<const F: usize, O: Dim, T: Tape<f32, Cpu>>(
    x: Mat<Const<F>, T>,
    weight: &Tensor<(O, Const<F>), f32, Cpu>,
    bias: &Tensor<(O,), f32, Cpu>,
) -> Result<Mat<O, T>> {
    let n = x.shape().0;
    let o = weight.shape().0;
    let (xs, ws, bs) = (read(&x), read(weight), read(bias));
    let y = linear_values::<F>(&xs, n, &ws, &bs)?;
    let dev = x.device().clone();
    let (x, tape) = x.split_tape();
    let xg = x.ghost();
    let (wg, bg) = (ParamGrad::of(weight), ParamGrad::of(bias));
    record(&dev, y, (n, o), tape, Label::Linear, move |dy, grads| {
        // the weight gradient accumulates straight into its slot, moved out meanwhile
        let (mut dw, mut db) = (wg.take(grads)?, vec![0.0f32; bs.len()]);
        ew::linear_backward(
            n,
            F,
            o.size(),
            &xs,
            &ws,
            &dy,
            Some(&mut grads.get_or_alloc_mut(&xg)?[..]),
            &mut dw,
            &mut db,
        );
        wg.put(grads, dw)?;
        bg.add(grads, &db)
    })
}

/// [`linear`] on a plain `(n, F)` buffer, inference only: the `(n, O)` outputs.
pub fn linear_raw<const F: usize, O: Dim>(
    x: &[f32],
    n: usize,
    weight: &Tensor<(O, Const<F>), f32, Cpu>,
    bias: &Tensor<(O,), f32, Cpu>,
) -> Result<Vec<f32>> {
    linear_values::<F>(x, n, &read(weight), &read(bias))
}

/// `x · wᵀ + b` for an `(n, F)` input and the `(O, F)` weight values `w`, `O` = `b.len()`.
fn linear_values<const F: usize>(x: &[f32], n: usize, w: &[f32], b: &[f32]) -> Result<Vec<f32>> {
    let o = b.len();
    if w.len() != o * F {
        return Err(shape_err(
            "linear",
            format!(
                "bias has {o} elements, weight has {} rows",
                w.len() / F.max(1)
            ),
        ));
    }
    if x.len() != n * F {
        return Err(shape_err(
            "linear",
            format!("input has {} values, ({n}, {F}) needs {}", x.len(), n * F),
        ));
    }
    let mut y = vec![0.0f32; n * o];
    ew::linear_forward(n, F, o, x, w, b, &mut y);
    Ok(y)
}
