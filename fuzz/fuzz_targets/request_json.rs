//! Fuzz target: see `pixart_suite::fuzzing::request_json` for the properties checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pixart_suite::fuzzing::request_json(data));
