//! [`Gpu`]: one opened CUDA device (context, stream, cuDNN, cuBLAS, the backend's kernels,
//! the caching allocator and the parameters copied to it), and [`DevBuf`], a buffer of
//! f32 or of activations on it.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::rc::Rc;
use std::sync::Arc;

use cudarc::cublas::CudaBlas;
use cudarc::cudnn::Cudnn;
use cudarc::driver::{
    sys::CUresult, CudaContext, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr,
    DriverError,
};
use half::bf16;

use super::alloc::{CachingPool, PoolStats, RawAlloc};
use super::conv::Convs;
use super::kernels::Kernels;
use super::train::{Tape, TrainParam};
use crate::backend::device::{GpuError, Precision};

/// A driver error as a [`GpuError`]: out of memory named as such, with what the
/// allocation of `bytes` bytes was for.
pub(super) fn driver_err(e: DriverError, what: &str, bytes: usize) -> GpuError {
    if e.0 == CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        GpuError::OutOfMemory {
            what: what.to_string(),
            bytes,
        }
    } else {
        GpuError::Call {
            what: what.to_string(),
            msg: e.to_string(),
        }
    }
}

/// A failed CUDA call as a [`GpuError`] naming the call.
pub(super) fn call_err<E: std::fmt::Debug>(what: &str) -> impl Fn(E) -> GpuError + '_ {
    move |e| GpuError::Call {
        what: what.to_string(),
        msg: format!("{e:?}"),
    }
}

/// Whether the NVIDIA driver's library (`libcuda.so`) can be loaded.
pub fn driver_present() -> bool {
    // SAFETY: only tries to open the library by its usual names.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Runs a call into the CUDA libraries with a panic inside them (a library that loads
/// but lacks a symbol) turned into an error.
pub(super) fn guarded<T>(
    what: &str,
    f: impl FnOnce() -> Result<T, GpuError>,
) -> Result<T, GpuError> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "a CUDA library failed".into());
        Err(GpuError::Call {
            what: what.to_string(),
            msg,
        })
    })
}

/// The number of CUDA GPUs the driver reports: [`GpuError::NoDriver`] when there is no
/// driver (never a panic).
pub fn device_count() -> Result<usize, GpuError> {
    if !driver_present() {
        return Err(GpuError::NoDriver);
    }
    guarded("counting CUDA devices", || {
        match CudaContext::device_count() {
            Ok(n) => Ok(n.max(0) as usize),
            // a driver with no GPU (or none visible through CUDA_VISIBLE_DEVICES)
            Err(DriverError(CUresult::CUDA_ERROR_NO_DEVICE)) => Ok(0),
            Err(e) => Err(GpuError::Call {
                what: "initialising the CUDA driver".into(),
                msg: e.to_string(),
            }),
        }
    })
}

/// Allocations from the driver, on the device's stream (stream-ordered, so a block freed
/// and handed out again is only reused after the work queued before it).
pub(super) struct DriverAlloc {
    stream: Arc<CudaStream>,
}

impl RawAlloc for DriverAlloc {
    type Block = CudaSlice<f32>;
    fn alloc(&mut self, bytes: usize) -> Result<CudaSlice<f32>, GpuError> {
        // SAFETY: a buffer's contents are written before they are read (every op writes
        // its whole output).
        unsafe { self.stream.alloc::<f32>(bytes / 4) }.map_err(|e| driver_err(e, "", bytes))
    }
    fn release(&mut self, block: CudaSlice<f32>) {
        drop(block);
    }
}

type Pool = Rc<RefCell<CachingPool<DriverAlloc>>>;

/// `len` values on the GPU, f32 or activations in the GPU's [`Precision`], from the
/// caching allocator (back to it when dropped).
pub struct DevBuf {
    slice: Option<CudaSlice<f32>>,
    class: usize,
    len: usize,
    /// Bytes a value takes.
    elem: usize,
    pool: Pool,
}

