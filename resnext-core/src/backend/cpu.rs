//! The CPU backend, [`CpuBackend`]. Its activations ([`CpuAct`]) are dfdx tensors on a
//! tape (a pass's input and output, and eval mode with gradients), plain buffers for
//! inference, where each convolution runs fused with its batch norm, residual add and
//! ReLU, or, in training, values on a tape held outside dfdx tensors ([`Traced`]), which
//! pass from one training op to the next without being copied in or out of tensors and
//! whose gradients pass back the same way. All compute with [`crate::ops`] and
//! [`crate::kernels`].

use std::marker::PhantomData;
use std::sync::Arc;

use dfdx::prelude::*;

use super::{Backend, TrainBackend};
use crate::error::{shape_err, Error, Result};
use crate::nn::{BatchNorm2d, ConvLayer, Linear};
use crate::ops::{
    self, Act, BnConfig, BnRef, ConvConfig, Grad, GradSlot, Held, Input, Mat, Recompute,
};

/// The CPU backend for tape `T` ([`OwnedTape`] to record gradients, [`NoneTape`] not to).
pub struct CpuBackend<T>(PhantomData<fn() -> T>);

impl<T> CpuBackend<T> {
    /// The backend for tape `T`.
    pub fn new() -> Self {
        CpuBackend(PhantomData)
    }
}

impl<T> Default for CpuBackend<T> {
    fn default() -> Self {
        Self::new()
    }
}

/// An activation of [`CpuBackend`]: a tensor on tape `T`, a plain buffer for inference, or
/// a training op's output on tape `T`.
#[derive(Debug)]
pub enum CpuAct<const C: usize, T> {
    /// A dfdx tensor carrying the tape.
    Tensor(Act<C, T>),
    /// Plain memory (inference without a tape).
    Buffer(Buf<C>),
    /// A training op's output, carrying the tape (see [`Traced`]).
    Traced(Traced<C, T>),
}

/// A training op's `(batch, C, height, width)` output held outside dfdx tensors: its
/// values (shared, never copied, by the ops that read it), its gradient slot (the readers'
/// backward passes add into it, the producer's takes it) and the tape. Becomes a tensor
/// where a pass leaves the backend ([`Traced::into_tensor`]).
#[derive(Debug)]
pub struct Traced<const C: usize, T> {
    data: Arc<Vec<f32>>,
    dims: [usize; 3],
    grad: GradSlot,
    /// How to make the values again (a batch norm + ReLU output), so that the op reading
    /// them need not keep them for its backward pass.
    recompute: Option<Arc<Recompute>>,
    tape: T,
    dev: Cpu,
}

impl<const C: usize, T: Tape<f32, Cpu>> Traced<C, T> {
    fn new(held: Held, tape: T, dev: Cpu) -> Self {
        let Held {
            data,
            dims,
            grad,
            recompute,
        } = held;
        Traced {
            data,
            dims,
            grad,
            recompute,
            tape,
            dev,
        }
    }

    /// `[n, h, w]`.
    pub fn dims(&self) -> [usize; 3] {
        self.dims
    }

    /// The activation as a tensor on the same tape (its values moved, not copied, unless
    /// another handle still shares them); its gradient flows back into the slot.
    pub fn into_tensor(self) -> Result<Act<C, T>> {
        let Traced {
            data,
            dims: [n, h, w],
            grad,
            mut tape,
            dev,
            ..
        } = self;
        let v = Arc::try_unwrap(data).unwrap_or_else(|shared| shared.as_ref().clone());
        let t = dev.try_tensor_from_vec(v, (n, Const::<C>, h, w))?;
        if T::OWNS_TAPE {
            let g = t.ghost();
            tape.add_backward_op(move |grads| {
                grad.add_vec(std::mem::take(&mut **grads.get_or_alloc_mut(&g)?));
                Ok(())
            });
        }
        Ok(t.put_tape(tape))
    }

    /// The values as a training op's input, the tape and the device.
    fn into_input(self) -> (Input<C>, T, Cpu) {
        let input = Input {
            data: self.data,
            dims: self.dims,
            grad: Grad::Slot(self.grad),
            recompute: self.recompute,
        };
        (input, self.tape, self.dev)
    }
}

