//! LLM calls: what a span says about one (across conventions), and what it cost.

pub mod config;

pub mod anomaly;
pub mod conventions;
pub mod labels;
pub mod observer;
pub mod pricing;

use std::sync::Arc;

pub use conventions::{LlmField, classify};

/// The scanner's classifier: the LLM conventions table, a slot per [`LlmField`].
pub struct Conventions;

impl crate::otlp::scan::Classifier for Conventions {
    #[inline]
    fn classify(&self, key: &[u8]) -> Option<(usize, u8)> {
        classify(key).map(|(field, precedence)| (field as usize, precedence))
    }
}

const _: () = assert!(LlmField::COUNT <= crate::otlp::scan::ATTR_SLOTS);
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

/// A number read from an attribute, if it is one; `Err` when it is there but implausible.
fn plausible(span: &[u8], value: Option<&AttrValue>, max: f64) -> Result<Option<f64>, ()> {
    let Some(value) = value else { return Ok(None) };
    let n = match value {
        AttrValue::Int(i) => *i as f64,
        AttrValue::Double(d) => *d,
        AttrValue::Str(range) => match std::str::from_utf8(crate::otlp::scan::str_at(span, range))
            .ok()
            .and_then(|s| s.trim().parse::<f64>().ok())
        {
            Some(n) => n,
            None => return Ok(None),
        },
        AttrValue::Bool(_) => return Ok(None),
    };
    if n.is_finite() && (0.0..=max).contains(&n) {
        Ok(Some(n))
    } else {
        Err(())
    }
}

/// Strings already seen in this request (models, providers, users, sessions repeat across
/// its spans): each distinct value is allocated once per request, not once per span.
#[derive(Default)]
pub struct Strings(Vec<Arc<str>>);

/// Distinct strings one [`Strings`] remembers; a request with more starts over.
const STRINGS_CAPACITY: usize = 64;

impl Strings {
    pub fn get(&mut self, s: &str) -> Arc<str> {
        if let Some(a) = self.0.iter().find(|a| a.as_ref() == s) {
            return a.clone();
        }
        if self.0.len() >= STRINGS_CAPACITY {
            self.0.clear();
        }
        let a: Arc<str> = Arc::from(s);
        self.0.push(a.clone());
        a
    }
}

/// A string attribute of the span, trimmed, if non-empty.
pub fn text(
    span: &[u8],
    facts: &SpanFacts,
    field: LlmField,
    strings: &mut Strings,
) -> Option<Arc<str>> {
    match facts.attrs.get(field as usize) {
        Some(AttrValue::Str(range)) => {
            let s = String::from_utf8_lossy(crate::otlp::scan::str_at(span, range));
            let s = s.trim();
            (!s.is_empty()).then(|| strings.get(s))
        }
        Some(AttrValue::Int(i)) => Some(strings.get(&i.to_string())),
        _ => None,
    }
}

