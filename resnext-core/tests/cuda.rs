//! The CUDA backend's tests (built only with the feature `cuda`). The host-side
//! ones (descriptor dims, the allocator, the kernels compiled by NVRTC, the no-driver
//! error) run on any machine; the GPU ones skip where there is no GPU and fail when
//! `RESNEXT_REQUIRE_GPU=1`. Kept out of the library's unit tests so that one build of the
//! library with the feature serves these and the command-line tests of `resnext-train`.

/// The caching allocator's bookkeeping against a fake driver (no GPU).
mod alloc {
    use proptest::prelude::*;
    use resnext_core::backend::cuda::{
        size_class, CachingPool, RawAlloc, LARGE_ROUND, SMALL_LIMIT,
    };
    use resnext_core::backend::device::GpuError;

    /// A driver with `capacity` bytes that records what it handed out.
    struct Fake {
        capacity: usize,
        used: usize,
        next: u32,
        live: Vec<(u32, usize)>,
    }

    impl Fake {
        fn new(capacity: usize) -> Self {
            Self {
                capacity,
                used: 0,
                next: 0,
                live: Vec::new(),
            }
        }
    }

    impl RawAlloc for Fake {
        type Block = (u32, usize);
        fn alloc(&mut self, bytes: usize) -> Result<(u32, usize), GpuError> {
            if self.used + bytes > self.capacity {
                return Err(GpuError::OutOfMemory {
                    what: String::new(),
                    bytes,
                });
            }
            self.used += bytes;
            self.next += 1;
            self.live.push((self.next, bytes));
            Ok((self.next, bytes))
        }
        fn release(&mut self, b: (u32, usize)) {
            let i = self.live.iter().position(|&l| l == b).expect("live block");
            self.live.swap_remove(i);
            self.used -= b.1;
        }
    }

    #[test]
    fn size_classes_round_up_and_cover_the_request() {
        assert_eq!(size_class(0), 512);
        assert_eq!(size_class(1), 512);
        assert_eq!(size_class(512), 512);
        assert_eq!(size_class(513), 1024);
        assert_eq!(size_class(SMALL_LIMIT), SMALL_LIMIT);
        assert_eq!(size_class(SMALL_LIMIT + 1), LARGE_ROUND);
        assert_eq!(size_class(LARGE_ROUND + 1), 2 * LARGE_ROUND);
    }

    #[test]
    fn a_freed_block_serves_the_next_request_of_its_class() {
        let mut p = CachingPool::new(Fake::new(1 << 30));
        let (a, ca) = p.take(1000, "a").unwrap();
        p.give_back(a, ca);
        let (b, cb) = p.take(900, "b").unwrap();
        assert_eq!((a, ca), (b, cb), "same class: the cached block");
        let (c, _) = p.take(5000, "c").unwrap();
        assert_ne!(c.0, b.0);
        let s = p.stats();
        assert_eq!((s.hits, s.misses), (1, 2));
        assert_eq!(s.in_use, 1024 + 5120);
        assert_eq!(s.reserved, s.in_use);
    }

    #[test]
    fn out_of_memory_empties_the_cache_and_retries_once() {
        let mut p = CachingPool::new(Fake::new(6 << 20));
        let (a, ca) = p.take(3 << 20, "first").unwrap();
        assert_eq!(ca, 4 << 20);
        p.give_back(a, ca);
        // a 6 MiB class beside the 4 MiB cached one exceeds the capacity: the cached
        // block goes back to the driver, then it fits
        let (b, cb) = p.take(5 << 20, "second").unwrap();
        assert_eq!(p.stats().retries, 1);
        assert_eq!(p.stats().reserved, cb);
        p.give_back(b, cb);
        let e = p.take(7 << 20, "a batch of 64").unwrap_err();
        assert!(e.is_out_of_memory());
        let msg = e.to_string();
        assert!(
            msg.contains("a batch of 64") && msg.contains("8.0 MiB"),
            "{msg}"
        );
        assert_eq!(
            p.stats().reserved,
            0,
            "the cache was emptied before giving up"
        );
    }

    proptest! {
        /// Whatever the order of takes and gives, the counters agree with the driver.
        #[test]
        fn the_counters_agree_with_the_driver(ops in proptest::collection::vec((0usize..3 << 21, any::<bool>()), 1..60)) {
            let mut p = CachingPool::new(Fake::new(usize::MAX));
            let mut held = Vec::new();
            for (bytes, give) in ops {
                if give && !held.is_empty() {
                    let (b, c) = held.swap_remove(bytes % held.len());
                    p.give_back(b, c);
                } else {
                    let (b, c) = p.take(bytes, "x").unwrap();
                    prop_assert!(c >= bytes);
                    held.push((b, c));
                }
                let s = p.stats();
                prop_assert_eq!(s.in_use, held.iter().map(|h| h.1).sum::<usize>());
                prop_assert_eq!(s.reserved, p.raw().used);
                prop_assert!(s.peak_in_use >= s.in_use);
            }
            for (b, c) in held.drain(..) {
                p.give_back(b, c);
            }
            p.empty_cache();
            prop_assert_eq!(p.raw().used, 0);
            prop_assert_eq!(p.stats().reserved, 0);
        }
    }
}

/// cuDNN's descriptor dims against the CPU's geometry (no GPU).
mod conv {
    use std::ffi::c_int;

    use proptest::prelude::*;
    use resnext_core::backend::cuda::{workspace_growth, ConvDims};
    use resnext_core::kernels::conv::Conv2dGeom;

