//! 2-D convolution (cross-correlation, as PyTorch defines it) with stride, zero padding and
//! groups, NCHW layout, weights `(out, in / groups, k, k)`.
//!
//! This module owns the geometry ([`Conv2dGeom`]) and the one place a convolution's
//! algorithm is chosen ([`Algorithm`]: [`Algorithm::forward`], [`Algorithm::prepared`],
//! [`Algorithm::backward`]), with the weights packed for it ([`ForwardWeights`],
//! [`PreparedWeights`]). Each algorithm is a leaf module that never imports another:
//! [`reference`] (plain loops, what the tests compare against), [`im2col`] (+ GEMM, any
//! convolution), [`pointwise`] (1×1 over the whole batch), [`direct`] (positions in the
//! lanes), [`lanes`] (channels in the lanes) and [`winograd`] (F(4×4, 3×3) and
//! F(2×2, 3×3)); the buffers the last three share are in `layout`. Instruction-set detection and the level switch
//! are [`super::isa`]; the vector abstraction they are written over, `super::simd`.

pub mod direct;
pub mod im2col;
pub mod lanes;
mod layout;
pub mod pointwise;
pub mod reference;
pub mod winograd;

pub use reference::{conv2d_backward_ref, conv2d_forward_ref};

use std::mem::MaybeUninit;
use winograd::Pairs;

/// Channels per group of the channel-in-lanes kernels ([`lanes`], [`winograd`]) come in
/// multiples of this: the narrowest register tile, 16 channels.
const LANE_CHANNELS: usize = 16;
/// ... and are at most this many.
const LANE_CHANNELS_MAX: usize = 64;

/// The geometry of one convolution call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dGeom {
    /// Batch size N.
    pub batch: usize,
    /// Input channels.
    pub in_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Input height.
    pub in_h: usize,
    /// Input width.
    pub in_w: usize,
    /// Square kernel size.
    pub kernel: usize,
    /// Stride in both directions.
    pub stride: usize,
    /// Zero padding on every side.
    pub padding: usize,
    /// Number of groups; divides both channel counts.
    pub groups: usize,
}