impl<const C: usize, T: Tape<f32, Cpu>> CpuAct<C, T> {
    /// A training op's input, with its tape and device: a tensor's values are copied out,
    /// a [`Traced`] activation's shared.
    fn into_train_input(self, op: &'static str) -> Result<(Input<C>, T, Cpu)> {
        match self {
            CpuAct::Tensor(x) => Ok(Input::split(x)),
            CpuAct::Traced(x) => Ok(x.into_input()),
            CpuAct::Buffer(_) => Err(shape_err(
                op,
                "training mode runs on tensors; this activation is an inference buffer",
            )),
        }
    }

    /// The activation as a tensor on its tape (a [`Traced`] one moved into a tensor);
    /// `None` for an inference buffer.
    fn into_tensor_act(self) -> Result<Option<Act<C, T>>> {
        match self {
            CpuAct::Tensor(x) => Ok(Some(x)),
            CpuAct::Traced(x) => Ok(Some(x.into_tensor()?)),
            CpuAct::Buffer(_) => Ok(None),
        }
    }
}

/// Logits of [`CpuBackend`], as a tensor or as plain rows (inference).
#[derive(Debug)]
pub enum CpuLogits<O: Dim, T> {
    /// A dfdx tensor carrying the tape.
    Tensor(Mat<O, T>),
    /// Plain memory (inference without a tape).
    Rows(Rows<O>),
}

fn mixed(op: &'static str) -> Error {
    shape_err(
        op,
        "the input is a tensor and the residual a buffer, or the other way round",
    )
}

impl<T: Tape<f32, Cpu> + Merge<T>> Backend for CpuBackend<T> {
    type Act<const C: usize> = CpuAct<C, T>;
    type Logits<O: Dim> = CpuLogits<O, T>;

    fn fork<const C: usize>(&self, x: CpuAct<C, T>) -> (CpuAct<C, T>, CpuAct<C, T>) {
        match x {
            CpuAct::Tensor(x) => {
                let (x, tape) = x.split_tape();
                let y = x.retaped::<T>();
                (CpuAct::Tensor(x.put_tape(tape)), CpuAct::Tensor(y))
            }
            CpuAct::Buffer(x) => (CpuAct::Buffer(x.clone()), CpuAct::Buffer(x)),
            CpuAct::Traced(x) => {
                let y = Traced {
                    data: x.data.clone(),
                    dims: x.dims,
                    grad: x.grad.clone(),
                    recompute: x.recompute.clone(),
                    tape: T::default(),
                    dev: x.dev.clone(),
                };
                (CpuAct::Traced(x), CpuAct::Traced(y))
            }
        }
    }

    fn identity<const I: usize, const O: usize>(&self, x: CpuAct<I, T>) -> Result<CpuAct<O, T>> {
        if I != O {
            return Err(shape_err(
                "identity",
                format!("an identity shortcut cannot turn {I} channels into {O}"),
            ));
        }
        Ok(match x {
            CpuAct::Tensor(x) => {
                let &(n, _, h, w) = x.shape();
                CpuAct::Tensor(x.try_reshape_like(&(n, Const::<O>, h, w))?)
            }
            CpuAct::Buffer(x) => CpuAct::Buffer(Buf {
                data: x.data,
                dims: x.dims,
            }),
            CpuAct::Traced(x) => CpuAct::Traced(Traced {
                data: x.data,
                dims: x.dims,
                grad: x.grad,
                recompute: x.recompute,
                tape: x.tape,
                dev: x.dev,
            }),
        })
    }

