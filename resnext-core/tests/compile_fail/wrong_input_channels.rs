// Feeding a 3-channel network a 1-channel batch must not compile.
use dfdx::prelude::*;
use resnext_core::builders::ResNeXt29_2x64d;
use resnext_core::ops::Act;

fn main() {
    let dev = Cpu::default();
    let net = dev.build_module::<ResNeXt29_2x64d<10>, f32>();
    let x: Act<1> = dev.zeros_like(&(1, Const::<1>, 32, 32));
    let _ = net.forward(x);
}