impl Conv2dGeom {
    /// Checks that the geometry describes a valid convolution, naming what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if self.kernel == 0 || self.stride == 0 || self.groups == 0 {
            return Err(format!(
                "kernel ({}), stride ({}) and groups ({}) must be positive",
                self.kernel, self.stride, self.groups
            ));
        }
        if !self.in_channels.is_multiple_of(self.groups)
            || !self.out_channels.is_multiple_of(self.groups)
        {
            return Err(format!(
                "groups {} must divide in_channels {} and out_channels {}",
                self.groups, self.in_channels, self.out_channels
            ));
        }
        if self.in_h + 2 * self.padding < self.kernel || self.in_w + 2 * self.padding < self.kernel
        {
            return Err(format!(
                "input {}x{} with padding {} is smaller than the {}x{} kernel",
                self.in_h, self.in_w, self.padding, self.kernel, self.kernel
            ));
        }
        Ok(())
    }
    /// Output height.
    pub fn out_h(&self) -> usize {
        (self.in_h + 2 * self.padding - self.kernel) / self.stride + 1
    }
    /// Output width.
    pub fn out_w(&self) -> usize {
        (self.in_w + 2 * self.padding - self.kernel) / self.stride + 1
    }
    /// Input channels per group.
    pub fn in_per_group(&self) -> usize {
        self.in_channels / self.groups
    }
    /// Output channels per group.
    pub fn out_per_group(&self) -> usize {
        self.out_channels / self.groups
    }
    /// Number of input elements.
    pub fn input_len(&self) -> usize {
        self.batch * self.in_channels * self.in_h * self.in_w
    }
    /// Number of output elements.
    pub fn output_len(&self) -> usize {
        self.batch * self.out_channels * self.out_h() * self.out_w()
    }
    /// Number of weight elements.
    pub fn weight_len(&self) -> usize {
        self.out_channels * self.in_per_group() * self.kernel * self.kernel
    }
    /// Multiply-accumulates of one forward pass.
    pub fn macs(&self) -> usize {
        self.output_len() * self.in_per_group() * self.kernel * self.kernel
    }
    /// Panics naming the buffer whose length does not fit a forward pass.
    /// (`y` may be new memory, not yet written.)
    pub fn check_forward<Y>(&self, x: &[f32], w: &[f32], y: &[Y]) {
        assert_eq!(x.len(), self.input_len(), "conv2d: input length");
        assert_eq!(w.len(), self.weight_len(), "conv2d: weight length");
        assert_eq!(y.len(), self.output_len(), "conv2d: output length");
    }
    /// Panics naming the buffer whose length does not fit a backward pass.
    pub fn check_backward(&self, x: &[f32], w: &[f32], dy: &[f32], dx: Option<&[f32]>, dw: &[f32]) {
        assert_eq!(x.len(), self.input_len(), "conv2d backward: input length");
        assert_eq!(w.len(), self.weight_len(), "conv2d backward: weight length");
        assert_eq!(
            dy.len(),
            self.output_len(),
            "conv2d backward: output-gradient length"
        );
        assert_eq!(
            dw.len(),
            self.weight_len(),
            "conv2d backward: weight-gradient length"
        );
        if let Some(dx) = dx {
            assert_eq!(
                dx.len(),
                self.input_len(),
                "conv2d backward: input-gradient length"
            );
        }
    }
    /// [`Conv2dGeom::check_backward`] with the input gradient as a [`Dest`].
    fn check_backward_into(
        &self,
        x: &[f32],
        w: &[f32],
        dy: &[f32],
        dx: Option<&Dest<'_>>,
        dw: &[f32],
    ) {
        self.check_backward(x, w, dy, None, dw);
        if let Some(d) = dx {
            assert_eq!(
                d.len(),
                self.input_len(),
                "conv2d backward: input-gradient length"
            );
        }
    }
    fn is_pointwise(&self) -> bool {
        self.kernel == 1 && self.stride == 1 && self.padding == 0
    }
    /// Whether both sides' channels per group are 16 to 64, in multiples of 16: the
    /// channel-in-lanes kernels' shapes.
    fn lane_channels(&self) -> bool {
        let (ipg, opg) = (self.in_per_group(), self.out_per_group());
        [ipg, opg]
            .iter()
            .all(|&c| c.is_multiple_of(LANE_CHANNELS) && (1..=LANE_CHANNELS_MAX).contains(&c))
    }
    /// The same convolution with each two neighbouring groups taken as one, whose weights
    /// are zero between the halves (`winograd::pair_weights`), where that turns channels per group
    /// the channel-in-lanes kernels cannot take (8, 24: ResNeXt-50's stage 2) into ones
    /// they can (16, 48). Input and output, channel order included, are the same.
    fn paired(&self) -> Option<Conv2dGeom> {
        if !self.groups.is_multiple_of(2) || self.lane_channels() {
            return None;
        }
        let p = Conv2dGeom {
            groups: self.groups / 2,
            ..*self
        };
        p.lane_channels().then_some(p)
    }
}

/// The algorithms a convolution runs on, each a leaf module.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    /// Winograd F(4×4, 3×3) or F(2×2, 3×3), channels in the lanes ([`winograd`]; the
    /// forward, the input gradient at stride 1, which is a convolution of the output
    /// gradient, and the weight gradient, the forward's tiling run backwards).
    Winograd,
    /// [`Algorithm::Winograd`] on each two neighbouring groups as one
    /// ([`Conv2dGeom::paired`]): twice the element-wise products, half of them with zero
    /// weights, for the vector width of 16 channels; where Winograd's products are a
    /// quarter of the direct method's (F(4×4) at 28×28), still half.
    WinogradPaired,
    /// Direct, output channels in the lanes ([`lanes`]).
    Lanes,
    /// Direct, output positions in the lanes ([`direct`]).
    Direct,
    /// 1×1 as one GEMM over the batch ([`pointwise`]).
    Pointwise,
    /// im2col + one GEMM per image and group ([`im2col`]).
    Im2col,
}

impl Algorithm {
    /// The forward's algorithm for `g` with plain weights (packed, where the algorithm
    /// packs, for this call only): Winograd (paired or not) where its per-call weight
    /// transform pays.
    pub fn forward(g: &Conv2dGeom) -> Self {
        Self::winograd_for(g, winograd::pays_per_call).unwrap_or_else(|| Self::direct(g))
    }

