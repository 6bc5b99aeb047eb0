//! The CPU backend, [`CpuBackend`]. Its activations ([`CpuAct`]) are either dfdx tensors
//! on a tape, so gradients flow (training, and eval mode with gradients), or plain
//! buffers for inference, where each convolution runs fused with its batch norm, residual
//! add and ReLU and activations pass between convolutions without being copied in and out
//! of tensors. Both compute with [`crate::ops`] and [`crate::kernels`].

use std::marker::PhantomData;
use std::sync::Arc;

use dfdx::prelude::*;

use super::{Backend, TrainBackend};
use crate::error::{shape_err, Error, Result};
use crate::nn::{BatchNorm2d, Conv2d, Linear};
use crate::ops::{self, Act, Mat};

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

/// An activation of [`CpuBackend`]: a tensor on tape `T`, or a plain buffer for inference.
#[derive(Debug)]
pub enum CpuAct<const C: usize, T> {
    /// A dfdx tensor carrying the tape.
    Tensor(Act<C, T>),
    /// Plain memory (inference without a tape).
    Buffer(Buf<C>),
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
        })
    }

    fn conv_bn_eval<
        const I: usize,
        const O: usize,
        const K: usize,
        const S: usize,
        const P: usize,
        const G: usize,
    >(
        &self,
        x: CpuAct<I, T>,
        conv: &Conv2d<I, O, K, S, P, G, f32, Cpu>,
        bn: &BatchNorm2d<O, f32, Cpu>,
        relu: bool,
        residual: Option<CpuAct<O, T>>,
    ) -> Result<CpuAct<O, T>> {
        match (x, residual) {
            (CpuAct::Buffer(x), None) => buffer_conv_bn(x, conv, bn, relu, None),
            (CpuAct::Buffer(x), Some(CpuAct::Buffer(r))) => {
                buffer_conv_bn(x, conv, bn, relu, Some(&r))
            }
            (CpuAct::Tensor(x), None) => {
                Ok(CpuAct::Tensor(tensor_conv_bn(x, conv, bn, relu, None)?))
            }
            (CpuAct::Tensor(x), Some(CpuAct::Tensor(r))) => {
                Ok(CpuAct::Tensor(tensor_conv_bn(x, conv, bn, relu, Some(r))?))
            }
            _ => Err(mixed("conv_bn_eval")),
        }
    }

    fn max_pool<const C: usize, const K: usize, const S: usize, const P: usize>(
        &self,
        x: CpuAct<C, T>,
    ) -> Result<CpuAct<C, T>> {
        Ok(match x {
            CpuAct::Tensor(x) => CpuAct::Tensor(ops::max_pool2d(x, K, S, P)?),
            CpuAct::Buffer(x) => {
                let (y, h, w) = ops::max_pool2d_raw(&x.data, x.shape4(), K, S, P)?;
                CpuAct::Buffer(Buf::new(y, [x.dims[0], h, w])?)
            }
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
    fn conv_bn_train<
        const I: usize,
        const O: usize,
        const K: usize,
        const S: usize,
        const P: usize,
        const G: usize,
    >(
        &self,
        x: CpuAct<I, T>,
        conv: &Conv2d<I, O, K, S, P, G, f32, Cpu>,
        bn: &mut BatchNorm2d<O, f32, Cpu>,
        relu: bool,
        residual: Option<CpuAct<O, T>>,
    ) -> Result<CpuAct<O, T>> {
        let residual = match residual {
            None => None,
            Some(CpuAct::Tensor(r)) => Some(r),
            Some(CpuAct::Buffer(_)) => return Err(mixed("conv_bn_train")),
        };
        match x {
            CpuAct::Tensor(x) => Ok(CpuAct::Tensor(
                conv.forward_bn_train(x, bn, relu, residual)?,
            )),
            CpuAct::Buffer(_) => Err(shape_err(
                "conv_bn_train",
                "training mode runs on tensors; this activation is an inference buffer",
            )),
        }
    }
}

/// Eval mode on a tensor: without a tape one fused op, with a tape the differentiable
/// ops one after the other.
fn tensor_conv_bn<
    const I: usize,
    const O: usize,
    const K: usize,
    const S: usize,
    const P: usize,
    const G: usize,
    T: Tape<f32, Cpu> + Merge<T>,
>(
    x: Act<I, T>,
    conv: &Conv2d<I, O, K, S, P, G, f32, Cpu>,
    bn: &BatchNorm2d<O, f32, Cpu>,
    relu: bool,
    residual: Option<Act<O, T>>,
) -> Result<Act<O, T>> {
    if !T::OWNS_TAPE {
        let (x, tape) = x.split_tape();
        let residual = residual.map(|r| r.split_tape().0);
        return Ok(conv
            .forward_bn_eval(x, bn, relu, residual.as_ref())?
            .put_tape(tape));
    }
    let y = conv.try_forward(x)?;
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
fn buffer_conv_bn<
    const I: usize,
    const O: usize,
    const K: usize,
    const S: usize,
    const P: usize,
    const G: usize,
    T,
>(
    x: Buf<I>,
    conv: &Conv2d<I, O, K, S, P, G, f32, Cpu>,
    bn: &BatchNorm2d<O, f32, Cpu>,
    relu: bool,
    residual: Option<&Buf<O>>,
) -> Result<CpuAct<O, T>> {
    let (y, h, w) = conv.forward_bn_eval_raw(
        &x.data,
        x.dims,
        bn,
        relu,
        residual.map(|r| r.data.as_slice()),
    )?;
    Ok(CpuAct::Buffer(Buf::new(y, [x.dims[0], h, w])?))
}

impl<const C: usize, T: Tape<f32, Cpu>> CpuAct<C, T> {
    /// The input of an eval-mode forward pass: a plain buffer when no tape is attached
    /// (returned with the tape, to put back on the output), else the tensor itself.
    pub fn eval_input(x: Act<C, T>) -> (Self, Option<T>) {
        if T::OWNS_TAPE {
            return (CpuAct::Tensor(x), None);
        }
        let (x, tape) = x.split_tape();
        (CpuAct::Buffer(Buf::from_tensor(&x)), Some(tape))
    }

    /// The tensor of an output; `tape` is what [`CpuAct::eval_input`] returned.
    pub fn into_tensor(self, dev: &Cpu, tape: Option<T>) -> Result<Act<C, T>> {
        match (self, tape) {
            (CpuAct::Tensor(y), _) => Ok(y),
            (CpuAct::Buffer(y), Some(tape)) => Ok(y.into_tensor(dev)?.put_tape(tape)),
            (CpuAct::Buffer(_), None) => Err(shape_err(
                "forward",
                "an inference buffer came out of a pass that records gradients",
            )),
        }
    }
}

impl<O: Dim, T: Tape<f32, Cpu>> CpuLogits<O, T> {
    /// The logits as a tensor; `tape` is what [`CpuAct::eval_input`] returned.
    pub fn into_tensor(self, dev: &Cpu, tape: Option<T>) -> Result<Mat<O, T>> {
        match (self, tape) {
            (CpuLogits::Tensor(y), _) => Ok(y),
            (CpuLogits::Rows(y), Some(tape)) => Ok(y.into_tensor(dev)?.put_tape(tape)),
            (CpuLogits::Rows(_), None) => Err(shape_err(
                "forward",
                "inference logits came out of a pass that records gradients",
            )),
        }
    }
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
