//! Load and save weights as safetensors with torchvision's tensor names.
//!
//! A file written by `safetensors.torch.save_file(torchvision_model.state_dict(), path)`
//! loads as it is: `num_batches_tracked` (int64) restores the batch-norm counters. Loading
//! checks every name, shape and dtype before it changes anything, so a bad file leaves
//! the model untouched; saving writes a temporary file and renames it into place.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use dfdx::prelude::*;
use resnext_fs::FileError;
use safetensors::tensor::{Dtype as StDtype, SafeTensors, TensorView};

use crate::params::{ParamKind, ParamVisitor, ParamVisitorMut, Params};

/// Why weights could not be loaded or saved. Every variant names the file and, where it
/// applies, the tensor and both shapes.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    /// The file could not be read or written.
    #[error(transparent)]
    File(#[from] FileError),
    /// The bytes are not a safetensors file.
    #[error("`{path}` is not a valid safetensors file: {msg}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        msg: String,
    },
    /// A tensor the model needs is not in the file.
    #[error("`{path}`: missing tensor `{name}` (the model expects shape {expected:?})")]
    Missing {
        /// The file.
        path: PathBuf,
        /// The tensor name.
        name: String,
        /// The shape the model expects.
        expected: Vec<usize>,
    },
    /// A tensor has another shape in the file than in the model.
    #[error(
        "`{path}`: tensor `{name}` has shape {found:?} in the file, the model expects {expected:?}"
    )]
    Shape {
        /// The file.
        path: PathBuf,
        /// The tensor name.
        name: String,
        /// The shape in the file.
        found: Vec<usize>,
        /// The shape the model expects.
        expected: Vec<usize>,
    },
    /// A tensor has a dtype we cannot read.
    #[error("`{path}`: tensor `{name}` has dtype {found}, expected {expected}")]
    Dtype {
        /// The file.
        path: PathBuf,
        /// The tensor name.
        name: String,
        /// The dtype in the file.
        found: String,
        /// What we accept.
        expected: &'static str,
    },
    /// A tensor holds values no trained model has: NaN or infinity anywhere, or a negative
    /// running variance.
    #[error("`{path}`: tensor `{name}` holds {what} at index {index}")]
    Value {
        /// The file.
        path: PathBuf,
        /// The tensor name.
        name: String,
        /// What was found, with the value.
        what: String,
        /// Where, in row-major order.
        index: usize,
    },
    /// The weights could not be serialised (no file involved yet).
    #[error("cannot serialise the weights: {msg}")]
    Serialize {
        /// What the serialiser said.
        msg: String,
    },
    /// The file holds tensors the model does not have.
    #[error("`{path}`: {count} unexpected tensor(s) not in the model, first: `{first}`")]
    Unexpected {
        /// The file.
        path: PathBuf,
        /// How many.
        count: usize,
        /// The first one in sorted order.
        first: String,
    },
}

/// The largest weights or optimiser-state file read (8 GiB; ResNeXt-101 64x4d is 330 MB):
/// a bound on the memory a file (or an endless device given as one) can take.
pub const MAX_FILE_BYTES: u64 = 8 << 30;

/// Name → (dtype, shape) of every tensor in a safetensors file.
pub fn inspect(
    path: impl AsRef<Path>,
) -> Result<BTreeMap<String, (String, Vec<usize>)>, WeightsError> {
    let path = path.as_ref();
    let bytes = resnext_fs::read_at_most(path, MAX_FILE_BYTES)?;
    let st = parse(path, &bytes)?;
    Ok(st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, (format!("{:?}", v.dtype()), v.shape().to_vec())))
        .collect())
}

fn parse<'a>(path: &Path, bytes: &'a [u8]) -> Result<SafeTensors<'a>, WeightsError> {
    SafeTensors::deserialize(bytes).map_err(|e| WeightsError::Format {
        path: path.into(),
        msg: e.to_string(),
    })
}

fn shape_of<S: Shape>(t: &Tensor<S, f32, Cpu>) -> Vec<usize> {
    t.shape().concrete().into()
}

