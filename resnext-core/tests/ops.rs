//! Every op against a plain reference (f64 loops) and its backward against finite
//! differences, with proptest over batch, size, channels, stride, padding and groups. A
//! test binary of its own, so that the aarch64 CI step (under qemu) builds only these.

mod common;

use dfdx::prelude::*;
use proptest::prelude::*;
use resnext_core::kernels::batchnorm::{self as bn, BnGeom};
use resnext_core::kernels::conv::{self, Conv2dGeom};
use resnext_core::kernels::pool::{self, PoolGeom};
use resnext_core::ops::{self, Act, BnConfig, ConvConfig};

use crate::common::{
    close, conv_term_scales, err_in_scale, qemu_or, rel_err, ties_and_nans, values, winograd_geom,
    ConvCase,
};

fn conv_geom() -> impl Strategy<Value = Conv2dGeom> {
    (
        1usize..3,
        1usize..4,
        1usize..4,
        1usize..4,
        1usize..9,
        1usize..9,
        prop::sample::select(vec![1usize, 3, 5]),
        1usize..4,
        0usize..3,
    )
        .prop_filter_map(
            "valid geometry",
            |(batch, groups, ipg, opg, h, w, kernel, stride, padding)| {
                let g = Conv2dGeom {
                    batch,
                    in_channels: groups * ipg,
                    out_channels: groups * opg,
                    in_h: h,
                    in_w: w,
                    kernel,
                    stride,
                    padding,
                    groups,
                };
                g.validate().ok().map(|_| g)
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]

    #[test]
    fn conv_fast_kernels_match_reference(g in conv_geom(), seed in any::<u64>()) {
        let ConvCase { x, w, dy, y: y_ref, dx: dx_ref, dw: dw_ref, .. } = ConvCase::new(&g, seed);
        // (few terms per result here, which may cancel: errors against the terms' size)
        let (y_scale, dx_scale, dw_scale) = conv_term_scales(&g, &x, &w, &dy);
        let mut y = vec![0.0; g.output_len()];
        conv::conv2d_forward(&g, &x, &w, &mut y);
        prop_assert!(err_in_scale(&y, &y_ref, y_scale) <= 1e-5);
        let (mut dx, mut dw) = (vec![0.0; x.len()], vec![0.0; w.len()]);
        conv::conv2d_backward(&g, &x, &w, &dy, Some(&mut dx), &mut dw);
        prop_assert!(err_in_scale(&dx, &dx_ref, dx_scale) <= 1e-5, "dx");
        prop_assert!(err_in_scale(&dw, &dw_ref, dw_scale) <= 1e-5, "dw");
        // into new buffers (written once where the algorithm allows): the same values
        prop_assert_eq!(conv::conv2d_forward_new(&g, &x, &w), y);
        let mut dw_new = vec![0.0; w.len()];
        prop_assert_eq!(conv::conv2d_backward_new(&g, &x, &w, &dy, &mut dw_new), dx);
        prop_assert_eq!(dw_new, dw);
    }

    #[test]
    fn lanes_grouped_conv_matches_reference(
        (batch, groups) in (1usize..4, 2usize..4),
        // 16 to 64 channels per group: one and two vectors of lanes, and 48 = 32 + 16
        ipg in prop::sample::select(vec![16usize, 32, 48, 64]),
        opg in prop::sample::select(vec![16usize, 32, 48, 64]),
        // rows past one 14-position tile, in uneven chunks (smaller images under qemu, where
        // the f64 reference is slow; `portable` covers the tiles at every level there too)
        (h, w, kernel, stride, padding) in (1usize..qemu_or(33), 1usize..qemu_or(33), 2usize..6, 1usize..4, 0usize..3),
        seed in any::<u64>(),
    ) {
        let g = Conv2dGeom { batch, in_channels: groups * ipg, out_channels: groups * opg, in_h: h, in_w: w, kernel, stride, padding, groups };
        prop_assume!(g.validate().is_ok());
        prop_assert!(conv::lanes::suits(&g));
        let ConvCase { x, w: wt, dy, y: y_ref, dx: dx_ref, dw: dw_ref, .. } = ConvCase::new(&g, seed);
        let mut y = vec![0.0; g.output_len()];
        let packed = conv::lanes::pack_forward_weights(&g, &wt, Vec::new());
        conv::lanes::conv2d_forward_packed(&g, &x, &packed, &mut y, |_, _, _| {});
        let (mut dx, mut dw) = (vec![1.0; x.len()], vec![1.0; wt.len()]);
        conv::lanes::conv2d_backward(&g, &x, &wt, &dy, Some(conv::Dest::Add(&mut dx)), &mut dw);
        prop_assert!(rel_err(&y, &y_ref) <= 1e-5, "y");
        let minus_one = |v: Vec<f32>| v.into_iter().map(|v| v - 1.0).collect::<Vec<_>>();
        prop_assert!(rel_err(&minus_one(dx), &dx_ref) <= 1e-5, "dx");
        prop_assert!(rel_err(&minus_one(dw), &dw_ref) <= 1e-5, "dw");
        // the weight gradient alone (no input gradient wanted)
        let mut dw_only = vec![0.0; wt.len()];
        conv::lanes::conv2d_backward(&g, &x, &wt, &dy, None, &mut dw_only);
        prop_assert!(rel_err(&dw_only, &dw_ref) <= 1e-5, "dw without dx");
    }

    #[test]
    fn winograd_grouped_conv_of_an_empty_batch_is_empty(groups in 2usize..4, h in 1usize..9) {
        let g = Conv2dGeom { batch: 0, in_channels: groups * 16, out_channels: groups * 32, in_h: h, in_w: h, kernel: 3, stride: 1, padding: 1, groups };
        prop_assert!(conv::winograd::suits_shape(&g));
        let wt = values(7, g.weight_len());
        let packed = conv::winograd::pack_forward_weights(&g, &wt);
        conv::winograd::conv2d_forward_packed(&g, &[], &packed, &mut [], |_, _, _| panic!("no images"));
        conv::winograd::conv2d_forward(&g, &[], &wt, &mut [], |_, _, _| panic!("no images"));
    }

    #[test]
    fn winograd_grouped_conv_matches_reference(
        // past one chunk of tiles at the top
        g in winograd_geom(1..4, vec![16, 32, 48, 64], qemu_or(26)),
        seed in any::<u64>(),
    ) {
        let (batch, groups, opg) = (g.batch, g.groups, g.out_per_group());
        prop_assert!(conv::winograd::suits_shape(&g));
        let x = values(seed, g.input_len());
        let wt = values(seed ^ 1, g.weight_len());
        let mut y_ref = vec![0.0; g.output_len()];
        conv::conv2d_forward_ref(&g, &x, &wt, &mut y_ref);
        // each tiling, per-call transform and weights transformed once, with an epilogue
        // that sees every (image, group) once with its own channels
        for tiling in conv::winograd::Tiling::ALL {
            let mut y = vec![f32::NAN; g.output_len()];
            conv::winograd::conv2d_forward_tiled(&g, tiling, &x, &wt, &mut y, |_, _, _| {});
            prop_assert!(rel_err(&y, &y_ref) <= 1e-5, "y, {:?}", tiling);
            let packed = conv::winograd::pack_forward_weights_tiled(&g, tiling, &wt);
            let seen = std::sync::Mutex::new(Vec::new());
            let mut y2 = vec![f32::NAN; g.output_len()];
            conv::winograd::conv2d_forward_packed(&g, &x, &packed, &mut y2, |n, c0, v| {
                v.iter_mut().for_each(|v| *v += 1.0);
                seen.lock().unwrap().push((n, c0, v.len()));
            });
            let minus_one = |v: Vec<f32>| v.into_iter().map(|v| v - 1.0).collect::<Vec<_>>();
            prop_assert!(rel_err(&minus_one(y2), &y_ref) <= 1e-5, "y packed, {:?}", tiling);
            let mut seen = seen.into_inner().unwrap();
            seen.sort_unstable();
            let want: Vec<_> = (0..batch)
                .flat_map(|n| (0..groups).map(move |grp| (n, grp * opg, opg * g.out_h() * g.out_w())))
                .collect();
            prop_assert_eq!(seen, want);
        }
        // and the tiling the plain entry points pick
        let mut y = vec![f32::NAN; g.output_len()];
        conv::winograd::conv2d_forward(&g, &x, &wt, &mut y, |_, _, _| {});
        prop_assert!(rel_err(&y, &y_ref) <= 1e-5, "y");
        let packed = conv::winograd::pack_forward_weights(&g, &wt);
        let mut y2 = vec![f32::NAN; g.output_len()];
        conv::winograd::conv2d_forward_packed(&g, &x, &packed, &mut y2, |_, _, _| {});
        prop_assert!(rel_err(&y2, &y_ref) <= 1e-5, "y packed");
    }

    #[test]
    fn winograd_input_grad_matches_reference(
        // padding 0–2: the gradient's own padding is 2, 1 or 0
        g in winograd_geom(1..4, vec![16, 32, 48, 64], qemu_or(26)),
        seed in any::<u64>(),
    ) {
        prop_assert!(conv::winograd::suits_input_grad_shape(&g));
        let ConvCase { x, w: wt, dy, dx: dx_ref, .. } = ConvCase::new(&g, seed);
        // each tiling, written over what was there and added into it
        let minus_one = |v: Vec<f32>| v.into_iter().map(|v| v - 1.0).collect::<Vec<_>>();
        for tiling in conv::winograd::Tiling::ALL {
            let mut dx = vec![f32::NAN; g.input_len()];
            conv::winograd::conv2d_input_grad_tiled(&g, tiling, &wt, &dy, &mut dx, false);
            prop_assert!(rel_err(&dx, &dx_ref) <= 1e-5, "dx written, {:?}", tiling);
            let mut dx = vec![1.0; g.input_len()];
            conv::winograd::conv2d_input_grad_tiled(&g, tiling, &wt, &dy, &mut dx, true);
            prop_assert!(rel_err(&minus_one(dx), &dx_ref) <= 1e-5, "dx added, {:?}", tiling);
        }
        let mut dx = vec![f32::NAN; g.input_len()];
        conv::winograd::conv2d_input_grad(&g, &wt, &dy, &mut dx, false);
        prop_assert!(rel_err(&dx, &dx_ref) <= 1e-5, "dx, the tiling picked");
        // and through the dispatch, which takes it where the transform pays
        let (mut dx, mut dw) = (vec![0.0; g.input_len()], vec![0.0; wt.len()]);
        conv::conv2d_backward(&g, &x, &wt, &dy, Some(&mut dx), &mut dw);
        prop_assert!(rel_err(&dx, &dx_ref) <= 1e-5, "dx through the dispatch");
    }

    #[test]
    fn winograd_weight_grad_matches_reference(
        // past one chunk of tiles and one pass of images at the top
        g in winograd_geom(1..4, vec![16, 32, 48, 64], qemu_or(26)),
        seed in any::<u64>(),
    ) {
        prop_assert!(conv::winograd::suits_shape(&g));
        let ConvCase { x, dy, dw: dw_ref, .. } = ConvCase::new(&g, seed);
        // each tiling, added into what was there
        for tiling in conv::winograd::Tiling::ALL {
            let mut dw = vec![1.0; g.weight_len()];
            conv::winograd::conv2d_weight_grad_tiled(&g, tiling, &x, &dy, &mut dw);
            let dw: Vec<f32> = dw.into_iter().map(|v| v - 1.0).collect();
            prop_assert!(rel_err(&dw, &dw_ref) <= 1e-5, "dw, {:?}", tiling);
        }
        let mut dw = vec![0.0; g.weight_len()];
        conv::winograd::conv2d_weight_grad(&g, &x, &dy, &mut dw);
        prop_assert!(rel_err(&dw, &dw_ref) <= 1e-5, "dw, the tiling picked");
    }

    #[test]
    fn pointwise_conv_matches_reference_per_image_and_batched(
        (batch, cin, cout, h, w) in (1usize..5, 1usize..20, 1usize..20, 1usize..13, 1usize..13),
        seed in any::<u64>(),
    ) {
        // Up to 8×8 pixels the batch runs as one product (channels × batch·pixels), above
        // it one product per image; both must equal the reference.
        let g = Conv2dGeom { batch, in_channels: cin, out_channels: cout, in_h: h, in_w: w, kernel: 1, stride: 1, padding: 0, groups: 1 };
        let ConvCase { x, w: wt, dy, y: y_ref, dx: dx_ref, dw: dw_ref, .. } = ConvCase::new(&g, seed);
        // (a few channels and pixels: sums that may cancel, judged against their terms;
        // the gradients added into 0.5 against at least that)
        let scales = std::cell::OnceCell::new();
        let scales = || *scales.get_or_init(|| conv_term_scales(&g, &x, &wt, &dy));
        let mut y = vec![0.0; g.output_len()];
        conv::conv2d_forward(&g, &x, &wt, &mut y);
        prop_assert!(close(&y, &y_ref, 1e-5, || scales().0), "y");
        prop_assert_eq!(conv::conv2d_forward_new(&g, &x, &wt), y);
        let (mut dx, mut dw) = (vec![0.5; x.len()], vec![0.5; wt.len()]);
        conv::conv2d_backward(&g, &x, &wt, &dy, Some(&mut dx), &mut dw);
        let minus = |v: Vec<f32>| v.into_iter().map(|v| v - 0.5).collect::<Vec<_>>();
        prop_assert!(close(&minus(dx), &dx_ref, 1e-5, || scales().1.max(0.5)), "dx");
        prop_assert!(close(&minus(dw), &dw_ref, 1e-5, || scales().2.max(0.5)), "dw");
        // the input gradient written into a new buffer rather than added
        let mut dw_new = vec![0.0; wt.len()];
        let dx_new = conv::conv2d_backward_new(&g, &x, &wt, &dy, &mut dw_new);
        prop_assert!(close(&dx_new, &dx_ref, 1e-5, || scales().1), "dx written");
        prop_assert!(close(&dw_new, &dw_ref, 1e-5, || scales().2), "dw beside a written dx");
    }

    #[test]
    fn dense_conv_below_one_image_per_thread_matches_reference(
        (batch, cin, cout, hw) in (1usize..3, 1usize..24, prop::sample::select(vec![17usize, 32, 40, 70]), 1usize..12),
        (kernel, stride) in prop::sample::select(vec![(1usize, 1usize), (1, 2), (3, 1), (3, 2)]),
        threads in 2usize..4,
        seed in any::<u64>(),
    ) {
        // Fewer images than threads: each image's output channels split over the threads,
        // each part with its own epilogue (channel offset). Plain output, plane statistics
        // and the fused eval epilogue (scale, shift, residual, ReLU) against the reference.
        let g = Conv2dGeom { batch, in_channels: cin, out_channels: cout, in_h: hw, in_w: hw + 1, kernel, stride, padding: kernel / 2, groups: 1 };
        let ConvCase { x, w, y: y_ref, .. } = ConvCase::new(&g, seed);
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        let ohw = g.out_h() * g.out_w();
        let scale = values(seed ^ 5, cout);
        let shift = values(seed ^ 7, cout);
        let residual = values(seed ^ 9, g.output_len());
        let (y, (y_stats, stats), fused) = pool.install(|| {
            let prepared = conv::PreparedWeights::new(&g, w.clone());
            (
                conv::conv2d_forward_new(&g, &x, &w),
                conv::conv2d_forward_plane_stats(&g, &x, &w),
                conv::conv2d_forward_fused(&g, &x, &prepared, Some(&scale), &shift, Some(&residual), true),
            )
        });
        prop_assert!(rel_err(&y, &y_ref) <= 1e-5, "y");
        prop_assert_eq!(&y_stats, &y);
        for (i, (plane, got)) in y.chunks(ohw).zip(&stats).enumerate() {
            prop_assert_eq!(*got, bn::plane_stats(plane), "statistics of plane {}", i);
        }
        let want: Vec<f32> = y_ref
            .iter()
            .zip(&residual)
            .enumerate()
            .map(|(i, (&v, &r))| (v * scale[(i / ohw) % cout] + shift[(i / ohw) % cout] + r).max(0.0))
            .collect();
        prop_assert!(rel_err(&fused, &want) <= 1e-5, "fused: {}", rel_err(&fused, &want));
    }

    #[test]
    fn relu_bit_mask_matches_the_positive_test(len in prop::sample::select(vec![1usize, 63, 64, 65, 1000, 16384, 16384 + 70, 40000]), seed in any::<u64>()) {
        use resnext_core::kernels::elementwise as ew;
        let y: Vec<f32> = values(seed, len).iter().map(|&v| if v < -0.5 { 0.0 } else { v }).collect();
        let dy = values(seed ^ 3, len);
        let mut got = dy.clone();
        ew::apply_positive_mask(&ew::positive_mask(&y), &mut got);
        let want: Vec<f32> = y.iter().zip(&dy).map(|(&v, &d)| if v > 0.0 { d } else { 0.0 }).collect();
        prop_assert_eq!(got, want);
    }

    #[test]
    fn grouped_conv_equals_concatenated_per_group_convs(g in conv_geom(), seed in any::<u64>()) {
        // The paper's equivalence (Fig. 3b vs 3c): split the input channels into groups,
        // convolve each with its own filters, concatenate the outputs.
        let x = values(seed, g.input_len());
        let w = values(seed ^ 1, g.weight_len());
        let mut y = vec![0.0; g.output_len()];
        conv::conv2d_forward(&g, &x, &w, &mut y);
        // (few terms per output, which may cancel: errors against the terms' size)
        let (scale, _, _) = conv_term_scales(&g, &x, &w, &vec![0.0; g.output_len()]);
        let (ipg, opg, hw, ohw) = (g.in_per_group(), g.out_per_group(), g.in_h * g.in_w, g.out_h() * g.out_w());
        let one = Conv2dGeom { in_channels: ipg, out_channels: opg, groups: 1, batch: 1, ..g };
        let wlen = one.weight_len();
        for n in 0..g.batch {
            for grp in 0..g.groups {
                let xs = &x[(n * g.in_channels + grp * ipg) * hw..][..ipg * hw];
                let mut ys = vec![0.0; opg * ohw];
                conv::conv2d_forward_ref(&one, xs, &w[grp * wlen..(grp + 1) * wlen], &mut ys);
                let got = &y[(n * g.out_channels + grp * opg) * ohw..][..opg * ohw];
                prop_assert!(err_in_scale(got, &ys, scale) <= 1e-5);
            }
        }
    }

    /// The training backward against `f64` arithmetic on planes long enough that the sums
    /// carry several `f32` runs into `f64` (and, offset, values whose deviations cancel).
    #[test]
    fn batch_norm_train_backward_matches_an_f64_reference(n in 1usize..3, c in 1usize..3, s in 200usize..1500, offset in prop::sample::select(vec![0.0f32, 30.0]), seed in any::<u64>()) {
        let g = BnGeom { batch: n, channels: c, spatial: s };
        let x: Vec<f32> = values(seed, g.len()).iter().map(|v| v * 2.0 + offset).collect();
        let dy = values(seed ^ 7, g.len());
        let (gamma, beta) = (values(seed ^ 1, c), values(seed ^ 2, c));
        let mut y = vec![0.0; g.len()];
        let stats = bn::bn_train_forward(&g, &x, &gamma, &beta, 1e-5, false, &mut y);
        let ch = bn::BnChannels { gamma: &gamma, beta: &beta, mean: &stats.mean, inv_std: &stats.inv_std, relu: false };
        let (mut dx, mut dgamma, mut dbeta) = (vec![0.0; g.len()], vec![0.0; c], vec![0.0; c]);
        bn::bn_backward(&g, &x, &ch, true, &dy, Some(&mut dx), &mut dgamma, &mut dbeta);
        let m = g.per_channel() as f64;
        for ch in 0..c {
            let idx: Vec<usize> = (0..n).flat_map(|i| ((i * c + ch) * s)..((i * c + ch + 1) * s)).collect();
            let mean = idx.iter().map(|&i| x[i] as f64).sum::<f64>() / m;
            let var = idx.iter().map(|&i| (x[i] as f64 - mean).powi(2)).sum::<f64>() / m;
            let is = 1.0 / (var + 1e-5).sqrt();
            let xhat = |i: usize| (x[i] as f64 - mean) * is;
            let sg: f64 = idx.iter().map(|&i| dy[i] as f64).sum();
            let sgx: f64 = idx.iter().map(|&i| dy[i] as f64 * xhat(i)).sum();
            let sum_abs: f64 = idx.iter().map(|&i| (dy[i] as f64).abs() * (1.0 + xhat(i).abs())).sum();
            prop_assert!((dbeta[ch] as f64 - sg).abs() <= 1e-5 * sum_abs, "dbeta {} vs {}", dbeta[ch], sg);
            prop_assert!((dgamma[ch] as f64 - sgx).abs() <= 1e-5 * sum_abs, "dgamma {} vs {}", dgamma[ch], sgx);
            let k = gamma[ch] as f64 * is;
            let scale = idx.iter().map(|&i| (dy[i] as f64).abs()).fold(0.0, f64::max) * 4.0;
            for &i in &idx {
                let want = k * (dy[i] as f64 - sg / m - xhat(i) * sgx / m);
                prop_assert!((dx[i] as f64 - want).abs() <= 1e-5 * k.abs() * scale, "dx[{}] {} vs {}", i, dx[i], want);
            }
        }
    }

    #[test]
    fn batch_norm_train_forward_matches_reference(n in 1usize..4, c in 1usize..6, s in 1usize..20, relu in any::<bool>(), seed in any::<u64>()) {
        let g = BnGeom { batch: n, channels: c, spatial: s };
        prop_assume!(g.per_channel() > 1);
        let x: Vec<f32> = values(seed, g.len()).iter().map(|v| v * 3.0 + 0.5).collect();
        let gamma = values(seed ^ 1, c);
        let beta = values(seed ^ 2, c);
        let mut y = vec![0.0; g.len()];
        let stats = bn::bn_train_forward(&g, &x, &gamma, &beta, 1e-5, relu, &mut y);
        let (y_ref, mean, var) = bn::bn_train_forward_ref(&g, &x, &gamma, &beta, 1e-5, relu);
        // f32 inputs make `x − mean` uncertain by a few ulps of |x|, which normalising
        // divides by the channel's σ: with two nearly equal values per channel that alone
        // exceeds any fixed relative tolerance, in PyTorch as much as here.
        let max_x = x.iter().fold(0.0f32, |m, v| m.max(v.abs())) as f64;
        let max_g = gamma.iter().fold(0.0f32, |m, v| m.max(v.abs())) as f64;
        let min_sd = var.iter().fold(f64::INFINITY, |m, v| m.min((v + 1e-5).sqrt()));
        let scale = y_ref.iter().fold(0.0f32, |m, v| m.max(v.abs())) as f64;
        let bound = 1e-5 * scale + 8.0 * f32::EPSILON as f64 * max_x * max_g / min_sd;
        let worst = y.iter().zip(&y_ref).map(|(a, b)| (a - b).abs() as f64).fold(0.0, f64::max);
        prop_assert!(worst <= bound, "max error {worst} above {bound}");
        // running statistics: momentum 0.1 with the unbiased variance
        let (mut rm, mut rv) = (vec![0.5f32; c], vec![2.0f32; c]);
        bn::update_running(&g, &stats, 0.1, &mut rm, &mut rv);
        let m = g.per_channel() as f64;
        for ch in 0..c {
            prop_assert!((rm[ch] as f64 - (0.9 * 0.5 + 0.1 * mean[ch])).abs() < 1e-5);
            prop_assert!((rv[ch] as f64 - (0.9 * 2.0 + 0.1 * var[ch] * m / (m - 1.0))).abs() < 1e-4);
        }
    }

    #[test]
    fn max_pool_matches_reference(planes in 1usize..4, h in 1usize..10, w in 1usize..10, k in 1usize..4, s in 1usize..3, p in 0usize..2, seed in any::<u64>()) {
        let g = PoolGeom { planes, in_h: h, in_w: w, kernel: k, stride: s, padding: p };
        prop_assume!(g.validate().is_ok());
        let x = values(seed, planes * h * w);
        let mut y = vec![0.0; planes * g.out_h() * g.out_w()];
        let mut idx = vec![0u32; y.len()];
        pool::max_pool_forward(&g, &x, &mut y, &mut idx);
        let mut values_only = vec![0.0; y.len()];
        pool::max_pool_forward_values(&g, &x, &mut values_only);
        prop_assert_eq!(&values_only, &y);
        prop_assert_eq!(y, pool::max_pool_forward_ref(&g, &x));
    }

    /// Ties and NaN: the chosen index is the first maximum in scan order (row by row), or
    /// the first NaN, as PyTorch picks; the values equal the reference's, NaN included.
    #[test]
    fn max_pool_argmax_takes_the_first_maximum_or_nan(planes in 1usize..3, h in 1usize..9, w in 1usize..24, k in 1usize..4, s in 1usize..3, p in 0usize..2, cells in proptest::collection::vec(0u8..5, 128)) {
        let g = PoolGeom { planes, in_h: h, in_w: w, kernel: k, stride: s, padding: p };
        prop_assume!(g.validate().is_ok());
        // few distinct values (ties everywhere), one in five a NaN
        let x = ties_and_nans(&cells, planes * h * w);
        let (oh, ow) = (g.out_h(), g.out_w());
        let mut y = vec![0.0; planes * oh * ow];
        let mut idx = vec![0u32; y.len()];
        pool::max_pool_forward(&g, &x, &mut y, &mut idx);
        for pl in 0..planes {
            for oy in 0..oh {
                for ox in 0..ow {
                    let (mut best, mut at) = (f32::NEG_INFINITY, None);
                    'scan: for iy in (oy * s) as isize - p as isize..(oy * s + k) as isize - p as isize {
                        for ix in (ox * s) as isize - p as isize..(ox * s + k) as isize - p as isize {
                            if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                continue;
                            }
                            let i = iy as usize * w + ix as usize;
                            let v = x[pl * h * w + i];
                            if at.is_none() || v > best || v.is_nan() {
                                (best, at) = (v, Some(i));
                                if v.is_nan() {
                                    break 'scan;
                                }
                            }
                        }
                    }
                    let o = (pl * oh + oy) * ow + ox;
                    prop_assert_eq!(Some(idx[o] as usize), at, "index at plane {} ({}, {})", pl, oy, ox);
                    prop_assert_eq!(y[o].to_bits(), best.to_bits(), "value at plane {} ({}, {})", pl, oy, ox);
                }
            }
        }
        let mut values_only = vec![0.0; y.len()];
        pool::max_pool_forward_values(&g, &x, &mut values_only);
        prop_assert_eq!(
            values_only.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            y.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
    }
}

