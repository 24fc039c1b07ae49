//! LLM calls: which span attributes describe one (across conventions), and what it cost.

use std::sync::Arc;

use serde::Deserialize;

use crate::otlp::scan::{AttrValue, SpanFacts};

/// A fact about an LLM call that several conventions spell differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LlmField {
    Model = 0,
    InputTokens = 1,
    OutputTokens = 2,
    CostUsd = 3,
    LatencyMs = 4,
}

impl LlmField {
    pub const COUNT: usize = 5;
}

/// Maps an attribute key to the LLM fact it carries and its precedence (lower wins when a
/// span carries the same fact under several conventions).
///
/// Precedence: OpenTelemetry GenAI (current, then deprecated), then the seed `llm.*`
/// convention, then OpenInference. For the model, the response model (what actually ran and
/// was billed) wins over the requested one.
pub fn classify(key: &[u8]) -> Option<(LlmField, u8)> {
    use LlmField::*;
    // Most attributes of a span are not LLM facts; every LLM key has one of two prefixes,
    // so one comparison turns them away before the table is searched.
    if !(key.starts_with(b"gen_ai.") || key.starts_with(b"llm.")) {
        return None;
    }
    Some(match key {
        b"gen_ai.response.model" => (Model, 0),
        b"gen_ai.request.model" => (Model, 1),
        b"llm.model" => (Model, 2),
        b"llm.model_name" => (Model, 3),
        b"gen_ai.usage.input_tokens" => (InputTokens, 0),
        b"gen_ai.usage.prompt_tokens" => (InputTokens, 1),
        b"llm.input_tokens" => (InputTokens, 2),
        b"llm.token_count.prompt" => (InputTokens, 3),
        b"gen_ai.usage.output_tokens" => (OutputTokens, 0),
        b"gen_ai.usage.completion_tokens" => (OutputTokens, 1),
        b"llm.output_tokens" => (OutputTokens, 2),
        b"llm.token_count.completion" => (OutputTokens, 3),
        b"llm.cost_usd" => (CostUsd, 0),
        b"gen_ai.usage.cost" => (CostUsd, 1),
        b"llm.cost.total" => (CostUsd, 2),
        b"llm.latency_ms" => (LatencyMs, 0),
        _ => return None,
    })
}

/// Model label used when a span has token attributes but names no model.
pub const UNKNOWN_MODEL: &str = "unknown";

/// One LLM call as the metrics and the cost policy see it.
#[derive(Debug, Clone, PartialEq)]
pub struct LlmCall {
    pub model: Arc<str>,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// The span's own cost attribute, else tokens × price; `None` when neither is known.
    pub cost_usd: Option<f64>,
    /// `llm.latency_ms` when present, else the span's duration.
    pub latency_seconds: f64,
    /// The `llm.latency_ms` attribute, which the latency policy also honours.
    pub latency_attr_ms: Option<f64>,
    pub error: bool,
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

/// The LLM call a span describes, if any: it names a model or carries token counts.
pub fn call_from_span(span: &[u8], facts: &SpanFacts, pricing: &Pricing) -> Option<LlmCall> {
    let attrs = &facts.llm;
    let model = match attrs.get(LlmField::Model) {
        Some(AttrValue::Str(range)) => Some(String::from_utf8_lossy(&span[range.clone()])),
        _ => None,
    };
    let tokens = |field| {
        attrs
            .get(field)
            .and_then(|v| number(span, v))
            .map(|n| n as u64)
    };
    let input = tokens(LlmField::InputTokens);
    let output = tokens(LlmField::OutputTokens);
    if model.is_none() && input.is_none() && output.is_none() {
        return None;
    }
    let model: Arc<str> = match model {
        Some(m) if !m.trim().is_empty() => Arc::from(m.trim()),
        _ => Arc::from(UNKNOWN_MODEL),
    };
    let (input_tokens, output_tokens) = (input.unwrap_or(0), output.unwrap_or(0));
    let cost_usd = attrs
        .get(LlmField::CostUsd)
        .and_then(|v| number(span, v))
        .or_else(|| {
            pricing
                .lookup(&model)
                .map(|p| p.cost(input_tokens, output_tokens))
        });
    let latency_attr_ms = attrs.get(LlmField::LatencyMs).and_then(|v| number(span, v));
    let duration_ns = facts.end_ns.saturating_sub(facts.start_ns);
    Some(LlmCall {
        model,
        input_tokens,
        output_tokens,
        cost_usd,
        latency_seconds: latency_attr_ms.map_or(duration_ns as f64 / 1e9, |ms| ms / 1e3),
        latency_attr_ms,
        error: facts.is_error(),
    })
}

/// USD per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub struct Price {
    pub input_per_mtok: f64,
    pub output_per_mtok: f64,
}