    /// The forward's algorithm for `g` with weights packed once ([`PreparedWeights`]):
    /// Winograd (paired or not) wherever it suits.
    pub fn prepared(g: &Conv2dGeom) -> Self {
        Self::winograd_for(g, winograd::suits).unwrap_or_else(|| Self::direct(g))
    }

    /// [`Algorithm::Winograd`] where `takes(g)`, else [`Algorithm::WinogradPaired`] where
    /// `takes` `g`'s [`Conv2dGeom::paired`] geometry.
    fn winograd_for(g: &Conv2dGeom, takes: impl Fn(&Conv2dGeom) -> bool) -> Option<Self> {
        if takes(g) {
            Some(Self::Winograd)
        } else if g.paired().is_some_and(|p| takes(&p)) {
            Some(Self::WinogradPaired)
        } else {
            None
        }
    }

    /// The forward's algorithm for `g` among the direct and GEMM ones.
    fn direct(g: &Conv2dGeom) -> Self {
        if lanes::suits(g) {
            Self::Lanes
        } else if direct::suits_forward(g) {
            Self::Direct
        } else if pointwise::suits(g) {
            Self::Pointwise
        } else {
            Self::Im2col
        }
    }

    /// The backward's algorithm for `g` (the weight gradient's, and the input gradient's
    /// unless [`Algorithm::input_grad`] says otherwise).
    pub fn backward(g: &Conv2dGeom) -> Self {
        if lanes::suits(g) {
            Self::Lanes
        } else if direct::suits(g) {
            Self::Direct
        } else if pointwise::suits(g) {
            Self::Pointwise
        } else {
            Self::Im2col
        }
    }

    /// The input gradient's algorithm for `g`: Winograd (paired or not) for the stride-1
    /// shapes of [`lanes`] where it suits, else [`Algorithm::backward`]'s.
    pub fn input_grad(g: &Conv2dGeom) -> Self {
        Self::winograd_for(g, |g| lanes::suits(g) && winograd::suits_input_grad(g))
            .unwrap_or_else(|| Self::backward(g))
    }

    /// How a Winograd algorithm runs the groups: [`Pairs::Halves`] for
    /// [`Algorithm::WinogradPaired`].
    fn pairs(self) -> Pairs {
        if self == Self::WinogradPaired {
            Pairs::Halves
        } else {
            Pairs::No
        }
    }

    /// The weight gradient's algorithm for `g`: Winograd (paired or not) where its input
    /// gradient is on the same and [`winograd::suits_weight_grad`], else
    /// [`Algorithm::backward`]'s.
    pub fn weight_grad(g: &Conv2dGeom) -> Self {
        let input_grad = Self::input_grad(g);
        if Self::winograd_for(g, winograd::suits_weight_grad) == Some(input_grad) {
            input_grad
        } else {
            Self::backward(g)
        }
    }
}

/// A convolution's weights packed for its [`Algorithm::prepared`] algorithm. Depends on
/// the weights, the channel counts, kernel and stride only (not the batch or image size).
#[derive(Clone, Debug)]
pub enum ForwardWeights {
    /// Transformed, output channels in the lanes ([`winograd`]).
    Winograd(winograd::WinogradWeights),
    /// Output channels in the lanes ([`lanes`]).
    Lanes(lanes::LaneWeights),
    /// Output positions in the lanes, per group ([`direct`]).
    Direct(Vec<direct::PackedWeights>),
}

impl ForwardWeights {
    /// Packs `w` for `g`'s [`Algorithm::prepared`] algorithm; `None` for the GEMM ones,
    /// which read the plain weights.
    pub fn pack(g: &Conv2dGeom, w: &[f32]) -> Option<Self> {
        match Algorithm::prepared(g) {
            a @ (Algorithm::Winograd | Algorithm::WinogradPaired) => Some(Self::Winograd(
                winograd::pack_forward_weights_as(g, a.pairs(), w),
            )),
            Algorithm::Lanes => Some(Self::Lanes(lanes::pack_forward_weights(g, w, Vec::new()))),
            Algorithm::Direct => Some(Self::Direct(direct::pack_forward_weights(g, w))),
            Algorithm::Pointwise | Algorithm::Im2col => None,
        }
    }
}