/// Central finite differences of `loss = Σ f(p) · r` at up to `probes` coordinates of `p`,
/// checked against `analytic`. A coordinate whose perturbation moves any output across a
/// ReLU kink (which outputs are exactly zero changes) is skipped: the function is not
/// differentiable there.
fn check_fd(
    p: &[f32],
    analytic: &[f32],
    probes: usize,
    f: impl Fn(&[f32]) -> Vec<f32>,
    r: &[f32],
    what: &str,
) {
    let zeros = |v: &[f32]| v.iter().map(|x| *x == 0.0).collect::<Vec<_>>();
    let base = zeros(&f(p));
    let step = (p.len() / probes).max(1);
    for i in (0..p.len()).step_by(step) {
        let eps = 1e-2f32;
        let (mut a, mut b) = (p.to_vec(), p.to_vec());
        a[i] += eps;
        b[i] -= eps;
        let (fa, fb) = (f(&a), f(&b));
        if zeros(&fa) != base || zeros(&fb) != base {
            continue;
        }
        let dot = |v: &[f32]| -> f64 { v.iter().zip(r).map(|(x, y)| *x as f64 * *y as f64).sum() };
        let fd = (dot(&fa) - dot(&fb)) / (2.0 * eps as f64);
        let an = analytic[i] as f64;
        assert!(
            (fd - an).abs() <= 2e-2 * an.abs().max(1.0),
            "{what}[{i}]: finite difference {fd} vs backward {an}"
        );
    }
}

