//! llmtail: a tail-sampling OTLP trace processor that understands LLM calls.
//!
//! Data flows one way: `receiver` → `pipeline` (LLM metrics for every span) → `buffer`
//! (held by trace id) → `sampler` (decided) → `exporter` (kept traces upstream).

pub mod adaptive;
pub mod buffer;
pub mod cluster;
pub mod config;
pub mod daemon;
pub mod exporter;
pub mod llm;
pub mod otlp;
pub mod pipeline;
pub mod receiver;
pub mod sampler;
pub mod telemetry;
pub mod units;
