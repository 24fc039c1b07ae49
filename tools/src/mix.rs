//! Production-shaped LLM traffic, for `llmtail-bench` and the criterion benches: what a
//! chat product's fleet sends, not what is convenient to generate.
//!
//! - 20 services and 30 models (cloud ids included: Bedrock, Vertex, Azure);
//! - users drawn from 10,000 and sessions from 100,000, both Zipf-distributed (a few heavy
//!   users, a long tail);
//! - 70% short traces (request, LLM call, tool, database: 4 spans) and 30% agent traces of
//!   10–50 spans (an `invoke_agent` span around turns of a chat call and a tool call);
//! - 10% of LLM spans carry 2–8 KB of prompt and completion content;
//! - errors carry an `exception` event with a stack trace;
//! - LLM spans in the GenAI, OpenInference and OpenLLMetry conventions, under their scopes.
//!
//! Requests group whole traces by service (one `ResourceSpans` per service), to a span count
//! (512, the SDKs' default batch; 8,192, a Collector's batch processor in front).

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{
    AnyValue, InstrumentationScope, KeyValue, any_value::Value,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::span::{Event, SpanKind};
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status};
use rand::Rng;
use rand_distr::{Distribution, Zipf};

use crate::loadgen::{Kind, pick_kind, random_trace_id};

pub const SERVICES: usize = 20;
pub const USERS: u64 = 10_000;
pub const SESSIONS: u64 = 100_000;

/// Models as instrumentations report them, cloud ids included.
pub const MODELS: [&str; 30] = [
    "gpt-4o-2024-08-06",
    "gpt-4o-mini-2024-07-18",
    "gpt-4.1-2025-04-14",
    "gpt-4.1-mini",
    "gpt-4.1-nano",
    "o3-mini",
    "o4-mini-2025-04-16",
    "gpt-5",
    "text-embedding-3-small",
    "text-embedding-3-large",
    "claude-sonnet-4-5-20250929",
    "claude-sonnet-4-20250514",
    "claude-haiku-4-5",
    "claude-opus-4-1",
    "claude-3-5-haiku-20241022",
    "anthropic.claude-3-5-sonnet-20241022-v2:0",
    "us.anthropic.claude-sonnet-4-20250514-v1:0",
    "anthropic.claude-3-haiku-20240307-v1:0",
    "meta.llama3-1-70b-instruct-v1:0",
    "amazon.nova-pro-v1:0",
    "gemini-2.5-pro",
    "gemini-2.5-flash",
    "publishers/google/models/gemini-2.0-flash-001",
    "claude-sonnet-4@20250514",
    "mistral-large-latest",
    "mistral-small-2503",
    "deepseek-chat",
    "llama-3.3-70b-versatile",
    "azure/gpt-4o",
    "command-r-plus",
];

/// Where a trace comes from and who it is for.
pub struct Mix {
    users: Zipf<f64>,
    sessions: Zipf<f64>,
    models: Zipf<f64>,
    /// llmtail's built-in prices, to know which traces its cost policy keeps.
    pricing: llmtail::llm::Pricing,
    /// Share of errors, slow and expensive traces.
    pub shares: (f64, f64, f64),
}

impl Default for Mix {
    fn default() -> Self {
        Mix {
            users: Zipf::new(USERS as f64, 1.1).expect("a Zipf distribution"),
            sessions: Zipf::new(SESSIONS as f64, 1.05).expect("a Zipf distribution"),
            models: Zipf::new(MODELS.len() as f64, 1.2).expect("a Zipf distribution"),
            pricing: llmtail::llm::Pricing::default(),
            shares: (0.05, 0.03, 0.02),
        }
    }
}

