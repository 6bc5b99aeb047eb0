//! Where a training op's input (and output) gradient lives: in dfdx's [`Gradients`], keyed
//! by a tensor, or in a [`GradSlot`] that travels with an activation held outside dfdx
//! tensors (the CPU backend's training activations,
//! [`CpuAct::Traced`](crate::backend::cpu::CpuAct::Traced)).
//!
//! A slot is filled by the backward passes of the ops that read the activation (each adds
//! its share) and emptied by the backward pass of the op that produced it. dfdx runs
//! backward ops in the reverse order of their creation, so every reader has added before
//! the producer takes. An activation that passes between two training ops this way is
//! never copied out of a tensor, and its gradient is neither zero-allocated by dfdx nor
//! copied: a reader whose slot already holds a gradient adds into that buffer.

use std::cell::RefCell;
use std::sync::{Arc, Mutex, PoisonError};

use dfdx::prelude::*;
use dfdx::tensor::CpuError;

use super::{read, Act, Grads};
use crate::dist;
use crate::kernels::{batchnorm as bn, elementwise as ew};

/// The shape of an [`Act`] with `C` channels.
pub(crate) type ActShape<const C: usize> = (usize, Const<C>, usize, usize);

/// The gradient of an activation held outside dfdx tensors; clones share it.
#[derive(Clone, Debug, Default)]
pub struct GradSlot(Arc<Mutex<Option<Vec<f32>>>>);

impl GradSlot {
    fn with<R>(&self, f: impl FnOnce(&mut Option<Vec<f32>>) -> R) -> R {
        f(&mut self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Adds `g` (moved in: the first share is kept as it is, no copy).
    pub(crate) fn add_vec(&self, g: Vec<f32>) {
        self.with(|slot| match slot {
            Some(acc) => ew::add_into(acc, &g),
            None => *slot = Some(g),
        });
    }
}

/// Finds (allocating it zeroed when missing) one tensor's gradient in dfdx's gradients.
type Lookup = Box<dyn for<'a> Fn(&'a mut Grads) -> Result<&'a mut Vec<f32>, CpuError>>;

/// The [`Lookup`] of `x`'s gradient (holding no reference to its values).
pub(crate) fn lookup<S: Shape, T>(x: &Tensor<S, f32, Cpu, T>) -> Lookup {
    let g = x.ghost();
    Box::new(move |grads: &mut Grads| Ok(&mut **grads.get_or_alloc_mut(&g)?))
}

thread_local! {
    /// The tensors whose gradient nobody reads, during [`without_grad_of`]: dfdx's
    /// [`Gradients`] serves as a set keyed by tensor identity (a tensor's id is not
    /// public), a marked tensor's entry empty.
    static UNWANTED: RefCell<Option<Grads>> = const { RefCell::new(None) };
}

/// Runs `forward` (a training forward pass) on `x` with the gradient of `x` marked as unwanted: a
/// training op that reads `x` computes no gradient for it. For the network input of a
/// training step, whose gradient costs as much as a weight's and is thrown away. The
/// mark is this thread's, and ends with `forward`, panic or not.
pub(crate) fn without_grad_of<S: Shape, T, R>(
    x: Tensor<S, f32, Cpu, T>,
    forward: impl FnOnce(Tensor<S, f32, Cpu, T>) -> R,
) -> Result<R, CpuError> {
    struct Restore(Option<Grads>);
    impl Drop for Restore {
        fn drop(&mut self) {
            UNWANTED.with(|u| *u.borrow_mut() = self.0.take());
        }
    }
    let mut set = Grads::leaky();
    // the mark: an entry with no values (its zeros are freed at once)
    std::mem::take(&mut **set.get_or_alloc_mut(&x)?);
    let _restore = Restore(UNWANTED.with(|u| u.replace(Some(set))));
    Ok(forward(x))
}

/// Whether `x` is marked by [`without_grad_of`].
fn unwanted<S: Shape, T>(x: &Tensor<S, f32, Cpu, T>) -> bool {
    UNWANTED.with(|u| {
        let mut set = u.borrow_mut();
        let Some(set) = set.as_mut() else {
            return false;
        };
        match set.get_or_alloc_mut(x) {
            Ok(entry) => {
                // an unmarked tensor's new entry (zeros of its length) shrinks to one value,
                // which no mark has (a tensor of no values needs no gradient either way)
                let marked = entry.is_empty();
                if !marked {
                    **entry = vec![0.0];
                }
                marked
            }
            Err(_) => false,
        }
    })
}

/// A parameter's gradient in dfdx's [`Gradients`], handed to data-parallel training
/// ([`dist::grad_ready`]) once the op's backward pass has finished it: the one way an op
/// adds to a parameter's gradient, so none is left out of the buckets.
pub(crate) struct ParamGrad(Lookup);

impl ParamGrad {
    /// The gradient of `p`.
    pub(crate) fn of<S: Shape, T>(p: &Tensor<S, f32, Cpu, T>) -> Self {
        ParamGrad(lookup(p))
    }

