//! CIFAR-10 and CIFAR-100 binary records.
#![no_main]
use datasets::cifar::{parse_records, Cifar};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::path::Path::new("fuzz.bin");
    for kind in [Cifar::Ten, Cifar::Hundred] {
        let (mut pixels, mut labels) = (Vec::new(), Vec::new());
        let _ = parse_records(kind, data, path, &mut pixels, &mut labels);
    }
});
