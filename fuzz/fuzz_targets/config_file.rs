//! Any text as a config file: parsing and resolving it must never panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    byokd::fuzzing::parse_config(data);
});
