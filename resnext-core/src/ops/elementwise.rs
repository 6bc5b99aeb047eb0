//! Element-wise ops: [`add_relu`], the residual merge.

use dfdx::prelude::*;

use super::{read, record, Act};
use crate::error::{shape_err, Result};
use crate::kernels::elementwise as ew;
use crate::profile::{self, Label};

/// `relu(a + b)`: the residual merge of a ResNeXt block.
pub fn add_relu<const C: usize, T: Tape<f32, Cpu> + Merge<T>>(
    a: Act<C, T>,
    b: Act<C, T>,
) -> Result<Act<C, T>> {
    if a.shape() != b.shape() {
        return Err(shape_err(
            "add_relu",
            format!("shapes differ: {:?} vs {:?}", a.shape(), b.shape()),
        ));
    }
    let shape = *a.shape();
    let _t = profile::scope(Label::AddReluFwd);
    let (av, bv) = (read(&a), read(&b));
    let mut y = ew::zeroed(av.len());
    ew::add_relu_forward(&av, &bv, &mut y);
    drop((av, bv));
    // The backward pass needs only where y > 0: one bit per value instead of y itself.
    let mask = if T::OWNS_TAPE {
        ew::positive_mask(&y)
    } else {
        Vec::new()
    };
    let dev = a.device().clone();
    let (a, ta) = a.split_tape();
    let (b, tb) = b.split_tape();
    let (ag, bg) = (a.ghost(), b.ghost());
    record(
        &dev,
        y,
        shape,
        ta.merge(tb),
        Label::AddReluBwd,
        move |mut dy, grads| {
            ew::apply_positive_mask(&mask, &mut dy);
            ew::add_into(grads.get_or_alloc_mut(&ag)?, &dy);
            ew::add_into(grads.get_or_alloc_mut(&bg)?, &dy);
            Ok(())
        },
    )
}
