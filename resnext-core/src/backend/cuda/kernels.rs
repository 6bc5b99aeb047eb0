//! The backend's own CUDA kernels (`kernels.cu`): the source, compiled by NVRTC when a GPU
//! is opened, and the loaded functions.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, LaunchConfig};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileError, CompileOptions, Ptx};

use crate::backend::device::GpuError;

/// The CUDA C++ source of every kernel of the backend.
pub const SOURCE: &str = include_str!("kernels.cu");

/// The `extern "C"` kernels [`SOURCE`] defines, by name.
pub const NAMES: [&str; 4] = [
    "bias_residual_act",
    "max_pool2d",
    "global_avg_pool",
    "add_bias_rows",
];

/// Whether NVRTC's library can be loaded (it is needed to compile [`SOURCE`]).
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to open the library by its usual names.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// [`SOURCE`] compiled to PTX by NVRTC. Needs no GPU, only NVRTC's library.
pub fn compile() -> Result<Ptx, GpuError> {
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
        ..Default::default()
    };
    compile_ptx_with_opts(SOURCE, opts).map_err(|e| GpuError::Compile {
        log: match e {
            CompileError::CompileError { log, .. } => log.to_string_lossy().into_owned(),
            e => format!("{e:?}"),
        },
    })
}

/// The loaded kernels.
#[derive(Debug)]
pub(super) struct Kernels {
    pub(super) bias_residual_act: CudaFunction,
    pub(super) max_pool2d: CudaFunction,
    pub(super) global_avg_pool: CudaFunction,
    pub(super) add_bias_rows: CudaFunction,
}

impl Kernels {
    /// Compiles [`SOURCE`] and loads it into `ctx`.
    pub(super) fn load(ctx: &Arc<CudaContext>) -> Result<Self, GpuError> {
        let module = ctx.load_module(compile()?).map_err(|e| GpuError::Call {
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
            bias_residual_act: f(NAMES[0])?,
            max_pool2d: f(NAMES[1])?,
            global_avg_pool: f(NAMES[2])?,
            add_bias_rows: f(NAMES[3])?,
        })
    }
}

/// Threads per block of the element-wise kernels.
const BLOCK: u32 = 256;

/// A launch over `work` independent items (grid-stride kernels: capped grid, any size is
/// correct).
pub(super) fn grid_for(work: usize) -> LaunchConfig {
    let blocks = work.div_ceil(BLOCK as usize).clamp(1, 65_535 * 8) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kernel compiles. Needs NVRTC's library (`nvidia-cuda-nvrtc` from PyPI is
    /// enough; no GPU): CI installs it and sets `RESNEXT_REQUIRE_NVRTC=1`, so there a
    /// missing library fails instead of skipping.
    #[test]
    fn every_kernel_compiles_with_nvrtc() {
        if !nvrtc_present() {
            assert!(
                std::env::var_os("RESNEXT_REQUIRE_NVRTC").is_none(),
                "RESNEXT_REQUIRE_NVRTC is set but libnvrtc cannot be loaded (LD_LIBRARY_PATH?)"
            );
            eprintln!("skipped: libnvrtc not found (set LD_LIBRARY_PATH to test the kernels)");
            return;
        }
        let ptx = compile().unwrap_or_else(|e| panic!("{e}"));
        let text = ptx.to_src();
        for name in NAMES {
            assert!(
                text.contains(&format!(".entry {name}(")),
                "{name} missing from the PTX"
            );
        }
    }

    #[test]
    fn every_kernel_is_named_once_and_defined_in_the_source() {
        for (i, name) in NAMES.iter().enumerate() {
            assert!(!NAMES[..i].contains(name));
            assert!(
                SOURCE.contains(&format!("__global__ void {name}(")),
                "{name} is not a kernel of kernels.cu"
            );
        }
        assert_eq!(
            SOURCE.matches("__global__ void").count(),
            NAMES.len(),
            "a kernel of kernels.cu is not in NAMES"
        );
    }

    #[test]
    fn a_launch_covers_the_work_with_a_bounded_grid() {
        for work in [0usize, 1, 255, 256, 257, 1 << 20, 1 << 40] {
            let cfg = grid_for(work);
            let threads = cfg.grid_dim.0 as usize * cfg.block_dim.0 as usize;
            assert!(
                cfg.grid_dim.0 >= 1 && cfg.grid_dim.0 <= 65_535 * 8,
                "{work}"
            );
            // one thread an item up to the cap, then grid-stride
            assert!(threads >= work.min(65_535 * 8 * BLOCK as usize), "{work}");
            assert!(
                threads < work.max(1) + BLOCK as usize,
                "{work}: no idle block"
            );
        }
    }
}