fn to_f32(path: &Path, name: &str, view: &TensorView<'_>) -> Result<Vec<f32>, WeightsError> {
    let data = view.data();
    match view.dtype() {
        StDtype::F32 => Ok(data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()),
        StDtype::F64 => Ok(data
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
            .collect()),
        other => Err(WeightsError::Dtype {
            path: path.into(),
            name: name.into(),
            found: format!("{other:?}"),
            expected: "F32 or F64",
        }),
    }
}

fn to_count(path: &Path, name: &str, view: &TensorView<'_>) -> Result<u64, WeightsError> {
    let data = view.data();
    let bad = || WeightsError::Dtype {
        path: path.into(),
        name: name.into(),
        found: format!("{:?} {:?}", view.dtype(), view.shape()),
        expected: "a scalar I64",
    };
    if view.shape().iter().product::<usize>() != 1 {
        return Err(bad());
    }
    match view.dtype() {
        StDtype::I64 => Ok(i64::from_le_bytes(data.try_into().map_err(|_| bad())?).max(0) as u64),
        StDtype::I32 => Ok(i32::from_le_bytes(data.try_into().map_err(|_| bad())?).max(0) as u64),
        _ => Err(bad()),
    }
}

/// Rejects NaN and infinite values, and negative running variances (they would turn into
/// finite, confident and wrong outputs: a ReLU maps NaN to zero).
fn check_values(path: &Path, name: &str, values: &[f32]) -> Result<(), WeightsError> {
    let bad = |index: usize, what: String| WeightsError::Value {
        path: path.into(),
        name: name.into(),
        what,
        index,
    };
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(bad(i, format!("a non-finite value ({})", values[i])));
    }
    if name.ends_with("running_var") {
        if let Some(i) = values.iter().position(|&v| v < 0.0) {
            return Err(bad(i, format!("a negative variance ({})", values[i])));
        }
    }
    Ok(())
}

/// Which tensors of a file a load may leave out, for [`load_with`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadMode {
    /// Every tensor of the model from the file, nothing else in the file (the default).
    Strict,
    /// As [`LoadMode::Strict`], except the classifier (`fc.weight`, `fc.bias`): when the
    /// file's has another class count (or the file has none), the model's is kept as
    /// initialised. What fine-tuning on a new class count needs; another architecture or
    /// input-channel count is still an error.
    NewHead,
    /// As [`LoadMode::NewHead`], and the classifier is kept as initialised even when the
    /// file's fits: the backbone only (new classes, as many as the old ones).
    Backbone,
    /// PyTorch's `strict=False`, and more: every tensor that is missing from the file or has
    /// another shape there is kept as initialised, and tensors the model does not have are
    /// ignored. Only when asked for: a load that fits nothing "succeeds".
    Lenient,
}

/// What [`load_with`] did, tensor by tensor.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Tensors (and batch-norm counters) loaded from the file.
    pub loaded: Vec<String>,
    /// Tensors of the model left as they were, each with why.
    pub kept: Vec<(String, String)>,
    /// Tensors in the file the model does not have (ignored; [`LoadMode::Lenient`] only).
    pub ignored: Vec<String>,
}

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "loaded {} tensors", self.loaded.len())?;
        if !self.kept.is_empty() {
            let kept: Vec<String> = self
                .kept
                .iter()
                .map(|(n, why)| format!("`{n}` ({why})"))
                .collect();
            write!(f, "; kept as initialised: {}", kept.join(", "))?;
        }
        if !self.ignored.is_empty() {
            write!(
                f,
                "; ignored {} tensors not in the model",
                self.ignored.len()
            )?;
        }
        Ok(())
    }
}

struct Check<'a> {
    path: &'a Path,
    st: &'a SafeTensors<'a>,
    seen: BTreeSet<String>,
    mode: LoadMode,
    /// Tensors of the model not taken from the file, with why.
    kept: Vec<(String, String)>,
}

