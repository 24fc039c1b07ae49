//! One span read as an LLM call: the facts it carries across conventions, normalised (the
//! input count includes the cached tokens), priced, and the part it plays among the LLM spans
//! of its trace ([`Role`]), which `llm::trace` resolves into calls counted once.

use std::sync::Arc;

use super::details;
use super::pricing::Usage;
use super::quirks::{self, InputTokens, Quirks};
use super::{LlmCall, LlmField, MAX_COST_USD, MAX_LATENCY_SECONDS, MAX_TOKENS, Pricing};
use crate::otlp::scan::{AttrValue, SpanFacts, str_at};

/// Model label used when a span is an LLM call but names no model.
pub const UNKNOWN_MODEL: &str = "unknown";

/// What an LLM span is to the calls of its trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A model call (a marker says so, or it names a model or carries tokens).
    Call,
    /// A span around calls that repeats their usage: an agent, a workflow, a chain. Its
    /// usage counts only where no call below it carries usage; it is never a call itself.
    Aggregate,
    /// A log-type span recording the usage of a call made by an earlier span (Logfire's
    /// streamed calls).
    Record,
}

/// An LLM span as held with its trace until the trace is decided.
#[derive(Debug, Clone, PartialEq)]
pub struct CallSpan {
    pub call: LlmCall,
    pub role: Role,
    /// Any token count was reported (a failed call has none).
    pub has_usage: bool,
    pub span_id: [u8; 8],
    pub parent_id: [u8; 8],
    pub start_ns: u64,
    pub end_ns: u64,
    /// The instrumentation scope that wrote it.
    pub scope: Arc<str>,
    pub service: Arc<str>,
}

/// `gen_ai.operation.name` / `llm.request.type` values that are a model call.
const CALL_OPERATIONS: &[&str] = &[
    "chat",
    "text_completion",
    "completion",
    "generate_content",
    "embeddings",
    "embedding",
    "rerank",
    "responses",
];
/// Values that are a span around calls.
const AGGREGATE_OPERATIONS: &[&str] = &[
    "invoke_agent",
    "create_agent",
    "invoke_workflow",
    "workflow",
    "agent",
];

/// What the span's markers say it is, if it has any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Marker {
    Call,
    Aggregate,
    /// A tool call, a retrieval, a plain span: not a call.
    Other,
    Record,
}

fn marker(span: &[u8], facts: &SpanFacts) -> Option<Marker> {
    let raw = |field: LlmField| match facts.attrs.get(field as usize) {
        Some(AttrValue::Str(range)) => Some(str_at(span, range).trim_ascii()),
        _ => None,
    };
    if raw(LlmField::LogfireSpanType).is_some_and(|t| t.eq_ignore_ascii_case(b"log")) {
        return Some(Marker::Record);
    }
    let in_list =
        |v: &[u8], list: &[&str]| list.iter().any(|x| v.eq_ignore_ascii_case(x.as_bytes()));
    if let Some(kind) = raw(LlmField::OpenInferenceKind) {
        return Some(match kind {
            k if in_list(k, &["LLM", "EMBEDDING"]) => Marker::Call,
            k if in_list(k, &["AGENT", "CHAIN"]) => Marker::Aggregate,
            _ => Marker::Other,
        });
    }
    if let Some(kind) = raw(LlmField::LangfuseType) {
        return Some(match kind {
            k if in_list(k, &["generation", "embedding"]) => Marker::Call,
            k if in_list(k, &["agent", "chain", "span"]) => Marker::Aggregate,
            _ => Marker::Other,
        });
    }
    if let Some(op) = raw(LlmField::Operation) {
        return Some(if in_list(op, CALL_OPERATIONS) {
            Marker::Call
        } else if in_list(op, AGGREGATE_OPERATIONS) {
            Marker::Aggregate
        } else {
            Marker::Other
        });
    }
    None
}

/// A number read from an attribute, if it is one; `Err` when it is there but implausible.
fn plausible(span: &[u8], value: Option<&AttrValue>, max: f64) -> Result<Option<f64>, ()> {
    let Some(value) = value else { return Ok(None) };
    let n = match value {
        AttrValue::Int(i) => *i as f64,
        AttrValue::Double(d) => *d,
        AttrValue::Str(range) => match std::str::from_utf8(str_at(span, range))
            .ok()
            .and_then(|s| s.trim().parse::<f64>().ok())
        {
            Some(n) => n,
            None => return Ok(None),
        },
        AttrValue::Bool(_) => return Ok(None),
    };
    checked(n, max)
}