/// The forward on [`Algorithm::forward`]'s choice, each image's (or (image, group)'s)
/// output passed to `epilogue(image, first channel, values)` while still in cache.
/// Writes every value of `y`.
fn forward_with(
    g: &Conv2dGeom,
    x: &[f32],
    w: &[f32],
    y: &mut [MaybeUninit<f32>],
    epilogue: impl Fn(usize, usize, &mut [f32]) + Sync,
) {
    match Algorithm::forward(g) {
        // (each task transforms its own group's weights)
        a @ (Algorithm::Winograd | Algorithm::WinogradPaired) => {
            winograd::conv2d_forward_into(g, x, w, a.pairs(), Dest::Write(y), epilogue)
        }
        Algorithm::Lanes => {
            // packed for this call only: in a buffer from this thread's pool, returned after
            let buf = super::scratch::take_stale(w.len());
            let packed = lanes::pack_forward_weights(g, w, buf);
            lanes::conv2d_forward_packed_into(g, x, &packed, y, epilogue);
            super::scratch::give([packed.into_buffer()]);
        }
        Algorithm::Direct => direct::conv2d_forward_into(g, x, w, y, epilogue),
        Algorithm::Pointwise => pointwise::conv2d_forward(g, x, w, y, epilogue),
        Algorithm::Im2col => im2col::conv2d_forward(g, x, w, y, epilogue),
    }
}

/// Fast forward, on [`Algorithm::forward`]'s choice. Overwrites `y`.
pub fn conv2d_forward(g: &Conv2dGeom, x: &[f32], w: &[f32], y: &mut [f32]) {
    forward_with(g, x, w, super::as_uninit(y), |_, _, _| {});
}

/// [`conv2d_forward`] into a new buffer (`g.output_len()` values), written once rather
/// than zero-filled first where the algorithm allows.
pub fn conv2d_forward_new(g: &Conv2dGeom, x: &[f32], w: &[f32]) -> Vec<f32> {
    // SAFETY: `forward_with` writes every value of its output.
    unsafe { super::written(g.output_len(), |y| forward_with(g, x, w, y, |_, _, _| {})) }
}

/// [`conv2d_forward_new`] that also returns every output plane's
/// [`plane_stats`](super::batchnorm::plane_stats) (index `n * out_channels + c`),
/// computed while the image's output is still in cache: the batch statistics of a
/// following training-mode batch norm without two more passes over memory.
pub fn conv2d_forward_plane_stats(
    g: &Conv2dGeom,
    x: &[f32],
    w: &[f32],
) -> (Vec<f32>, Vec<(f64, f64)>) {
    use std::sync::atomic::{AtomicU64, Ordering};
    let ohw = g.out_h() * g.out_w();
    let cells: Vec<(AtomicU64, AtomicU64)> = (0..g.batch * g.out_channels)
        .map(|_| (AtomicU64::new(0), AtomicU64::new(0)))
        .collect();
    let y = if ohw > 0 {
        let stats = |n: usize, c0: usize, yn: &mut [f32]| {
            for (c, plane) in yn.chunks(ohw).enumerate() {
                let (mean, m2) = super::batchnorm::plane_stats(plane);
                let cell = &cells[n * g.out_channels + c0 + c];
                cell.0.store(mean.to_bits(), Ordering::Relaxed);
                cell.1.store(m2.to_bits(), Ordering::Relaxed);
            }
        };
        // SAFETY: `forward_with` writes every value of its output.
        unsafe { super::written(g.output_len(), |y| forward_with(g, x, w, y, stats)) }
    } else {
        Vec::new()
    };
    let planes = cells
        .into_iter()
        .map(|(a, b)| {
            (
                f64::from_bits(a.into_inner()),
                f64::from_bits(b.into_inner()),
            )
        })
        .collect();
    (y, planes)
}

/// Convolution weights prepared once for repeated forward passes (inference): the plain
/// `(out, in / groups, k, k)` values and, for the algorithms that pack, their packed form.
#[derive(Clone, Debug)]
pub struct PreparedWeights {
    w: Vec<f32>,
    packed: Option<ForwardWeights>,
}

