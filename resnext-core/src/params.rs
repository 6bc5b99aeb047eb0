//! Named parameter traversal with torchvision's names.
//!
//! dfdx's [`TensorCollection`] can only describe tensors whose shape is known at compile
//! time, but a classifier whose class count is read from a dataset at run time has a
//! `(usize, Const<F>)` weight. [`Params`] is the one traversal that covers both: networks
//! implement it by walking their const-shaped parts through dfdx's visitor machinery
//! ([`walk`], [`walk_mut`]) and visiting the head directly. Weight I/O, the optimiser and
//! parameter counting are written against it.

use dfdx::nn::tensor_collection::{
    RecursiveWalker, ScalarOptions, TensorCollection, TensorOptions, TensorViewer, TensorVisitor,
    ViewTensorMut, ViewTensorName, ViewTensorRef,
};
use dfdx::prelude::*;
use num_traits::NumCast;

use std::convert::Infallible;

/// What a named tensor is, for the optimiser and for counting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamKind {
    /// A trainable weight with two or more dims (conv and dense weights): weight decay applies.
    Weight,
    /// A trainable vector (batch-norm scale and shift, biases): no weight decay by default.
    Vector,
    /// A buffer updated outside the optimiser (batch-norm running statistics).
    Buffer,
}

impl ParamKind {
    fn of<S: Shape>(do_gradient_update: bool) -> Self {
        if !do_gradient_update {
            ParamKind::Buffer
        } else if S::NUM_DIMS >= 2 {
            ParamKind::Weight
        } else {
            ParamKind::Vector
        }
    }
}

/// Reads each named tensor and counter of a model.
pub trait ParamVisitor {
    /// What stops the walk ([`Infallible`] for a visitor that cannot fail).
    type Error;
    /// Called once per tensor, in a fixed order.
    fn tensor<S: Shape>(
        &mut self,
        name: &str,
        t: &Tensor<S, f32, Cpu>,
        kind: ParamKind,
    ) -> Result<(), Self::Error>;
    /// Called once per integer counter (batch norm's `num_batches_tracked`).
    fn counter(&mut self, _name: &str, _value: u64) -> Result<(), Self::Error> {
        Ok(())
    }
}

/// Reads and writes each named tensor and counter of a model.
pub trait ParamVisitorMut {
    /// What stops the walk ([`Infallible`] for a visitor that cannot fail).
    type Error;
    /// Called once per tensor, in a fixed order.
    fn tensor<S: Shape>(
        &mut self,
        name: &str,
        t: &mut Tensor<S, f32, Cpu>,
        kind: ParamKind,
    ) -> Result<(), Self::Error>;
    /// Called once per integer counter (batch norm's `num_batches_tracked`).
    fn counter(&mut self, _name: &str, _value: &mut u64) -> Result<(), Self::Error> {
        Ok(())
    }
}

/// A model whose named tensors can be visited (torchvision names, dot-separated).
pub trait Params {
    /// Visits every tensor and counter read-only; names are prefixed with `prefix.` when
    /// `prefix` is not empty.
    fn visit_params<V: ParamVisitor>(&self, prefix: &str, v: &mut V) -> Result<(), V::Error>;
    /// Visits every tensor and counter mutably.
    fn visit_params_mut<V: ParamVisitorMut>(
        &mut self,
        prefix: &str,
        v: &mut V,
    ) -> Result<(), V::Error>;

    /// Number of trainable scalars (torchvision's `sum(p.numel() for p in m.parameters())`).
    fn num_params(&self) -> usize {
        struct Count(usize);
        impl ParamVisitor for Count {
            type Error = Infallible;
            fn tensor<S: Shape>(
                &mut self,
                _: &str,
                t: &Tensor<S, f32, Cpu>,
                kind: ParamKind,
            ) -> Result<(), Infallible> {
                if kind != ParamKind::Buffer {
                    self.0 += t.shape().num_elements();
                }
                Ok(())
            }
        }
        let mut c = Count(0);
        match self.visit_params("", &mut c) {
            Ok(()) => c.0,
            Err(never) => match never {},
        }
    }
}

