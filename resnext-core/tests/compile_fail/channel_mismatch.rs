// A block whose IN differs from the previous block's OUT must not compile.
use dfdx::prelude::*;
use resnext_core::builders::Bottleneck;
use resnext_core::ops::Act;

fn main() {
    let dev = Cpu::default();
    let chain = dev.build_module::<(Bottleneck<64, 128, 256, 1, 32>, Bottleneck<128, 128, 256, 1, 32>), f32>();
    let x: Act<64> = dev.zeros_like(&(1, Const::<64>, 8, 8));
    let _ = chain.forward(x);
}
