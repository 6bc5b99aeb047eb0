//! `--config` TOML text: any input is a validated set of training arguments or an error
//! naming what is wrong, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(args) = resnext_train::train::parse_config(text) {
            // what parses is in range: the checks `train` relies on hold
            assert!(args.lr > 0.0 && args.lr.is_finite());
            assert!((0.0..1.0).contains(&args.momentum));
            assert!((1..=65_536).contains(&args.batch_size));
            assert!(args.max_steps.is_none_or(|m| m >= 1));
        }
    }
});
