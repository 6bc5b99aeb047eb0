//! Safetensors bytes loaded into a small ResNeXt: any input loads completely or is an
//! error that leaves the model untouched.
#![no_main]
use dfdx::prelude::*;
use libfuzzer_sys::fuzz_target;
use resnext_core::builders::{Linear, ResNeXtCifar, Stage};
use resnext_core::params::Params;

type Net = ResNeXtCifar<
    1,
    8,
    Stage<8, 8, 16, 1, 2, 1>,
    Stage<16, 16, 32, 2, 2, 1>,
    Stage<32, 16, 32, 2, 2, 1>,
    Linear<32, 3>,
>;

fuzz_target!(|data: &[u8]| {
    let dev = Cpu::seed_from_u64(0);
    let mut net = dev.build_module::<Net, f32>();
    let before = resnext_core::weights::to_bytes(&net).expect("serialises");
    if resnext_core::weights::load_from_bytes(
        &mut net,
        data,
        std::path::Path::new("fuzz.safetensors"),
    )
    .is_err()
    {
        assert_eq!(
            resnext_core::weights::to_bytes(&net).expect("serialises"),
            before
        );
    }
    let _ = net.num_params();
});