    fn conv_bn_eval<const I: usize, const O: usize, C: ConvLayer<I, O>>(
        &self,
        x: CpuAct<I, T>,
        conv: &C,
        bn: &BatchNorm2d<O, f32, Cpu>,
        relu: bool,
        residual: Option<CpuAct<O, T>>,
    ) -> Result<CpuAct<O, T>> {
        let (w, cfg) = (conv.weight(), C::CONFIG);
        Ok(match (x, residual) {
            (CpuAct::Buffer(x), None) => {
                CpuAct::Buffer(buffer_conv_bn(x, w, cfg, bn.eval_ref(), relu, None)?)
            }
            (CpuAct::Buffer(x), Some(CpuAct::Buffer(r))) => {
                CpuAct::Buffer(buffer_conv_bn(x, w, cfg, bn.eval_ref(), relu, Some(&r))?)
            }
            (x, r) => {
                let x = x.into_tensor_act()?.ok_or_else(|| mixed("conv_bn_eval"))?;
                let r = match r {
                    Some(r) => Some(r.into_tensor_act()?.ok_or_else(|| mixed("conv_bn_eval"))?),
                    None => None,
                };
                CpuAct::Tensor(tensor_conv_bn(x, w, cfg, bn, relu, r)?)
            }
        })
    }

    fn max_pool<const C: usize, const K: usize, const S: usize, const P: usize>(
        &self,
        x: CpuAct<C, T>,
    ) -> Result<CpuAct<C, T>> {
        Ok(match x {
            CpuAct::Tensor(x) => CpuAct::Tensor(ops::max_pool2d(x, K, S, P)?),
            CpuAct::Traced(x) => {
                let (x, tape, dev) = x.into_input();
                let (y, tape) = ops::max_pool2d_on::<C, T, Held>(&dev, x, [K, S, P], tape)?;
                CpuAct::Traced(Traced::new(y, tape, dev))
            }
            CpuAct::Buffer(x) => {
                let (y, h, w) = ops::max_pool2d_raw(&x.data, x.shape4(), K, S, P)?;
                CpuAct::Buffer(Buf::new(y, [x.dims[0], h, w])?)
            }
        })
    }

    fn avg_pool<const F: usize>(&self, x: CpuAct<F, T>) -> Result<CpuLogits<Const<F>, T>> {
        Ok(match x {
            CpuAct::Tensor(x) => CpuLogits::Tensor(ops::global_avg_pool(x)?),
            CpuAct::Traced(x) => return self.avg_pool(CpuAct::Tensor(x.into_tensor()?)),
            CpuAct::Buffer(x) => CpuLogits::Rows(Rows {
                data: ops::global_avg_pool_raw(&x.data, x.shape4())?,
                n: x.dims[0],
                cols: Const,
            }),
        })
    }

    fn classify<const F: usize, O: Dim>(
        &self,
        x: CpuAct<F, T>,
        fc: &Linear<F, O, f32, Cpu>,
    ) -> Result<CpuLogits<O, T>> {
        Ok(match x {
            CpuAct::Tensor(x) => {
                CpuLogits::Tensor(ops::linear(ops::global_avg_pool(x)?, &fc.weight, &fc.bias)?)
            }
            CpuAct::Traced(x) => return self.classify(CpuAct::Tensor(x.into_tensor()?), fc),
            CpuAct::Buffer(x) => {
                let n = x.dims[0];
                let pooled = ops::global_avg_pool_raw(&x.data, x.shape4())?;
                CpuLogits::Rows(Rows {
                    data: ops::linear_raw(&pooled, n, &fc.weight, &fc.bias)?,
                    n,
                    cols: fc.weight.shape().0,
                })
            }
        })
    }
}

impl<T: Tape<f32, Cpu> + Merge<T>> TrainBackend for CpuBackend<T> {
    fn conv_bn_train<const I: usize, const O: usize, C: ConvLayer<I, O>>(
        &self,
        x: CpuAct<I, T>,
        conv: &C,
        bn: &mut BatchNorm2d<O, f32, Cpu>,
        relu: bool,
        residual: Option<CpuAct<O, T>>,
    ) -> Result<CpuAct<O, T>> {
        let (x, tape, dev) = x.into_train_input("conv_bn_train")?;
        let (residual, tape) = match residual {
            None => (None, tape),
            Some(r) => {
                let (r, tr, _) = r.into_train_input("conv_bn_train")?;
                (Some(r), tape.merge(tr))
            }
        };
        let cfg = BnConfig {
            relu,
            ..Default::default()
        };
        let (y, tape) = bn.train_with(|bn| {
            ops::conv2d_bn_train_on::<I, O, _, T, Held>(
                &dev,
                x,
                conv.weight(),
                C::CONFIG,
                bn,
                cfg,
                residual,
                tape,
            )
        })?;
        Ok(CpuAct::Traced(Traced::new(y, tape, dev)))
    }