/// The LLM call a span describes, if any: it names a model or carries token counts.
pub fn call_from_span(
    span: &[u8],
    facts: &SpanFacts,
    pricing: &Pricing,
    strings: &mut Strings,
) -> Option<LlmCall> {
    let attrs = &facts.attrs;
    let mut ignored = Vec::new();
    let mut read = |field: LlmField, max: f64, name: &'static str| {
        plausible(span, attrs.get(field as usize), max).unwrap_or_else(|()| {
            ignored.push(name);
            None
        })
    };
    let mut count = |field, name| read(field, MAX_TOKENS, name).map(|n| n as u64);
    let (input, output, total) = (
        count(LlmField::InputTokens, "input_tokens"),
        count(LlmField::OutputTokens, "output_tokens"),
        count(LlmField::TotalTokens, "total_tokens"),
    );
    let cache_read = count(LlmField::CacheReadTokens, "cache_read_tokens");
    let cache_write = count(LlmField::CacheWriteTokens, "cache_write_tokens");
    let reasoning = count(LlmField::ReasoningTokens, "reasoning_tokens");
    let cost_attr = read(LlmField::CostUsd, MAX_COST_USD, "cost_usd");
    let latency_attr_ms = read(LlmField::LatencyMs, MAX_LATENCY_SECONDS * 1e3, "latency_ms");
    let request_model = text(span, facts, LlmField::RequestModel, strings);
    let response_model = text(span, facts, LlmField::ResponseModel, strings);
    let other_model = text(span, facts, LlmField::Model, strings);
    let named = response_model
        .clone()
        .or(request_model.clone())
        .or(other_model.clone());
    if named.is_none() && input.is_none() && output.is_none() && total.is_none() {
        return None;
    }
    let model = named.unwrap_or_else(|| strings.get(UNKNOWN_MODEL));
    // Only a total reported: count it as input, so the call's tokens are not lost.
    let input = input.or_else(|| total.map(|t| t.saturating_sub(output.unwrap_or(0))));
    let usage = Usage {
        input: input.unwrap_or(0),
        output: output.unwrap_or(0),
        cache_read: cache_read.unwrap_or(0),
        cache_write: cache_write.unwrap_or(0),
    };
    let cost_usd = pricing.call_cost(&model, &usage, cost_attr);
    let duration = facts.end_ns.saturating_sub(facts.start_ns) as f64 / 1e9;
    let latency_seconds = match latency_attr_ms {
        Some(ms) => Some(ms / 1e3),
        None if facts.start_ns == 0 || duration > MAX_LATENCY_SECONDS => {
            ignored.push("duration");
            None
        }
        None => Some(duration),
    };
    let error_type = text(span, facts, LlmField::ErrorType, strings);
    let error = facts.is_error() || error_type.is_some();
    Some(LlmCall {
        request_model: request_model
            .or(other_model)
            .unwrap_or_else(|| model.clone()),
        response_model,
        model,
        provider: text(span, facts, LlmField::Provider, strings),
        operation: text(span, facts, LlmField::Operation, strings),
        usage,
        reasoning_tokens: reasoning.unwrap_or(0),
        cost_usd,
        latency_seconds,
        latency_attr_ms,
        ignored,
        error_type: error_type.or_else(|| error.then(|| strings.get("_OTHER"))),
        error,
    })
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value::Value};
    use opentelemetry_proto::tonic::trace::v1::Span;
    use prost::Message;

    use super::*;
    use crate::otlp::scan::scan_span;

    fn call(attrs: &[(&str, Value)]) -> Option<LlmCall> {
        let span = Span {
            trace_id: vec![1; 16],
            span_id: vec![2; 8],
            start_time_unix_nano: 1_000_000_000,
            end_time_unix_nano: 3_000_000_000,
            attributes: attrs
                .iter()
                .map(|(k, v)| KeyValue {
                    key: (*k).into(),
                    value: Some(AnyValue {
                        value: Some(v.clone()),
                    }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
        .encode_to_vec();
        call_from_span(
            &span,
            &scan_span(&span, &Conventions).unwrap(),
            &Pricing::default(),
            &mut Strings::default(),
        )
    }

    fn s(v: &str) -> Value {
        Value::StringValue(v.into())
    }

    #[test]
    fn precedence_across_conventions() {
        let c = call(&[
            ("llm.model_name", s("gpt-4o-mini")),
            ("llm.model", s("gpt-4o")),
            ("gen_ai.request.model", s("gpt-4.1")),
            ("gen_ai.response.model", s("gpt-4.1-2025-04-14")),
            ("llm.token_count.prompt", Value::IntValue(1)),
            ("gen_ai.usage.prompt_tokens", Value::IntValue(2)),
            ("gen_ai.usage.input_tokens", Value::IntValue(1000)),
            ("llm.output_tokens", Value::StringValue("250".into())),
            ("gen_ai.system", s("openai")),
            ("gen_ai.provider.name", s("azure.ai.openai")),
        ])
        .unwrap();
        assert_eq!(&*c.model, "gpt-4.1-2025-04-14", "the response model wins");
        assert_eq!(&*c.request_model, "gpt-4.1");
        assert_eq!(
            c.usage.input, 1000,
            "current GenAI beats deprecated and OpenInference"
        );
        assert_eq!(c.usage.output, 250, "numeric strings count");
        assert_eq!(c.provider.as_deref(), Some("azure.ai.openai"));
        assert!((c.cost_usd.unwrap() - (1000.0 * 2.0 + 250.0 * 8.0) / 1e6).abs() < 1e-12);
        assert_eq!(
            c.latency_seconds,
            Some(2.0),
            "no llm.latency_ms: the span's duration"
        );

        assert!(c.ignored.is_empty());

        let deprecated = call(&[
            ("gen_ai.usage.prompt_tokens", Value::IntValue(7)),
            ("llm.token_count.prompt", Value::IntValue(9)),
        ])
        .unwrap();
        assert_eq!(deprecated.usage.input, 7);
        assert_eq!(&*deprecated.model, UNKNOWN_MODEL);
        assert_eq!(
            deprecated.cost_usd, None,
            "unknown model, no cost attribute: unpriced"
        );

        let total_only = call(&[
            ("llm.model", s("gpt-4o")),
            ("llm.usage.total_tokens", Value::IntValue(120)),
            ("llm.output_tokens", Value::IntValue(20)),
        ])
        .unwrap();
        assert_eq!((total_only.usage.input, total_only.usage.output), (100, 20));

        let attr_cost = call(&[
            ("llm.model", s("gpt-4o")),
            ("gen_ai.usage.cost", Value::DoubleValue(0.5)),
            ("llm.cost.total", Value::DoubleValue(9.0)),
        ])
        .unwrap();
        assert_eq!(
            attr_cost.cost_usd,
            Some(0.5),
            "OpenLIT's cost beats OpenInference's"
        );

        let failed = call(&[("llm.model", s("gpt-4o")), ("error.type", s("timeout"))]).unwrap();
        assert!(failed.error);
        assert_eq!(failed.error_type.as_deref(), Some("timeout"));

        let cached = call(&[
            ("gen_ai.request.model", s("claude-3-5-sonnet-20241022")),
            ("gen_ai.usage.input_tokens", Value::IntValue(10_000)),
            (
                "gen_ai.usage.cache_read.input_tokens",
                Value::IntValue(9_000),
            ),
            ("gen_ai.usage.output_tokens", Value::IntValue(0)),
        ])
        .unwrap();
        assert!((cached.cost_usd.unwrap() - (1_000.0 * 3.0 + 9_000.0 * 0.3) / 1e6).abs() < 1e-12);
        assert!(
            call(&[("http.route", s("/x"))]).is_none(),
            "not an LLM call"
        );
        assert!(
            call(&[("session.id", s("abc"))]).is_none(),
            "a session alone is not an LLM call"
        );
    }

    #[test]
    fn absurd_numbers_are_ignored_and_said() {
        let c = call(&[
            ("gen_ai.request.model", Value::StringValue("gpt-4o".into())),
            ("gen_ai.usage.input_tokens", Value::DoubleValue(1e19)),
            ("gen_ai.usage.output_tokens", Value::IntValue(-5)),
            ("llm.cost_usd", Value::DoubleValue(1.7e308)),
            ("llm.latency_ms", Value::StringValue("NaN".into())),
        ])
        .unwrap();
        assert_eq!((c.usage.input, c.usage.output), (0, 0));
        assert_eq!(
            c.cost_usd,
            Some(0.0),
            "priced from the table, on the tokens counted"
        );
        assert_eq!(
            c.latency_seconds,
            Some(2.0),
            "a NaN latency: the duration counts"
        );
        assert_eq!(
            c.ignored,
            ["input_tokens", "output_tokens", "cost_usd", "latency_ms"]
        );
        let at_max = call(&[
            ("gen_ai.request.model", Value::StringValue("m".into())),
            (
                "gen_ai.usage.input_tokens",
                Value::IntValue(MAX_TOKENS as i64),
            ),
            ("llm.cost_usd", Value::DoubleValue(MAX_COST_USD)),
        ])
        .unwrap();
        assert_eq!(at_max.usage.input, MAX_TOKENS as u64);
        assert_eq!(at_max.cost_usd, Some(MAX_COST_USD));
        assert!(at_max.ignored.is_empty());
    }

    #[test]
    fn cache_writes_are_read_under_the_current_genai_name_and_the_old_one() {
        let current = call(&[
            (
                "gen_ai.request.model",
                Value::StringValue("claude-sonnet-4".into()),
            ),
            ("gen_ai.usage.input_tokens", Value::IntValue(1000)),
            (
                "gen_ai.usage.cache_write.input_tokens",
                Value::IntValue(800),
            ),
            (
                "gen_ai.usage.cache_creation.input_tokens",
                Value::IntValue(5),
            ),
        ])
        .unwrap();
        assert_eq!(current.usage.cache_write, 800, "the current name wins");
        let old = call(&[
            (
                "gen_ai.request.model",
                Value::StringValue("claude-sonnet-4".into()),
            ),
            ("gen_ai.usage.input_tokens", Value::IntValue(1000)),
            (
                "gen_ai.usage.cache_creation.input_tokens",
                Value::IntValue(300),
            ),
        ])
        .unwrap();
        assert_eq!(old.usage.cache_write, 300);
    }
}