    fn geom(
        batch: usize,
        c: usize,
        o: usize,
        hw: usize,
        k: usize,
        s: usize,
        g: usize,
    ) -> Conv2dGeom {
        Conv2dGeom {
            batch,
            in_channels: c,
            out_channels: o,
            in_h: hw,
            in_w: hw,
            kernel: k,
            stride: s,
            padding: k / 2,
            groups: g,
        }
    }

    #[test]
    fn the_grouped_stage_two_convolution_is_described_as_pytorch_shapes_it() {
        // resnext50_32x4d layer2.0.conv2: 256 → 256, 3×3, stride 2, 32 groups, 56×56 in
        let d = ConvDims::of(&geom(8, 256, 256, 56, 3, 2, 32)).unwrap();
        assert_eq!(d.x, [8, 256, 56, 56]);
        assert_eq!(d.w, [256, 8, 3, 3]);
        assert_eq!(d.y, [8, 256, 28, 28]);
        assert_eq!((d.pad, d.stride, d.groups), ([1, 1], [2, 2], 32));
    }

    #[test]
    fn sizes_past_cudnns_32_bits_and_bad_groups_are_errors() {
        let e = ConvDims::of(&geom(1 << 16, 256, 256, 56, 1, 1, 1)).unwrap_err();
        assert!(e.to_string().contains("smaller batch"), "{e}");
        let e = ConvDims::of(&geom(1, 30, 32, 8, 3, 1, 4)).unwrap_err();
        assert!(e.to_string().contains("groups"), "{e}");
    }

    #[test]
    fn the_workspace_only_grows_in_whole_mebibytes() {
        assert_eq!(workspace_growth(0, 0), 0);
        assert_eq!(workspace_growth(0, 1), 1 << 20);
        assert_eq!(workspace_growth(4 << 20, 3 << 20), 4 << 20);
        assert_eq!(workspace_growth(4 << 20, (4 << 20) + 1), 5 << 20);
    }

    proptest! {
        /// The output dims cuDNN is told are those the CPU kernels compute.
        #[test]
        fn descriptor_dims_agree_with_the_cpu_geometry(
            n in 1usize..9, cg in 1usize..9, og in 1usize..9, g in 1usize..5,
            hw in 1usize..40, k in prop::sample::select(vec![1usize, 3, 7]), s in 1usize..3,
        ) {
            let geo = geom(n, cg * g, og * g, hw, k, s, g);
            prop_assume!(geo.validate().is_ok());
            let d = ConvDims::of(&geo).unwrap();
            // cuDNN's rule: out = (in + 2 pad - k) / stride + 1
            let out = |i: c_int| (i + 2 * d.pad[0] - d.w[2]) / d.stride[0] + 1;
            prop_assert_eq!(out(d.x[2]) as usize, geo.out_h());
            prop_assert_eq!(d.y, [n as c_int, (og * g) as c_int, geo.out_h() as c_int, geo.out_w() as c_int]);
            prop_assert_eq!(d.w[1] * d.groups, d.x[1]);
            prop_assert_eq!(d.w.iter().product::<c_int>() as usize, geo.weight_len());
        }
    }
}