impl DevBuf {
    /// Number of values.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether it holds no value.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The whole block, whatever its values' type (the kernels take the length as an
    /// argument).
    pub(super) fn slice(&self) -> &CudaSlice<f32> {
        self.slice.as_ref().expect("live buffer")
    }
    pub(super) fn slice_mut(&mut self) -> &mut CudaSlice<f32> {
        self.slice.as_mut().expect("live buffer")
    }
    /// The `len` values of an f32 buffer.
    pub(super) fn view(&self) -> CudaView<'_, f32> {
        self.typed()
    }
    pub(super) fn view_mut(&mut self) -> CudaViewMut<'_, f32> {
        self.typed_mut()
    }
    /// The `len` values as `T`, which must be the buffer's type (f32, or an activation's).
    pub(super) fn typed<T>(&self) -> CudaView<'_, T> {
        assert_eq!(
            std::mem::size_of::<T>(),
            self.elem,
            "a buffer read as another type"
        );
        // SAFETY: the block holds len values of `elem` bytes, of type T as checked.
        unsafe { self.slice().transmute::<T>(self.len) }.expect("the block holds len values")
    }
    pub(super) fn typed_mut<T>(&mut self) -> CudaViewMut<'_, T> {
        assert_eq!(
            std::mem::size_of::<T>(),
            self.elem,
            "a buffer written as another type"
        );
        let len = self.len;
        // SAFETY: as in `typed`.
        unsafe { self.slice_mut().transmute_mut::<T>(len) }.expect("the block holds len values")
    }
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        if let Some(s) = self.slice.take() {
            if let Ok(mut p) = self.pool.try_borrow_mut() {
                p.give_back(s, self.class);
            }
        }
    }
}

impl std::fmt::Debug for DevBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevBuf").field("len", &self.len).finish()
    }
}

/// A convolution's weights with its eval-mode batch norm folded in, on the GPU: the
/// weights in the activations' precision, the shift in f32.
pub(super) struct FoldedConv {
    pub(super) w: DevBuf,
    pub(super) shift: CudaSlice<f32>,
}

/// A classifier's weight `(O, F)` and bias on the GPU.
pub(super) struct GpuLinear {
    pub(super) w: CudaSlice<f32>,
    pub(super) b: CudaSlice<f32>,
}

/// The GPU copies of a model's parameters, keyed by
/// [`param_key`](crate::backend::param_key) and valid for one state of the model (its
/// stamp).
#[derive(Default)]
pub(super) struct Params {
    stamp: Option<u64>,
    pub(super) convs: HashMap<usize, Rc<FoldedConv>>,
    pub(super) linears: HashMap<usize, Rc<GpuLinear>>,
}

pub(super) struct Inner {
    pub(super) index: usize,
    pub(super) name: String,
    pub(super) precision: Precision,
    pub(super) stream: Arc<CudaStream>,
    pub(super) blas: CudaBlas,
    pub(super) k: Kernels,
    pub(super) convs: RefCell<Convs>,
    pub(super) params: RefCell<Params>,
    /// The training copies of parameters and buffers (weights the optimiser updates on
    /// the GPU, their gradients and optimiser state; running statistics), by
    /// [`param_key`](crate::backend::param_key).
    pub(super) train: RefCell<HashMap<usize, Rc<TrainParam>>>,
    /// The backward operations of the forward pass being recorded.
    pub(super) tape: RefCell<Tape>,
    /// The NCCL communicator of the GPUs' process group, once joined.
    pub(super) group: RefCell<Option<cudarc::nccl::Comm>>,
    /// The size of the gradient buckets summed over the group.
    pub(super) bucket_bytes: Cell<usize>,
    /// Whether training-mode batch norms use the group's batch.
    pub(super) sync_bn: Cell<bool>,
    pool: Pool,
}

/// One CUDA GPU, opened: what the CUDA backend computes on. Cheap to clone (a handle);
/// not `Send`: use it from the thread that opened it.
///
/// It is the [`Backend`](crate::backend::Backend) itself: `net.eval_on(&gpu, x)` runs a
/// typed network's eval-mode forward pass on it, the channel counts checked at compile
/// time as on the CPU.
#[derive(Clone)]
pub struct Gpu {
    pub(super) inner: Rc<Inner>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu")
            .field("index", &self.inner.index)
            .field("name", &self.inner.name)
            .finish()
    }
}