impl Check<'_> {
    /// Whether the mode lets the model keep its own `name` instead of failing with `e`.
    fn may_keep(&mut self, name: &str, e: WeightsError) -> Result<(), WeightsError> {
        let head = name == "fc.weight" || name == "fc.bias";
        let keep = match self.mode {
            LoadMode::Backbone => {
                head && !matches!(e, WeightsError::Value { .. } | WeightsError::Dtype { .. })
            }
            LoadMode::Strict => false,
            LoadMode::NewHead => {
                head && !matches!(e, WeightsError::Value { .. } | WeightsError::Dtype { .. })
            }
            LoadMode::Lenient => !matches!(e, WeightsError::Value { .. }),
        };
        if !keep {
            return Err(e);
        }
        let why = match &e {
            WeightsError::Missing { .. } => "not in the file".to_string(),
            WeightsError::Shape {
                found, expected, ..
            } => {
                format!("{found:?} in the file, {expected:?} here")
            }
            other => other.to_string(),
        };
        self.kept.push((name.to_string(), why));
        Ok(())
    }
}

impl ParamVisitor for Check<'_> {
    type Error = WeightsError;
    fn tensor<S: Shape>(
        &mut self,
        name: &str,
        t: &Tensor<S, f32, Cpu>,
        _: ParamKind,
    ) -> Result<(), WeightsError> {
        let expected = shape_of(t);
        let head = name == "fc.weight" || name == "fc.bias";
        if head && self.mode == LoadMode::Backbone {
            if self.st.tensor(name).is_ok() {
                self.seen.insert(name.to_string());
            }
            self.kept
                .push((name.to_string(), "the head is reset".into()));
            return Ok(());
        }
        let Ok(view) = self.st.tensor(name) else {
            let e = WeightsError::Missing {
                path: self.path.into(),
                name: name.into(),
                expected,
            };
            return self.may_keep(name, e);
        };
        self.seen.insert(name.to_string());
        if view.shape() != expected.as_slice() {
            let e = WeightsError::Shape {
                path: self.path.into(),
                name: name.into(),
                found: view.shape().to_vec(),
                expected,
            };
            return self.may_keep(name, e);
        }
        match to_f32(self.path, name, &view) {
            Ok(values) => check_values(self.path, name, &values),
            Err(e) => self.may_keep(name, e),
        }
    }
    fn counter(&mut self, name: &str, _: u64) -> Result<(), WeightsError> {
        if let Ok(view) = self.st.tensor(name) {
            to_count(self.path, name, &view)?;
            self.seen.insert(name.to_string());
        }
        Ok(())
    }
}

struct Assign<'a> {
    path: &'a Path,
    st: &'a SafeTensors<'a>,
    /// Tensors to leave as they are.
    skip: BTreeSet<String>,
    loaded: Vec<String>,
}

impl ParamVisitorMut for Assign<'_> {
    type Error = WeightsError;
    fn tensor<S: Shape>(
        &mut self,
        name: &str,
        t: &mut Tensor<S, f32, Cpu>,
        _: ParamKind,
    ) -> Result<(), WeightsError> {
        if self.skip.contains(name) {
            return Ok(());
        }
        let view = self.st.tensor(name).map_err(|_| WeightsError::Missing {
            path: self.path.into(),
            name: name.into(),
            expected: shape_of(t),
        })?;
        t.copy_from(&to_f32(self.path, name, &view)?);
        self.loaded.push(name.to_string());
        Ok(())
    }
    fn counter(&mut self, name: &str, value: &mut u64) -> Result<(), WeightsError> {
        *value = match self.st.tensor(name) {
            Ok(view) => {
                self.loaded.push(name.to_string());
                to_count(self.path, name, &view)?
            }
            Err(_) => 0,
        };
        Ok(())
    }
}

/// Loads weights from safetensors bytes; `path` only labels errors. Checks everything
/// first and changes the model only when the whole file fits.
pub fn load_from_bytes<M: Params>(
    model: &mut M,
    bytes: &[u8],
    path: &Path,
) -> Result<(), WeightsError> {
    load_with(model, bytes, path, LoadMode::Strict).map(|_| ())
}