    /// The gradient accumulated so far, moved out, for the op to add into; the op gives it
    /// back with [`ParamGrad::put`].
    pub(crate) fn take(&self, grads: &mut Grads) -> Result<Vec<f32>, CpuError> {
        Ok(std::mem::take((self.0)(grads)?))
    }

    /// Puts back the gradient [`ParamGrad::take`] moved out, with the op's share added:
    /// final for this pass, it is handed over.
    pub(crate) fn put(&self, grads: &mut Grads, g: Vec<f32>) -> Result<(), CpuError> {
        let slot = (self.0)(grads)?;
        *slot = g;
        dist::grad_ready(slot);
        Ok(())
    }

    /// Adds the op's share `g` and hands the gradient over.
    pub(crate) fn add(&self, grads: &mut Grads, g: &[f32]) -> Result<(), CpuError> {
        let slot = (self.0)(grads)?;
        ew::add_into(slot, g);
        dist::grad_ready(slot);
        Ok(())
    }
}

/// Where one gradient lives.
pub(crate) enum Grad<const C: usize> {
    /// dfdx's gradient of a tensor.
    Tensor(Lookup),
    /// A slot of an activation held outside dfdx.
    Slot(GradSlot),
    /// Nowhere: nobody reads it ([`without_grad_of`]); adding into it does nothing.
    Unwanted,
}

impl<const C: usize> std::fmt::Debug for Grad<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Grad::Tensor(_) => f.write_str("Grad::Tensor"),
            Grad::Slot(s) => f.debug_tuple("Grad::Slot").field(s).finish(),
            Grad::Unwanted => f.write_str("Grad::Unwanted"),
        }
    }
}

impl<const C: usize> Grad<C> {
    /// Whether anybody reads this gradient: an op skips computing an unwanted one.
    pub(crate) fn wanted(&self) -> bool {
        !matches!(self, Grad::Unwanted)
    }

    /// The gradient accumulated so far, moved out: zeros of `len` when nothing was added.
    pub(crate) fn take(&self, grads: &mut Grads, len: usize) -> Result<Vec<f32>, CpuError> {
        Ok(match self {
            Grad::Tensor(g) => std::mem::take(g(grads)?),
            Grad::Slot(s) => s.with(Option::take).unwrap_or_else(|| ew::zeroed(len)),
            Grad::Unwanted => ew::zeroed(len),
        })
    }

    /// Runs `f` on the accumulator of `len` values (zeros when nothing was added yet);
    /// `f` adds its share into it.
    pub(crate) fn accumulate(
        &self,
        grads: &mut Grads,
        len: usize,
        f: impl FnOnce(&mut [f32]),
    ) -> Result<(), CpuError> {
        match self {
            Grad::Tensor(g) => f(g(grads)?),
            Grad::Slot(s) => s.with(|slot| f(slot.get_or_insert_with(|| ew::zeroed(len)))),
            Grad::Unwanted => {}
        }
        Ok(())
    }

