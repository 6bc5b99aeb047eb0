//! Tests that run the kernels at every instruction-set level this CPU has (`isa::set_level`:
//! AVX-512, AVX2 + FMA and plain code on an AVX-512 machine; NEON and plain code on
//! aarch64), a process-wide setting: in a test binary of their own, so that the switch
//! never changes the kernels under another test's feet (tests that compare two runs bit
//! for bit, for one), and one at a time within it.

mod common;

use std::mem::MaybeUninit;
use std::sync::Mutex;

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use resnext_core::kernels::conv::{self, Conv2dGeom, Dest};
use resnext_core::kernels::isa;
use resnext_core::kernels::{batchnorm as bn, elementwise as ew, pool};

use crate::common::{close, qemu_or, rel_err, ties_and_nans, values, winograd_geom, ConvCase};

/// Held by each test while it may switch the kernels.
static SWITCH: Mutex<()> = Mutex::new(());

/// Runs a convolution's forward (`fwd(y)`) and backward (`bwd(dx, dw)`, which must add
/// into the ones `dw` holds, like every backward kernel) at `level`, and checks them
/// against `c`'s reference results: relative to the largest result, or where that
/// cancelled, to the largest sum of the terms' sizes (at least 1 for the gradients, which
/// were added to ones). The backward runs twice: adding the input gradient into ones, and
/// writing it into new memory (NaN here, so that a value left unwritten shows).
fn check_at(
    level: isa::Level,
    c: &ConvCase,
    fwd: impl FnOnce(&mut [f32]),
    bwd: impl Fn(Dest<'_>, &mut [f32]),
) -> Result<(), TestCaseError> {
    let _one_at_a_time = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    isa::set_level(Some(level)).unwrap();
    let mut y = vec![0.0; c.y.len()];
    fwd(&mut y);
    let (mut dx, mut dw) = (vec![1.0; c.x.len()], vec![1.0; c.w.len()]);
    bwd(Dest::Add(&mut dx), &mut dw);
    let (mut dx_new, mut dw_beside) = (
        vec![MaybeUninit::new(f32::NAN); c.x.len()],
        vec![1.0; c.w.len()],
    );
    bwd(Dest::Write(&mut dx_new), &mut dw_beside);
    isa::set_level(None).unwrap();
    // SAFETY: every value was initialised (to NaN) before the call.
    let dx_new: Vec<f32> = dx_new
        .into_iter()
        .map(|v| unsafe { v.assume_init() })
        .collect();
    let scales = std::cell::OnceCell::new();
    let scales = || *scales.get_or_init(|| c.term_scales());
    prop_assert!(close(&y, &c.y, 1e-5, || scales().0), "y at {level}");
    let minus_one = |v: Vec<f32>| v.into_iter().map(|v| v - 1.0).collect::<Vec<_>>();
    prop_assert!(
        close(&minus_one(dx), &c.dx, 1e-5, || scales().1.max(1.0)),
        "dx at {level}"
    );
    prop_assert!(
        close(&minus_one(dw.clone()), &c.dw, 1e-5, || scales().2.max(1.0)),
        "dw at {level}"
    );
    prop_assert!(
        close(&dx_new, &c.dx, 1e-5, || scales().1),
        "dx written into new memory at {level}"
    );
    prop_assert_eq!(dw_beside, dw, "dw beside a written dx at {}", level);
    Ok(())
}

/// `bwd` for the dispatching entry points: [`conv::conv2d_backward`] adding into `dx`, or
/// [`conv::conv2d_backward_new`] copied into it.
fn dispatched(g: &Conv2dGeom, c: &ConvCase, dx: Dest<'_>, dw: &mut [f32]) {
    match dx {
        Dest::Add(dx) => conv::conv2d_backward(g, &c.x, &c.w, &c.dy, Some(dx), dw),
        Dest::Write(dx) => {
            let new = conv::conv2d_backward_new(g, &c.x, &c.w, &c.dy, dw);
            for (d, v) in dx.iter_mut().zip(new) {
                d.write(v);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]

    #[test]
    fn direct_grouped_conv_matches_reference(
        (batch, groups, ipg) in (1usize..3, 2usize..4, 1usize..19),
        // up to 64 output channels per group, several 8-channel register blocks
        opg in prop_oneof![1usize..19, prop::sample::select(vec![16usize, 32, 48, 64])],
        (h, w, kernel, stride, padding) in (1usize..21, 1usize..21, 2usize..6, 1usize..4, 0usize..3),
        level in prop::sample::select(isa::available()),
        seed in any::<u64>(),
    ) {
        // Channel counts past the kernel's 8-channel blocks and grids past several vectors.
        let g = Conv2dGeom { batch, in_channels: groups * ipg, out_channels: groups * opg, in_h: h, in_w: w, kernel, stride, padding, groups };
        prop_assume!(g.validate().is_ok());
        prop_assert!(conv::direct::suits(&g));
        let c = ConvCase::new(&g, seed);
        check_at(level, &c, |y| {
            conv::direct::conv2d_forward(&g, &c.x, &c.w, y, |_, _, _| {});
        }, |dx, dw| {
            conv::direct::conv2d_backward(&g, &c.x, &c.w, &c.dy, Some(dx), dw);
        })?;
    }

    #[test]
    fn lanes_grouped_conv_matches_reference(
        (batch, groups) in (1usize..3, 2usize..4),
        // one and two 16-channel tiles, a 32-channel block and 48 = 32 + 16
        ipg in prop::sample::select(vec![16usize, 32, 48]),
        opg in prop::sample::select(vec![16usize, 32, 48]),
        // rows of one to several position tiles at every level (6 and 14 positions)
        (h, w, kernel, stride, padding) in (1usize..20, 1usize..20, 2usize..5, 1usize..3, 0usize..3),
        level in prop::sample::select(isa::available()),
        seed in any::<u64>(),
    ) {
        let g = Conv2dGeom { batch, in_channels: groups * ipg, out_channels: groups * opg, in_h: h, in_w: w, kernel, stride, padding, groups };
        prop_assume!(g.validate().is_ok());
        prop_assert!(conv::lanes::suits(&g));
        let c = ConvCase::new(&g, seed);
        check_at(level, &c, |y| {
            let packed = conv::lanes::pack_forward_weights(&g, &c.w, Vec::new());
            conv::lanes::conv2d_forward_packed(&g, &c.x, &packed, y, |_, _, _| {});
        }, |dx, dw| {
            conv::lanes::conv2d_backward(&g, &c.x, &c.w, &c.dy, Some(dx), dw);
        })?;
    }

    #[test]
    fn winograd_grouped_conv_matches_reference(
        // several register blocks of tiles
        g in winograd_geom(1..3, vec![16, 32, 48], 16),
        level in prop::sample::select(isa::available()),
        seed in any::<u64>(),
    ) {
        prop_assert!(conv::winograd::suits_shape(&g));
        let x = values(seed, g.input_len());
        let wt = values(seed ^ 1, g.weight_len());
        let mut y_ref = vec![0.0; g.output_len()];
        conv::conv2d_forward_ref(&g, &x, &wt, &mut y_ref);
        let _one_at_a_time = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
        isa::set_level(Some(level)).unwrap();
        let mut ys = vec![];
        for tiling in conv::winograd::Tiling::ALL {
            // (NaN: every value must be written)
            let mut y = vec![f32::NAN; g.output_len()];
            conv::winograd::conv2d_forward_tiled(&g, tiling, &x, &wt, &mut y, |_, _, _| {});
            let packed = conv::winograd::pack_forward_weights_tiled(&g, tiling, &wt);
            let mut y2 = vec![f32::NAN; g.output_len()];
            conv::winograd::conv2d_forward_packed(&g, &x, &packed, &mut y2, |_, _, _| {});
            ys.push((tiling, y, y2));
        }
        isa::set_level(None).unwrap();
        for (tiling, y, y2) in ys {
            prop_assert!(rel_err(&y, &y_ref) <= 1e-5, "y at {level}, {:?}", tiling);
            prop_assert!(rel_err(&y2, &y_ref) <= 1e-5, "y (packed) at {level}, {:?}", tiling);
        }
    }

    #[test]
    fn winograd_input_grad_matches_reference(
        g in winograd_geom(1..3, vec![16, 32, 48], 16),
        level in prop::sample::select(isa::available()),
        seed in any::<u64>(),
    ) {
        prop_assert!(conv::winograd::suits_input_grad_shape(&g));
        let c = ConvCase::new(&g, seed);
        let _one_at_a_time = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
        isa::set_level(Some(level)).unwrap();
        let dxs = conv::winograd::Tiling::ALL.map(|tiling| {
            let mut dx = vec![1.0; g.input_len()];
            conv::winograd::conv2d_input_grad_tiled(&g, tiling, &c.w, &c.dy, &mut dx, true);
            // written over NaN: every value
            let mut dx_written = vec![f32::NAN; g.input_len()];
            conv::winograd::conv2d_input_grad_tiled(&g, tiling, &c.w, &c.dy, &mut dx_written, false);
            (tiling, dx, dx_written)
        });
        isa::set_level(None).unwrap();
        let minus_one = |v: Vec<f32>| v.into_iter().map(|v| v - 1.0).collect::<Vec<_>>();
        for (tiling, dx, dx_written) in dxs {
            prop_assert!(rel_err(&minus_one(dx), &c.dx) <= 1e-5, "dx at {level}, {:?}", tiling);
            prop_assert!(rel_err(&dx_written, &c.dx) <= 1e-5, "dx written at {level}, {:?}", tiling);
        }
    }

    #[test]
    fn winograd_weight_grad_matches_reference(
        g in winograd_geom(1..3, vec![16, 32, 48], 16),
        level in prop::sample::select(isa::available()),
        seed in any::<u64>(),
    ) {
        prop_assert!(conv::winograd::suits_shape(&g));
        let c = ConvCase::new(&g, seed);
        let _one_at_a_time = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
        isa::set_level(Some(level)).unwrap();
        let dws = conv::winograd::Tiling::ALL.map(|tiling| {
            let mut dw = vec![1.0; g.weight_len()];
            conv::winograd::conv2d_weight_grad_tiled(&g, tiling, &c.x, &c.dy, &mut dw);
            (tiling, dw)
        });
        // and the backward through the dispatch, which takes it where it pays at this level
        let (mut dx, mut dw) = (vec![0.0; g.input_len()], vec![0.0; g.weight_len()]);
        conv::conv2d_backward(&g, &c.x, &c.w, &c.dy, Some(&mut dx), &mut dw);
        isa::set_level(None).unwrap();
        let minus_one = |v: Vec<f32>| v.into_iter().map(|v| v - 1.0).collect::<Vec<_>>();
        for (tiling, dw) in dws {
            prop_assert!(rel_err(&minus_one(dw), &c.dw) <= 1e-5, "dw at {level}, {:?}", tiling);
        }
        prop_assert!(rel_err(&dx, &c.dx) <= 1e-5, "dx through the dispatch at {level}");
        prop_assert!(rel_err(&dw, &c.dw) <= 1e-5, "dw through the dispatch at {level}");
    }

    #[test]
    fn paired_groups_match_reference(
        // 8 channels per group (ResNeXt-50's stage 2) and 24: two groups run as one of 16
        // or 48 through Winograd, wherever the level takes it (at least 2 groups after
        // pairing, and images of enough tiles for the per-call weight transform to pay)
        (batch, pairs) in (1usize..3, 2usize..4),
        ipg in prop::sample::select(vec![8usize, 24]),
        opg in prop::sample::select(vec![8usize, 24]),
        (h, w, padding) in (13usize..qemu_or(24), 13usize..qemu_or(24), 0usize..3),
        level in prop::sample::select(isa::available()),
        seed in any::<u64>(),
    ) {
        let groups = 2 * pairs;
        let g = Conv2dGeom { batch, in_channels: groups * ipg, out_channels: groups * opg, in_h: h, in_w: w, kernel: 3, stride: 1, padding, groups };
        let c = ConvCase::new(&g, seed);
        let (chosen, fused) = (std::cell::Cell::new(None), std::cell::RefCell::new(vec![]));
        check_at(level, &c, |y| {
            chosen.set(Some((conv::Algorithm::prepared(&g), conv::Algorithm::weight_grad(&g), isa::wide_fma())));
            conv::conv2d_forward(&g, &c.x, &c.w, y);
            // with the weights packed once (inference), through the fused epilogue
            let prepared = conv::PreparedWeights::new(&g, c.w.clone());
            *fused.borrow_mut() = conv::conv2d_forward_fused(&g, &c.x, &prepared, None, &vec![0.0; g.out_channels], None, false);
        }, |dx, dw| dispatched(&g, &c, dx, dw))?;
        let (prepared, weight_grad, wide) = chosen.get().expect("ran");
        // (on full-width AVX-512 groups of 16 stay on the direct kernels)
        prop_assert_eq!(prepared == conv::Algorithm::WinogradPaired, !wide, "{:?} at {}", prepared, level);
        prop_assert_eq!(weight_grad == conv::Algorithm::WinogradPaired, !wide, "{:?} at {}", weight_grad, level);
        prop_assert!(close(&fused.into_inner(), &c.y, 1e-5, || c.term_scales().0), "fused at {level}");
    }

    #[test]
    fn direct_forward_of_a_stem_conv_matches_reference(
        (batch, cin, cout) in (1usize..3, 1usize..5, prop_oneof![1usize..19, Just(64usize)]),
        (h, w, kernel, stride, padding) in (5usize..30, 5usize..30, 5usize..8, 1usize..4, 0usize..4),
        level in prop::sample::select(isa::available()),
        seed in any::<u64>(),
    ) {
        // A dense convolution with an RGB-like input and a large kernel (ResNeXt's 7×7
        // stride-2 stem) takes the direct forward kernel.
        let g = Conv2dGeom { batch, in_channels: cin, out_channels: cout, in_h: h, in_w: w, kernel, stride, padding, groups: 1 };
        prop_assume!(g.validate().is_ok());
        let x = values(seed, g.input_len());
        let wt = values(seed ^ 1, g.weight_len());
        let mut y_ref = vec![0.0; g.output_len()];
        conv::conv2d_forward_ref(&g, &x, &wt, &mut y_ref);
        let _one_at_a_time = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
        isa::set_level(Some(level)).unwrap();
        let mut y = vec![0.0; g.output_len()];
        conv::direct::conv2d_forward(&g, &x, &wt, &mut y, |_, _, _| {});
        // and through the dispatcher, which picks it (at batch 1 its channels split)
        let mut y_dispatched = vec![0.0; g.output_len()];
        conv::conv2d_forward(&g, &x, &wt, &mut y_dispatched);
        isa::set_level(None).unwrap();
        prop_assert!(rel_err(&y, &y_ref) <= 1e-5, "y at {level}");
        prop_assert!(rel_err(&y_dispatched, &y_ref) <= 1e-5, "y (dispatched)");
    }
}

/// What the batch-norm and element-wise kernels produce for one input, at one level.
#[derive(Debug)]
struct NormOutputs {
    y: Vec<f32>,
    inv_std: Vec<f32>,
    dx: Vec<f32>,
    dgamma: Vec<f32>,
    in_place: Vec<f32>,
    add_relu: Vec<f32>,
    bn_add_relu: Vec<f32>,
    masked: Vec<f32>,
}

/// Runs the batch-norm (training forward, backward, in-place backward, the residual
/// epilogue) and element-wise kernels (residual add + ReLU, the ReLU mask, the add) at
/// `level` on inputs drawn from `seed`.
fn norm_kernels_at(level: isa::Level, g: &bn::BnGeom, relu: bool, seed: u64) -> NormOutputs {
    let _one_at_a_time = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    isa::set_level(Some(level)).unwrap();
    let (c, len) = (g.channels, g.len());
    let x = values(seed, len);
    let (gamma, beta) = (values(seed ^ 1, c), values(seed ^ 2, c));
    let (dy, r) = (values(seed ^ 3, len), values(seed ^ 4, len));
    let mut y = vec![0.0; len];
    let stats = bn::bn_train_forward(g, &x, &gamma, &beta, 1e-5, relu, &mut y);
    let ch = bn::BnChannels {
        gamma: &gamma,
        beta: &beta,
        mean: &stats.mean,
        inv_std: &stats.inv_std,
        relu,
    };
    let (mut dx, mut dgamma, mut dbeta) = (vec![0.0; len], vec![0.0; c], vec![0.0; c]);
    bn::bn_backward(
        g,
        &x,
        &ch,
        true,
        &dy,
        Some(&mut dx),
        &mut dgamma,
        &mut dbeta,
    );
    let mut in_place = dy.clone();
    bn::bn_backward_in_place(g, &x, &ch, &mut in_place, &mut dgamma, &mut dbeta);
    let scale: Vec<f32> = gamma
        .iter()
        .zip(&stats.inv_std)
        .map(|(a, b)| a * b)
        .collect();
    let mut bn_add_relu = vec![0.0; len];
    bn::affine_add_relu_forward(g, &x, &stats.mean, &scale, &beta, &r, &mut bn_add_relu);
    let mut add_relu = vec![0.0; len];
    ew::add_relu_forward(&x, &r, &mut add_relu);
    let mut masked = dy.clone();
    ew::apply_positive_mask(&ew::positive_mask(&add_relu), &mut masked);
    ew::add_into(&mut masked, &x);
    isa::set_level(None).unwrap();
    NormOutputs {
        y,
        inv_std: stats.inv_std,
        dx,
        dgamma,
        in_place,
        add_relu,
        bn_add_relu,
        masked,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]

    /// Batch norm and the element-wise ops at every level against the plain level (which
    /// `ops::batch_norm_train_forward_matches_reference` checks against the f64 reference,
    /// with the error bound f32 inputs allow).
    #[test]
    fn batch_norm_and_elementwise_kernels_agree_at_every_level(
        (batch, channels, spatial) in (1usize..4, 1usize..6, 2usize..150),
        relu in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let g = bn::BnGeom { batch, channels, spatial };
        let want = norm_kernels_at(isa::Level::Scalar, &g, relu, seed);
        for level in isa::available() {
            let got = norm_kernels_at(level, &g, relu, seed);
            for (what, a, b) in [
                ("y", &got.y, &want.y),
                ("inv_std", &got.inv_std, &want.inv_std),
                ("dx", &got.dx, &want.dx),
                ("dgamma", &got.dgamma, &want.dgamma),
                ("in-place dx", &got.in_place, &want.in_place),
                ("bn + add + relu", &got.bn_add_relu, &want.bn_add_relu),
                ("add + relu", &got.add_relu, &want.add_relu),
                ("mask + add", &got.masked, &want.masked),
            ] {
                prop_assert!(rel_err(a, b) <= 1e-5, "{what} at {level}: {a:?} against {b:?}");
            }
        }
    }
}

/// Max pooling with indices at `level`: the values' bits and the chosen indices.
fn max_pool_at(level: isa::Level, g: &pool::PoolGeom, x: &[f32]) -> (Vec<u32>, Vec<u32>) {
    let _one_at_a_time = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    isa::set_level(Some(level)).unwrap();
    let mut y = vec![0.0; g.planes * g.out_h() * g.out_w()];
    let mut idx = vec![0u32; y.len()];
    pool::max_pool_forward(g, x, &mut y, &mut idx);
    isa::set_level(None).unwrap();
    (y.iter().map(|v| v.to_bits()).collect(), idx)
}

proptest! {
    /// Max pooling picks the same input, bit for bit, at every level: inputs full of ties
    /// and NaNs, rows wider than a vector (`ops::max_pool_argmax_takes_the_first_maximum_or_nan`
    /// checks the choice against the scan-order rule).
    #[test]
    fn max_pool_is_exact_at_every_level(
        (planes, h, w) in (1usize..3, 1usize..10, 1usize..40),
        (k, s, p) in (1usize..4, 1usize..3, 0usize..2),
        cells in proptest::collection::vec(0u8..5, 97),
    ) {
        let g = pool::PoolGeom { planes, in_h: h, in_w: w, kernel: k, stride: s, padding: p };
        prop_assume!(g.validate().is_ok());
        // few distinct values (ties everywhere), one in five a NaN
        let x = ties_and_nans(&cells, planes * h * w);
        let want = max_pool_at(isa::Level::Scalar, &g, &x);
        for level in isa::available() {
            prop_assert_eq!(&max_pool_at(level, &g, &x), &want, "at {}", level);
        }
    }
}
