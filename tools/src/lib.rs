//! llmtail's tools, apart from the daemon: the load generator (also the traffic of the
//! benchmarks and end-to-end tests) and the fuzz targets' checks. The binaries are
//! `llmtail-loadgen`, `llmtail-bench` and `llmtail-soak`.

pub mod fuzzing;
pub mod loadgen;
pub mod mix;
