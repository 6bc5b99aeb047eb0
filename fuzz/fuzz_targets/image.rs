//! Image files as the image-folder reader decodes them (with its size and memory caps).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = datasets::folder::decode_rgb_bytes(data, std::path::Path::new("fuzz.img"));
});
