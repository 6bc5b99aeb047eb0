//! IDX headers and data with 1 and 3 dims, as MNIST's files hold them.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::path::Path::new("fuzz-idx3-ubyte");
    let _ = datasets::mnist::parse_idx(data, 1, path);
    let _ = datasets::mnist::parse_idx(data, 3, path);
});