/// Joins a prefix and a name with a dot, torchvision style.
pub fn join(prefix: &str, name: &str) -> String {
    match (prefix.is_empty(), name.is_empty()) {
        (true, _) => name.to_string(),
        (_, true) => prefix.to_string(),
        _ => format!("{prefix}.{name}"),
    }
}

/// A dfdx `TensorVisitor` named `$name` that hands each tensor (viewed through `$view`)
/// to a `$visitor`, and each counter to `$counter` (given the visitor, the viewed counter
/// and its name).
macro_rules! bridge {
    ($name:ident, $visitor:ident, $view:ident, |$this:ident, $value:ident, $key:ident| $counter:block) => {
        struct $name<'v, V>(&'v mut V);

        impl<V: $visitor> TensorVisitor<f32, Cpu> for $name<'_, V> {
            type Viewer = ($view, ViewTensorName);
            type Err = V::Error;
            type E2 = f32;
            type D2 = Cpu;

            fn visit<S: Shape>(
                &mut self,
                opts: TensorOptions<S, f32, Cpu>,
                (t, name): <Self::Viewer as TensorViewer>::View<'_, Tensor<S, f32, Cpu>>,
            ) -> Result<Option<Tensor<S, f32, Cpu>>, V::Error> {
                self.0
                    .tensor(&name, t, ParamKind::of::<S>(opts.do_gradient_update))?;
                Ok(None)
            }

            fn visit_scalar<N: NumCast>(
                &mut self,
                _: ScalarOptions<N>,
                ($value, $key): <Self::Viewer as TensorViewer>::View<'_, N>,
            ) -> Result<Option<N>, V::Error> {
                let $this = &mut *self.0;
                $counter
                Ok(None)
            }
        }
    };
}

bridge!(Bridge, ParamVisitor, ViewTensorRef, |v, value, name| {
    v.counter(&name, value.to_u64().unwrap_or(0))?;
});

bridge!(
    BridgeMut,
    ParamVisitorMut,
    ViewTensorMut,
    |v, value, name| {
        let mut n = value.to_u64().unwrap_or(0);
        v.counter(&name, &mut n)?;
        if let Some(n) = N::from(n) {
            *value = n;
        }
    }
);

/// Visits the tensors of a const-shaped module (anything with a [`TensorCollection`]).
pub fn walk<M: TensorCollection<f32, Cpu>, V: ParamVisitor>(
    m: &M,
    prefix: &str,
    v: &mut V,
) -> Result<(), V::Error> {
    M::iter_tensors(&mut RecursiveWalker {
        m: (m, prefix.to_string()),
        f: &mut Bridge(v),
    })?;
    Ok(())
}

/// Mutable twin of [`walk`].
pub fn walk_mut<M: TensorCollection<f32, Cpu>, V: ParamVisitorMut>(
    m: &mut M,
    prefix: &str,
    v: &mut V,
) -> Result<(), V::Error> {
    M::iter_tensors(&mut RecursiveWalker {
        m: (m, prefix.to_string()),
        f: &mut BridgeMut(v),
    })?;
    Ok(())
}

impl<const F: usize, O: Dim> Params for crate::nn::Linear<F, O, f32, Cpu> {
    fn visit_params<V: ParamVisitor>(&self, prefix: &str, v: &mut V) -> Result<(), V::Error> {
        v.tensor(&join(prefix, "weight"), &self.weight, ParamKind::Weight)?;
        v.tensor(&join(prefix, "bias"), &self.bias, ParamKind::Vector)
    }
    fn visit_params_mut<V: ParamVisitorMut>(
        &mut self,
        prefix: &str,
        v: &mut V,
    ) -> Result<(), V::Error> {
        v.tensor(&join(prefix, "weight"), &mut self.weight, ParamKind::Weight)?;
        v.tensor(&join(prefix, "bias"), &mut self.bias, ParamKind::Vector)
    }
}