/// One generated trace of the mix.
pub struct MixTrace {
    pub trace_id: [u8; 16],
    pub kind: Kind,
    pub service: usize,
    /// By instrumentation scope: (scope name, spans).
    pub scopes: Vec<(&'static str, Vec<Span>)>,
}

impl MixTrace {
    pub fn span_count(&self) -> usize {
        self.scopes.iter().map(|(_, s)| s.len()).sum()
    }
}

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

fn span_id(rng: &mut impl Rng) -> Vec<u8> {
    loop {
        let id: [u8; 8] = rng.random();
        if id != [0; 8] {
            return id.to_vec();
        }
    }
}

/// Text of about `n` bytes, as prompts read.
fn text(rng: &mut impl Rng, n: usize) -> String {
    const WORDS: [&str; 16] = [
        "the",
        "customer",
        "asked",
        "about",
        "their",
        "invoice",
        "and",
        "refund",
        "policy",
        "please",
        "summarise",
        "context",
        "document",
        "answer",
        "briefly",
        "because",
    ];
    let mut out = String::with_capacity(n + 16);
    while out.len() < n {
        out.push_str(WORDS[rng.random_range(0..WORDS.len())]);
        out.push(' ');
    }
    out
}

const STACK: &str = "Traceback (most recent call last):\n  File \"/app/agent/loop.py\", line 212, in run\n    reply = await self.llm.complete(messages)\n  File \"/app/agent/llm.py\", line 88, in complete\n    return await self.client.chat.completions.create(**params)\n  File \"/usr/lib/python3.12/site-packages/openai/resources/chat/completions.py\", line 1720, in create\n    return await self._post(\"/chat/completions\", body=body, options=options)\n  File \"/usr/lib/python3.12/site-packages/openai/_base_client.py\", line 1856, in post\n    return await self.request(cast_to, opts, stream=stream)\nopenai.RateLimitError: Error code: 429 - Rate limit reached for gpt-4o in organization org-xyz on tokens per min (TPM): Limit 30000000, Used 29998312, Requested 4102.\n";

const MS: u64 = 1_000_000;

impl Mix {
    /// One trace starting at `start_ns`.
    pub fn trace(&self, rng: &mut impl Rng, start_ns: u64) -> MixTrace {
        let kind = pick_kind(rng, self.shares.0, self.shares.1, self.shares.2);
        let trace_id = random_trace_id(rng);
        let service = rng.random_range(0..SERVICES);
        let user = format!("user-{}", self.users.sample(rng) as u64);
        let session = format!("sess-{}", self.sessions.sample(rng) as u64);
        let agent = rng.random_bool(0.3);
        let root_ms: u64 = if kind == Kind::SlowDuration {
            6_000
        } else {
            rng.random_range(300..3_000)
        };
        let base =
            |name: String, id: Vec<u8>, parent: Vec<u8>, k: SpanKind, from: u64, to: u64| Span {
                trace_id: trace_id.to_vec(),
                span_id: id,
                parent_span_id: parent,
                name,
                kind: k as i32,
                start_time_unix_nano: start_ns + from * MS,
                end_time_unix_nano: start_ns + to * MS,
                flags: 0x101,
                ..Default::default()
            };
        let root_id = span_id(rng);
        let mut root = base(
            "POST /v1/chat".into(),
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
            s(
                "user_agent.original",
                "chat-web/3.2 (Macintosh; Intel Mac OS X 14_5)",
            ),
            s("client.address", "10.42.17.3"),
        ];
        let mut app = vec![root];
        let mut llm_spans = Vec::new();
        let mut tools = Vec::new();
        // The calls: one, or an agent's turns.
        let (parent, turns) = if agent {
            let agent_id = span_id(rng);
            let mut a = base(
                "invoke_agent support".into(),
                agent_id.clone(),
                root_id.clone(),
                SpanKind::Internal,
                5,
                root_ms - 5,
            );
            a.attributes = vec![
                s("gen_ai.operation.name", "invoke_agent"),
                s("gen_ai.agent.name", "support"),
            ];
            app.push(a);
            (agent_id, rng.random_range(4..24usize))
        } else {
            (root_id.clone(), 1)
        };
        let step = (root_ms - 20) / (turns as u64 * 2);
        let failing_turn = rng.random_range(0..turns);
        let mut cost = 0.0;
        for turn in 0..turns {
            let from = 10 + turn as u64 * 2 * step;
            let model = match kind {
                Kind::ExpensiveTokens if turn == 0 => "claude-opus-4-1",
                _ => MODELS[self.models.sample(rng) as usize - 1],
            };
            let (input, output) = match kind {
                Kind::ExpensiveTokens if turn == 0 => (60_000, 8_000),
                _ => (rng.random_range(200..4_000), rng.random_range(20..800)),
            };
            let mut llm = base(
                format!("chat {model}"),
                span_id(rng),
                parent.clone(),
                SpanKind::Client,
                from,
                from + step,
            );
            cost += self
                .pricing
                .call_cost(
                    &std::sync::Arc::from(model),
                    &llmtail::llm::Usage {
                        input: input as u64,
                        output: output as u64,
                        ..Default::default()
                    },
                    None,
                )
                .unwrap_or(0.0);
            let convention = rng.random_range(0..3);
            llm.attributes = match convention {
                0 => vec![
                    s("gen_ai.operation.name", "chat"),
                    s("gen_ai.provider.name", "openai"),
                    s("gen_ai.request.model", model),
                    s("gen_ai.response.model", model),
                    i("gen_ai.usage.input_tokens", input),
                    i("gen_ai.usage.output_tokens", output),
                    s("gen_ai.response.id", "chatcmpl-9x8Y7w6V5u4T3s2R1q"),
                    kv(
                        "gen_ai.response.finish_reasons",
                        Value::StringValue("stop".into()),
                    ),
                ],
                1 => vec![
                    s("openinference.span.kind", "LLM"),
                    s("llm.model_name", model),
                    s("llm.system", "anthropic"),
                    i("llm.token_count.prompt", input),
                    i("llm.token_count.completion", output),
                    i("llm.token_count.total", input + output),
                    s(
                        "llm.invocation_parameters",
                        "{\"max_tokens\": 1024, \"temperature\": 0.2}",
                    ),
                ],
                _ => vec![
                    s("gen_ai.system", "openai"),
                    s("llm.request.type", "chat"),
                    s("gen_ai.request.model", model),
                    i("gen_ai.usage.prompt_tokens", input),
                    i("gen_ai.usage.completion_tokens", output),
                    i("llm.usage.total_tokens", input + output),
                ],
            };
            llm.attributes
                .extend([s("user.id", &user), s("session.id", &session)]);
            if rng.random_bool(0.1) {
                let (p, c) = (rng.random_range(2_000..6_000), rng.random_range(200..2_000));
                let prompt = text(rng, p);
                let completion = text(rng, c);
                llm.attributes.extend([
                    s("gen_ai.input.messages", &prompt),
                    s("gen_ai.output.messages", &completion),
                ]);
            }
            match kind {
                Kind::SlowLatencyAttr if turn == 0 => llm
                    .attributes
                    .push(kv("llm.latency_ms", Value::DoubleValue(7_000.0))),
                Kind::ExpensiveAttr if turn == 0 => llm
                    .attributes
                    .push(kv("llm.cost_usd", Value::DoubleValue(0.25))),
                Kind::Error if turn == failing_turn => {
                    llm.status = Some(Status {
                        code: StatusCode::Error as i32,
                        message: "Error code: 429 - rate limited".into(),
                    });
                    llm.events.push(Event {
                        time_unix_nano: start_ns + (from + step) * MS,
                        name: "exception".into(),
                        attributes: vec![
                            s("exception.type", "openai.RateLimitError"),
                            s("exception.message", "Rate limit reached"),
                            s("exception.stacktrace", STACK),
                        ],
                        dropped_attributes_count: 0,
                    });
                }
                _ => {}
            }
            let scope = [
                "opentelemetry.instrumentation.openai.v1",
                "openinference.instrumentation.anthropic",
                "opentelemetry.instrumentation.openai.v1",
            ][convention];
            llm_spans.push((scope, llm));
            let mut tool = base(
                "execute_tool search_docs".into(),
                span_id(rng),
                parent.clone(),
                SpanKind::Internal,
                from + step,
                from + 2 * step,
            );
            tool.attributes = vec![
                s("gen_ai.operation.name", "execute_tool"),
                s("gen_ai.tool.name", "search_docs"),
                s("gen_ai.tool.call.id", "call_Zx81kq"),
            ];
            tools.push(tool);
        }
        if !agent {
            let mut db = base(
                "SELECT documents".into(),
                span_id(rng),
                root_id,
                SpanKind::Client,
                2,
                8,
            );
            db.attributes = vec![
                s("db.system.name", "postgresql"),
                s("db.operation.name", "SELECT"),
                s("db.collection.name", "documents"),
                s("server.address", "pg-primary.internal"),
            ];
            app.push(db);
        }
        app.extend(tools);
        let mut scopes: Vec<(&'static str, Vec<Span>)> = vec![("chat-service", app)];
        for (scope, span) in llm_spans {
            match scopes.iter_mut().find(|(s, _)| *s == scope) {
                Some((_, spans)) => spans.push(span),
                None => scopes.push((scope, vec![span])),
            }
        }
        // A trace the cost policy keeps (≥ $0.10) is an interesting one, whatever it was
        // drawn as.
        let kind = if kind == Kind::Normal && cost >= 0.10 {
            Kind::ExpensiveTokens
        } else {
            kind
        };
        MixTrace {
            trace_id,
            kind,
            service,
            scopes,
        }
    }

    /// Traces until `spans` spans, as one request (whole traces; a resource per service).
    pub fn request(
        &self,
        rng: &mut impl Rng,
        spans: usize,
        start_ns: u64,
    ) -> (ExportTraceServiceRequest, Vec<MixTrace>) {
        let mut traces = Vec::new();
        let mut n = 0;
        while n < spans {
            let t = self.trace(rng, start_ns);
            n += t.span_count();
            traces.push(t);
        }
        (request(&traces), traces)
    }
}

/// The traces as one export request: a `ResourceSpans` per service, a `ScopeSpans` per scope.
pub fn request(traces: &[MixTrace]) -> ExportTraceServiceRequest {
    let mut resource_spans: Vec<ResourceSpans> = Vec::new();
    for service in 0..SERVICES {
        let mine: Vec<&MixTrace> = traces.iter().filter(|t| t.service == service).collect();
        if mine.is_empty() {
            continue;
        }
        let mut scope_spans: Vec<ScopeSpans> = Vec::new();
        for t in mine {
            for (scope, spans) in &t.scopes {
                match scope_spans
                    .iter_mut()
                    .find(|s| s.scope.as_ref().is_some_and(|sc| sc.name == *scope))
                {
                    Some(s) => s.spans.extend(spans.iter().cloned()),
                    None => scope_spans.push(ScopeSpans {
                        scope: Some(InstrumentationScope {
                            name: (*scope).into(),
                            version: "0.40.2".into(),
                            ..Default::default()
                        }),
                        spans: spans.clone(),
                        schema_url: String::new(),
                    }),
                }
            }
        }
        resource_spans.push(ResourceSpans {
            resource: Some(Resource {
                attributes: vec![
                    s("service.name", &format!("svc-{service:02}")),
                    s("service.version", "3.2.0"),
                    s("service.namespace", "chat"),
                    s("deployment.environment.name", "production"),
                    s("k8s.pod.name", &format!("svc-{service:02}-7f9c4d8b6-x2k9q")),
                    s("k8s.namespace.name", "llm-apps"),
                    s("telemetry.sdk.language", "python"),
                    s("telemetry.sdk.name", "opentelemetry"),
                    s("telemetry.sdk.version", "1.45.2"),
                ],
                ..Default::default()
            }),
            scope_spans,
            schema_url: "https://opentelemetry.io/schemas/1.26.0".into(),
        });
    }
    ExportTraceServiceRequest { resource_spans }
}
