//! How each instrumentation library deviates from the OpenTelemetry GenAI conventions, keyed
//! by the instrumentation scope its spans carry: one table of data, mirrored in docs/llm.md,
//! with a test per row in `tests` below and the real library in `tests/e2e/llm_clients.rs`.

/// Whether a library's input token count includes the cached tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputTokens {
    /// Includes cache reads and writes, as the GenAI conventions (and OpenAI) say.
    IncludesCache,
    /// Reports them beside it, as Anthropic's API does.
    ExcludesCache,
    /// Unknown library: the GenAI convention, unless the input is smaller than the cache
    /// tokens (which no inclusive count can be), read as exclusive.
    Convention,
}

/// What a cost attribute of 0 on tokens the price table can price means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroCost {
    /// "Not known": the library writes 0 for models its own table lacks. The price table
    /// prices the call (under `llm.cost_source: auto`).
    Unknown,
    /// The call really was free (a library that omits the attribute when it cannot price).
    Free,
}

/// One library's quirks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quirks {
    /// The instrumentation scope name, or, ending in `.`, a prefix of it (`openlit.`
    /// matches `openlit` and `openlit.instrumentation.openai`).
    pub scope: &'static str,
    /// `gen_ai.provider.name` / `gen_ai.system` the row is limited to (`None`: any).
    pub provider: Option<&'static str>,
    /// The library, as users know it.
    pub library: &'static str,
    pub input_tokens: InputTokens,
    pub zero_cost: ZeroCost,
    /// A span of this scope is an LLM call only when a marker says so
    /// (`gen_ai.operation.name`...): its other spans name a model without being a call.
    pub calls_need_marker: bool,
    /// Every span of this scope is a call, attributes or not (a library whose spans of
    /// failed calls carry none).
    pub every_span_is_a_call: bool,
    /// Duplicate spans the library emits for one call, and how llmtail counts it once
    /// (documentation; the rules are in `llm::trace`).
    pub duplicates: &'static str,
}

const fn row(
    scope: &'static str,
    provider: Option<&'static str>,
    library: &'static str,
    input_tokens: InputTokens,
) -> Quirks {
    Quirks {
        scope,
        provider,
        library,
        input_tokens,
        zero_cost: ZeroCost::Unknown,
        calls_need_marker: false,
        every_span_is_a_call: false,
        duplicates: "",
    }
}

use InputTokens::*;

/// The libraries llmtail knows, most specific row first (the first match wins).
pub const QUIRKS: &[Quirks] = &[
    Quirks {
        calls_need_marker: true,
        duplicates: "none of its own; under another instrumentation (OpenInference, OpenLLMetry, \
                     Logfire) the same call has that library's span too: its parent for \
                     `messages.create`, its sibling for `messages.stream`",
        ..row(
            "com.anthropic.sdk.python",
            None,
            "Anthropic Python client's own tracing",
            IncludesCache,
        )
    },
    row(
        "opentelemetry.instrumentation.openai_v2",
        None,
        "OpenTelemetry openai-v2",
        IncludesCache,
    ),
    row(
        "opentelemetry.util.genai.",
        None,
        "OpenTelemetry GenAI utilities (openai-v2 and others)",
        IncludesCache,
    ),
    row(
        "opentelemetry.instrumentation.anthropic",
        None,
        "OpenLLMetry (Anthropic)",
        IncludesCache,
    ),
    row(
        "opentelemetry.instrumentation.openai.",
        None,
        "OpenLLMetry (OpenAI)",
        IncludesCache,
    ),
    row(
        "opentelemetry.instrumentation.",
        None,
        "OpenLLMetry (other providers)",
        Convention,
    ),
    row(
        "openinference.instrumentation.anthropic",
        None,
        "OpenInference (Anthropic)",
        IncludesCache,
    ),
    row(
        "openinference.instrumentation.",
        None,
        "OpenInference",
        IncludesCache,
    ),
    Quirks {
        every_span_is_a_call: true,
        ..row(
            "openlit.instrumentation.anthropic",
            None,
            "OpenLIT (Anthropic)",
            ExcludesCache,
        )
    },
    row(
        "openlit.",
        Some("anthropic"),
        "OpenLIT (Anthropic models elsewhere)",
        ExcludesCache,
    ),
    row("openlit.", None, "OpenLIT", IncludesCache),
    Quirks {
        duplicates: "a streamed call is a request span without usage followed by a \
                     `logfire.span_type=log` span with the usage: one call, counted at the \
                     request span with the log's usage",
        ..row("logfire.", None, "Logfire", IncludesCache)
    },
    row("langfuse-sdk", None, "Langfuse", Convention),
];

