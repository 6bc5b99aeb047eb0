//! `.npy` bytes: any input is an array or an error, never a panic or an abort.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = datasets::npy::parse(data, std::path::Path::new("fuzz.npy"));
});
