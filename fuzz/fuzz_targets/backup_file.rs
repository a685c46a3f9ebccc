//! Any bytes as a backup file: reading it must end in a value or an error, never a panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    byokd::fuzzing::read_backup(data);
});