/// The row for the unknown library: the GenAI conventions.
pub const GENAI: Quirks = row("", None, "OpenTelemetry GenAI conventions", Convention);

/// The quirks of the library that wrote spans under `scope`, for calls to `provider`.
pub fn lookup(scope: &str, provider: Option<&str>) -> &'static Quirks {
    QUIRKS
        .iter()
        .find(|q| {
            let scoped = match q.scope.strip_suffix('.') {
                Some(name) => scope == name || scope.starts_with(q.scope),
                None => scope == q.scope,
            };
            scoped && q.provider.is_none_or(|p| provider == Some(p))
        })
        .unwrap_or(&GENAI)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_row_is_found_by_its_scope_and_provider() {
        let cases = [
            (
                "com.anthropic.sdk.python",
                Some("anthropic"),
                "Anthropic Python client's own tracing",
            ),
            (
                "opentelemetry.instrumentation.openai_v2",
                Some("openai"),
                "OpenTelemetry openai-v2",
            ),
            (
                "opentelemetry.util.genai.handler",
                Some("openai"),
                "OpenTelemetry GenAI utilities (openai-v2 and others)",
            ),
            (
                "opentelemetry.instrumentation.anthropic",
                Some("anthropic"),
                "OpenLLMetry (Anthropic)",
            ),
            (
                "opentelemetry.instrumentation.openai.v1",
                Some("openai"),
                "OpenLLMetry (OpenAI)",
            ),
            (
                "opentelemetry.instrumentation.bedrock",
                Some("aws.bedrock"),
                "OpenLLMetry (other providers)",
            ),
            (
                "openinference.instrumentation.anthropic",
                Some("anthropic"),
                "OpenInference (Anthropic)",
            ),
            (
                "openinference.instrumentation.openai",
                Some("openai"),
                "OpenInference",
            ),
            (
                "openlit.instrumentation.anthropic",
                None,
                "OpenLIT (Anthropic)",
            ),
            (
                "openlit.instrumentation.bedrock",
                Some("anthropic"),
                "OpenLIT (Anthropic models elsewhere)",
            ),
            ("openlit.instrumentation.openai", Some("openai"), "OpenLIT"),
            ("logfire.openai", Some("openai"), "Logfire"),
            ("langfuse-sdk", None, "Langfuse"),
            ("my.app", Some("openai"), "OpenTelemetry GenAI conventions"),
            // A prefix row matches at a dot only.
            (
                "openlitx",
                Some("anthropic"),
                "OpenTelemetry GenAI conventions",
            ),
        ];
        for (scope, provider, library) in cases {
            assert_eq!(lookup(scope, provider).library, library, "{scope}");
        }
        // Every row is reachable: no earlier row hides it.
        for q in QUIRKS {
            let scope = q
                .scope
                .strip_suffix('.')
                .map_or(q.scope.to_owned(), |p| format!("{p}.x"));
            assert_eq!(lookup(&scope, q.provider).library, q.library);
        }
    }

    #[test]
    fn docs_llm_lists_every_row() {
        let docs = include_str!("../../docs/llm.md");
        for q in QUIRKS {
            assert!(
                docs.contains(&format!("`{}`", q.scope)),
                "docs/llm.md does not list {}",
                q.scope
            );
        }
    }
}
