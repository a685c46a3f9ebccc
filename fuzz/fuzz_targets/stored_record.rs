//! A corrupted sled value must decode to an error, never a panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    byokd::fuzzing::decode_stored_record(data);
});