    /// Adds an op's share into the gradient: `f(Some(acc))` adds into the gradient
    /// accumulated so far; where nothing was (an empty slot), `f(None)` returns the share
    /// as a new buffer, which the slot then holds, so it is written once rather than
    /// zero-filled and added into. (What `f` returns after adding is dropped.) An unwanted
    /// gradient does not call `f`: an op that computes more than the input gradient in
    /// `f` asks [`Grad::wanted`] first.
    pub(crate) fn add_or_put(
        &self,
        grads: &mut Grads,
        f: impl FnOnce(Option<&mut [f32]>) -> Vec<f32>,
    ) -> Result<(), CpuError> {
        match self {
            Grad::Tensor(g) => {
                f(Some(g(grads)?));
            }
            Grad::Slot(s) => s.with(|slot| match slot {
                Some(acc) => {
                    f(Some(acc));
                }
                None => *slot = Some(f(None)),
            }),
            Grad::Unwanted => {}
        }
        Ok(())
    }

    /// Adds `g` into the gradient.
    pub(crate) fn add(&self, grads: &mut Grads, g: &[f32]) -> Result<(), CpuError> {
        match self {
            Grad::Slot(s) => s.with(|slot| match slot {
                Some(acc) => ew::add_into(acc, g),
                None => *slot = Some(g.to_vec()),
            }),
            Grad::Tensor(_) => self.accumulate(grads, g.len(), |acc| ew::add_into(acc, g))?,
            Grad::Unwanted => {}
        }
        Ok(())
    }
}

/// How a batch norm + ReLU output is made again from the batch norm's input, which that
/// op's backward pass keeps anyway: the op that reads the output can keep this instead of
/// the values for its own backward pass, so the output is freed once the forward pass has
/// read it (a quarter of what a bottleneck block keeps for training).
#[derive(Debug)]
pub(crate) struct Recompute {
    /// The batch norm's input.
    pub x: Arc<Vec<f32>>,
    /// Its geometry.
    pub geom: bn::BnGeom,
    /// Per channel: subtracted, then multiplied, then added, before the ReLU.
    pub center: Vec<f32>,
    /// See `center`.
    pub scale: Vec<f32>,
    /// See `center`.
    pub shift: Vec<f32>,
}

impl Recompute {
    /// The output values, bit for bit those of the forward pass (same kernel, same
    /// inputs).
    pub(crate) fn values(&self) -> Vec<f32> {
        let ch = bn::Affine {
            center: &self.center,
            scale: &self.scale,
            shift: &self.shift,
        };
        bn::affine_forward_new(&self.geom, &self.x, ch, None, true)
    }
}

/// A training op's input: its values (shared, not copied, when they come from another
/// op), its `[n, h, w]`, and where its gradient goes.
#[derive(Debug)]
pub(crate) struct Input<const C: usize> {
    /// `(n, C, h, w)` values, row-major.
    pub data: Arc<Vec<f32>>,
    /// `[n, h, w]`.
    pub dims: [usize; 3],
    /// Where the op's backward pass adds this input's gradient.
    pub grad: Grad<C>,
    /// How to make the values again, where they can be (a batch norm + ReLU output).
    pub recompute: Option<Arc<Recompute>>,
}

/// What a training op's backward pass keeps of its input.
#[derive(Debug)]
pub(crate) enum Kept {
    /// The values.
    Values(Arc<Vec<f32>>),
    /// The recipe to make them again.
    Recompute(Arc<Recompute>),
}

impl Kept {
    /// What a backward pass that reads `data` should keep: the recipe where there is one
    /// (the values are then freed when the forward pass drops them), else the values.
    pub(crate) fn new(data: Arc<Vec<f32>>, recompute: Option<Arc<Recompute>>) -> Self {
        match recompute {
            Some(r) => Kept::Recompute(r),
            None => Kept::Values(data),
        }
    }

    /// The values, made again where only the recipe was kept.
    pub(crate) fn values(&self) -> std::borrow::Cow<'_, [f32]> {
        match self {
            Kept::Values(v) => std::borrow::Cow::Borrowed(v.as_slice()),
            Kept::Recompute(r) => std::borrow::Cow::Owned(r.values()),
        }
    }
}

impl<const C: usize> Input<C> {
    /// A tensor's values (copied out) and its gradient in dfdx's [`Gradients`] (none
    /// where it is unwanted, [`without_grad_of`]).
    pub(crate) fn of_tensor<T>(x: &Act<C, T>) -> Self {
        let &(n, _, h, w) = x.shape();
        Input {
            data: Arc::new(read(x)),
            dims: [n, h, w],
            grad: if unwanted(x) {
                Grad::Unwanted
            } else {
                Grad::Tensor(lookup(x))
            },
            recompute: None,
        }
    }

