//! Which span attributes describe an LLM call, across the conventions in use: one table,
//! read by the scanner (through [`classify`]) and mirrored in docs/llm.md.

use std::collections::HashMap;
use std::sync::OnceLock;

/// A fact about an LLM call that several conventions spell differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LlmField {
    /// A model name from a convention without a request/response distinction.
    Model = 0,
    RequestModel,
    ResponseModel,
    Provider,
    Operation,
    InputTokens,
    OutputTokens,
    TotalTokens,
    CacheReadTokens,
    CacheWriteTokens,
    ReasoningTokens,
    CostUsd,
    LatencyMs,
    ErrorType,
    UserId,
    SessionId,
    /// `openinference.span.kind` (LLM, EMBEDDING, CHAIN, AGENT, TOOL...).
    OpenInferenceKind,
    /// `langfuse.observation.type` (generation, embedding, span, agent...).
    LangfuseType,
    /// `logfire.span_type` (span, log).
    LogfireSpanType,
    /// `llm.invocation_parameters`: the request's parameters as JSON (OpenInference).
    InvocationParameters,
    /// `langfuse.observation.usage_details`: token counts as JSON.
    UsageDetails,
    /// `langfuse.observation.cost_details`: costs as JSON.
    CostDetails,
}

const _: () = assert!(LlmField::COUNT <= crate::otlp::scan::EXTRA_SLOTS.start);

impl LlmField {
    pub const COUNT: usize = 22;
    pub const ALL: [LlmField; Self::COUNT] = [
        LlmField::Model,
        LlmField::RequestModel,
        LlmField::ResponseModel,
        LlmField::Provider,
        LlmField::Operation,
        LlmField::InputTokens,
        LlmField::OutputTokens,
        LlmField::TotalTokens,
        LlmField::CacheReadTokens,
        LlmField::CacheWriteTokens,
        LlmField::ReasoningTokens,
        LlmField::CostUsd,
        LlmField::LatencyMs,
        LlmField::ErrorType,
        LlmField::UserId,
        LlmField::SessionId,
        LlmField::OpenInferenceKind,
        LlmField::LangfuseType,
        LlmField::LogfireSpanType,
        LlmField::InvocationParameters,
        LlmField::UsageDetails,
        LlmField::CostDetails,
    ];
}

/// Where each attribute comes from: (key, fact, precedence, convention). For one fact, the
/// key with the lowest precedence a span carries wins.
#[rustfmt::skip]
pub const CONVENTIONS: &[(&str, LlmField, u8, &str)] = &[
    ("gen_ai.request.model", LlmField::RequestModel, 0, "OpenTelemetry GenAI"),
    ("gen_ai.response.model", LlmField::ResponseModel, 0, "OpenTelemetry GenAI"),
    ("llm.request.model_name", LlmField::RequestModel, 1, "OpenInference"),
    ("llm.response.model_name", LlmField::ResponseModel, 1, "OpenInference"),
    ("llm.model", LlmField::Model, 0, "seed (`llm.*`)"),
    ("llm.model_name", LlmField::Model, 1, "OpenInference"),
    ("llm.request.model", LlmField::Model, 2, "OpenLLMetry (old)"),
    ("langfuse.observation.model.name", LlmField::Model, 3, "Langfuse"),
    ("gen_ai.provider.name", LlmField::Provider, 0, "OpenTelemetry GenAI"),
    ("gen_ai.system", LlmField::Provider, 1, "OpenTelemetry GenAI (deprecated)"),
    ("llm.provider", LlmField::Provider, 2, "OpenInference"),
    ("llm.system", LlmField::Provider, 3, "OpenInference"),
    ("gen_ai.operation.name", LlmField::Operation, 0, "OpenTelemetry GenAI"),
    ("llm.request.type", LlmField::Operation, 1, "OpenLLMetry"),
    ("gen_ai.usage.input_tokens", LlmField::InputTokens, 0, "OpenTelemetry GenAI"),
    ("gen_ai.usage.prompt_tokens", LlmField::InputTokens, 1, "OpenTelemetry GenAI (deprecated), OpenLLMetry"),
    ("llm.input_tokens", LlmField::InputTokens, 2, "seed (`llm.*`)"),
    ("llm.token_count.prompt", LlmField::InputTokens, 3, "OpenInference"),
    ("llm.usage.prompt_tokens", LlmField::InputTokens, 4, "OpenLLMetry (old)"),
    ("gen_ai.usage.output_tokens", LlmField::OutputTokens, 0, "OpenTelemetry GenAI"),
    ("gen_ai.usage.completion_tokens", LlmField::OutputTokens, 1, "OpenTelemetry GenAI (deprecated), OpenLLMetry"),
    ("llm.output_tokens", LlmField::OutputTokens, 2, "seed (`llm.*`)"),
    ("llm.token_count.completion", LlmField::OutputTokens, 3, "OpenInference"),
    ("llm.usage.completion_tokens", LlmField::OutputTokens, 4, "OpenLLMetry (old)"),
    ("llm.usage.total_tokens", LlmField::TotalTokens, 0, "OpenLLMetry"),
    ("llm.total_tokens", LlmField::TotalTokens, 1, "seed (`llm.*`)"),
    ("llm.token_count.total", LlmField::TotalTokens, 2, "OpenInference"),
    ("gen_ai.usage.cache_read.input_tokens", LlmField::CacheReadTokens, 0, "OpenTelemetry GenAI"),
    ("gen_ai.usage.cache_read_input_tokens", LlmField::CacheReadTokens, 1, "OpenLLMetry"),
    ("llm.token_count.prompt_details.cache_read", LlmField::CacheReadTokens, 2, "OpenInference"),
    ("gen_ai.usage.cache_write.input_tokens", LlmField::CacheWriteTokens, 0, "OpenTelemetry GenAI"),
    ("gen_ai.usage.cache_creation.input_tokens", LlmField::CacheWriteTokens, 1, "OpenTelemetry GenAI (before the rename to cache_write)"),
    ("gen_ai.usage.cache_creation_input_tokens", LlmField::CacheWriteTokens, 2, "OpenLLMetry"),
    ("llm.token_count.prompt_details.cache_write", LlmField::CacheWriteTokens, 3, "OpenInference"),
    ("gen_ai.usage.reasoning.output_tokens", LlmField::ReasoningTokens, 0, "OpenTelemetry GenAI"),
    ("gen_ai.usage.reasoning_tokens", LlmField::ReasoningTokens, 1, "OpenLLMetry"),
    ("llm.token_count.completion_details.reasoning", LlmField::ReasoningTokens, 2, "OpenInference"),
    ("llm.cost_usd", LlmField::CostUsd, 0, "seed (`llm.*`)"),
    ("gen_ai.usage.cost", LlmField::CostUsd, 1, "OpenLIT"),
    ("llm.cost.total", LlmField::CostUsd, 2, "OpenInference"),
    ("llm.latency_ms", LlmField::LatencyMs, 0, "seed (`llm.*`)"),
    ("error.type", LlmField::ErrorType, 0, "OpenTelemetry"),
    ("user.id", LlmField::UserId, 0, "OpenTelemetry"),
    ("enduser.id", LlmField::UserId, 1, "OpenTelemetry (deprecated)"),
    ("llm.user_id", LlmField::UserId, 2, "seed (`llm.*`)"),
    ("langfuse.user.id", LlmField::UserId, 3, "Langfuse"),
    ("session.id", LlmField::SessionId, 0, "OpenTelemetry, OpenInference"),
    ("gen_ai.conversation.id", LlmField::SessionId, 1, "OpenTelemetry GenAI"),
    ("langfuse.session.id", LlmField::SessionId, 2, "Langfuse"),
    ("openinference.span.kind", LlmField::OpenInferenceKind, 0, "OpenInference"),
    ("langfuse.observation.type", LlmField::LangfuseType, 0, "Langfuse"),
    ("logfire.span_type", LlmField::LogfireSpanType, 0, "Logfire"),
    ("llm.invocation_parameters", LlmField::InvocationParameters, 0, "OpenInference"),
    ("langfuse.observation.usage_details", LlmField::UsageDetails, 0, "Langfuse"),
    ("langfuse.observation.cost_details", LlmField::CostDetails, 0, "Langfuse"),
];

