//! Hot-path micro-benchmarks: `hot_path/*` on the loadgen's 4-span traces (~20 attributes
//! on the LLM span), `mix/*` on the production-shaped mix `llmtail-bench` sends.
//!
//! Figures to keep on this project's 2-core machine (release build), measured when written:
//! - `scan_span/llm`: ≤ 0.45 µs for the 27-attribute LLM span (measured 0.37 µs); the
//!   scanner reads only ids, times, status, events, tracestate and the LLM attributes.
//! - `split_request/400_spans` (view decode of a 100-trace request): ≤ 0.03 µs per span
//!   (measured 9.3 µs per request, 0.023 µs per span), zero-copy.
//! - `reframe/400_spans` (kept spans written into a new request with their tracestate
//!   rewritten): ≤ 0.04 µs per span (measured 12.5 µs per request, 0.031 µs per span).
//! - `buffer_add_and_decide/400_spans` (hold 100 traces, then decide them): ≤ 0.12 µs per
//!   span (measured 41 µs, 0.10 µs per span).
//! - `observe_llm_call` (metrics, bounded labels, anomaly baseline): ≤ 0.4 µs per LLM call
//!   (measured 0.32 µs).
//! - `validate_span/llm` (schema check of what is forwarded: UTF-8, wire types, nesting):
//!   ≤ 0.4 µs for the 27-attribute LLM span (measured 0.35 µs; 0.66 µs with a table lookup
//!   per field and std's UTF-8 check, before attributes got their own path);
//!   `validate_span/llm_with_5kb_prompt` ≤ 0.8 µs (measured 0.72 µs; 2.37 µs with std's
//!   UTF-8 check).
//! - `walk_request/400_spans` (framing check and walk of a request, as ingest does it):
//!   ≤ 0.04 µs per span (measured 13.1 µs per request, 0.033 µs per span; the prost view
//!   decode it replaced, 10.3 µs, allocated per message).

use std::sync::Arc;

use bytes::Bytes;
use std::time::{Duration, Instant};

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use llmtail::buffer::SpanStats;
use llmtail::buffer::{BufferLimits, TraceBuffer};
use llmtail::config::Config;
use llmtail::llm::observer::LlmObserver;
use llmtail::llm::{Conventions, Pricing};
use llmtail::otlp::reframe::{HeldSpan, KeptSpan, Origin, encode_request};
use llmtail::otlp::scan::scan_span;
use llmtail::otlp::tracestate::Threshold;
use llmtail::otlp::view;
use llmtail::sampling::Sampler;
use llmtail::sampling::adaptive::BaseRate;
use llmtail::telemetry::Metrics;
use llmtail_tools::loadgen::{self, Kind};
use prost::Message;
use rand::SeedableRng;
use rand::rngs::StdRng;

fn request(traces: usize) -> Bytes {
    let mut rng = StdRng::seed_from_u64(42);
    let spans = (0..traces)
        .flat_map(|i| loadgen::trace(&mut rng, Kind::Normal, loadgen::convention_for(i), 1).spans)
        .collect();
    Bytes::from(loadgen::request(spans).encode_to_vec())
}

