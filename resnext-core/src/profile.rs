//! Opt-in op-level profiling: with `RESNEXT_PROFILE=1` in the environment, every op's
//! forward and backward time is accumulated under its [`Label`]; [`report`] returns the
//! totals. Off by default (one relaxed atomic load per op).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// What a profiled span measured: one op's forward or backward pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Label {
    /// 1×1 convolution, forward.
    Conv1x1Fwd,
    /// 1×1 convolution, backward.
    Conv1x1Bwd,
    /// Grouped convolution, forward.
    ConvGroupedFwd,
    /// Grouped convolution, backward.
    ConvGroupedBwd,
    /// Other `k × k` convolutions (the stem), forward.
    ConvKxkFwd,
    /// Other `k × k` convolutions, backward.
    ConvKxkBwd,
    /// 1×1 convolution with eval-mode batch norm folded in.
    Conv1x1BnEval,
    /// Grouped convolution with eval-mode batch norm folded in.
    ConvGroupedBnEval,
    /// Other convolutions with eval-mode batch norm folded in.
    ConvKxkBnEval,
    /// Training-mode batch norm (batch statistics), forward.
    BatchNormTrainFwd,
    /// Eval-mode batch norm, forward.
    BatchNormEvalFwd,
    /// Batch norm, backward.
    BatchNormBwd,
    /// Max pooling, forward.
    MaxPoolFwd,
    /// Max pooling, backward.
    MaxPoolBwd,
    /// Residual add + ReLU, forward.
    AddReluFwd,
    /// Residual add + ReLU, backward.
    AddReluBwd,
    /// Global average pooling, forward or backward.
    GlobalAvgPool,
    /// Fully connected layer, forward or backward.
    Linear,
    /// Cross-entropy loss, forward or backward.
    CrossEntropy,
    /// The optimiser's parameter update.
    SgdStep,
    /// Averaging the gradients over a data-parallel group (one all-reduce a step).
    AllReduce,
}

impl Label {
    /// The label as the profile report prints it.
    pub fn name(self) -> &'static str {
        match self {
            Label::Conv1x1Fwd => "conv 1x1 fwd",
            Label::Conv1x1Bwd => "conv 1x1 bwd",
            Label::ConvGroupedFwd => "conv grouped fwd",
            Label::ConvGroupedBwd => "conv grouped bwd",
            Label::ConvKxkFwd => "conv kxk fwd",
            Label::ConvKxkBwd => "conv kxk bwd",
            Label::Conv1x1BnEval => "conv 1x1+bn eval",
            Label::ConvGroupedBnEval => "conv grouped+bn eval",
            Label::ConvKxkBnEval => "conv kxk+bn eval",
            Label::BatchNormTrainFwd => "batch_norm train fwd",
            Label::BatchNormEvalFwd => "batch_norm eval fwd",
            Label::BatchNormBwd => "batch_norm bwd",
            Label::MaxPoolFwd => "max_pool fwd",
            Label::MaxPoolBwd => "max_pool bwd",
            Label::AddReluFwd => "add_relu fwd",
            Label::AddReluBwd => "add_relu bwd",
            Label::GlobalAvgPool => "global_avg_pool",
            Label::Linear => "linear",
            Label::CrossEntropy => "cross_entropy",
            Label::SgdStep => "sgd step",
            Label::AllReduce => "all-reduce",
        }
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("RESNEXT_PROFILE").is_ok_and(|v| v != "0" && !v.is_empty()))
}

fn table() -> &'static Mutex<BTreeMap<Label, (Duration, u64)>> {
    static T: OnceLock<Mutex<BTreeMap<Label, (Duration, u64)>>> = OnceLock::new();
    T.get_or_init(Default::default)
}

/// Times a scope under its label when profiling is on.
pub struct Scope(Option<(Label, Instant)>);

/// Starts timing `label`.
pub fn scope(label: Label) -> Scope {
    Scope(enabled().then(|| (label, Instant::now())))
}

impl Drop for Scope {
    fn drop(&mut self) {
        if let Some((label, t)) = self.0.take() {
            let mut tab = table().lock().unwrap_or_else(|e| e.into_inner());
            let e = tab.entry(label).or_default();
            e.0 += t.elapsed();
            e.1 += 1;
        }
    }
}

/// `(label, total time, calls)` sorted by time, longest first; empty when profiling is off.
pub fn report() -> Vec<(Label, Duration, u64)> {
    let tab = table().lock().unwrap_or_else(|e| e.into_inner());
    let mut v: Vec<_> = tab.iter().map(|(k, (d, n))| (*k, *d, *n)).collect();
    v.sort_by_key(|e| std::cmp::Reverse(e.1));
    v
}