fn act<const C: usize>(dev: &Cpu, v: Vec<f32>, n: usize, h: usize, w: usize) -> Act<C> {
    dev.tensor_from_vec(v, (n, Const::<C>, h, w))
}

macro_rules! conv_fd_case {
    ($name:ident, $i:literal, $o:literal, $g:literal) => {
        proptest! {
            #![proptest_config(ProptestConfig { cases: 12, .. ProptestConfig::default() })]
            #[test]
            fn $name(n in 1usize..3, h in 3usize..8, w in 3usize..8, k in prop::sample::select(vec![1usize, 3]), s in 1usize..3, p in 0usize..2, seed in any::<u64>()) {
                let dev = Cpu::default();
                let cfg = ConvConfig { kernel: k, stride: s, padding: p, groups: $g };
                let xv = values(seed, n * $i * h * w);
                let wv = values(seed ^ 7, $o * ($i / $g) * k * k);
                let wt: Tensor<(usize,), f32, Cpu> = dev.tensor_from_vec(wv.clone(), (wv.len(),));
                let x = act::<$i>(&dev, xv.clone(), n, h, w);
                let y: Act<$o, _> = ops::conv2d(x.trace(Gradients::leaky()), &wt, cfg).unwrap();
                let r = values(seed ^ 9, y.shape().num_elements());
                let rt = dev.tensor_from_vec(r.clone(), *y.shape());
                let grads = (y * rt).sum().backward();
                let (gx, gw) = (grads.get(&x).as_vec(), grads.get(&wt).as_vec());
                let fwd_x = |q: &[f32]| ops::conv2d::<$i, $o, _, NoneTape>(act::<$i>(&dev, q.to_vec(), n, h, w), &wt, cfg).unwrap().as_vec();
                check_fd(&xv, &gx, 16, fwd_x, &r, "dx");
                let fwd_w = |q: &[f32]| {
                    let wq: Tensor<(usize,), f32, Cpu> = dev.tensor_from_vec(q.to_vec(), (q.len(),));
                    ops::conv2d::<$i, $o, _, NoneTape>(act::<$i>(&dev, xv.clone(), n, h, w), &wq, cfg).unwrap().as_vec()
                };
                check_fd(&wv, &gw, 16, fwd_w, &r, "dw");
            }
        }
    };
}