fn benches(c: &mut Criterion) {
    let req = request(100);
    let decoded = view::ExportTraceServiceRequest::decode(req.clone()).unwrap();
    let spans: Vec<Bytes> = decoded.resource_spans[0].scope_spans[0].spans.clone();
    let llm_span = spans[1].clone();

    let mut g = c.benchmark_group("hot_path");
    g.throughput(Throughput::Elements(1));
    g.bench_function("scan_span/llm", |b| {
        b.iter(|| scan_span(std::hint::black_box(&llm_span), &Conventions).unwrap())
    });

    // Validation of what is forwarded (UTF-8, wire types, nesting), per span at ingest.
    g.bench_function("validate_span/llm", |b| {
        b.iter(|| llmtail::otlp::validate::span(std::hint::black_box(&llm_span)).unwrap())
    });
    let with_prompt = {
        let mut s = opentelemetry_proto::tonic::trace::v1::Span::decode(llm_span.clone()).unwrap();
        let prompt: String =
            "You are a helpful assistant. Résumé the user's question — ".repeat(90);
        s.attributes
            .push(opentelemetry_proto::tonic::common::v1::KeyValue {
                key: "gen_ai.input.messages".into(),
                value: Some(opentelemetry_proto::tonic::common::v1::AnyValue {
                    value: Some(
                        opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(
                            prompt,
                        ),
                    ),
                }),
                ..Default::default()
            });
        Bytes::from(s.encode_to_vec())
    };
    g.bench_function("validate_span/llm_with_5kb_prompt", |b| {
        b.iter(|| llmtail::otlp::validate::span(std::hint::black_box(&with_prompt)).unwrap())
    });
    g.bench_function("scan_span/llm_with_5kb_prompt", |b| {
        b.iter(|| scan_span(std::hint::black_box(&with_prompt), &Conventions).unwrap())
    });

    g.throughput(Throughput::Elements(spans.len() as u64));
    // What ingest does now: the request's framing checked, then walked without decoding.
    g.bench_function("walk_request/400_spans", |b| {
        b.iter(|| {
            let req = std::hint::black_box(&req);
            llmtail::otlp::request::check(req).unwrap();
            llmtail::otlp::request::resource_spans(req)
                .map(|rs| rs.scope_spans().map(|ss| ss.spans().count()).sum::<usize>())
                .sum::<usize>()
        })
    });
    g.bench_function("split_request/400_spans", |b| {
        b.iter(|| {
            view::ExportTraceServiceRequest::decode(std::hint::black_box(req.clone())).unwrap()
        })
    });

    let origin = Arc::new(Origin {
        data: req.clone(),
        resource: decoded.resource_spans[0].resource.clone(),
        resource_schema_url: decoded.resource_spans[0].schema_url.clone(),
        scope: decoded.resource_spans[0].scope_spans[0].scope.clone(),
        scope_schema_url: Bytes::new(),
        service: Arc::from("chat-api"),
        pin: None,
    });
    let kept: Vec<KeptSpan> = spans
        .iter()
        .map(|s| {
            KeptSpan::new(
                HeldSpan::new(
                    origin.clone(),
                    s,
                    scan_span(s, &Conventions).unwrap().trace_state,
                    false,
                ),
                Threshold::from_probability(0.1),
            )
        })
        .collect();
    g.bench_function("reframe/400_spans", |b| {
        b.iter(|| encode_request(std::hint::black_box(&kept)))
    });

    // Buffer: hold 400 spans (100 traces), then decide them all.
    let cfg = Config::parse("exporter:\n  file: {path: x}\nsampling:\n  base_rate: 0.1\n").unwrap();
    let facts: Vec<_> = spans
        .iter()
        .map(|s| scan_span(s, &Conventions).unwrap())
        .collect();
    let held: Vec<HeldSpan> = kept.iter().map(|k| k.span.clone()).collect();
    let observer = Arc::new(LlmObserver::new(
        &cfg.llm,
        Metrics::new(),
        None,
        Arc::new(BaseRate::new(0.1)),
        Arc::new(llmtail::llm::Pricing::new(&cfg.llm.pricing)),
    ));
    g.bench_function("buffer_add_and_decide/400_spans", |b| {
        b.iter_batched(
            || {
                TraceBuffer::new(
                    BufferLimits {
                        idle_timeout: Duration::from_secs(10),
                        max_trace_duration: Duration::from_secs(1800),
                        regret_window: Duration::ZERO,
                        max_regret_traces: 0,
                        root_grace: Duration::from_secs(1),
                        max_traces: 100_000,
                        decision_cache_size: 100_000,
                        max_spans_per_trace: 10_000,
                    },
                    Sampler::new(&cfg.sampling, Arc::new(BaseRate::new(0.1))),
                    llmtail::pipeline::Budget::new(),
                    observer.clone(),
                )
            },
            |buffer| {
                let now = Instant::now();
                let mut evicted = Vec::new();
                for (f, h) in facts.iter().zip(&held) {
                    let summary = SpanStats {
                        trace_id: f.trace_id,
                        is_root: f.is_root,
                        start_ns: f.start_ns,
                        end_ns: f.end_ns,
                        ..Default::default()
                    };
                    buffer.add(summary, h.clone(), now, &mut evicted);
                }
                let mut out = Vec::new();
                buffer.decide_due(now + Duration::from_secs(11), &mut out);
                out
            },
            BatchSize::SmallInput,
        )
    });

    // LLM metrics: one call observed (labels bounded, handles cached, anomaly baseline).
    let call = llmtail::llm::call_from_span(
        &llm_span,
        &scan_span(&llm_span, &Conventions).unwrap(),
        &llmtail::llm::SpanOrigin {
            scope: &Arc::from("opentelemetry.instrumentation.openai.v1"),
            service: &Arc::from("chat-api"),
        },
        &Pricing::default(),
        &mut llmtail::llm::Strings::default(),
    )
    .unwrap()
    .call;
    let service: Arc<str> = Arc::from("chat-api");
    g.throughput(Throughput::Elements(1));
    g.bench_function("observe_llm_call", |b| {
        b.iter(|| observer.observe(&service, std::hint::black_box(&call), Instant::now()))
    });
    g.finish();
}