impl Price {
    pub fn cost(&self, input_tokens: u64, output_tokens: u64) -> f64 {
        (input_tokens as f64 * self.input_per_mtok + output_tokens as f64 * self.output_per_mtok)
            / 1e6
    }
}

/// Built-in prices, USD per million tokens (input, output), standard tier, no caching.
/// Each line: model id prefix, prices, source and the date the price was read.
const BUILTIN_PRICES: &[(&str, f64, f64)] = &[
    // Anthropic — anthropic.com/pricing, 2025-10-01
    ("claude-3-5-sonnet", 3.0, 15.0),
    ("claude-3-7-sonnet", 3.0, 15.0),
    ("claude-3-5-haiku", 0.80, 4.0),
    ("claude-3-haiku", 0.25, 1.25),
    ("claude-3-opus", 15.0, 75.0),
    ("claude-sonnet-4", 3.0, 15.0),
    ("claude-sonnet-4-5", 3.0, 15.0),
    ("claude-opus-4", 15.0, 75.0),
    ("claude-opus-4-1", 15.0, 75.0),
    ("claude-haiku-4-5", 1.0, 5.0),
    // OpenAI — openai.com/api/pricing, 2025-10-01
    ("gpt-4o", 2.50, 10.0),
    ("gpt-4o-mini", 0.15, 0.60),
    ("gpt-4.1", 2.0, 8.0),
    ("gpt-4.1-mini", 0.40, 1.60),
    ("gpt-4.1-nano", 0.10, 0.40),
    ("o3", 2.0, 8.0),
    ("o3-mini", 1.10, 4.40),
    ("o4-mini", 1.10, 4.40),
    ("gpt-4-turbo", 10.0, 30.0),
    ("gpt-3.5-turbo", 0.50, 1.50),
    // Google — ai.google.dev/gemini-api/docs/pricing, 2025-10-01 (prompts ≤ 200k tokens)
    ("gemini-2.5-pro", 1.25, 10.0),
    ("gemini-2.5-flash", 0.30, 2.50),
    ("gemini-2.0-flash", 0.10, 0.40),
];

/// One `llm.pricing` entry of the config: a glob (`*` matches any run of characters)
/// matched against the model id, case-insensitively.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PricingEntry {
    #[serde(rename = "match")]
    pub pattern: String,
    pub input_per_mtok: f64,
    pub output_per_mtok: f64,
}

impl PricingEntry {
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.pattern.trim().is_empty() {
            problems.push("match: must not be empty".to_owned());
        }
        for (key, v) in [
            ("input_per_mtok", self.input_per_mtok),
            ("output_per_mtok", self.output_per_mtok),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                problems.push(format!("{key}: must be a number ≥ 0, got {v}"));
            }
        }
        problems
    }
}

/// The pricing table: the config's entries first (first match wins), then the built-in
/// table (longest id prefix wins).
#[derive(Debug, Clone, Default)]
pub struct Pricing {
    overrides: Vec<(String, Price)>,
}

impl Pricing {
    pub fn new(entries: &[PricingEntry]) -> Self {
        Pricing {
            overrides: entries
                .iter()
                .map(|e| {
                    (
                        e.pattern.to_ascii_lowercase(),
                        Price {
                            input_per_mtok: e.input_per_mtok,
                            output_per_mtok: e.output_per_mtok,
                        },
                    )
                })
                .collect(),
        }
    }

