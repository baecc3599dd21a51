//! Feeds arbitrary bytes to the form decoder: it must return (never panic, hang or overflow
//! the stack), and whatever it accepts must be a JSON object.
#![no_main]

use b24_shared::form::{decode_form, FormLimits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(value) = decode_form(data, &FormLimits::default()) {
        assert!(
            value.is_object(),
            "decode_form returned a non-object: {value}"
        );
    }
});