/// Loads weights from safetensors bytes under `mode`, and says which tensors were loaded
/// and which kept. Checks everything first: on an error the model is unchanged.
pub fn load_with<M: Params>(
    model: &mut M,
    bytes: &[u8],
    path: &Path,
    mode: LoadMode,
) -> Result<LoadReport, WeightsError> {
    let st = parse(path, bytes)?;
    let mut check = Check {
        path,
        st: &st,
        seen: BTreeSet::new(),
        mode,
        kept: Vec::new(),
    };
    model.visit_params("", &mut check)?;
    let mut ignored: Vec<String> = st
        .names()
        .into_iter()
        .filter(|n| !check.seen.contains(*n))
        .cloned()
        .collect();
    ignored.sort();
    if let (Some(first), false) = (ignored.first(), mode == LoadMode::Lenient) {
        return Err(WeightsError::Unexpected {
            path: path.into(),
            count: ignored.len(),
            first: first.clone(),
        });
    }
    let mut assign = Assign {
        path,
        st: &st,
        skip: check.kept.iter().map(|(n, _)| n.clone()).collect(),
        loaded: Vec::new(),
    };
    model.visit_params_mut("", &mut assign)?;
    Ok(LoadReport {
        loaded: assign.loaded,
        kept: check.kept,
        ignored,
    })
}

/// Loads a safetensors file into `model` under `mode` (see [`load_with`]).
pub fn load_safetensors_with<M: Params>(
    model: &mut M,
    path: impl AsRef<Path>,
    mode: LoadMode,
) -> Result<LoadReport, WeightsError> {
    let path = path.as_ref();
    let bytes = resnext_fs::read_at_most(path, MAX_FILE_BYTES)?;
    load_with(model, &bytes, path, mode)
}

/// Loads a safetensors file into `model` (see [`load_from_bytes`]).
pub fn load_safetensors<M: Params>(
    model: &mut M,
    path: impl AsRef<Path>,
) -> Result<(), WeightsError> {
    let path = path.as_ref();
    let bytes = resnext_fs::read_at_most(path, MAX_FILE_BYTES)?;
    load_from_bytes(model, &bytes, path)
}

struct Collect(Vec<(String, StDtype, Vec<usize>, Vec<u8>)>);

impl ParamVisitor for Collect {
    type Error = WeightsError;
    fn tensor<S: Shape>(
        &mut self,
        name: &str,
        t: &Tensor<S, f32, Cpu>,
        _: ParamKind,
    ) -> Result<(), WeightsError> {
        let bytes = crate::ops::read(t)
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        self.0
            .push((name.to_string(), StDtype::F32, shape_of(t), bytes));
        Ok(())
    }
    fn counter(&mut self, name: &str, value: u64) -> Result<(), WeightsError> {
        self.0.push((
            name.to_string(),
            StDtype::I64,
            vec![],
            (value as i64).to_le_bytes().to_vec(),
        ));
        Ok(())
    }
}

/// Serialises `model` to safetensors bytes with torchvision's names (f32 tensors,
/// int64 `num_batches_tracked`), loadable by `safetensors.torch.load_file`.
pub fn to_bytes<M: Params>(model: &M) -> Result<Vec<u8>, WeightsError> {
    let mut c = Collect(Vec::new());
    model.visit_params("", &mut c)?;
    let views: Vec<(String, TensorView<'_>)> =
        c.0.iter()
            .map(|(n, d, s, b)| TensorView::new(*d, s.clone(), b).map(|v| (n.clone(), v)))
            .collect::<Result<_, _>>()
            .map_err(|e| WeightsError::Serialize { msg: e.to_string() })?;
    safetensors::tensor::serialize(views, &None)
        .map_err(|e| WeightsError::Serialize { msg: e.to_string() })
}

/// A serialisation failure while saving `path`, reported as a failed write of that file.
pub(crate) fn unwritable(path: &Path, e: WeightsError) -> WeightsError {
    WeightsError::File(FileError::Write {
        path: path.into(),
        error: std::io::Error::other(e.to_string()),
    })
}

/// Saves `model` to `path` atomically (see [`to_bytes`] and [`resnext_fs::write_atomic`]).
pub fn save_safetensors<M: Params>(model: &M, path: impl AsRef<Path>) -> Result<(), WeightsError> {
    let path = path.as_ref();
    let bytes = to_bytes(model).map_err(|e| unwritable(path, e))?;
    Ok(resnext_fs::write(path, &bytes)?)
}
