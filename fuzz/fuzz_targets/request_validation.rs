//! Any bytes on the wire: decoding and validating a request must never panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    byokd::fuzzing::validate_requests(data);
});