conv_fd_case!(conv_backward_matches_finite_differences_dense, 3, 4, 1);
conv_fd_case!(conv_backward_matches_finite_differences_grouped, 8, 8, 4);
conv_fd_case!(conv_backward_matches_finite_differences_depthwise, 4, 8, 4);

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, .. ProptestConfig::default() })]

    #[test]
    fn batch_norm_backward_matches_finite_differences(n in 1usize..4, h in 1usize..5, w in 1usize..5, relu in any::<bool>(), train in any::<bool>(), seed in any::<u64>()) {
        prop_assume!(n * h * w > 1);
        let dev = Cpu::default();
        let xv: Vec<f32> = values(seed, n * 3 * h * w).iter().map(|v| v * 2.0).collect();
        if train {
            // Central differences with step 1e-2 need each channel's spread well above the
            // step: with nearly equal values batch norm is close to a step function there.
            let hw = h * w;
            for c in 0..3 {
                let vals: Vec<f64> = (0..n).flat_map(|i| xv[(i * 3 + c) * hw..(i * 3 + c + 1) * hw].iter().map(|&v| v as f64)).collect();
                let mean = vals.iter().sum::<f64>() / vals.len() as f64;
                let var = vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / vals.len() as f64;
                prop_assume!(var > 0.05);
            }
        }
        let gamma: Tensor<Rank1<3>, f32, Cpu> = dev.tensor([1.5, 0.7, -0.4]);
        let beta: Tensor<Rank1<3>, f32, Cpu> = dev.tensor([0.1, -0.2, 0.3]);
        let mean0: Tensor<Rank1<3>, f32, Cpu> = dev.tensor([0.2, -0.1, 0.0]);
        let var0: Tensor<Rank1<3>, f32, Cpu> = dev.tensor([0.8, 1.3, 2.0]);
        let cfg = BnConfig { relu, ..Default::default() };
        let run = |x: Act<3, OwnedTape<f32, Cpu>>| {
            if train {
                let (mut m, mut v) = (mean0.clone(), var0.clone());
                ops::batch_norm2d_train(x, &gamma, &beta, &mut m, &mut v, cfg).unwrap()
            } else {
                ops::batch_norm2d_eval(x, &gamma, &beta, &mean0, &var0, cfg).unwrap()
            }
        };
        let x = act::<3>(&dev, xv.clone(), n, h, w);
        let y = run(x.trace(Gradients::leaky()));
        let r = values(seed ^ 5, y.shape().num_elements());
        let rt = dev.tensor_from_vec(r.clone(), *y.shape());
        let grads = (y * rt).sum().backward();
        let gx = grads.get(&x).as_vec();
        let (gg, gb) = (grads.get(&gamma).as_vec(), grads.get(&beta).as_vec());
        let fwd = |q: &[f32]| run(act::<3>(&dev, q.to_vec(), n, h, w).trace(Gradients::leaky())).as_vec();
        check_fd(&xv, &gx, 24, fwd, &r, "dx");
        let fwd_g = |q: &[f32]| {
            let gq: Tensor<Rank1<3>, f32, Cpu> = dev.tensor([q[0], q[1], q[2]]);
            let x = act::<3>(&dev, xv.clone(), n, h, w);
            if train {
                let (mut m, mut v) = (mean0.clone(), var0.clone());
                ops::batch_norm2d_train(x, &gq, &beta, &mut m, &mut v, cfg).unwrap().as_vec()
            } else {
                ops::batch_norm2d_eval(x, &gq, &beta, &mean0, &var0, cfg).unwrap().as_vec()
            }
        };
        check_fd(&gamma.as_vec(), &gg, 3, fwd_g, &r, "dgamma");
        let fwd_b = |q: &[f32]| {
            let bq: Tensor<Rank1<3>, f32, Cpu> = dev.tensor([q[0], q[1], q[2]]);
            let x = act::<3>(&dev, xv.clone(), n, h, w);
            if train {
                let (mut m, mut v) = (mean0.clone(), var0.clone());
                ops::batch_norm2d_train(x, &gamma, &bq, &mut m, &mut v, cfg).unwrap().as_vec()
            } else {
                ops::batch_norm2d_eval(x, &gamma, &bq, &mean0, &var0, cfg).unwrap().as_vec()
            }
        };
        check_fd(&beta.as_vec(), &gb, 3, fwd_b, &r, "dbeta");
    }

    #[test]
    fn max_pool_backward_matches_finite_differences(n in 1usize..3, h in 2usize..9, w in 2usize..9, seed in any::<u64>()) {
        let dev = Cpu::default();
        // distinct values so no window has a tie within the finite-difference step
        let mut xv: Vec<f32> = (0..n * 2 * h * w).map(|i| i as f32 * 0.1).collect();
        let perm = values(seed, xv.len());
        let mut idx: Vec<usize> = (0..xv.len()).collect();
        idx.sort_by(|&a, &b| perm[a].total_cmp(&perm[b]));
        xv = idx.iter().map(|&i| xv[i]).collect();
        let x = act::<2>(&dev, xv.clone(), n, h, w);
        let y = ops::max_pool2d(x.trace(Gradients::leaky()), 3, 2, 1).unwrap();
        let r = values(seed ^ 3, y.shape().num_elements());
        let rt = dev.tensor_from_vec(r.clone(), *y.shape());
        let grads = (y * rt).sum().backward();
        let fwd = |q: &[f32]| ops::max_pool2d(act::<2>(&dev, q.to_vec(), n, h, w), 3, 2, 1).unwrap().as_vec();
        check_fd(&xv, &grads.get(&x).as_vec(), 32, fwd, &r, "dx");
    }

    #[test]
    fn pool_add_relu_linear_backward_match_finite_differences(n in 1usize..4, h in 1usize..5, w in 1usize..5, seed in any::<u64>()) {
        let dev = Cpu::default();
        let av = values(seed, n * 4 * h * w);
        // keep a + b at least 0.05 away from the ReLU kink
        let bv: Vec<f32> = values(seed ^ 1, n * 4 * h * w).iter().zip(&av).map(|(v, a)| -a + v.signum() * (0.05 + v.abs())).collect();
        let wv = values(seed ^ 2, 3 * 4);
        let bias: Tensor<(usize,), f32, Cpu> = dev.tensor_from_vec(values(seed ^ 3, 3), (3,));
        let wt: Tensor<(usize, Const<4>), f32, Cpu> = dev.tensor_from_vec(wv.clone(), (3, Const::<4>));
        let net = |a: Act<4, OwnedTape<f32, Cpu>>, b: Act<4, OwnedTape<f32, Cpu>>, wt: &Tensor<(usize, Const<4>), f32, Cpu>| {
            let y = ops::add_relu(a, b).unwrap();
            ops::linear(ops::global_avg_pool(y).unwrap(), wt, &bias).unwrap()
        };
        let (a, b) = (act::<4>(&dev, av.clone(), n, h, w), act::<4>(&dev, bv.clone(), n, h, w));
        let (ta, tb) = a.trace(Gradients::leaky()).split_tape();
        let y = net(ta.put_tape(tb), b.retaped(), &wt);
        let r = values(seed ^ 4, y.shape().num_elements());
        let rt = dev.tensor_from_vec(r.clone(), *y.shape());
        let grads = (y * rt).sum().backward();
        let fwd_a = |q: &[f32]| net(act::<4>(&dev, q.to_vec(), n, h, w).trace(Gradients::leaky()), b.retaped(), &wt).as_vec();
        check_fd(&av, &grads.get(&a).as_vec(), 16, fwd_a, &r, "da");
        let fwd_b = |q: &[f32]| net(a.clone().trace(Gradients::leaky()), act::<4>(&dev, q.to_vec(), n, h, w).retaped(), &wt).as_vec();
        check_fd(&bv, &grads.get(&b).as_vec(), 16, fwd_b, &r, "db");
        let fwd_w = |q: &[f32]| {
            let wq = dev.tensor_from_vec(q.to_vec(), (3, Const::<4>));
            net(a.clone().trace(Gradients::leaky()), b.retaped(), &wq).as_vec()
        };
        check_fd(&wv, &grads.get(&wt).as_vec(), 12, fwd_w, &r, "dw");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    /// The fused training op against the ops it replaces (each checked against finite
    /// differences above): outputs, running statistics and every gradient.
    #[test]
    fn fused_conv_bn_train_equals_conv_then_batch_norm_then_add_relu(
        n in 1usize..3, h in 2usize..8, w in 2usize..8, k in prop::sample::select(vec![1usize, 3]),
        s in 1usize..3, groups in prop::sample::select(vec![1usize, 2]), relu in any::<bool>(),
        with_residual in any::<bool>(), seed in any::<u64>(),
    ) {
        let dev = Cpu::default();
        let cfg = ConvConfig { kernel: k, stride: s, padding: k / 2, groups };
        let (oh, ow) = ((h + 2 * (k / 2) - k) / s + 1, (w + 2 * (k / 2) - k) / s + 1);
        prop_assume!(n * oh * ow > 1);
        let xv = values(seed, n * 4 * h * w);
        let wv = values(seed ^ 3, 6 * (4 / groups) * k * k);
        let rv = values(seed ^ 11, n * 6 * oh * ow);
        let wt: Tensor<(usize,), f32, Cpu> = dev.tensor_from_vec(wv.clone(), (wv.len(),));
        let gamma: Tensor<Rank1<6>, f32, Cpu> = dev.tensor([1.5, 0.7, -0.4, 1.0, 0.2, -1.1]);
        let beta: Tensor<Rank1<6>, f32, Cpu> = dev.tensor([0.1, -0.2, 0.3, 0.0, 0.5, -0.6]);
        let mean0: Tensor<Rank1<6>, f32, Cpu> = dev.tensor([0.2, -0.1, 0.0, 0.3, 0.1, -0.2]);
        let var0: Tensor<Rank1<6>, f32, Cpu> = dev.tensor([0.8, 1.3, 2.0, 1.0, 0.5, 1.1]);
        let bn_cfg = BnConfig { relu: relu && !with_residual, ..Default::default() };
        let x = act::<4>(&dev, xv.clone(), n, h, w);
        let r = act::<6>(&dev, rv.clone(), n, oh, ow);

        // composed
        let (mut m1, mut v1) = (mean0.clone(), var0.clone());
        let y: Act<6, _> = ops::conv2d(x.trace(Gradients::leaky()), &wt, cfg).unwrap();
        let y = ops::batch_norm2d_train(y, &gamma, &beta, &mut m1, &mut v1, bn_cfg).unwrap();
        let y = match (with_residual, relu) {
            (true, true) => ops::add_relu(y, r.trace(Gradients::leaky())).unwrap(),
            (true, false) => y + r.trace(Gradients::leaky()),
            _ => y,
        };
        let probe = values(seed ^ 17, y.shape().num_elements());
        let pt = dev.tensor_from_vec(probe.clone(), *y.shape());
        let want_y = y.as_vec();
        let want = (y * pt.clone()).sum().backward();

        // fused
        let (mut m2, mut v2) = (mean0.clone(), var0.clone());
        let bnr = ops::BnTrainRef { gamma: &gamma, beta: &beta, mean: &mut m2, var: &mut v2 };
        let fused_cfg = BnConfig { relu, ..Default::default() };
        let res = with_residual.then(|| r.trace(Gradients::leaky()));
        let y: Act<6, _> = ops::conv2d_bn_train(x.trace(Gradients::leaky()), &wt, cfg, bnr, fused_cfg, res).unwrap();
        let got_y = y.as_vec();
        let got = (y * pt).sum().backward();

        prop_assert!(rel_err(&got_y, &want_y) < 1e-6, "output: {}", rel_err(&got_y, &want_y));
        prop_assert_eq!(m2.as_vec(), m1.as_vec());
        prop_assert_eq!(v2.as_vec(), v1.as_vec());
        let pairs = [
            ("dx", got.get(&x).as_vec(), want.get(&x).as_vec()),
            ("dw", got.get(&wt).as_vec(), want.get(&wt).as_vec()),
            ("dgamma", got.get(&gamma).as_vec(), want.get(&gamma).as_vec()),
            ("dbeta", got.get(&beta).as_vec(), want.get(&beta).as_vec()),
        ];
        for (what, a, b) in &pairs {
            prop_assert!(rel_err(a, b) < 1e-5, "{}: {}", what, rel_err(a, b));
        }
        if with_residual {
            let (a, b) = (got.get(&r).as_vec(), want.get(&r).as_vec());
            prop_assert!(rel_err(&a, &b) < 1e-6, "dresidual: {}", rel_err(&a, &b));
        }
    }
}

