#![no_main]
//! Fuzz target: `llmtail_tools::fuzzing::otlp_json` (see tools/src/fuzzing.rs for what it checks).

libfuzzer_sys::fuzz_target!(|data: &[u8]| llmtail_tools::fuzzing::otlp_json(data));
