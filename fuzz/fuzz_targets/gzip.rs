//! Gzip streams as the IDX and CIFAR readers decompress them (output capped at 1 GiB), and
//! IDX files inside them.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::path::Path::new("fuzz.gz");
    if let Ok(bytes) = datasets::archive::gunzip(data, path) {
        let _ = datasets::mnist::parse_idx(&bytes, 3, path);
    }
});