    fn stop_grad<const C: usize>(&self, x: CpuAct<C, T>) -> Result<CpuAct<C, T>> {
        Ok(match x {
            CpuAct::Tensor(x) => CpuAct::Buffer(Buf::from_tensor(&x)),
            CpuAct::Traced(x) => CpuAct::Buffer(Buf {
                data: x.data,
                dims: x.dims,
            }),
            buffer => buffer,
        })
    }

    fn resume_grad<const C: usize>(&self, x: CpuAct<C, T>) -> Result<CpuAct<C, T>> {
        Ok(match x {
            CpuAct::Buffer(x) if T::OWNS_TAPE => {
                CpuAct::Tensor(x.into_tensor(&Cpu::default())?.retaped::<T>())
            }
            other => other,
        })
    }
}

/// Eval mode on a tensor: without a tape one fused op, with a tape the differentiable
/// ops one after the other.
fn tensor_conv_bn<const I: usize, const O: usize, WS: Shape, T: Tape<f32, Cpu> + Merge<T>>(
    x: Act<I, T>,
    weight: &Tensor<WS, f32, Cpu>,
    cfg: ConvConfig,
    bn: &BatchNorm2d<O, f32, Cpu>,
    relu: bool,
    residual: Option<Act<O, T>>,
) -> Result<Act<O, T>> {
    if !T::OWNS_TAPE {
        let (x, tape) = x.split_tape();
        let residual = residual.map(|r| r.split_tape().0);
        let eps = BnConfig::default().eps;
        let y = ops::conv2d_bn_eval(x, weight, cfg, bn.eval_ref(), eps, relu, residual.as_ref())?;
        return Ok(y.put_tape(tape));
    }
    let y = ops::conv2d::<I, O, WS, T>(x, weight, cfg)?;
    let Some(r) = residual else {
        return bn.forward_eval_act(y, relu);
    };
    let y = bn.forward_eval_act(y, false)?;
    if relu {
        ops::add_relu(y, r)
    } else if y.shape() == r.shape() {
        Ok(y.try_add(r)?)
    } else {
        Err(shape_err(
            "conv_bn_eval",
            format!(
                "residual has shape {:?}, the output has {:?}",
                r.shape(),
                y.shape()
            ),
        ))
    }
}

/// Eval mode on plain buffers: one fused pass.
fn buffer_conv_bn<const I: usize, const O: usize, WS: Shape>(
    x: Buf<I>,
    weight: &Tensor<WS, f32, Cpu>,
    cfg: ConvConfig,
    bn: BnRef<'_, O>,
    relu: bool,
    residual: Option<&Buf<O>>,
) -> Result<Buf<O>> {
    let (eps, r) = (BnConfig::default().eps, residual.map(|r| r.data.as_slice()));
    let (y, h, w) =
        ops::conv2d_bn_eval_raw::<I, O, WS>(&x.data, x.dims, weight, cfg, bn, eps, relu, r)?;
    Buf::new(y, [x.dims[0], h, w])
}

impl<const C: usize, T: Tape<f32, Cpu>> CpuAct<C, T> {
    /// The input of an eval-mode forward pass: a plain buffer when no tape is attached,
    /// else the tensor itself; with what turns the output back into a tensor.
    pub fn eval_input(x: Act<C, T>) -> (Self, Restore<T>) {
        if T::OWNS_TAPE {
            return (CpuAct::Tensor(x), Restore(None));
        }
        let dev = x.device().clone();
        let (x, tape) = x.split_tape();
        (
            CpuAct::Buffer(Buf::from_tensor(&x)),
            Restore(Some((dev, tape))),
        )
    }

