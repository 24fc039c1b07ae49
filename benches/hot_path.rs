//! Hot-path micro-benchmarks on realistic LLM spans (the loadgen's 4-span traces, ~20
//! attributes on the LLM span).
//!
//! Figures to keep on this project's 2-core machine (release build), measured when written:
//! - `scan_span/llm`: ≤ 0.35 µs for the 20-attribute LLM span (measured 0.28 µs); the
//!   scanner reads only ids, times, status, events, tracestate and the LLM attributes.
//! - `split_request/400_spans` (view decode of a 100-trace request): ≤ 0.03 µs per span
//!   (measured 9.0 µs per request, 0.023 µs per span), zero-copy.
//! - `reframe/400_spans` (kept spans written into a new request with their tracestate
//!   rewritten): ≤ 0.15 µs per span (measured 50 µs per request, 0.125 µs per span).

use std::sync::Arc;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use llmtail::loadgen::{self, Kind};
use llmtail::otlp::reframe::{HeldSpan, KeptSpan, Origin, encode_request};
use llmtail::otlp::scan::scan_span;
use llmtail::otlp::tracestate::Threshold;
use llmtail::otlp::view;
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
        b.iter(|| scan_span(std::hint::black_box(&llm_span)).unwrap())
    });

    g.throughput(Throughput::Elements(spans.len() as u64));
    g.bench_function("split_request/400_spans", |b| {
        b.iter(|| {
            view::ExportTraceServiceRequest::decode(std::hint::black_box(req.clone())).unwrap()
        })
    });

    let origin = Arc::new(Origin {
        resource: decoded.resource_spans[0].resource.clone(),
        resource_schema_url: decoded.resource_spans[0].schema_url.clone(),
        scope: decoded.resource_spans[0].scope_spans[0].scope.clone(),
        scope_schema_url: Bytes::new(),
        service: Arc::from("chat-api"),
    });
    let kept: Vec<KeptSpan> = spans
        .iter()
        .map(|s| KeptSpan {
            span: HeldSpan {
                origin: origin.clone(),
                bytes: s.clone(),
                trace_state: scan_span(s).unwrap().trace_state,
                is_root: false,
                extra: None,
            },
            threshold: Threshold::from_probability(0.1),
        })
        .collect();
    g.bench_function("reframe/400_spans", |b| {
        b.iter(|| encode_request(std::hint::black_box(&kept)))
    });
    g.finish();
}

criterion_group!(hot_path, benches);
criterion_main!(hot_path);
