//! The reference convolution: plain loops with `f64` accumulation, what every fast kernel
//! is tested against.

use super::Conv2dGeom;

/// Reference forward: plain loops with `f64` accumulation.
pub fn conv2d_forward_ref(g: &Conv2dGeom, x: &[f32], w: &[f32], y: &mut [f32]) {
    let (oh, ow, k) = (g.out_h(), g.out_w(), g.kernel);
    let (ipg, opg) = (g.in_per_group(), g.out_per_group());
    for n in 0..g.batch {
        for oc in 0..g.out_channels {
            let grp = oc / opg;
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut acc = 0.0f64;
                    for icg in 0..ipg {
                        let ic = grp * ipg + icg;
                        for ky in 0..k {
                            for kx in 0..k {
                                let iy = (oy * g.stride + ky) as isize - g.padding as isize;
                                let ix = (ox * g.stride + kx) as isize - g.padding as isize;
                                if iy < 0
                                    || ix < 0
                                    || iy >= g.in_h as isize
                                    || ix >= g.in_w as isize
                                {
                                    continue;
                                }
                                let xv = x[((n * g.in_channels + ic) * g.in_h + iy as usize)
                                    * g.in_w
                                    + ix as usize];
                                let wv = w[((oc * ipg + icg) * k + ky) * k + kx];
                                acc += xv as f64 * wv as f64;
                            }
                        }
                    }
                    y[((n * g.out_channels + oc) * oh + oy) * ow + ox] = acc as f32;
                }
            }
        }
    }
}

/// Reference backward: overwrites `dx` (input gradient) and `dw` (weight gradient).
pub fn conv2d_backward_ref(
    g: &Conv2dGeom,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    dw: &mut [f32],
) {
    let (oh, ow, k) = (g.out_h(), g.out_w(), g.kernel);
    let (ipg, opg) = (g.in_per_group(), g.out_per_group());
    let mut dx64 = vec![0.0f64; dx.len()];
    let mut dw64 = vec![0.0f64; dw.len()];
    for n in 0..g.batch {
        for oc in 0..g.out_channels {
            let grp = oc / opg;
            for oy in 0..oh {
                for ox in 0..ow {
                    let d = dy[((n * g.out_channels + oc) * oh + oy) * ow + ox] as f64;
                    for icg in 0..ipg {
                        let ic = grp * ipg + icg;
                        for ky in 0..k {
                            for kx in 0..k {
                                let iy = (oy * g.stride + ky) as isize - g.padding as isize;
                                let ix = (ox * g.stride + kx) as isize - g.padding as isize;
                                if iy < 0
                                    || ix < 0
                                    || iy >= g.in_h as isize
                                    || ix >= g.in_w as isize
                                {
                                    continue;
                                }
                                let xi = ((n * g.in_channels + ic) * g.in_h + iy as usize) * g.in_w
                                    + ix as usize;
                                let wi = ((oc * ipg + icg) * k + ky) * k + kx;
                                dx64[xi] += d * w[wi] as f64;
                                dw64[wi] += d * x[xi] as f64;
                            }
                        }
                    }
                }
            }
        }
    }
    for (o, v) in dx.iter_mut().zip(dx64) {
        *o = v as f32;
    }
    for (o, v) in dw.iter_mut().zip(dw64) {
        *o = v as f32;
    }
}