/// Maps an attribute key to the LLM fact it carries and its precedence.
#[inline]
pub fn classify(key: &[u8]) -> Option<(LlmField, u8)> {
    // Most attributes of a span are not LLM facts; every key in the table starts with one
    // of these letters, so one byte turns most others away before the table is consulted.
    if !matches!(key.first(), Some(b'g' | b'l' | b'e' | b'u' | b's' | b'o')) {
        return None;
    }
    table().get(key).copied()
}

type Table = HashMap<&'static [u8], (LlmField, u8), foldhash::fast::FixedState>;

/// [`CONVENTIONS`] as a hash map, built once: one hash of the key instead of comparing it
/// with every entry (the scanner calls this for every attribute of every span).
fn table() -> &'static Table {
    static TABLE: OnceLock<Table> = OnceLock::new();
    TABLE.get_or_init(|| {
        CONVENTIONS
            .iter()
            .map(|&(k, field, precedence, _)| (k.as_bytes(), (field, precedence)))
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_lists_every_field_in_order() {
        for (i, f) in LlmField::ALL.iter().enumerate() {
            assert_eq!(*f as usize, i);
        }
    }

    #[test]
    fn every_key_is_unique_and_each_fact_has_distinct_precedences() {
        for (i, (k, f, p, _)) in CONVENTIONS.iter().enumerate() {
            assert!(CONVENTIONS[..i].iter().all(|(k2, ..)| k2 != k), "{k} twice");
            assert!(
                CONVENTIONS[..i]
                    .iter()
                    .all(|(_, f2, p2, _)| !(f2 == f && p2 == p)),
                "{k}: precedence {p} taken"
            );
            assert!(
                matches!(k.as_bytes()[0], b'g' | b'l' | b'e' | b'u' | b's' | b'o'),
                "{k} escapes the prefilter"
            );
        }
    }

    #[test]
    fn docs_llm_lists_every_key() {
        let readme = include_str!("../../docs/llm.md");
        for (k, ..) in CONVENTIONS {
            assert!(
                readme.contains(&format!("`{k}`")),
                "docs/llm.md does not list {k}"
            );
        }
    }

    #[test]
    fn classify_finds_keys_and_rejects_others() {
        assert_eq!(
            classify(b"gen_ai.usage.input_tokens"),
            Some((LlmField::InputTokens, 0))
        );
        assert_eq!(
            classify(b"llm.token_count.prompt"),
            Some((LlmField::InputTokens, 3))
        );
        assert_eq!(classify(b"session.id"), Some((LlmField::SessionId, 0)));
        assert_eq!(classify(b"http.route"), None);
        assert_eq!(classify(b"gen_ai.usage.input_token"), None);
    }
}
