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

use resnext_core::kernels::batchnorm::{self as bn, BnChannels, BnGeom, BnStats};
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

/// PyTorch's default batch-norm epsilon, which [`BnCase`] runs with.
const BN_EPS: f64 = 1e-5;

/// A training batch norm + ReLU to measure: seeded input, output gradient, γ and β at
/// `geom`, and the batch statistics of one forward pass over them.
pub struct BnCase {
    /// The layout.
    pub geom: BnGeom,
    /// Input.
    pub x: Vec<f32>,
    /// Output gradient.
    pub dy: Vec<f32>,
    /// Scale γ.
    pub gamma: Vec<f32>,
    /// Shift β.
    pub beta: Vec<f32>,
    /// The forward pass's batch statistics.
    pub stats: BnStats,
}

impl BnCase {
    /// The case at `geom`.
    pub fn new(geom: BnGeom) -> Self {
        let (x, gamma, beta) = (
            values(4, geom.len()),
            values(6, geom.channels),
            values(7, geom.channels),
        );
        let mut y = vec![0.0; geom.len()];
        let stats = bn::bn_train_forward(&geom, &x, &gamma, &beta, BN_EPS, true, &mut y);
        Self {
            geom,
            x,
            dy: values(5, geom.len()),
            gamma,
            beta,
            stats,
        }
    }

    /// The training forward (statistics, then the normalised output + ReLU into `y`).
    pub fn forward(&self, y: &mut [f32]) -> BnStats {
        let (g, x) = (&self.geom, &self.x);
        bn::bn_train_forward(g, x, &self.gamma, &self.beta, BN_EPS, true, y)
    }

    /// What the backward pass needs (the ReLU fused).
    pub fn channels(&self) -> BnChannels<'_> {
        BnChannels {
            gamma: &self.gamma,
            beta: &self.beta,
            mean: &self.stats.mean,
            inv_std: &self.stats.inv_std,
            relu: true,
        }
    }
}
