//! LLM calls: what a span says about one (across conventions), and what it cost.

pub mod anomaly;
pub mod conventions;
pub mod labels;
pub mod observer;
pub mod pricing;

use std::sync::Arc;

pub use conventions::{LlmField, classify};
pub use pricing::{Price, Pricing, PricingEntry, Usage};

use crate::otlp::scan::{AttrValue, SpanFacts};

/// Model label used when a span has token attributes but names no model.
pub const UNKNOWN_MODEL: &str = "unknown";

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
    pub usage: Usage,
    pub reasoning_tokens: u64,
    /// The span's own cost attribute, else the price of its tokens; `None` when neither is
    /// known.
    pub cost_usd: Option<f64>,
    /// `llm.latency_ms` when present, else the span's duration.
    pub latency_seconds: f64,
    /// The `llm.latency_ms` attribute, which the latency policy also honours.
    pub latency_attr_ms: Option<f64>,
    /// Status ERROR, an `exception` event, or `error.type`.
    pub error: bool,
    /// `error.type`, else `_OTHER` for other errors (GenAI metric attribute).
    pub error_type: Option<Arc<str>>,
}

fn number(span: &[u8], value: &AttrValue) -> Option<f64> {
    let n = match value {
        AttrValue::Int(i) => *i as f64,
        AttrValue::Double(d) => *d,
        AttrValue::Str(range) => std::str::from_utf8(&span[range.clone()])
            .ok()?
            .trim()
            .parse()
            .ok()?,
        AttrValue::Bool(_) => return None,
    };
    (n.is_finite() && n >= 0.0).then_some(n)
}

/// A string attribute of the span, trimmed, if non-empty.
pub fn text(span: &[u8], facts: &SpanFacts, field: LlmField) -> Option<Arc<str>> {
    match facts.llm.get(field) {
        Some(AttrValue::Str(range)) => {
            let s = String::from_utf8_lossy(&span[range.clone()]);
            let s = s.trim();
            (!s.is_empty()).then(|| Arc::from(s))
        }
        Some(AttrValue::Int(i)) => Some(Arc::from(i.to_string())),
        _ => None,
    }
}

/// The LLM call a span describes, if any: it names a model or carries token counts.
pub fn call_from_span(span: &[u8], facts: &SpanFacts, pricing: &Pricing) -> Option<LlmCall> {
    let attrs = &facts.llm;
    let count = |field| {
        attrs
            .get(field)
            .and_then(|v| number(span, v))
            .map(|n| n as u64)
    };
    let request_model = text(span, facts, LlmField::RequestModel);
    let response_model = text(span, facts, LlmField::ResponseModel);
    let other_model = text(span, facts, LlmField::Model);
    let (input, output, total) = (
        count(LlmField::InputTokens),
        count(LlmField::OutputTokens),
        count(LlmField::TotalTokens),
    );
    let named = response_model
        .clone()
        .or(request_model.clone())
        .or(other_model.clone());
    if named.is_none() && input.is_none() && output.is_none() && total.is_none() {
        return None;
    }
    let model = named.unwrap_or_else(|| Arc::from(UNKNOWN_MODEL));
    // Only a total reported: count it as input, so the call's tokens are not lost.
    let input = input.or_else(|| total.map(|t| t.saturating_sub(output.unwrap_or(0))));
    let usage = Usage {
        input: input.unwrap_or(0),
        output: output.unwrap_or(0),
        cache_read: count(LlmField::CacheReadTokens).unwrap_or(0),
        cache_write: count(LlmField::CacheWriteTokens).unwrap_or(0),
    };
    let cost_usd = attrs
        .get(LlmField::CostUsd)
        .and_then(|v| number(span, v))
        .or_else(|| pricing.price(&model).map(|p| p.cost(&usage)));
    let latency_attr_ms = attrs.get(LlmField::LatencyMs).and_then(|v| number(span, v));
    let duration_ns = facts.end_ns.saturating_sub(facts.start_ns);
    let error_type = text(span, facts, LlmField::ErrorType);
    let error = facts.is_error() || error_type.is_some();
    Some(LlmCall {
        request_model: request_model
            .or(other_model)
            .unwrap_or_else(|| model.clone()),
        response_model,
        model,
        provider: text(span, facts, LlmField::Provider),
        operation: text(span, facts, LlmField::Operation),
        usage,
        reasoning_tokens: count(LlmField::ReasoningTokens).unwrap_or(0),
        cost_usd,
        latency_seconds: latency_attr_ms.map_or(duration_ns as f64 / 1e9, |ms| ms / 1e3),
        latency_attr_ms,
        error_type: error_type.or_else(|| error.then(|| Arc::from("_OTHER"))),
        error,
    })
}