/// The file names NVIDIA's libraries are loaded by (for error messages).
fn lib_names(lib: &str) -> String {
    cudarc::get_lib_name_candidates(lib)
        .into_iter()
        .filter(|n| n.contains(".so"))
        .take(4)
        .collect::<Vec<_>>()
        .join(", ")
}

impl Gpu {
    /// Opens GPU `index` in fp32: the driver, cuDNN, cuBLAS and NVRTC must load and the
    /// GPU must exist; the backend's kernels are compiled for it. Every failure is an error
    /// naming what is missing, never a panic.
    pub fn open(index: usize) -> Result<Self, GpuError> {
        Self::open_with(index, Precision::Fp32)
    }

    /// Opens GPU `index` (as [`Gpu::open`]) to compute in `precision`: with
    /// [`Precision::Bf16`] every activation on it, and every activation's gradient, is
    /// bfloat16 and the convolutions run on the tensor cores; weights, their gradients,
    /// the optimiser and the batch-norm statistics stay f32.
    pub fn open_with(index: usize, precision: Precision) -> Result<Self, GpuError> {
        let count = device_count()?;
        if index >= count {
            return Err(GpuError::NoDevice { index, count });
        }
        // SAFETY (all three): only try to open the libraries by their usual names.
        let libs = unsafe {
            [
                ("cuDNN", "cudnn", cudarc::cudnn::sys::is_culib_present()),
                ("cuBLAS", "cublas", cudarc::cublas::sys::is_culib_present()),
                ("NVRTC", "nvrtc", cudarc::nvrtc::sys::is_culib_present()),
            ]
        };
        if let Some((lib, file, _)) = libs.iter().find(|l| !l.2) {
            return Err(GpuError::MissingLibrary {
                lib,
                names: lib_names(file),
            });
        }
        guarded("opening the GPU", || {
            let ctx = CudaContext::new(index).map_err(call_err("creating a CUDA context"))?;
            let name = ctx.name().unwrap_or_else(|_| "CUDA GPU".into());
            let stream = ctx.default_stream();
            let cudnn = Cudnn::new(stream.clone()).map_err(call_err("creating a cuDNN handle"))?;
            let blas =
                CudaBlas::new(stream.clone()).map_err(call_err("creating a cuBLAS handle"))?;
            let k = Kernels::load(&ctx, precision)?;
            let pool = Rc::new(RefCell::new(CachingPool::new(DriverAlloc {
                stream: stream.clone(),
            })));
            Ok(Gpu {
                inner: Rc::new(Inner {
                    index,
                    name,
                    precision,
                    stream,
                    blas,
                    k,
                    convs: RefCell::new(Convs::new(cudnn)),
                    params: RefCell::new(Params::default()),
                    train: RefCell::new(HashMap::new()),
                    tape: RefCell::new(Tape::default()),
                    group: RefCell::new(None),
                    bucket_bytes: Cell::new(crate::dist::DEFAULT_BUCKET_BYTES),
                    sync_bn: Cell::new(false),
                    pool,
                }),
            })
        })
    }

    /// The GPU's index.
    pub fn index(&self) -> usize {
        self.inner.index
    }

    /// The number format it computes in.
    pub fn precision(&self) -> Precision {
        self.inner.precision
    }

    /// The GPU's name as the driver reports it.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The caching allocator's counters.
    pub fn memory(&self) -> PoolStats {
        self.inner.pool.borrow().stats()
    }

    /// Gives the allocator's cached blocks back to the driver.
    pub fn empty_cache(&self) {
        self.inner.pool.borrow_mut().empty_cache();
    }

    /// Forgets the GPU copies of every parameter: call it after changing a model's
    /// weights before running it again on this GPU (the parameters are copied once and
    /// reused, keyed by where the host tensors live). [`Gpu::use_model_state`] does it
    /// when a model's state stamp changes.
    pub fn forget_params(&self) {
        let mut p = self.inner.params.borrow_mut();
        p.convs.clear();
        p.linears.clear();
    }