#[test]
fn ops_reject_bad_shapes_with_errors_naming_the_op() {
    let dev = Cpu::default();
    let x: Act<4> = dev.zeros_like(&(1, Const::<4>, 2, 2));
    let w: Tensor<(usize,), f32, Cpu> = dev.zeros_like(&(4 * 4 * 9,));
    let err = ops::conv2d::<4, 4, _, NoneTape>(
        x.clone(),
        &w,
        ConvConfig {
            kernel: 3,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("conv2d") && err.to_string().contains("smaller than"),
        "{err}"
    );
    let err = ops::conv2d::<4, 4, _, NoneTape>(
        x.clone(),
        &w,
        ConvConfig {
            kernel: 1,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("weight has 144 elements"), "{err}");
    let err = ops::max_pool2d(x.clone(), 5, 1, 0).unwrap_err();
    assert!(err.to_string().starts_with("max_pool2d"), "{err}");
    let one: Act<4> = dev.zeros_like(&(1, Const::<4>, 1, 1));
    let (g, b) = (dev.ones::<Rank1<4>>(), dev.zeros::<Rank1<4>>());
    let (mut m, mut v) = (dev.zeros::<Rank1<4>>(), dev.ones::<Rank1<4>>());
    let err =
        ops::batch_norm2d_train(one, &g, &b, &mut m, &mut v, BnConfig::default()).unwrap_err();
    assert!(
        err.to_string().contains("more than one value per channel"),
        "{err}"
    );
    let w1: Tensor<(usize,), f32, Cpu> = dev.zeros_like(&(16,));
    let bad_residual: Act<4> = dev.zeros_like(&(1, Const::<4>, 3, 2));
    let bnr = ops::BnTrainRef {
        gamma: &g,
        beta: &b,
        mean: &mut m,
        var: &mut v,
    };
    let err = ops::conv2d_bn_train::<4, 4, _, NoneTape>(
        x.clone(),
        &w1,
        ConvConfig::default(),
        bnr,
        BnConfig::default(),
        Some(bad_residual),
    )
    .unwrap_err();
    assert!(
        err.to_string().starts_with("conv2d_bn_train") && err.to_string().contains("residual"),
        "{err}"
    );
}
