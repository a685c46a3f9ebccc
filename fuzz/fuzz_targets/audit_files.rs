//! Any bytes in the trail's segment, offset and index files: opening, reading, searching and scrubbing must never panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    byokd::fuzzing::read_audit_files(data);
});