    /// The input of a training-mode forward pass: the tensor itself.
    pub fn train_input(x: Act<C, T>) -> (Self, Restore<T>) {
        (CpuAct::Tensor(x), Restore(None))
    }
}

/// Turns the output of a pass back into a tensor: the device and tape set aside when its
/// input became a plain buffer ([`CpuAct::eval_input`]).
#[derive(Clone, Debug)]
pub struct Restore<T>(Option<(Cpu, T)>);

impl<T: Tape<f32, Cpu>> Restore<T> {
    /// The activation `y` as a tensor.
    pub fn act<const C: usize>(self, y: CpuAct<C, T>) -> Result<Act<C, T>> {
        match (y, self.0) {
            (CpuAct::Tensor(y), _) => Ok(y),
            (CpuAct::Traced(y), _) => y.into_tensor(),
            (CpuAct::Buffer(y), Some((dev, tape))) => Ok(y.into_tensor(&dev)?.put_tape(tape)),
            (CpuAct::Buffer(_), None) => Err(from_buffer()),
        }
    }

    /// The logits `y` as a tensor.
    pub fn logits<O: Dim>(self, y: CpuLogits<O, T>) -> Result<Mat<O, T>> {
        match (y, self.0) {
            (CpuLogits::Tensor(y), _) => Ok(y),
            (CpuLogits::Rows(y), Some((dev, tape))) => Ok(y.into_tensor(&dev)?.put_tape(tape)),
            (CpuLogits::Rows(_), None) => Err(from_buffer()),
        }
    }
}

fn from_buffer() -> Error {
    shape_err(
        "forward",
        "an inference buffer came out of a pass whose input was a tensor",
    )
}

/// A `(batch, C, height, width)` activation on plain memory: a shared row-major buffer
/// and its runtime dims (a fork shares it).
#[derive(Clone, Debug)]
pub struct Buf<const C: usize> {
    data: Arc<Vec<f32>>,
    dims: [usize; 3],
}

impl<const C: usize> Buf<C> {
    /// `data` as an `(n, C, h, w)` activation with `dims = [n, h, w]`.
    pub fn new(data: Vec<f32>, dims: [usize; 3]) -> Result<Self> {
        let [n, h, w] = dims;
        if data.len() != n * C * h * w {
            return Err(shape_err(
                "buffer",
                format!(
                    "{} values do not fill shape ({n}, {C}, {h}, {w})",
                    data.len()
                ),
            ));
        }
        Ok(Buf {
            data: Arc::new(data),
            dims,
        })
    }

    /// The values of a tensor.
    pub fn from_tensor<T>(x: &Act<C, T>) -> Self {
        let &(n, _, h, w) = x.shape();
        Buf {
            data: Arc::new(ops::read(x)),
            dims: [n, h, w],
        }
    }

    /// `[n, h, w]`.
    pub fn dims(&self) -> [usize; 3] {
        self.dims
    }

    /// `[n, C, h, w]`.
    fn shape4(&self) -> [usize; 4] {
        let [n, h, w] = self.dims;
        [n, C, h, w]
    }

    /// The values, row-major (copied only when another handle still shares them).
    pub fn into_vec(self) -> Vec<f32> {
        Arc::try_unwrap(self.data).unwrap_or_else(|shared| shared.as_ref().clone())
    }

    /// The activation as a tensor on `dev`.
    pub fn into_tensor(self, dev: &Cpu) -> Result<Act<C>> {
        let [n, h, w] = self.dims;
        Ok(dev.try_tensor_from_vec(self.into_vec(), (n, Const::<C>, h, w))?)
    }
}

/// `(n, O)` logits on plain memory, row-major.
#[derive(Clone, Debug)]
pub struct Rows<O: Dim> {
    /// The values.
    pub data: Vec<f32>,
    /// Rows (the batch).
    pub n: usize,
    /// Columns.
    pub cols: O,
}

impl<O: Dim> Rows<O> {
    /// The logits as a tensor on `dev`.
    pub fn into_tensor(self, dev: &Cpu) -> Result<Mat<O>> {
        Ok(dev.try_tensor_from_vec(self.data, (self.n, self.cols))?)
    }
}