    /// Declares which state of a model the next forward passes run: the GPU copies of the
    /// parameters are kept while `stamp` stays the same and made again after it changes
    /// ([`FoldCache::stamp`](crate::ops::FoldCache::stamp) is one).
    pub fn use_model_state(&self, stamp: u64) {
        if self.inner.params.borrow().stamp != Some(stamp) {
            self.forget_params();
            self.inner.params.borrow_mut().stamp = Some(stamp);
        }
    }

    /// Waits for the queued work to finish.
    pub fn synchronize(&self) -> Result<(), GpuError> {
        self.inner
            .stream
            .synchronize()
            .map_err(call_err("waiting for the GPU"))
    }

    /// A buffer of `len` values of `elem` bytes, contents unset (the caller writes all of
    /// them). `what` names it in an out-of-memory error.
    fn alloc_elems(&self, len: usize, elem: usize, what: &str) -> Result<DevBuf, GpuError> {
        // whole f32 words, so that the block is one f32 slice
        let bytes = (len * elem).div_ceil(4) * 4;
        let (slice, class) = self.inner.pool.borrow_mut().take(bytes, what)?;
        Ok(DevBuf {
            slice: Some(slice),
            class,
            len,
            elem,
            pool: self.inner.pool.clone(),
        })
    }

    /// A buffer of `len` f32 values, contents unset (as [`Gpu::alloc_elems`]).
    pub(super) fn alloc(&self, len: usize, what: &str) -> Result<DevBuf, GpuError> {
        self.alloc_elems(len, 4, what)
    }

    /// A buffer of `len` activation values (the GPU's precision), contents unset.
    pub(super) fn alloc_act(&self, len: usize, what: &str) -> Result<DevBuf, GpuError> {
        self.alloc_elems(len, self.inner.precision.act_bytes(), what)
    }

    /// `data` copied to a new f32 buffer.
    pub(super) fn upload(&self, data: &[f32], what: &str) -> Result<DevBuf, GpuError> {
        let mut b = self.alloc(data.len(), what)?;
        self.inner
            .stream
            .memcpy_htod(data, &mut b.view_mut())
            .map_err(|e| driver_err(e, what, data.len() * 4))?;
        Ok(b)
    }

    /// `data` copied to a new buffer of activations (rounded to bf16 on the host in
    /// mixed precision).
    pub(super) fn upload_act(&self, data: &[f32], what: &str) -> Result<DevBuf, GpuError> {
        match self.inner.precision {
            Precision::Fp32 => self.upload(data, what),
            Precision::Bf16 => {
                let half: Vec<bf16> = data.iter().map(|&v| bf16::from_f32(v)).collect();
                let mut b = self.alloc_act(data.len(), what)?;
                self.inner
                    .stream
                    .memcpy_htod(&half, &mut b.typed_mut::<bf16>())
                    .map_err(|e| driver_err(e, what, data.len() * 2))?;
                Ok(b)
            }
        }
    }

    /// The values of a buffer of activations as f32, copied to the host.
    pub(super) fn download_act(&self, b: &DevBuf) -> Result<Vec<f32>, GpuError> {
        match self.inner.precision {
            Precision::Fp32 => self.download(b),
            Precision::Bf16 => Ok(self
                .inner
                .stream
                .clone_dtoh(&b.typed::<bf16>())
                .map_err(call_err("copying from the GPU"))?
                .into_iter()
                .map(bf16::to_f32)
                .collect()),
        }
    }

    /// `data` copied to a new plain device slice (parameters).
    pub(super) fn upload_param(&self, data: &[f32]) -> Result<CudaSlice<f32>, GpuError> {
        self.inner
            .stream
            .clone_htod(data)
            .map_err(|e| driver_err(e, "model parameters", data.len() * 4))
    }

    /// The values of `b`, copied to the host (waits for the work that writes them).
    pub(super) fn download(&self, b: &DevBuf) -> Result<Vec<f32>, GpuError> {
        self.inner
            .stream
            .clone_dtoh(&b.view())
            .map_err(call_err("copying from the GPU"))
    }
}

/// A buffer's device address as a kernel argument that may be null.
pub(super) fn raw(gpu: &Gpu, b: Option<&DevBuf>) -> u64 {
    b.map_or(0, |b| b.slice().device_ptr(&gpu.inner.stream).0)
}