fn checked(n: f64, max: f64) -> Result<Option<f64>, ()> {
    if n.is_finite() && (0.0..=max).contains(&n) {
        Ok(Some(n))
    } else {
        Err(())
    }
}

/// Strings already seen in this request (models, providers, users, sessions repeat across
/// its spans): each distinct value is allocated once per request, not once per span.
#[derive(Default)]
pub struct Strings(std::collections::HashSet<Arc<str>, foldhash::fast::RandomState>);

/// Distinct strings one [`Strings`] remembers; a request with more starts over.
const STRINGS_CAPACITY: usize = 1024;

impl Strings {
    pub fn get(&mut self, s: &str) -> Arc<str> {
        if let Some(a) = self.0.get(s) {
            return a.clone();
        }
        if self.0.len() >= STRINGS_CAPACITY {
            self.0.clear();
        }
        let a: Arc<str> = Arc::from(s);
        self.0.insert(a.clone());
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
            let s = String::from_utf8_lossy(str_at(span, range));
            let s = s.trim();
            (!s.is_empty()).then(|| strings.get(s))
        }
        Some(AttrValue::Int(i)) => Some(strings.get(&i.to_string())),
        _ => None,
    }
}

/// Where a span comes from: its scope's name and its resource's service.
pub struct SpanOrigin<'a> {
    pub scope: &'a Arc<str>,
    pub service: &'a Arc<str>,
}

/// The LLM span this span is, if it is one: a marker says it is a call (or an aggregate
/// or record carrying usage), or, unmarked, it names a model or carries token counts.
/// The name of an instrumentation scope, as the LLM quirks table is keyed.
pub fn scope_label(scope: &[u8]) -> Arc<str> {
    match crate::otlp::scan::scope_name(scope) {
        Ok(Some(name)) => Arc::from(String::from_utf8_lossy(name).as_ref()),
        _ => Arc::from(""),
    }
}

/// Whether a span with LLM attributes (`has_attrs`) or none, of a scope, is an LLM span: a
/// span without them is one only in a scope whose every span is a call.
pub fn may_be_call(has_attrs: bool, scope: &str) -> bool {
    has_attrs || quirks::lookup(scope, None).every_span_is_a_call
}

/// The LLM call a held span is, read again from its bytes, its scope and its service as
/// ingest read it (at the prices of now): held traces keep which spans are calls, not
/// their facts.
pub fn recall(
    span: &[u8],
    scope: &[u8],
    service: &Arc<str>,
    pricing: &Pricing,
    strings: &mut Strings,
) -> Option<CallSpan> {
    let facts = crate::otlp::scan::scan_span(span, &super::Conventions).ok()?;
    let scope = scope_label(scope);
    if !may_be_call(!facts.attrs.is_empty(), &scope) {
        return None;
    }
    let from = SpanOrigin {
        scope: &scope,
        service,
    };
    call_from_span(span, &facts, &from, pricing, strings)
}

