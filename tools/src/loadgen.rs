//! Realistic LLM-application traces, for `llmtail-loadgen` and the black-box tests.
//!
//! A trace is a request span (root), an LLM call, a tool call and a database query, the way
//! an instrumented chat service emits them. The LLM span alternates between the GenAI, the
//! seed `llm.*` and the OpenInference conventions. A trace's [`Kind`] makes it an error, slow
//! or expensive by one of the ways llmtail's policies recognise.

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{
    AnyValue, InstrumentationScope, KeyValue, any_value::Value,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::span::{Event, SpanKind};
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status};
use rand::Rng;

/// What makes a trace interesting (or not) to the shipped policies
/// (errors; slow ≥ 5000 ms; expensive ≥ $0.10).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Normal,
    /// LLM span with status ERROR and an `exception` event.
    Error,
    /// Root span lasting 6 s.
    SlowDuration,
    /// Short spans, but the LLM span says `llm.latency_ms: 7000`.
    SlowLatencyAttr,
    /// LLM span carrying `llm.cost_usd: 0.25`.
    ExpensiveAttr,
    /// 5,000 input + 2,000 output tokens of claude-opus-4: $0.225 by the price table.
    ExpensiveTokens,
}

impl Kind {
    pub fn is_interesting(self) -> bool {
        self != Kind::Normal
    }
}

/// The LLM attribute conventions a generated LLM span may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Convention {
    GenAi,
    Seed,
    OpenInference,
}

/// One generated trace and the facts the tests check against.
#[derive(Debug, Clone)]
pub struct GeneratedTrace {
    pub trace_id: [u8; 16],
    pub kind: Kind,
    pub spans: Vec<Span>,
    pub model: &'static str,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Cost as llmtail should compute it (attribute, else tokens × built-in price).
    pub cost_usd: f64,
}

/// The service name generated traces are sent under.
pub const SERVICE: &str = "chat-api";

fn kv(key: &str, value: Value) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

fn s(key: &str, v: &str) -> KeyValue {
    kv(key, Value::StringValue(v.to_owned()))
}

fn i(key: &str, v: i64) -> KeyValue {
    kv(key, Value::IntValue(v))
}

fn d(key: &str, v: f64) -> KeyValue {
    kv(key, Value::DoubleValue(v))
}

pub fn random_trace_id(rng: &mut impl Rng) -> [u8; 16] {
    loop {
        let id: [u8; 16] = rng.random();
        if id != [0; 16] {
            return id;
        }
    }
}

fn span_id(rng: &mut impl Rng) -> Vec<u8> {
    loop {
        let id: [u8; 8] = rng.random();
        if id != [0; 8] {
            return id.to_vec();
        }
    }
}

