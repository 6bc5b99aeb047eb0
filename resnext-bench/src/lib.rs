//! Benchmark support shared by the criterion benches and the binaries: peak-memory readout,
//! input generation and the stage shapes of `resnext50_32x4d`.

/// Peak resident memory of this process in bytes (Linux `VmHWM`), if available.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub use resnext_core::testing::values;

use resnext_core::kernels::conv::Conv2dGeom;

/// Output size of stage `stage` (1 to 4) of `resnext50_32x4d` at 224×224: 56, 28, 14, 7.
pub fn stage_size(stage: usize) -> usize {
    56 >> (stage - 1)
}

/// Bottleneck width of stage `stage` (1 to 4) of `resnext50_32x4d`: 128 to 1024.
pub fn stage_width(stage: usize) -> usize {
    128 << (stage - 1)
}

/// The grouped 3×3 convolution (32 groups) of stage `stage` of `resnext50_32x4d` at batch
/// `batch`; stride 2 is the first block of stages 2 to 4, on the previous stage's size.
pub fn grouped3x3(stage: usize, batch: usize, stride: usize) -> Conv2dGeom {
    let (hw, width) = (stage_size(stage), stage_width(stage));
    Conv2dGeom {
        batch,
        in_channels: width,
        out_channels: width,
        in_h: hw * stride,
        in_w: hw * stride,
        kernel: 3,
        stride,
        padding: 1,
        groups: 32,
    }
}

/// A 1×1 convolution `inp → out` at the size of stage `stage` of `resnext50_32x4d`.
pub fn pointwise(stage: usize, batch: usize, inp: usize, out: usize) -> Conv2dGeom {
    let hw = stage_size(stage);
    Conv2dGeom {
        batch,
        in_channels: inp,
        out_channels: out,
        in_h: hw,
        in_w: hw,
        kernel: 1,
        stride: 1,
        padding: 0,
        groups: 1,
    }
}
