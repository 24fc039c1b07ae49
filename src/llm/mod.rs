//! LLM calls: what a span says about one (across conventions), and what it cost.

pub mod config;

pub mod anomaly;
pub mod call;
pub mod conventions;
pub mod details;
pub mod labels;
pub mod observer;
pub mod pricing;
pub mod quirks;
pub mod trace;

use std::sync::Arc;

pub use conventions::{LlmField, classify};

/// The scanner's classifier: the LLM conventions table, a slot per [`LlmField`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Conventions;

impl crate::otlp::scan::Classifier for Conventions {
    #[inline]
    fn classify(&self, key: &[u8]) -> Option<(usize, u8)> {
        classify(key).map(|(field, precedence)| (field as usize, precedence))
    }
}

const _: () = assert!(LlmField::COUNT <= crate::otlp::scan::ATTR_SLOTS);
pub use call::{CallSpan, Role, SpanOrigin, Strings, UNKNOWN_MODEL, call_from_span, text};
pub use pricing::{CostFrom, Price, Pricing, PricingEntry, Usage};

/// One LLM call as metrics, policies and anomaly detection see it.
#[derive(Debug, Clone, PartialEq)]
pub struct LlmCall {
    /// Response model, else request model, else a convention's single model key.
    pub model: Arc<str>,
    /// `gen_ai.request.model` (else `model`), for the GenAI semantic-convention metrics.
    pub request_model: Arc<str>,
    /// `gen_ai.response.model`, if reported.
    pub response_model: Option<Arc<str>>,
    pub provider: Option<Arc<str>>,
    pub operation: Option<Arc<str>>,
    /// Input tokens including the cached ones, whatever the library reported.
    pub usage: Usage,
    /// Part of the output tokens.
    pub reasoning_tokens: u64,
    /// The span's own cost attribute, else the price of its tokens; `None` when neither is
    /// known.
    pub cost_usd: Option<f64>,
    pub cost_from: CostFrom,
    /// `llm.latency_ms` when present, else the span's duration; `None` when that is not
    /// plausible (see [`MAX_LATENCY_SECONDS`]).
    pub latency_seconds: Option<f64>,
    /// Values of the span that were not plausible and were not counted.
    pub ignored: Vec<&'static str>,
    /// The `llm.latency_ms` attribute, which the latency policy also honours.
    pub latency_attr_ms: Option<f64>,
    /// Status ERROR, an `exception` event, or `error.type`.
    pub error: bool,
    /// `error.type`, else `_OTHER` for other errors (GenAI metric attribute).
    pub error_type: Option<Arc<str>>,
}

/// Plausible maxima for numbers from the network. A value past them, negative or not
/// finite is not counted (and is counted in `llmtail_llm_values_ignored_total{field}`):
/// one span claiming 1e19 tokens or a cost of 1e300 must not wrap a counter or pin it at
/// an absurd value until restart. The largest context windows are ~10M tokens; the
/// costliest single calls cost dollars, not thousands.
pub const MAX_TOKENS: f64 = 100_000_000.0;
pub const MAX_COST_USD: f64 = 10_000.0;
/// A day: a span that started at 0 (1970) is not a 56-year call.
pub const MAX_LATENCY_SECONDS: f64 = 86_400.0;