    /// A tensor taken apart for a training op: its values (copied out) and gradient
    /// ([`Input::of_tensor`]), its tape and its device.
    pub(crate) fn split<T: Tape<f32, Cpu>>(x: Act<C, T>) -> (Self, T, Cpu) {
        let dev = x.device().clone();
        let (x, tape) = x.split_tape();
        (Input::of_tensor(&x), tape, dev)
    }

    /// `(n, C, h, w)`.
    pub(crate) fn shape(&self) -> ActShape<C> {
        let [n, h, w] = self.dims;
        (n, Const, h, w)
    }
}

/// What a training op makes of its output values: a tensor (its gradient in dfdx's
/// [`Gradients`]) or values held outside dfdx with a fresh [`GradSlot`].
pub(crate) trait Output<const C: usize>: Sized {
    /// Wraps `y`, of `shape`, with how to make it again where it can be; returns where
    /// its gradient will be.
    fn wrap(
        y: Vec<f32>,
        shape: ActShape<C>,
        dev: &Cpu,
        recompute: Option<Recompute>,
    ) -> Result<(Self, Grad<C>), CpuError>;
}

impl<const C: usize> Output<C> for Act<C> {
    fn wrap(
        y: Vec<f32>,
        shape: ActShape<C>,
        dev: &Cpu,
        _: Option<Recompute>,
    ) -> Result<(Self, Grad<C>), CpuError> {
        let t = dev.try_tensor_from_vec(y, shape)?;
        let g = Grad::Tensor(lookup(&t));
        Ok((t, g))
    }
}

/// Values held outside dfdx.
#[derive(Debug)]
pub(crate) struct Held {
    /// The values.
    pub data: Arc<Vec<f32>>,
    /// `[n, h, w]`.
    pub dims: [usize; 3],
    /// The gradient slot.
    pub grad: GradSlot,
    /// How to make the values again, where they can be.
    pub recompute: Option<Arc<Recompute>>,
}

impl<const C: usize> Output<C> for Held {
    fn wrap(
        y: Vec<f32>,
        shape: ActShape<C>,
        _: &Cpu,
        recompute: Option<Recompute>,
    ) -> Result<(Self, Grad<C>), CpuError> {
        let slot = GradSlot::default();
        let (n, _, h, w) = shape;
        let held = Held {
            data: Arc::new(y),
            dims: [n, h, w],
            grad: slot.clone(),
            recompute: recompute.map(Arc::new),
        };
        Ok((held, Grad::Slot(slot)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_keeps_the_first_share_and_adds_the_rest() {
        let mut grads = Grads::leaky();
        let slot = GradSlot::default();
        let g = Grad::<1>::Slot(slot.clone());
        assert_eq!(g.take(&mut grads, 3).unwrap(), vec![0.0; 3]);
        slot.add_vec(vec![1.0, 2.0, 3.0]);
        g.add(&mut grads, &[1.0, 1.0, 1.0]).unwrap();
        g.accumulate(&mut grads, 3, |acc| acc[0] += 10.0).unwrap();
        assert_eq!(g.take(&mut grads, 3).unwrap(), vec![12.0, 3.0, 4.0]);
        // taken: empty again
        assert_eq!(g.take(&mut grads, 3).unwrap(), vec![0.0; 3]);
    }

    #[test]
    fn add_or_put_puts_the_first_share_and_adds_the_next() {
        let mut grads = Grads::leaky();
        let g = Grad::<1>::Slot(GradSlot::default());
        let share = |acc: Option<&mut [f32]>| match acc {
            Some(acc) => {
                acc.iter_mut().for_each(|v| *v += 1.0);
                Vec::new()
            }
            None => vec![5.0, 6.0],
        };
        g.add_or_put(&mut grads, share).unwrap();
        g.add_or_put(&mut grads, share).unwrap();
        assert_eq!(g.take(&mut grads, 2).unwrap(), vec![6.0, 7.0]);
    }
}