pub fn call_from_span(
    span: &[u8],
    facts: &SpanFacts,
    origin: &SpanOrigin,
    pricing: &Pricing,
    strings: &mut Strings,
) -> Option<CallSpan> {
    let attrs = &facts.attrs;
    let mut ignored = Vec::new();
    let mut read = |field: LlmField, max: f64, name: &'static str| {
        plausible(span, attrs.get(field as usize), max).unwrap_or_else(|()| {
            ignored.push(name);
            None
        })
    };
    let mut input = read(LlmField::InputTokens, MAX_TOKENS, "input_tokens");
    let mut output = read(LlmField::OutputTokens, MAX_TOKENS, "output_tokens");
    let total = read(LlmField::TotalTokens, MAX_TOKENS, "total_tokens");
    let mut cache_read = read(LlmField::CacheReadTokens, MAX_TOKENS, "cache_read_tokens");
    let mut cache_write = read(LlmField::CacheWriteTokens, MAX_TOKENS, "cache_write_tokens");
    let mut reasoning = read(LlmField::ReasoningTokens, MAX_TOKENS, "reasoning_tokens");
    let mut cost_attr = read(LlmField::CostUsd, MAX_COST_USD, "cost_usd");
    let latency_attr_ms = read(LlmField::LatencyMs, MAX_LATENCY_SECONDS * 1e3, "latency_ms");
    let json = |field: LlmField| match attrs.get(field as usize) {
        Some(AttrValue::Str(range)) => Some(str_at(span, range)),
        _ => None,
    };
    // Usage as JSON (Langfuse), where the plain attributes say nothing: its input already
    // includes the cache.
    let mut json_inclusive = false;
    if input.is_none()
        && output.is_none()
        && let Some(u) = json(LlmField::UsageDetails).and_then(details::usage)
    {
        let mut count = |v: Option<f64>, name| {
            v.and_then(|n| {
                checked(n, MAX_TOKENS).unwrap_or_else(|()| {
                    ignored.push(name);
                    None
                })
            })
        };
        input = count(u.input, "input_tokens");
        output = count(u.output, "output_tokens");
        cache_read = cache_read.or(count(u.cache_read, "cache_read_tokens"));
        cache_write = cache_write.or(count(u.cache_write, "cache_write_tokens"));
        reasoning = reasoning.or(count(u.reasoning, "reasoning_tokens"));
        json_inclusive = true;
    }
    if cost_attr.is_none()
        && let Some(c) = json(LlmField::CostDetails).and_then(details::cost)
    {
        cost_attr = checked(c, MAX_COST_USD).unwrap_or_else(|()| {
            ignored.push("cost_usd");
            None
        });
    }
    let has_usage = input.is_some() || output.is_some() || total.is_some();
    let request_model = text(span, facts, LlmField::RequestModel, strings);
    let response_model = text(span, facts, LlmField::ResponseModel, strings);
    let mut other_model = text(span, facts, LlmField::Model, strings);
    let provider = text(span, facts, LlmField::Provider, strings);
    let quirks: &Quirks = quirks::lookup(origin.scope, provider.as_deref());

    let role = match marker(span, facts) {
        Some(Marker::Call) => Role::Call,
        Some(Marker::Record) if has_usage => Role::Record,
        Some(Marker::Aggregate | Marker::Other) if has_usage => Role::Aggregate,
        Some(_) => return None,
        None if quirks.every_span_is_a_call => Role::Call,
        None if quirks.calls_need_marker => return None,
        None if has_usage => Role::Call,
        None if request_model.is_some() || response_model.is_some() || other_model.is_some() => {
            Role::Call
        }
        None => return None,
    };
    if request_model.is_none()
        && response_model.is_none()
        && other_model.is_none()
        && let Some(m) = json(LlmField::InvocationParameters).and_then(details::invocation_model)
    {
        other_model = Some(strings.get(&m));
    }
    let model = response_model
        .clone()
        .or(request_model.clone())
        .or(other_model.clone())
        .unwrap_or_else(|| strings.get(UNKNOWN_MODEL));
    // Only a total reported: count it as input, so the call's tokens are not lost.
    let input = input.or_else(|| total.map(|t| (t - output.unwrap_or(0.0)).max(0.0)));
    let (cache_read, cache_write) = (
        cache_read.unwrap_or(0.0) as u64,
        cache_write.unwrap_or(0.0) as u64,
    );
    let cached = cache_read.saturating_add(cache_write);
    let reported = input.unwrap_or(0.0) as u64;
    let includes_cache = json_inclusive
        || match quirks.input_tokens {
            InputTokens::IncludesCache => true,
            InputTokens::ExcludesCache => false,
            // No inclusive count is smaller than its parts.
            InputTokens::Convention => reported >= cached,
        };
    let usage = Usage {
        input: if includes_cache {
            reported
        } else {
            reported.saturating_add(cached)
        },
        output: output.unwrap_or(0.0) as u64,
        cache_read,
        cache_write,
    };
    let cost = pricing.explain_cost(&model, &usage, cost_attr, quirks.zero_cost);
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
    Some(CallSpan {
        call: LlmCall {
            request_model: request_model
                .or(other_model)
                .unwrap_or_else(|| model.clone()),
            response_model,
            model,
            provider,
            operation: text(span, facts, LlmField::Operation, strings),
            usage,
            reasoning_tokens: reasoning.unwrap_or(0.0) as u64,
            cost_usd: cost.usd,
            cost_from: cost.from,
            latency_seconds,
            latency_attr_ms,
            ignored,
            error_type: error_type.or_else(|| error.then(|| strings.get("_OTHER"))),
            error,
        },
        role,
        has_usage,
        span_id: facts.span_id,
        parent_id: facts.parent_id,
        start_ns: facts.start_ns,
        end_ns: facts.end_ns,
        scope: origin.scope.clone(),
        service: origin.service.clone(),
    })
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value::Value};
    use opentelemetry_proto::tonic::trace::v1::Span;
    use prost::Message;

    use super::*;
    use crate::llm::{Conventions, LlmCall};
    use crate::otlp::scan::scan_span;

    fn call(attrs: &[(&str, Value)]) -> Option<LlmCall> {
        span_in("my.app", attrs).map(|c| c.call)
    }

    /// The span with `attrs`, written by a library of instrumentation scope `scope`.
    fn span_in(scope: &str, attrs: &[(&str, Value)]) -> Option<CallSpan> {
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
            &SpanOrigin {
                scope: &Arc::from(scope),
                service: &Arc::from("svc"),
            },
            &Pricing::default(),
            &mut Strings::default(),
        )
    }

    fn int(v: i64) -> Value {
        Value::IntValue(v)
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

    /// The usage each library reports for one Anthropic call of 200 uncached input, 1,000
    /// cache-read, 500 cache-write and 300 output tokens (as the real libraries wrote it in
    /// tests/e2e/llm_clients.rs), normalised to input including the cache.
    #[test]
    fn each_library_row_reads_its_input_tokens_right() {
        let genai_of = |input, provider| {
            vec![
                ("gen_ai.operation.name", s("chat")),
                ("gen_ai.provider.name", s(provider)),
                ("gen_ai.request.model", s("claude-sonnet-4-20250514")),
                ("gen_ai.usage.input_tokens", int(input)),
                ("gen_ai.usage.output_tokens", int(300)),
                ("gen_ai.usage.cache_read.input_tokens", int(1000)),
                ("gen_ai.usage.cache_creation.input_tokens", int(500)),
            ]
        };
        let genai = |input| genai_of(input, "anthropic");
        let openinference = vec![
            ("openinference.span.kind", s("LLM")),
            ("llm.provider", s("anthropic")),
            ("llm.model_name", s("claude-sonnet-4-20250514")),
            ("llm.token_count.prompt", int(1700)),
            ("llm.token_count.completion", int(300)),
            ("llm.token_count.prompt_details.cache_read", int(1000)),
            ("llm.token_count.prompt_details.cache_write", int(500)),
        ];
        let cases: Vec<(&str, Vec<(&str, Value)>)> = vec![
            ("com.anthropic.sdk.python", genai(1700)),
            ("opentelemetry.instrumentation.anthropic", genai(1700)),
            ("opentelemetry.util.genai.handler", genai(1700)),
            ("opentelemetry.instrumentation.openai_v2", genai(1700)),
            ("opentelemetry.instrumentation.openai.v1", genai(1700)),
            (
                "openinference.instrumentation.anthropic",
                openinference.clone(),
            ),
            ("openinference.instrumentation.openai", openinference),
            ("openlit.instrumentation.anthropic", genai(200)),
            ("openlit.instrumentation.bedrock", genai(200)),
            ("openlit.instrumentation.openai", genai_of(1700, "openai")),
            ("logfire.anthropic", genai(1700)),
            // Unknown libraries: the convention, and an input smaller than the cache is
            // read as exclusive.
            ("my.app", genai(1700)),
            ("my.app", genai(200)),
            ("opentelemetry.instrumentation.bedrock", genai(200)),
        ];
        for (scope, attrs) in cases {
            let c = span_in(scope, &attrs).unwrap().call;
            assert_eq!(
                c.usage,
                Usage {
                    input: 1700,
                    output: 300,
                    cache_read: 1000,
                    cache_write: 500
                },
                "{scope}"
            );
            // 200 × 3 + 1,000 × 0.3 + 500 × 3.75 + 300 × 15 per million.
            assert!((c.cost_usd.unwrap() - 7275e-6).abs() < 1e-12, "{scope}");
        }
        // Langfuse: usage in JSON.
        let langfuse = span_in(
            "langfuse-sdk",
            &[
                ("langfuse.observation.type", s("generation")),
                (
                    "langfuse.observation.model.name",
                    s("claude-sonnet-4-20250514"),
                ),
                (
                    "langfuse.observation.usage_details",
                    s(r#"{"input_tokens": 200, "cache_read_input_tokens": 1000,
                         "cache_creation_input_tokens": 500, "output_tokens": 300}"#),
                ),
                ("langfuse.observation.cost_details", s(r#"{"total": 0}"#)),
            ],
        )
        .unwrap();
        assert_eq!(langfuse.call.usage.input, 1700);
        assert_eq!(langfuse.call.usage.cache_write, 500);
        assert_eq!(
            langfuse.call.cost_from,
            crate::llm::CostFrom::PriceTableOverZero,
            "a cost of 0 on priced tokens is unknown"
        );
        assert!((langfuse.call.cost_usd.unwrap() - 7275e-6).abs() < 1e-12);
    }

    #[test]
    fn calls_are_recognised_by_their_markers() {
        // OpenInference's failed OpenAI call: the model only in the invocation parameters.
        let failed = span_in(
            "openinference.instrumentation.openai",
            &[
                ("openinference.span.kind", s("LLM")),
                ("llm.system", s("openai")),
                ("llm.invocation_parameters", s(r#"{"model": "gpt-4o"}"#)),
            ],
        )
        .unwrap();
        assert_eq!((failed.role, failed.has_usage), (Role::Call, false));
        assert_eq!(&*failed.call.model, "gpt-4o");
        // A marker alone makes a call, of an unknown model.
        let bare = span_in("x", &[("gen_ai.operation.name", s("chat"))]).unwrap();
        assert_eq!(&*bare.call.model, UNKNOWN_MODEL);
        // Tools, retrievers, agents without usage are not calls.
        for (k, v) in [
            ("gen_ai.operation.name", "execute_tool"),
            ("gen_ai.operation.name", "invoke_agent"),
            ("openinference.span.kind", "TOOL"),
            ("openinference.span.kind", "CHAIN"),
            ("langfuse.observation.type", "span"),
        ] {
            assert!(
                span_in("x", &[(k, s(v)), ("gen_ai.request.model", s("gpt-4o"))]).is_none(),
                "{v}"
            );
        }
        // An agent repeating its calls' usage is an aggregate.
        let agent = span_in(
            "x",
            &[
                ("gen_ai.operation.name", s("invoke_agent")),
                ("gen_ai.usage.input_tokens", int(10)),
            ],
        )
        .unwrap();
        assert_eq!(agent.role, Role::Aggregate);
        // Logfire's log of a streamed call's usage is a record; without usage, nothing.
        let record = [
            ("logfire.span_type", s("log")),
            ("gen_ai.operation.name", s("chat")),
            ("gen_ai.request.model", s("gpt-4o")),
        ];
        assert!(span_in("logfire.openai", &record).is_none());
        let mut with_usage = record.to_vec();
        with_usage.push(("gen_ai.usage.input_tokens", int(800)));
        assert_eq!(
            span_in("logfire.openai", &with_usage).unwrap().role,
            Role::Record
        );
        // The Anthropic client's own spans name a model on calls that are not LLM calls
        // (count_tokens, sessions.create): only its marked spans are.
        let count_tokens = [("gen_ai.request.model", s("claude-sonnet-4"))];
        assert!(span_in("com.anthropic.sdk.python", &count_tokens).is_none());
        assert!(span_in("my.app", &count_tokens).is_some());
        // OpenLIT's span of a failed Anthropic call has no attributes at all.
        let openlit = span_in("openlit.instrumentation.anthropic", &[]).unwrap();
        assert_eq!(
            (openlit.role, &*openlit.call.model),
            (Role::Call, UNKNOWN_MODEL)
        );
    }
}