/// The backend's own kernels: compiled by NVRTC (no GPU needed), launch sizes.
mod kernels {
    use resnext_core::backend::cuda::kernels::{
        compile, grid_for, nvrtc_present, BLOCK, NAMES, SOURCE,
    };
    use resnext_core::backend::device::Precision;

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
        for precision in [Precision::Fp32, Precision::Bf16] {
            let ptx = compile(precision).unwrap_or_else(|e| panic!("{precision}: {e}"));
            let text = ptx.to_src();
            for name in NAMES {
                assert!(
                    text.contains(&format!(".entry {name}(")),
                    "{name} missing from the {precision} PTX"
                );
            }
            // activations are stored as 16-bit values in bf16, as 32-bit floats in fp32
            let sixteen = text.contains("st.global.u16") || text.contains("st.global.b16");
            assert_eq!(
                sixteen,
                precision == Precision::Bf16,
                "{precision}: 16-bit stores"
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

/// The GPUs' group: how rank 0's NCCL id reaches every rank through the group's own sum.
mod group {
    use proptest::prelude::*;
    use resnext_core::backend::cuda::{id_as_values, id_from_values, BucketPlan};
    use std::ffi::c_char;

    proptest! {
        #[test]
        fn an_nccl_id_survives_the_sum_over_the_group(
            bytes in proptest::collection::vec(any::<u8>(), 128),
            world in 1usize..9,
        ) {
            let mut id = [0 as c_char; 128];
            for (c, &b) in id.iter_mut().zip(&bytes) {
                *c = b as c_char;
            }
            // rank 0 gives the id, the others zeros: the sum is the id
            let mut sum = id_as_values(Some(&id));
            for _ in 1..world {
                for (s, z) in sum.iter_mut().zip(vec![0.0f64; 128]) {
                    *s += z;
                }
            }
            prop_assert_eq!(id_from_values(&sum), Some(id));
        }
    }

    proptest! {
        /// Gradient buckets: every parameter in one bucket, filled from the last back and
        /// closed at the cap; whatever order the gradients are written in (repeated and
        /// unknown keys included), each bucket is handed out once, in order, only after
        /// all of its gradients are written.
        #[test]
        fn gradient_buckets_are_summed_in_order_once_complete(
            sizes in proptest::collection::vec(1usize..5000, 1..40),
            cap in prop_oneof![Just(0usize), 1usize..20_000],
            order in proptest::collection::vec(0usize..50, 0..120),
        ) {
            // parameter i has key 1000 + i
            let params: Vec<(usize, usize)> =
                sizes.iter().enumerate().map(|(i, &b)| (1000 + i, b)).collect();
            let mut plan = BucketPlan::new(&params, cap);
            let buckets = plan.buckets().to_vec();
            let flat: Vec<usize> = buckets.concat();
            prop_assert_eq!(flat, (0..sizes.len()).rev().collect::<Vec<_>>());
            if cap == 0 {
                prop_assert_eq!(buckets.len(), 1);
            }
            for (b, m) in buckets.iter().enumerate() {
                let bytes: usize = m.iter().map(|&i| sizes[i]).sum();
                let last = sizes[*m.last().unwrap()];
                if cap > 0 {
                    prop_assert!(bytes - last < cap, "bucket {b} ran past the cap");
                    if b + 1 < buckets.len() {
                        prop_assert!(bytes >= cap, "bucket {b} closed below the cap");
                    }
                }
            }
            // writes in the drawn order (indices past the parameters are unknown keys),
            // then every parameter
            let writes = order.iter().copied().chain(0..sizes.len());
            let (mut written, mut handed) = (vec![false; sizes.len()], 0);
            for i in writes {
                if i < sizes.len() {
                    written[i] = true;
                }
                let ready = plan.written(&[1000 + i]);
                prop_assert_eq!(ready.start, handed);
                for b in ready.clone() {
                    prop_assert!(buckets[b].iter().all(|&j| written[j]), "bucket {b} early");
                }
                handed = ready.end;
                // nothing complete is held back
                if handed < buckets.len() {
                    prop_assert!(!buckets[handed].iter().all(|&j| written[j]));
                }
            }
            prop_assert_eq!(handed, buckets.len());
            prop_assert!(plan.rest().is_empty());
        }
    }

    #[test]
    fn unwritten_buckets_are_summed_at_the_end() {
        let mut plan = BucketPlan::new(&[(1, 40), (2, 40), (3, 40)], 40);
        assert_eq!(plan.buckets().len(), 3);
        // the last parameter's bucket, then nothing until the first bucket's turn
        assert_eq!(plan.written(&[3]), 0..1);
        assert_eq!(plan.written(&[1]), 1..1);
        assert_eq!(plan.rest(), 1..3);
    }

    #[test]
    fn a_rank_0_without_an_id_fails_every_rank() {
        assert_eq!(id_from_values(&id_as_values(None)), None);
        assert_eq!(id_from_values(&[0.0; 127]), None);
        assert_eq!(id_from_values(&[256.0; 128]), None);
        assert_eq!(id_from_values(&[0.5; 128]), None);
    }
}

/// The backend on a GPU against the CPU (skipped without one), and its errors without a driver.
mod on_gpu {
    use dfdx::prelude::*;
    use resnext_core::backend::cuda::{device_count, driver_present, CudaAct, CudaLogits, Gpu};
    use resnext_core::backend::device::{GpuError, Precision};
    use resnext_core::backend::Backend;
    use resnext_core::builders::{ResNeXt11_8x8d, ResNeXt29_8x64d, ResNeXt50_32x4d};
    use resnext_core::error::Result;
    use resnext_core::model::{train_step, Arch, Frozen};
    use resnext_core::nn::{BatchNorm2d, ConvLayer};
    use resnext_core::ops::{cross_entropy_mixed, Act, BnConfig, Targets};
    use resnext_core::optim::{Algorithm, OptimConfig, Optimizer};
    use resnext_core::params::{ParamKind, ParamVisitor, Params};
    use std::collections::BTreeMap;

    /// The typed networks run on the GPU backend with their channel counts checked at
    /// compile time (type-checked here; run by the GPU tests below where a GPU is).
    #[allow(dead_code)]
    fn typed_networks_take_and_give_gpu_activations(
        gpu: &Gpu,
        dev: &Cpu,
    ) -> Result<(CudaLogits<Const<1000>>, CudaLogits<Const<10>>)> {
        let net = dev.build_module::<ResNeXt50_32x4d<1000>, f32>();
        let x: CudaAct<3> = gpu.input(&[0.0; 3 * 64 * 64], [1, 3, 64, 64])?;
        let cifar = dev.build_module::<ResNeXt29_8x64d<10>, f32>();
        let y: CudaAct<3> = gpu.input(&[0.0; 3 * 32 * 32], [1, 3, 32, 32])?;
        Ok((net.eval_on(gpu, x)?, cifar.eval_on(gpu, y)?))
    }

    /// Whether to run the GPU tests: a driver and a GPU are there. `RESNEXT_REQUIRE_GPU=1`
    /// (the GPU check script sets it) makes their absence a failure instead of a skip.
    fn gpu_or_skip() -> Option<Gpu> {
        let required = std::env::var_os("RESNEXT_REQUIRE_GPU").is_some();
        match Gpu::open(0) {
            Ok(g) => Some(g),
            Err(e) if !required => {
                eprintln!("skipped: {e}");
                None
            }
            Err(e) => panic!("RESNEXT_REQUIRE_GPU is set: {e}"),
        }
    }

    /// Max |a - b| / max(1, |b|) over the values.
    fn rel_err(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs() / y.abs().max(1.0))
            .fold(0.0, f32::max)
    }

    /// On a GPU: every network's eval-mode logits equal the CPU's (fp32, TF32 off), with
    /// random weights and running statistics, at two batch sizes and odd image sizes.
    #[test]
    fn gpu_eval_logits_match_the_cpu() {
        let Some(gpu) = gpu_or_skip() else { return };
        let dev = Cpu::seed_from_u64(7);
        for (arch, shape) in [
            ("resnext11_8x8d", [3, 3, 32, 32]),
            ("resnext29_8x64d", [2, 3, 33, 31]),
            ("resnext50_32x4d", [2, 3, 96, 80]),
        ] {
            let arch: resnext_core::model::Arch = arch.parse().unwrap();
            let mut net = arch.build(&dev, 3, 17).unwrap();
            let x = resnext_core::testing::values(5, shape.iter().product());
            // one training step on the CPU: running statistics and weights no longer the
            // initial ones, so the folding of every batch norm is tested
            let mut opt = resnext_core::optim::Optimizer::new(resnext_core::optim::OptimConfig {
                lr: 0.05,
                ..Default::default()
            });
            let labels: Vec<usize> = (0..shape[0]).collect();
            net.train_step(x.clone(), shape, &labels, 0.0, &mut opt)
                .unwrap();
            let cpu = net.forward_eval(x.clone(), shape).unwrap();
            let on_gpu = net.forward_eval_gpu(&gpu, &x, shape).unwrap();
            let e = rel_err(&on_gpu, &cpu);
            assert!(e <= 1e-4, "{arch} {shape:?}: relative error {e}");
            // the second call reuses the GPU copies of the parameters
            let again = net.forward_eval_gpu(&gpu, &x, shape).unwrap();
            assert_eq!(again, on_gpu, "{arch}: not deterministic");
        }
        let s = gpu.memory();
        assert!(s.hits > 0 && s.in_use == 0, "{s:?}");
    }

    /// On a machine without the NVIDIA driver (CI's), opening a GPU is an error that says
    /// so, not a panic.
    #[test]
    fn without_a_driver_opening_a_gpu_is_an_error_naming_the_driver() {
        if driver_present() {
            eprintln!("skipped: this machine has a CUDA driver");
            return;
        }
        assert!(matches!(device_count(), Err(GpuError::NoDriver)));
        let e = Gpu::open(0).unwrap_err();
        assert!(matches!(e, GpuError::NoDriver), "{e}");
        assert!(e.to_string().starts_with("no CUDA driver found"), "{e}");
    }

    /// Random running statistics and affine parameters for `bn`.
    fn randomize<const C: usize>(bn: &mut BatchNorm2d<C, f32, Cpu>, seed: u64) {
        let v = |k: u64| resnext_core::testing::values(seed * 4 + k, C);
        bn.weight.copy_from(&v(0));
        bn.bias.copy_from(&v(1));
        bn.running_mean.copy_from(&v(2));
        let var: Vec<f32> = v(3).iter().map(|x| 0.5 + x.abs()).collect();
        bn.running_var.copy_from(&var);
    }

    /// One fused convolution + batch norm (+ residual, + ReLU) on the GPU against the CPU.
    fn conv_case<
        const I: usize,
        const O: usize,
        const K: usize,
        const S: usize,
        const P: usize,
        const G: usize,
    >(
        gpu: &Gpu,
        [n, h, w]: [usize; 3],
        relu: bool,
        residual: bool,
    ) {
        let dev = Cpu::seed_from_u64(3);
        let conv = dev.build_module::<resnext_core::builders::Conv2d<I, O, K, S, P, G>, f32>();
        let mut bn = dev.build_module::<resnext_core::builders::BatchNorm2d<O>, f32>();
        randomize(&mut bn, (I * 31 + O * 7 + K + S) as u64);
        let x = resnext_core::testing::values(1, n * I * h * w);
        let (oh, ow) = ((h + 2 * P - K) / S + 1, (w + 2 * P - K) / S + 1);
        let r = residual.then(|| resnext_core::testing::values(2, n * O * oh * ow));
        let (cpu, ..) = resnext_core::ops::conv2d_bn_eval_raw::<I, O, _>(
            &x,
            [n, h, w],
            &conv.weight,
            <resnext_core::nn::Conv2d<I, O, K, S, P, G, f32, Cpu> as ConvLayer<I, O>>::CONFIG,
            bn.eval_ref(),
            BnConfig::default().eps,
            relu,
            r.as_deref(),
        )
        .unwrap();
        gpu.forget_params();
        let xg = gpu.input::<I>(&x, [n, I, h, w]).unwrap();
        let rg = r
            .as_ref()
            .map(|r| gpu.input::<O>(r, [n, O, oh, ow]).unwrap());
        let y = gpu.conv_bn_eval(xg, &conv, &bn, relu, rg).unwrap();
        assert_eq!(y.shape(), [n, O, oh, ow]);
        let e = rel_err(&gpu.activation(&y).unwrap(), &cpu);
        assert!(
            e <= 1e-4,
            "conv {I}->{O} k{K} s{S} g{G} on {n}x{h}x{w}: relative error {e}"
        );
    }

    /// On a GPU: each convolution shape of the networks (stem 7×7/2, 1×1, grouped 3×3 at
    /// stride 1 and 2, the CIFAR stem), pooling and the head against the CPU.
    #[test]
    fn gpu_ops_match_the_cpu() {
        let Some(gpu) = gpu_or_skip() else { return };
        conv_case::<3, 64, 7, 2, 3, 1>(&gpu, [2, 45, 38], true, false);
        conv_case::<3, 64, 3, 1, 1, 1>(&gpu, [2, 32, 32], true, false);
        conv_case::<64, 128, 1, 1, 0, 1>(&gpu, [3, 14, 15], true, false);
        conv_case::<128, 128, 3, 1, 1, 32>(&gpu, [2, 14, 13], true, false);
        conv_case::<128, 128, 3, 2, 1, 32>(&gpu, [2, 15, 14], true, false);
        conv_case::<256, 256, 3, 2, 1, 8>(&gpu, [1, 9, 9], true, false);
        conv_case::<128, 256, 1, 1, 0, 1>(&gpu, [2, 7, 7], true, true);
        conv_case::<64, 256, 1, 2, 0, 1>(&gpu, [2, 14, 14], false, false);

        let (n, c, h, w) = (2, 16, 13, 11);
        let x = resnext_core::testing::values(9, n * c * h * w);
        let xg = gpu.input::<16>(&x, [n, c, h, w]).unwrap();
        let y = gpu.max_pool::<16, 3, 2, 1>(xg.clone()).unwrap();
        let (cpu, oh, ow) = resnext_core::ops::max_pool2d_raw(&x, [n, c, h, w], 3, 2, 1).unwrap();
        assert_eq!(y.shape(), [n, c, oh, ow]);
        assert_eq!(gpu.activation(&y).unwrap(), cpu, "max pool");
        let pooled = gpu.avg_pool::<16>(xg.clone()).unwrap();
        let cpu = resnext_core::ops::global_avg_pool_raw(&x, [n, c, h, w]).unwrap();
        assert!(
            rel_err(&gpu.logits(&pooled).unwrap(), &cpu) <= 1e-5,
            "average pool"
        );

        let dev = Cpu::seed_from_u64(5);
        let fc = dev.build_module::<resnext_core::builders::Linear<16, 10>, f32>();
        let logits = gpu.classify(xg, &fc).unwrap();
        let cpu = resnext_core::ops::linear_raw(&cpu, n, &fc.weight, &fc.bias).unwrap();
        assert_eq!(logits.shape(), (n, 10));
        assert!(
            rel_err(&gpu.logits(&logits).unwrap(), &cpu) <= 1e-5,
            "classifier"
        );
    }

    /// What a visitor reads from each named tensor of a network, by name.
    struct Read<F>(F, BTreeMap<String, Vec<f32>>);

    /// What [`Read`] reads: a tensor's values, or its gradient (none for buffers).
    trait Reader {
        fn read<S: Shape>(&self, t: &Tensor<S, f32, Cpu>, kind: ParamKind) -> Option<Vec<f32>>;
    }

    impl<F: Reader> ParamVisitor for Read<F> {
        type Error = std::convert::Infallible;
        fn tensor<S: Shape>(
            &mut self,
            name: &str,
            t: &Tensor<S, f32, Cpu>,
            kind: ParamKind,
        ) -> Result<(), Self::Error> {
            if let Some(v) = self.0.read(t, kind) {
                self.1.insert(name.to_string(), v);
            }
            Ok(())
        }
    }

    /// Every tensor's values.
    struct Values;
    impl Reader for Values {
        fn read<S: Shape>(&self, t: &Tensor<S, f32, Cpu>, _: ParamKind) -> Option<Vec<f32>> {
            Some(t.as_vec())
        }
    }

    /// Every trainable tensor's gradient on the CPU's tape.
    struct CpuGrads<'a>(&'a Gradients<f32, Cpu>);
    impl Reader for CpuGrads<'_> {
        fn read<S: Shape>(&self, t: &Tensor<S, f32, Cpu>, kind: ParamKind) -> Option<Vec<f32>> {
            (kind != ParamKind::Buffer).then(|| self.0.get(t).as_vec())
        }
    }

