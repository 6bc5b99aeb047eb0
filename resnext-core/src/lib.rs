//! ResNeXt (Xie et al. 2017, "Aggregated Residual Transformations for Deep Neural
//! Networks", <https://arxiv.org/abs/1611.05431>) as typed [dfdx] modules.

pub mod backend;
pub mod builders;
pub mod dist;
pub mod ema;
pub mod error;
pub mod kernels;
pub mod ops;

pub use error::{Error, Result};
pub mod model;
pub mod nn;
pub mod oom;
pub mod optim;
pub mod params;
pub mod profile;
pub mod testing;
pub mod weights;

/// Makes glibc keep freed memory for reuse instead of unmapping every large block: each op
/// allocates its output afresh, and with glibc's defaults every such allocation is a new
/// `mmap` whose pages fault in on first touch (about 10% of an eval pass of ResNeXt-50 at
/// batch 8 on our 2-core machine). Call once at the start of a binary, before threads are
/// spawned; it changes process-wide allocator settings, so libraries never call it.
/// A no-op on other platforms.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only adjusts glibc's allocation thresholds; it is called before the
    // program starts other threads.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}