/// Builds one trace of the given kind, starting at `start_ns`.
pub fn trace(
    rng: &mut impl Rng,
    kind: Kind,
    convention: Convention,
    start_ns: u64,
) -> GeneratedTrace {
    const MS: u64 = 1_000_000;
    let trace_id = random_trace_id(rng);
    let root_id = span_id(rng);
    let (model, input_tokens, output_tokens) = match kind {
        Kind::ExpensiveTokens => ("claude-opus-4-20250514", 5_000, 2_000),
        _ => (
            "gpt-4o-mini-2024-07-18",
            rng.random_range(200..1500),
            rng.random_range(50..400),
        ),
    };
    let root_ms = if kind == Kind::SlowDuration {
        6_000
    } else {
        rng.random_range(300..1_500)
    };
    let llm_ms = root_ms * 6 / 10;
    let base =
        |name: &str, id: Vec<u8>, parent: Vec<u8>, kind: SpanKind, from: u64, to: u64| Span {
            trace_id: trace_id.to_vec(),
            span_id: id,
            parent_span_id: parent,
            name: name.to_owned(),
            kind: kind as i32,
            start_time_unix_nano: start_ns + from * MS,
            end_time_unix_nano: start_ns + to * MS,
            flags: 0x101,
            ..Default::default()
        };
    let mut root = base(
        "POST /v1/chat",
        root_id.clone(),
        Vec::new(),
        SpanKind::Server,
        0,
        root_ms,
    );
    root.attributes = vec![
        s("http.request.method", "POST"),
        s("http.route", "/v1/chat"),
        i(
            "http.response.status_code",
            if kind == Kind::Error { 500 } else { 200 },
        ),
        s("url.scheme", "https"),
        s("user_agent.original", "chat-web/3.2"),
    ];
    let mut llm = base(
        "chat",
        span_id(rng),
        root_id.clone(),
        SpanKind::Client,
        40,
        40 + llm_ms,
    );
    llm.attributes = match convention {
        Convention::GenAi => vec![
            s("gen_ai.operation.name", "chat"),
            s("gen_ai.system", "openai"),
            s("gen_ai.request.model", model),
            s("gen_ai.response.model", model),
            i("gen_ai.usage.input_tokens", input_tokens as i64),
            i("gen_ai.usage.output_tokens", output_tokens as i64),
            d("gen_ai.request.temperature", 0.2),
            i("gen_ai.request.max_tokens", 1024),
            d("gen_ai.request.top_p", 1.0),
            s("gen_ai.response.id", "chatcmpl-9x7Yb2"),
            s("gen_ai.response.finish_reasons", "stop"),
            s("server.address", "api.openai.com"),
            i("server.port", 443),
        ],
        Convention::Seed => vec![
            s("llm.model", model),
            i("llm.input_tokens", input_tokens as i64),
            i("llm.output_tokens", output_tokens as i64),
            s("llm.provider", "openai"),
            d("llm.temperature", 0.2),
            i("llm.max_tokens", 1024),
            s("llm.finish_reason", "stop"),
            s("llm.request_id", "req_01HZX3"),
            s("server.address", "api.openai.com"),
        ],
        Convention::OpenInference => vec![
            s("openinference.span.kind", "LLM"),
            s("llm.model_name", model),
            s("llm.provider", "openai"),
            i("llm.token_count.prompt", input_tokens as i64),
            i("llm.token_count.completion", output_tokens as i64),
            i(
                "llm.token_count.total",
                (input_tokens + output_tokens) as i64,
            ),
            s("llm.invocation_parameters", "{\"temperature\":0.2}"),
            s("input.mime_type", "application/json"),
            s("output.mime_type", "application/json"),
        ],
    };
    llm.attributes.extend([
        s("session.id", "sess-42"),
        s("user.id", "user-7"),
        s("app.prompt.template", "support-v3"),
        s("app.feature", "answer"),
        i("app.retry", 0),
        s("app.cache", "miss"),
        s("deployment.environment", "production"),
    ]);
    let mut cost_usd = llmtail_price(model, input_tokens, output_tokens);
    match kind {
        Kind::SlowLatencyAttr => llm.attributes.push(d("llm.latency_ms", 7_000.0)),
        Kind::ExpensiveAttr => {
            llm.attributes.push(d("llm.cost_usd", 0.25));
            cost_usd = 0.25;
        }
        Kind::Error => {
            llm.status = Some(Status {
                code: StatusCode::Error as i32,
                message: "upstream 429: rate limited".into(),
            });
            llm.events.push(Event {
                time_unix_nano: start_ns + (40 + llm_ms) * MS,
                name: "exception".into(),
                attributes: vec![
                    s("exception.type", "RateLimitError"),
                    s("exception.message", "Rate limit reached for requests"),
                ],
                dropped_attributes_count: 0,
            });
        }
        _ => {}
    }
    let mut tool = base(
        "tool search_docs",
        span_id(rng),
        root_id.clone(),
        SpanKind::Internal,
        40 + llm_ms,
        60 + llm_ms,
    );
    tool.attributes = vec![
        s("gen_ai.tool.name", "search_docs"),
        s("gen_ai.operation.name", "execute_tool"),
    ];
    let mut db = base(
        "SELECT documents",
        span_id(rng),
        root_id,
        SpanKind::Client,
        10,
        30,
    );
    db.attributes = vec![
        s("db.system.name", "postgresql"),
        s("db.operation.name", "SELECT"),
        s("db.collection.name", "documents"),
    ];
    GeneratedTrace {
        trace_id,
        kind,
        spans: vec![root, llm, tool, db],
        model,
        input_tokens,
        output_tokens,
        cost_usd,
    }
}

/// Prices the generator's two models use, from the built-in table (USD per million tokens).
fn llmtail_price(model: &str, input: u64, output: u64) -> f64 {
    let (pi, po) = if model.starts_with("claude-opus-4") {
        (15.0, 75.0)
    } else {
        (0.15, 0.60)
    };
    (input as f64 * pi + output as f64 * po) / 1e6
}

/// Wraps spans into one export request from [`SERVICE`].
pub fn request(spans: Vec<Span>) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![
                    s("service.name", SERVICE),
                    s("service.version", "3.2.0"),
                    s("telemetry.sdk.language", "python"),
                ],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "llmtail-loadgen".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..Default::default()
                }),
                spans,
                schema_url: String::new(),
            }],
            schema_url: "https://opentelemetry.io/schemas/1.26.0".into(),
        }],
    }
}

/// Picks a kind with the given shares of errors, slow and expensive traces.
pub fn pick_kind(rng: &mut impl Rng, error: f64, slow: f64, expensive: f64) -> Kind {
    let x: f64 = rng.random();
    if x < error {
        Kind::Error
    } else if x < error + slow / 2.0 {
        Kind::SlowDuration
    } else if x < error + slow {
        Kind::SlowLatencyAttr
    } else if x < error + slow + expensive / 2.0 {
        Kind::ExpensiveAttr
    } else if x < error + slow + expensive {
        Kind::ExpensiveTokens
    } else {
        Kind::Normal
    }
}

pub fn convention_for(n: usize) -> Convention {
    match n % 3 {
        0 => Convention::GenAi,
        1 => Convention::Seed,
        _ => Convention::OpenInference,
    }
}