    pub fn lookup(&self, model: &str) -> Option<Price> {
        let model = model.to_ascii_lowercase();
        let bare = model.rsplit('/').next().unwrap_or(&model);
        if let Some((_, price)) = self
            .overrides
            .iter()
            .find(|(pattern, _)| glob_match(pattern, &model) || glob_match(pattern, bare))
        {
            return Some(*price);
        }
        BUILTIN_PRICES
            .iter()
            .filter(|(id, _, _)| is_version_of(bare, id))
            .max_by_key(|(id, _, _)| id.len())
            .map(|&(_, input, output)| Price {
                input_per_mtok: input,
                output_per_mtok: output,
            })
    }
}

/// `model` is `id` itself or `id` followed by a dated or versioned suffix
/// (`-20241022`, `-2024-08-06`, `-latest`, `@20241022`), but not a sibling model
/// (`gpt-4o-mini` is not a version of `gpt-4o`).
fn is_version_of(model: &str, id: &str) -> bool {
    let Some(rest) = model.strip_prefix(id) else {
        return false;
    };
    rest.is_empty()
        || rest == "-latest"
        || rest.starts_with('@')
        || rest
            .strip_prefix('-')
            .is_some_and(|r| r.starts_with(|c: char| c.is_ascii_digit()))
}

/// Glob match where `*` matches any (possibly empty) run of characters.
fn glob_match(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn price(model: &str) -> Option<(f64, f64)> {
        Pricing::default()
            .lookup(model)
            .map(|p| (p.input_per_mtok, p.output_per_mtok))
    }

    #[test]
    fn builtin_prices_match_dated_ids_and_provider_prefixes() {
        assert_eq!(price("claude-3-5-sonnet-20241022"), Some((3.0, 15.0)));
        assert_eq!(price("claude-3-5-haiku-20241022"), Some((0.80, 4.0)));
        assert_eq!(price("openai/gpt-4o"), Some((2.50, 10.0)));
        assert_eq!(price("gpt-4o-2024-08-06"), Some((2.50, 10.0)));
        assert_eq!(price("gpt-4o-mini"), Some((0.15, 0.60)));
        assert_eq!(price("gpt-4o-mini-2024-07-18"), Some((0.15, 0.60)));
        assert_eq!(price("claude-sonnet-4-5-20250929"), Some((3.0, 15.0)));
        assert_eq!(price("claude-opus-4-20250514"), Some((15.0, 75.0)));
        assert_eq!(price("GPT-4.1"), Some((2.0, 8.0)));
        assert_eq!(price("o3"), Some((2.0, 8.0)));
        assert_eq!(price("google/gemini-2.5-pro"), Some((1.25, 10.0)));
        assert_eq!(price("gemini-2.5-flash"), Some((0.30, 2.50)));
        assert_eq!(price("gemini-2.5-flash-lite"), None);
        assert_eq!(price("my-fine-tune"), None);
    }

    #[test]
    fn config_entries_override_and_extend() {
        let pricing = Pricing::new(&[
            PricingEntry {
                pattern: "claude-3-5-sonnet*".into(),
                input_per_mtok: 1.0,
                output_per_mtok: 2.0,
            },
            PricingEntry {
                pattern: "acme-*-v?".into(),
                input_per_mtok: 5.0,
                output_per_mtok: 5.0,
            },
        ]);
        assert_eq!(
            pricing
                .lookup("claude-3-5-sonnet-20241022")
                .unwrap()
                .input_per_mtok,
            1.0
        );
        assert_eq!(pricing.lookup("gpt-4o").unwrap().input_per_mtok, 2.5);
        assert!(pricing.lookup("acme-large-v?").is_some());
        assert!(pricing.lookup("acme-large-v2").is_none());
    }

    #[test]
    fn glob() {
        assert!(glob_match("a*", "abc"));
        assert!(glob_match("*c", "abc"));
        assert!(glob_match("a*c", "abc"));
        assert!(glob_match("a*b*c", "aXbYc"));
        assert!(!glob_match("a*b*c", "aXcYb"));
        assert!(glob_match("abc", "abc"));
        assert!(!glob_match("abc", "abcd"));
        assert!(glob_match("*", ""));
        assert!(!glob_match("ab*ba", "aba"));
    }

    #[test]
    fn cost_is_tokens_times_price_per_million() {
        let p = Price {
            input_per_mtok: 3.0,
            output_per_mtok: 15.0,
        };
        assert!((p.cost(1_000_000, 100_000) - 4.5).abs() < 1e-12);
    }
}