impl PreparedWeights {
    /// Prepares `w` for convolutions with `g`'s channel counts, kernel and groups.
    pub fn new(g: &Conv2dGeom, w: Vec<f32>) -> Self {
        let packed = ForwardWeights::pack(g, &w);
        Self { w, packed }
    }
}

/// Forward fused with a per-channel epilogue, applied to each image's output while it is
/// still in cache: `y = relu?(y · scale[c] + shift[c] (+ residual))` (`scale` all ones when
/// `None`). With `scale`/`shift` from a batch norm's eval-mode statistics this is
/// convolution + batch norm (+ residual add) + ReLU in one pass. Returns the new output
/// buffer.
pub fn conv2d_forward_fused(
    g: &Conv2dGeom,
    x: &[f32],
    w: &PreparedWeights,
    scale: Option<&[f32]>,
    shift: &[f32],
    residual: Option<&[f32]>,
    relu: bool,
) -> Vec<f32> {
    let ohw = g.out_h() * g.out_w();
    let out_img = g.out_channels * ohw;
    assert_eq!(shift.len(), g.out_channels, "conv2d fused: shift length");
    if let Some(s) = scale {
        assert_eq!(s.len(), g.out_channels, "conv2d fused: scale length");
    }
    if let Some(r) = residual {
        assert_eq!(r.len(), g.output_len(), "conv2d fused: residual length");
    }
    let epilogue = |n: usize, c0: usize, yn: &mut [f32]| {
        let res = residual.map(|r| &r[n * out_img + c0 * ohw..][..yn.len()]);
        for (c, plane) in yn.chunks_mut(ohw.max(1)).enumerate() {
            let (a, b) = (scale.map_or(1.0, |s| s[c0 + c]), shift[c0 + c]);
            let r = res.map(|r| &r[c * ohw..(c + 1) * ohw]);
            scale_shift_plane(plane, a, b, r, relu);
        }
    };
    // (the packed form's algorithm can depend on the batch: a stem on `direct` when the
    // batch fills the threads, else on GEMM)
    let run = |y: &mut [MaybeUninit<f32>]| match (&w.packed, Algorithm::prepared(g)) {
        (Some(ForwardWeights::Winograd(p)), Algorithm::Winograd | Algorithm::WinogradPaired) => {
            winograd::conv2d_forward_packed_into(g, x, p, Dest::Write(y), epilogue)
        }
        (Some(ForwardWeights::Lanes(p)), Algorithm::Lanes) => {
            lanes::conv2d_forward_packed_into(g, x, p, y, epilogue)
        }
        (Some(ForwardWeights::Direct(p)), Algorithm::Direct) => {
            direct::conv2d_forward_packed_into(g, x, p, y, epilogue)
        }
        _ => forward_with(g, x, &w.w, y, epilogue),
    };
    // SAFETY: every algorithm writes every value of its output.
    unsafe { super::written(g.output_len(), run) }
}

leveled! {
    /// `y = relu?(y · a + b (+ r))` over one plane, at the level's vector width.
    fn scale_shift_plane(y: &mut [f32], a: f32, b: f32, r: Option<&[f32]>, relu: bool) {
        match (r, relu) {
            (Some(r), true) => y
                .iter_mut()
                .zip(r)
                .for_each(|(v, &r)| *v = super::relu(*v * a + b + r)),
            (Some(r), false) => y.iter_mut().zip(r).for_each(|(v, &r)| *v = *v * a + b + r),
            (None, true) => y.iter_mut().for_each(|v| *v = super::relu(*v * a + b)),
            (None, false) => y.iter_mut().for_each(|v| *v = *v * a + b),
        }
    }
}

