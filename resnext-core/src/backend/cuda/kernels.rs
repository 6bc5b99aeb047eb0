//! The backend's own CUDA kernels (`kernels.cu`): the source, compiled by NVRTC when a GPU
//! is opened, and the loaded functions.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, LaunchConfig};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileError, CompileOptions, Ptx};

use crate::backend::device::{GpuError, Precision};

/// The CUDA C++ source of every kernel of the backend.
pub const SOURCE: &str = include_str!("kernels.cu");

/// Whether NVRTC's library can be loaded (it is needed to compile [`SOURCE`]).
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to open the library by its usual names.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// [`SOURCE`] compiled to PTX by NVRTC for activations in `precision`. Needs no GPU, only
/// NVRTC's library.
pub fn compile(precision: Precision) -> Result<Ptx, GpuError> {
    if !nvrtc_present() {
        return Err(GpuError::MissingLibrary {
            lib: "NVRTC",
            names: "libnvrtc.so, libnvrtc.so.13".into(),
        });
    }
    let opts = CompileOptions {
        // the fp32 results must match the CPU's: no flush to zero, IEEE division and sqrt
        ftz: Some(false),
        prec_div: Some(true),
        prec_sqrt: Some(true),
        name: Some("resnext_kernels.cu".into()),
        options: match precision {
            Precision::Fp32 => vec![],
            Precision::Bf16 => vec!["-DACT_BF16".into()],
        },
        ..Default::default()
    };
    compile_ptx_with_opts(SOURCE, opts).map_err(|e| GpuError::Compile {
        log: match e {
            CompileError::CompileError { log, .. } => log.to_string_lossy().into_owned(),
            e => format!("{e:?}"),
        },
    })
}

/// The loaded kernels, one field each, and [`NAMES`], from one list.
macro_rules! kernels {
    ($($name:ident),+ $(,)?) => {
        /// The `extern "C"` kernels [`SOURCE`] defines, by name.
        pub const NAMES: &[&str] = &[$(stringify!($name)),+];

        /// The loaded kernels.
        #[derive(Debug)]
        pub(super) struct Kernels {
            $(pub(super) $name: CudaFunction,)+
        }

        impl Kernels {
            /// Compiles [`SOURCE`] for `precision` and loads it into `ctx`.
            pub(super) fn load(ctx: &Arc<CudaContext>, precision: Precision) -> Result<Self, GpuError> {
                let module = ctx.load_module(compile(precision)?).map_err(|e| GpuError::Call {
                    what: "loading the compiled kernels".into(),
                    msg: e.to_string(),
                })?;
                let f = |name: &str| {
                    module.load_function(name).map_err(|e| GpuError::Call {
                        what: format!("kernel {name}"),
                        msg: e.to_string(),
                    })
                };
                Ok(Self {
                    $($name: f(stringify!($name))?,)+
                })
            }
        }
    };
}

kernels! {
    to_act,
    add_act_to_float,
    float_to_act,
    bias_residual_act,
    max_pool2d,
    global_avg_pool,
    add_bias_rows,
    bn_stats,
    bn_moments,
    bn_stats_finish,
    bn_apply,
    bn_backward_reduce,
    bn_backward_apply,
    act_backward,
    max_pool2d_backward,
    avg_pool_backward,
    col_sum_add,
    cross_entropy,
    sum_squares,
    sgd_step,
    adamw_step,
}

/// Threads per block of the element-wise kernels.
pub const BLOCK: u32 = 256;

/// A launch over `work` independent items (grid-stride kernels: capped grid, any size is
/// correct).
pub fn grid_for(work: usize) -> LaunchConfig {
    let blocks = work.div_ceil(BLOCK as usize).clamp(1, 65_535 * 8) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}