    /// Every trainable tensor's gradient from the last step on the GPU.
    struct GpuGrads<'a>(&'a Gpu);
    impl Reader for GpuGrads<'_> {
        fn read<S: Shape>(&self, t: &Tensor<S, f32, Cpu>, kind: ParamKind) -> Option<Vec<f32>> {
            (kind != ParamKind::Buffer).then(|| self.0.gradient(t).unwrap().unwrap_or_default())
        }
    }

    fn read<M: Params, F: Reader>(net: &M, f: F) -> BTreeMap<String, Vec<f32>> {
        let mut r = Read(f, BTreeMap::new());
        let Ok(()) = net.visit_params("", &mut r);
        r.1
    }

    /// max |a − b| over max |b| (the error against the tensor's own scale).
    fn scaled_err(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-12);
        a.iter()
            .zip(b)
            .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
            / scale
    }

    /// One typed network's training step on the GPU against the CPU: the loss and logits,
    /// every parameter's gradient, then (two SGD steps with Nesterov momentum and weight
    /// decay on each side) every weight, running statistic and momentum buffer.
    fn train_case<const C: usize, M>(
        gpu: &Gpu,
        net0: &M,
        shape: [usize; 4],
        classes: usize,
        forward: impl Fn(&mut M, &Gpu, CudaAct<C>) -> Result<CudaLogits<Const<10>>> + Copy,
    ) where
        M: Clone
            + Params
            + ModuleMut<
                Act<C, OwnedTape<f32, Cpu>>,
                Output = Tensor<(usize, Const<10>), f32, Cpu, OwnedTape<f32, Cpu>>,
                Error = resnext_core::Error,
            >,
    {
        let dev = Cpu::seed_from_u64(0);
        let [n, _, h, w] = shape;
        let x = resnext_core::testing::values(11, shape.iter().product());
        let labels: Vec<usize> = (0..n).map(|i| (i * 7) % classes).collect();
        let targets = Targets::hard(&labels, 0.1);
        let what = std::any::type_name::<M>();

        // the CPU's gradients
        let mut net_g = net0.clone();
        let xt: Act<C> = dev.tensor_from_vec(x.clone(), (n, Const::<C>, h, w));
        let logits = net_g.try_forward_mut(xt.trace(Gradients::leaky())).unwrap();
        let cpu_logits = logits.as_vec();
        let loss = cross_entropy_mixed(logits, targets).unwrap();
        let cpu_loss = loss.array();
        let grads = loss.backward();
        let cpu_grads = read(&net_g, CpuGrads(&grads));

        // the same step on the GPU
        let cfg = OptimConfig {
            lr: 0.05,
            momentum: 0.9,
            nesterov: true,
            weight_decay: 5e-4,
            ..Default::default()
        };
        let mut net_gpu = net0.clone();
        let mut opt_gpu = Optimizer::new(cfg.clone());
        gpu.reset_training();
        let step = |net: &mut M, opt: &mut Optimizer| {
            let xg = gpu.input::<C>(&x, shape).unwrap();
            gpu.train_step_by(net, xg, targets, opt, forward).unwrap()
        };
        let out = step(&mut net_gpu, &mut opt_gpu);
        assert!(
            (out.loss - cpu_loss).abs() <= 1e-4 * cpu_loss.abs().max(1.0),
            "{what}: loss {} against the CPU's {cpu_loss}",
            out.loss
        );
        let e = rel_err(&out.logits, &cpu_logits);
        assert!(e <= 1e-4, "{what}: logits, relative error {e}");
        let gpu_grads = read(&net_gpu, GpuGrads(gpu));
        assert_eq!(cpu_grads.len(), gpu_grads.len());
        for (name, cg) in &cpu_grads {
            let e = scaled_err(&gpu_grads[name], cg);
            assert!(e <= 1e-3, "{what}: gradient of {name}, scaled error {e}");
        }

        // two steps each side, then everything the steps changed
        let mut net_cpu = net0.clone();
        let mut opt_cpu = Optimizer::new(cfg);
        for _ in 0..2 {
            let xt: Act<C> = dev.tensor_from_vec(x.clone(), (n, Const::<C>, h, w));
            train_step(&mut net_cpu, xt, targets, &mut opt_cpu).unwrap();
        }
        step(&mut net_gpu, &mut opt_gpu);
        gpu.sync_to_host(&mut net_gpu, Some(&mut opt_gpu)).unwrap();
        let (cpu, on_gpu) = (read(&net_cpu, Values), read(&net_gpu, Values));
        assert_eq!(cpu.len(), on_gpu.len());
        for (name, c) in &cpu {
            let e = rel_err(&on_gpu[name], c);
            assert!(
                e <= 1e-4,
                "{what}: {name} after two steps, relative error {e}"
            );
        }
        assert_eq!(opt_gpu.steps(), opt_cpu.steps());
        let (a, b) = (
            opt_gpu.state_bytes().unwrap(),
            opt_cpu.state_bytes().unwrap(),
        );
        let (a, b) = (
            safetensors::SafeTensors::deserialize(&a).unwrap(),
            safetensors::SafeTensors::deserialize(&b).unwrap(),
        );
        assert_eq!(a.len(), b.len(), "{what}: optimiser state");
        let floats = |v: safetensors::tensor::TensorView<'_>| -> Vec<f32> {
            v.data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        };
        for (name, tb) in b.tensors() {
            if name.starts_with("momentum.") {
                let e = scaled_err(&floats(a.tensor(&name).unwrap()), &floats(tb));
                assert!(e <= 1e-3, "{what}: {name}, scaled error {e}");
            }
        }
    }

    /// On a GPU: a training step of ResNeXt-11 (CIFAR layout) and of ResNeXt-50 against the
    /// CPU's (fp32, TF32 off): loss, logits, every gradient, and after two SGD steps every
    /// weight, running statistic and the optimiser's state.
    #[test]
    fn gpu_training_step_matches_the_cpu() {
        let Some(gpu) = gpu_or_skip() else { return };
        let dev = Cpu::seed_from_u64(21);
        let net = dev.build_module::<ResNeXt11_8x8d<10>, f32>();
        train_case::<3, _>(&gpu, &net, [4, 3, 20, 18], 10, |m, g, x| m.train_on(g, x));
        let net = dev.build_module::<ResNeXt50_32x4d<10>, f32>();
        train_case::<3, _>(&gpu, &net, [2, 3, 64, 72], 10, |m, g, x| m.train_on(g, x));
        let s = gpu.memory();
        assert!(s.in_use < 64 << 20, "{s:?}");
    }

    /// On a GPU, through the command line's API (runtime class count): frozen parts, mixed
    /// targets, AdamW with clipping; the networks' eval-mode logits agree after the steps.
    #[test]
    fn gpu_training_through_the_registry_matches_the_cpu() {
        let Some(gpu) = gpu_or_skip() else { return };
        let dev = Cpu::seed_from_u64(4);
        let arch: Arch = "resnext11_8x8d".parse().unwrap();
        let shape = [4, 3, 16, 16];
        let x = resnext_core::testing::values(3, shape.iter().product());
        let (a, b) = ([1usize, 4, 2, 0], [3usize, 3, 1, 2]);
        let targets = Targets {
            labels: &a,
            mixed: Some((&b, 0.7)),
            label_smoothing: 0.05,
        };
        for (frozen, algorithm) in [
            (Frozen::NONE, Algorithm::ADAMW),
            (
                Frozen {
                    stem: true,
                    stages: [true, false, false, false],
                    head: false,
                },
                Algorithm::Sgd,
            ),
            (
                Frozen {
                    stem: false,
                    stages: [false, true, false, false],
                    head: false,
                },
                Algorithm::Sgd,
            ),
        ] {
            let cfg = OptimConfig {
                lr: 0.02,
                algorithm,
                clip_grad_norm: Some(0.5),
                groups: vec![resnext_core::optim::ParamGroup {
                    prefixes: frozen.prefixes(),
                    lr_scale: 0.0,
                }],
                ..Default::default()
            };
            let mut cpu = arch.build(&dev, 3, 5).unwrap();
            let mut on_gpu = arch.build(&dev, 3, 5).unwrap();
            // the same weights on both
            let file = std::env::temp_dir()
                .join(format!("resnext-gpu-{}.safetensors", std::process::id()));
            cpu.save_safetensors(&file).unwrap();
            on_gpu.load_safetensors(&file).unwrap();
            let _ = std::fs::remove_file(&file);
            cpu.set_frozen(frozen);
            on_gpu.set_frozen(frozen);
            gpu.reset_training();
            let (mut oc, mut og) = (Optimizer::new(cfg.clone()), Optimizer::new(cfg));
            for _ in 0..2 {
                let c = cpu
                    .train_step_on(x.clone(), shape, targets, &mut oc)
                    .unwrap();
                let g = on_gpu
                    .train_step_gpu(&gpu, &x, shape, targets, &mut og)
                    .unwrap();
                assert!(
                    (c.loss - g.loss).abs() <= 1e-4,
                    "{frozen:?}: loss {} vs {}",
                    g.loss,
                    c.loss
                );
                let (cn, gn) = (c.grad_norm.unwrap(), g.grad_norm.unwrap());
                assert!(
                    (cn - gn).abs() <= 1e-3 * cn,
                    "{frozen:?}: gradient norm {gn} vs {cn}"
                );
            }
            on_gpu.sync_from_gpu(&gpu, Some(&mut og)).unwrap();
            let e = rel_err(
                &on_gpu.forward_eval(x.clone(), shape).unwrap(),
                &cpu.forward_eval(x.clone(), shape).unwrap(),
            );
            assert!(
                e <= 1e-4,
                "{frozen:?} {:?}: eval logits after two steps, relative error {e}",
                og.cfg.algorithm
            );
            // and on the GPU itself
            let e = rel_err(
                &on_gpu.forward_eval_gpu(&gpu, &x, shape).unwrap(),
                &cpu.forward_eval(x.clone(), shape).unwrap(),
            );
            assert!(
                e <= 1e-4,
                "{frozen:?}: GPU eval logits after two steps, relative error {e}"
            );
        }
    }

    /// The cosine of the angle between two vectors.
    fn cosine(a: &[f32], b: &[f32]) -> f64 {
        let dot = |x: &[f32], y: &[f32]| {
            x.iter()
                .zip(y)
                .map(|(p, q)| *p as f64 * *q as f64)
                .sum::<f64>()
        };
        dot(a, b) / (dot(a, a) * dot(b, b)).sqrt().max(1e-30)
    }

    /// On a GPU in mixed precision: activations are stored in bf16 (rounded to nearest
    /// even), and the eval logits, a training step's loss, and its gradients stay close to
    /// the CPU's fp32 ones, within what bf16's 8-bit significand allows.
    #[test]
    fn gpu_bf16_stays_close_to_fp32() {
        let Some(_) = gpu_or_skip() else { return };
        let gpu = Gpu::open_with(0, Precision::Bf16).unwrap();
        assert_eq!(gpu.precision(), Precision::Bf16);
        // 1 + 2⁻¹⁰ is not a bf16 value: it rounds to 1; 1 + 3·2⁻⁸ rounds to even 1 + 2⁻⁶
        let x = gpu
            .input::<3>(&[1.0 + 1.0 / 1024.0, 1.0 + 3.0 / 256.0, -2.5], [1, 3, 1, 1])
            .unwrap();
        assert_eq!(gpu.activation(&x).unwrap(), [1.0, 1.0 + 1.0 / 64.0, -2.5]);

        let dev = Cpu::seed_from_u64(9);
        for (arch, shape) in [
            ("resnext11_8x8d", [4, 3, 32, 32]),
            ("resnext50_32x4d", [2, 3, 96, 96]),
        ] {
            let arch: Arch = arch.parse().unwrap();
            let net = arch.build(&dev, 3, 10).unwrap();
            let x = resnext_core::testing::values(2, shape.iter().product());
            let cpu = net.forward_eval(x.clone(), shape).unwrap();
            let half = net.forward_eval_gpu(&gpu, &x, shape).unwrap();
            let e = scaled_err(&half, &cpu);
            assert!(e <= 0.05, "{arch:?}: bf16 eval logits, scaled error {e}");
            assert!(cosine(&half, &cpu) >= 0.999, "{arch:?}: bf16 eval logits");
        }

        // one training step of a typed ResNeXt-11: loss and gradients against the CPU's
        let net0 = dev.build_module::<ResNeXt11_8x8d<10>, f32>();
        let shape = [8, 3, 24, 24];
        let x = resnext_core::testing::values(4, shape.iter().product());
        let labels: Vec<usize> = (0..8).map(|i| (i * 3) % 10).collect();
        let targets = Targets::hard(&labels, 0.0);
        let mut net = net0.clone();
        let xt: Act<3> = dev.tensor_from_vec(x.clone(), (8, Const::<3>, 24, 24));
        let loss = cross_entropy_mixed(
            net.try_forward_mut(xt.trace(Gradients::leaky())).unwrap(),
            targets,
        )
        .unwrap();
        let cpu_loss = loss.array();
        let grads = loss.backward();
        let cpu_grads = read(&net, CpuGrads(&grads));
        let mut net_gpu = net0.clone();
        let mut opt = Optimizer::new(OptimConfig {
            lr: 0.05,
            momentum: 0.9,
            weight_decay: 0.0,
            ..Default::default()
        });
        let xg = gpu.input::<3>(&x, shape).unwrap();
        let out = gpu
            .train_step_by(&mut net_gpu, xg, targets, &mut opt, |m, g, x| {
                m.train_on(g, x)
            })
            .unwrap();
        assert!(
            (out.loss - cpu_loss).abs() <= 0.02 * cpu_loss,
            "bf16 loss {} against the CPU's {cpu_loss}",
            out.loss
        );
        let gpu_grads = read(&net_gpu, GpuGrads(&gpu));
        let (mut all_c, mut all_g) = (Vec::new(), Vec::new());
        for (name, c) in &cpu_grads {
            let g = &gpu_grads[name];
            assert!(
                cosine(g, c) >= 0.95,
                "{name}: bf16 gradient, cosine {}",
                cosine(g, c)
            );
            all_c.extend_from_slice(c);
            all_g.extend_from_slice(g);
        }
        assert!(
            cosine(&all_g, &all_c) >= 0.99,
            "bf16 gradients, cosine {}",
            cosine(&all_g, &all_c)
        );
        // the update ran on the f32 weights: they moved as the CPU's SGD would move them
        gpu.sync_to_host(&mut net_gpu, None).unwrap();
        let (before, after) = (read(&net0, Values), read(&net_gpu, Values));
        let name = "fc.weight";
        let step: Vec<f32> = after[name]
            .iter()
            .zip(&before[name])
            .map(|(a, b)| b - a)
            .collect();
        assert!(
            cosine(&step, &cpu_grads[name]) >= 0.95,
            "the SGD step of {name}"
        );
    }

    /// On a GPU with NCCL: a GPU in a group of one (NCCL's communicator made from the
    /// group's id, every gradient summed by NCCL, in small buckets) trains as one outside
    /// a group, and so does one with synchronised batch norm (the statistics and their
    /// backward sums through NCCL too).
    #[test]
    fn gpu_in_a_group_of_one_trains_as_alone() {
        let Some(alone) = gpu_or_skip() else { return };
        assert!(
            alone.set_sync_bn(true).is_err(),
            "synchronised batch norm outside a group"
        );
        let grouped = Gpu::open(0).unwrap();
        grouped
            .join_group(&resnext_core::dist::Single)
            .unwrap_or_else(|e| panic!("joining a group of one: {e}"));
        // many buckets (ResNeXt-11 has about 2 MiB of gradients), each summed on the
        // communicator's stream while the backward pass goes on
        grouped.set_bucket_bytes(64 << 10);
        assert_eq!(grouped.group_world(), 1);
        let synced = Gpu::open(0).unwrap();
        synced.join_group(&resnext_core::dist::Single).unwrap();
        synced.set_sync_bn(true).unwrap();
        let dev = Cpu::seed_from_u64(8);
        let arch: Arch = "resnext11_8x8d".parse().unwrap();
        let shape = [4, 3, 16, 16];
        let x = resnext_core::testing::values(3, shape.iter().product());
        let labels = [1usize, 4, 2, 0];
        let cfg = OptimConfig {
            lr: 0.05,
            clip_grad_norm: Some(1.0),
            ..Default::default()
        };
        let mut nets = Vec::new();
        for gpu in [&alone, &grouped, &synced] {
            let mut net = arch.build(&dev, 3, 5).unwrap();
            let file = std::env::temp_dir()
                .join(format!("resnext-group-{}.safetensors", std::process::id()));
            if nets.is_empty() {
                net.save_safetensors(&file).unwrap();
            } else {
                net.load_safetensors(&file).unwrap();
                let _ = std::fs::remove_file(&file);
            }
            let mut opt = Optimizer::new(cfg.clone());
            let mut losses = Vec::new();
            for _ in 0..2 {
                let out = net
                    .train_step_gpu(gpu, &x, shape, Targets::hard(&labels, 0.0), &mut opt)
                    .unwrap();
                losses.push((out.loss, out.grad_norm));
            }
            net.sync_from_gpu(gpu, None).unwrap();
            nets.push((losses, net.forward_eval(x.clone(), shape).unwrap()));
        }
        // equal up to the order of cuDNN's atomic sums (its backward-filter algorithms are
        // not all deterministic)
        for (i, other) in nets[1..].iter().enumerate() {
            for ((la, na), (lb, nb)) in nets[0].0.iter().zip(&other.0) {
                assert!(
                    (la - lb).abs() <= 1e-5 * la.abs().max(1.0),
                    "case {i}: loss {la} vs {lb}"
                );
                let (na, nb) = (na.unwrap(), nb.unwrap());
                assert!(
                    (na - nb).abs() <= 1e-5 * na,
                    "case {i}: gradient norm {na} vs {nb}"
                );
            }
            let e = rel_err(&other.1, &nets[0].1);
            assert!(
                e <= 1e-5,
                "case {i}: eval logits after two steps, relative error {e}"
            );
        }
    }
}
