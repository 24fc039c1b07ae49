#![no_main]
//! Fuzz target: `llmtail::fuzzing::split_and_reframe` (see src/fuzzing.rs for what it checks).

libfuzzer_sys::fuzz_target!(|data: &[u8]| llmtail::fuzzing::split_and_reframe(data));
