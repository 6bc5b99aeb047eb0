//! [`Linear`]: the classifier, with a class count fixed in the type or chosen at run time.

use dfdx::prelude::*;
use rand_distr::Uniform;

use crate::error::{Error, Result};
use crate::ops::{self, Mat};

/// Fully connected layer `F → O` (`y = x Wᵀ + b`, weight `(O, F)` as torchvision stores
/// it). `O` is `Const<N>` for a class count fixed in the type, or `usize` for one known
/// only at run time (build those with [`Linear::new_runtime`]). PyTorch's default
/// initialisation: uniform in ±1/√F.
#[derive(Clone, Debug)]
pub struct Linear<const F: usize, O: Dim, E: Dtype, D: Storage<E>> {
    /// `(O, F)`.
    pub weight: Tensor<(O, Const<F>), E, D>,
    /// `(O,)`.
    pub bias: Tensor<(O,), E, D>,
}

/// PyTorch's default initialisation of a layer with `F` inputs: uniform in ±1/√F.
fn fill_uniform<const F: usize, S: Shape, D: Device<f32>>(
    t: &mut Tensor<S, f32, D>,
) -> Result<(), D::Err> {
    let b = 1.0 / (F as f32).sqrt();
    t.try_fill_with_distr(Uniform::new(-b, b))
}

impl<const F: usize> Linear<F, usize, f32, Cpu> {
    /// A classifier with `classes` outputs chosen at run time.
    pub fn new_runtime(dev: &Cpu, classes: usize) -> Result<Self> {
        let mut weight = dev.try_zeros_like(&(classes, Const::<F>))?;
        fill_uniform::<F, _, _>(&mut weight)?;
        let mut bias = dev.try_zeros_like(&(classes,))?;
        fill_uniform::<F, _, _>(&mut bias)?;
        Ok(Self { weight, bias })
    }
}

impl<const F: usize, const N: usize, D: Device<f32>> TensorCollection<f32, D>
    for Linear<F, Const<N>, f32, D>
{
    type To<E2: Dtype, D2: Device<E2>> = Linear<F, Const<N>, E2, D2>;

    fn iter_tensors<V: ModuleVisitor<Self, f32, D>>(
        visitor: &mut V,
    ) -> Result<Option<Self::To<V::E2, V::D2>>, V::Err> {
        visitor.visit_fields(
            (
                field_tensor!(weight, TensorOptions::reset_with(fill_uniform::<F, _, _>)),
                field_tensor!(bias, TensorOptions::reset_with(fill_uniform::<F, _, _>)),
            ),
            |(weight, bias)| Linear { weight, bias },
        )
    }
}

impl<const F: usize, O: Dim, E: Dtype, D: Storage<E>> NonMutableModule for Linear<F, O, E, D> {}

impl<const F: usize, O: Dim, T: Tape<f32, Cpu>> Module<Mat<Const<F>, T>>
    for Linear<F, O, f32, Cpu>
{
    type Output = Mat<O, T>;
    type Error = Error;
    fn try_forward(&self, x: Mat<Const<F>, T>) -> Result<Mat<O, T>> {
        ops::linear(x, &self.weight, &self.bias)
    }
}