/// Where a kernel puts its result (a backward pass its input gradient, Winograd also its
/// forward output): added into what is there, or written over new memory.
#[derive(Debug)]
pub enum Dest<'a> {
    /// Added into: the values accumulated so far.
    Add(&'a mut [f32]),
    /// Written, every value: new memory, when nothing was accumulated yet.
    Write(&'a mut [MaybeUninit<f32>]),
}

impl<'a> Dest<'a> {
    /// Its length.
    fn len(&self) -> usize {
        match self {
            Self::Add(d) => d.len(),
            Self::Write(d) => d.len(),
        }
    }

    /// Values `range` of it.
    fn part(&mut self, range: std::ops::Range<usize>) -> Dest<'_> {
        match self {
            Self::Add(d) => Dest::Add(&mut d[range]),
            Self::Write(d) => Dest::Write(&mut d[range]),
        }
    }

    /// `self (+)= src`: added into, or written.
    fn put(self, src: &[f32]) {
        assert_eq!(self.len(), src.len(), "conv destination: length");
        match self {
            Self::Add(d) => layout::add(d, src),
            Self::Write(d) => write(d, src),
        }
    }

    /// Its first value, its length, and whether it is added into (else written).
    fn raw(self) -> (*mut f32, usize, bool) {
        match self {
            Self::Add(d) => (d.as_mut_ptr(), d.len(), true),
            Self::Write(d) => (d.as_mut_ptr().cast(), d.len(), false),
        }
    }

    /// Consecutive parts of `len` values.
    fn chunks(self, len: usize) -> Vec<Dest<'a>> {
        match self {
            Self::Add(d) => d.chunks_mut(len).map(Dest::Add).collect(),
            Self::Write(d) => d.chunks_mut(len).map(Dest::Write).collect(),
        }
    }

    /// As values to add into: new memory is zero-filled first.
    fn init(self) -> &'a mut [f32] {
        match self {
            Self::Add(d) => d,
            Self::Write(d) => super::elementwise::zero_fill(d),
        }
    }
}

/// Copies `src` into `dst` (equal lengths).
fn write(dst: &mut [MaybeUninit<f32>], src: &[f32]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        d.write(s);
    }
}

/// Fast backward, on [`Algorithm::backward`]'s choice: adds the input gradient into `dx`
/// (when given) and the weight gradient into `dw`.
pub fn conv2d_backward(
    g: &Conv2dGeom,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    dx: Option<&mut [f32]>,
    dw: &mut [f32],
) {
    backward_with(g, x, w, dy, dx.map(Dest::Add), dw)
}

/// [`conv2d_backward`] where no input gradient was accumulated yet: returns it as a new
/// buffer, written once rather than zero-filled and added into (except where a stride
/// phase of the direct or lanes kernel gets no tap: zero-filled there first,
/// [`Dest::init`]).
pub fn conv2d_backward_new(
    g: &Conv2dGeom,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    dw: &mut [f32],
) -> Vec<f32> {
    // SAFETY: every algorithm writes every value of a `Dest::Write` (directly, or after
    // `Dest::init` zero-fills it).
    unsafe {
        super::written(g.input_len(), |dx| {
            backward_with(g, x, w, dy, Some(Dest::Write(dx)), dw)
        })
    }
}

fn backward_with(
    g: &Conv2dGeom,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    dx: Option<Dest<'_>>,
    dw: &mut [f32],
) {
    // the weight gradient below, the input gradient here
    let dx = match (dx, Algorithm::input_grad(g)) {
        (Some(dx), a @ (Algorithm::Winograd | Algorithm::WinogradPaired)) => {
            winograd::conv2d_input_grad_into(g, w, a.pairs(), dy, dx);
            None
        }
        (dx, _) => dx,
    };
    let weight_grad = Algorithm::weight_grad(g);
    if matches!(weight_grad, Algorithm::Winograd | Algorithm::WinogradPaired) {
        // (whose input gradient went through Winograd above)
        assert!(
            dx.is_none(),
            "winograd weight gradient without its input gradient"
        );
        return winograd::conv2d_weight_grad_as(g, weight_grad.pairs(), x, dy, dw);
    }
    match Algorithm::backward(g) {
        Algorithm::Lanes => lanes::conv2d_backward(g, x, w, dy, dx, dw),
        Algorithm::Direct => direct::conv2d_backward(g, x, w, dy, dx, dw),
        Algorithm::Pointwise => pointwise::conv2d_backward(g, x, w, dy, dx, dw),
        Algorithm::Winograd | Algorithm::WinogradPaired | Algorithm::Im2col => {
            im2col::conv2d_backward(g, x, w, dy, dx, dw)
        }
    }
}