/// The production-shaped mix (`llmtail_tools::mix`: 20 services, 30 models, Zipf users of
/// 10,000 and sessions of 100,000, agent traces, prompt-carrying spans) in a 512-span
/// request: what ingest does per span, and holding and deciding its traces with LLM
/// accounting and spend per user (the top-K labels) on.
fn mix(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(7);
    let mix = llmtail_tools::mix::Mix::default();
    // Several requests, so users and sessions churn as they do in production.
    let requests: Vec<Bytes> = (0..16)
        .map(|_| Bytes::from(mix.request(&mut rng, 512, 1).0.encode_to_vec()))
        .collect();
    let spans_in = |req: &Bytes| {
        let mut out = Vec::new();
        for rs in llmtail::otlp::request::resource_spans(req) {
            for ss in rs.scope_spans() {
                let scope: Arc<str> = Arc::from(
                    String::from_utf8_lossy(
                        llmtail::otlp::scan::scope_name(&ss.scope)
                            .unwrap()
                            .unwrap_or_default(),
                    )
                    .as_ref(),
                );
                for span in ss.spans() {
                    out.push((scope.clone(), span));
                }
            }
        }
        out
    };
    let n: usize = requests.iter().map(|r| spans_in(r).len()).sum();
    let mut g = c.benchmark_group("mix");
    g.throughput(Throughput::Elements(n as u64));
    let pricing = Pricing::default();
    let service: Arc<str> = Arc::from("svc-01");
    let read = |req: &Bytes| {
        let mut strings = llmtail::llm::Strings::default();
        let mut out = Vec::new();
        for (scope, span) in spans_in(req) {
            llmtail::otlp::validate::span(&span).unwrap();
            let facts = scan_span(&span, &Conventions).unwrap();
            let call = llmtail::llm::call_from_span(
                &span,
                &facts,
                &llmtail::llm::SpanOrigin {
                    scope: &scope,
                    service: &service,
                },
                &pricing,
                &mut strings,
            );
            let user =
                llmtail::llm::text(&span, &facts, llmtail::llm::LlmField::UserId, &mut strings);
            out.push((facts, call, user, span));
        }
        out
    };
    g.bench_function("ingest_read/512_span_requests", |b| {
        b.iter(|| {
            requests
                .iter()
                .map(|r| read(std::hint::black_box(r)).len())
                .sum::<usize>()
        })
    });
    let cfg = Config::parse("exporter:\n  file: {path: x}\nsampling:\n  base_rate: 0.1\n").unwrap();
    let observer = Arc::new(LlmObserver::new(
        &cfg.llm,
        Metrics::new(),
        None,
        Arc::new(BaseRate::new(0.1)),
        Arc::new(llmtail::llm::Pricing::new(&cfg.llm.pricing)),
    ));
    // One origin per request, its buffer the request's, as ingest makes them.
    let origins: Vec<Arc<Origin>> = requests
        .iter()
        .map(|r| {
            Arc::new(Origin {
                data: r.clone(),
                resource: Bytes::new(),
                resource_schema_url: Bytes::new(),
                scope: Bytes::new(),
                scope_schema_url: Bytes::new(),
                service: service.clone(),
                pin: None,
            })
        })
        .collect();
    let read_all: Vec<_> = requests
        .iter()
        .zip(&origins)
        .flat_map(|(r, o)| read(r).into_iter().map(move |x| (o.clone(), x)))
        .collect();
    g.bench_function("hold_decide_account/512_span_requests", |b| {
        b.iter_batched(
            || {
                let buffer = TraceBuffer::new(
                    BufferLimits {
                        idle_timeout: Duration::from_secs(10),
                        max_trace_duration: Duration::from_secs(1800),
                        regret_window: Duration::ZERO,
                        max_regret_traces: 0,
                        root_grace: Duration::from_secs(1),
                        max_traces: 100_000,
                        decision_cache_size: 100_000,
                        max_spans_per_trace: 10_000,
                    },
                    Sampler::new(&cfg.sampling, Arc::new(BaseRate::new(0.1))),
                    llmtail::pipeline::Budget::new(),
                    observer.clone(),
                );
                (buffer, read_all.clone())
            },
            |(buffer, spans)| {
                let now = Instant::now();
                let mut evicted = Vec::new();
                for (origin, (f, call, user, bytes)) in spans {
                    let stats = SpanStats {
                        trace_id: f.trace_id,
                        is_root: f.is_root,
                        start_ns: f.start_ns,
                        end_ns: f.end_ns,
                        error: f.is_error(),
                        call: call.map(Box::new),
                        user,
                        ..Default::default()
                    };
                    let held = HeldSpan::new(origin, &bytes, f.trace_state, f.is_root);
                    buffer.add(stats, held, now, &mut evicted);
                }
                let mut out = Vec::new();
                buffer.decide_due(now + Duration::from_secs(11), &mut out);
                for t in &out {
                    observer.record_spend(&t.summary, now);
                }
                out
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(hot_path, benches, mix);
criterion_main!(hot_path);
