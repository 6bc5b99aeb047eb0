//! Pooling: [`max_pool2d`] and [`global_avg_pool`].

use dfdx::prelude::*;

use super::grad::{Input, Output};
use super::{read, record, Act, Mat};
use crate::error::{shape_err, Result};
use crate::kernels::{elementwise as ew, pool};
use crate::profile::{self, Label};

/// 2-D max pooling with square window `kernel`, `stride` and implicit -inf `padding`.
pub fn max_pool2d<const C: usize, T: Tape<f32, Cpu>>(
    x: Act<C, T>,
    kernel: usize,
    stride: usize,
    padding: usize,
) -> Result<Act<C, T>> {
    let (x, tape, dev) = Input::split(x);
    let (y, tape): (Act<C>, T) = max_pool2d_on(&dev, x, [kernel, stride, padding], tape)?;
    Ok(y.put_tape(tape))
}

/// [`max_pool2d`] on an input that may be held outside dfdx tensors, with
/// `[kernel, stride, padding]`: the output is an `Out`, the backward pass recorded on
/// `tape`.
pub(crate) fn max_pool2d_on<const C: usize, T: Tape<f32, Cpu>, Out: Output<C>>(
    dev: &Cpu,
    x: Input<C>,
    window: [usize; 3],
    mut tape: T,
) -> Result<(Out, T)> {
    let [n, h, w] = x.dims;
    let g = pool_geom(n * C, [h, w], window)?;
    let shape = (n, Const::<C>, g.out_h(), g.out_w());
    let _t = profile::scope(Label::MaxPoolFwd);
    let mut y = ew::zeroed(shape.num_elements());
    // the indices of the maxima are kept only for a backward pass
    let argmax = if T::OWNS_TAPE {
        let mut argmax = vec![0u32; y.len()];
        pool::max_pool_forward(&g, &x.data, &mut y, &mut argmax);
        argmax
    } else {
        pool::max_pool_forward_values(&g, &x.data, &mut y);
        Vec::new()
    };
    let Input { grad: x_grad, .. } = x;
    let (out, out_grad) = Out::wrap(y, shape, dev, None)?;
    if T::OWNS_TAPE {
        let in_len = n * C * h * w;
        tape.add_backward_op(move |grads| {
            let _t = profile::scope(Label::MaxPoolBwd);
            let dy = out_grad.take(grads, argmax.len())?;
            x_grad.accumulate(grads, in_len, |dx| {
                pool::max_pool_backward(&g, &argmax, &dy, dx)
            })
        });
    }
    Ok((out, tape))
}

/// The checked geometry of max pooling `planes` planes of `h × w` with a square window:
/// `[kernel, stride, padding]`.
fn pool_geom(
    planes: usize,
    [h, w]: [usize; 2],
    [kernel, stride, padding]: [usize; 3],
) -> Result<pool::PoolGeom> {
    let g = pool::PoolGeom {
        planes,
        in_h: h,
        in_w: w,
        kernel,
        stride,
        padding,
    };
    g.validate().map_err(|m| shape_err("max_pool2d", m))?;
    Ok(g)
}

/// [`max_pool2d`] on a plain `(n, C, h, w)` buffer with `dims = [n, C, h, w]`, inference
/// only: returns the output buffer and its height and width.
pub fn max_pool2d_raw(
    x: &[f32],
    [n, c, h, w]: [usize; 4],
    kernel: usize,
    stride: usize,
    padding: usize,
) -> Result<(Vec<f32>, usize, usize)> {
    let g = pool_geom(n * c, [h, w], [kernel, stride, padding])?;
    if x.len() != n * c * h * w {
        return Err(shape_err(
            "max_pool2d",
            format!(
                "input has {} values, shape ({n}, {c}, {h}, {w}) needs {}",
                x.len(),
                n * c * h * w
            ),
        ));
    }
    let _t = profile::scope(Label::MaxPoolFwd);
    let mut y = vec![0.0f32; n * c * g.out_h() * g.out_w()];
    pool::max_pool_forward_values(&g, x, &mut y);
    Ok((y, g.out_h(), g.out_w()))
}

/// [`global_avg_pool`] on a plain `(n, c, h, w)` buffer: the `(n, c)` means.
pub fn global_avg_pool_raw(x: &[f32], [n, c, h, w]: [usize; 4]) -> Result<Vec<f32>> {
    if h * w == 0 || x.len() != n * c * h * w {
        return Err(shape_err(
            "global_avg_pool",
            format!(
                "{} values for input ({n}, {c}, {h}, {w}): empty spatial size or wrong length",
                x.len()
            ),
        ));
    }
    let mut y = vec![0.0f32; n * c];
    pool::global_avg_pool_forward(h * w, x, &mut y);
    Ok(y)
}

/// Global average pooling `(N, C, H, W) → (N, C)`.
pub fn global_avg_pool<const C: usize, T: Tape<f32, Cpu>>(
    x: Act<C, T>,
) -> Result<Mat<Const<C>, T>> {
    let &(n, _, h, w) = x.shape();
    let y = global_avg_pool_raw(&read(&x), [n, C, h, w])?;
    let dev = x.device().clone();
    let (x, tape) = x.split_tape();
    let xg = x.ghost();
    record(
        &dev,
        y,
        (n, Const::<C>),
        tape,
        Label::GlobalAvgPool,
        move |dy, grads| {
            pool::global_avg_pool_backward(h * w, &dy, grads.get_or_alloc_mut(&xg)?);
            Ok(())
        },
    )
}
