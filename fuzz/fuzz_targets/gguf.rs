//! Fuzz target: see `pixart_suite::fuzzing::gguf` for the properties checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pixart_suite::fuzzing::gguf(data));
