mod common;
use common::*;
use resnext_core::kernels::conv::{self, Conv2dGeom};
#[test]
fn errs() {
    for (ipg, hw, pad) in [(16, 7, 1), (32, 7, 1), (64, 8, 1), (64, 32, 1), (16, 14, 1), (64, 15, 2), (32, 5, 0)] {
        let g = Conv2dGeom { batch: 2, in_channels: 2 * ipg, out_channels: 2 * ipg, in_h: hw, in_w: hw, kernel: 3, stride: 1, padding: pad, groups: 2 };
        let mut worst = [0f32; 2];
        for seed in 0..20u64 {
            let x = values(seed, g.input_len());
            let wt = values(seed ^ 1, g.weight_len());
            let mut y_ref = vec![0.0; g.output_len()];
            conv::conv2d_forward_ref(&g, &x, &wt, &mut y_ref);
            for (i, t) in conv::winograd::Tiling::ALL.into_iter().enumerate() {
                let mut y = vec![0.0; g.output_len()];
                conv::winograd::conv2d_forward_tiled(&g, t, &x, &wt, &mut y, |_, _, _| {});
                worst[i] = worst[i].max(rel_err(&y, &y_ref));
            }
        }
        println!("ipg {ipg} hw {hw} pad {pad}: F2 {:.2e} F4 {:.2e}", worst[0], worst[1]);
    }
}
