//! What the fuzz targets (`fuzz/fuzz_targets/`) run, kept in the library so the corpus
//! replay test (`tests/fuzz_corpus.rs`) runs exactly the same checks on stable Rust.
//! Each function takes arbitrary bytes; it must not panic except on a broken invariant,
//! which is what the fuzzer looks for.

use std::sync::Arc;

use bytes::Bytes;
use prost::Message;

use llmtail::config::Config;
use llmtail::llm::{Conventions, LlmField};
use llmtail::otlp::reframe::{HeldSpan, KeptSpan, Origin, encode_request};
use llmtail::otlp::scan::{self, AttrValue};
use llmtail::otlp::tracestate::Threshold;
use llmtail::otlp::{json, view};

/// The span scanner: every range it returns lies inside the span, and it agrees with a
/// full protobuf decode on what both read.
pub fn scan_span(data: &[u8]) {
    // What validation passes, the reference decoder decodes (so an upstream does too).
    if llmtail::otlp::validate::span(data).is_ok() {
        opentelemetry_proto::tonic::trace::v1::Span::decode(data)
            .expect("a span that validates decodes");
    }
    let Ok(facts) = scan::scan_span(data, &Conventions) else {
        return;
    };
    let trace_state = facts.trace_state(data);
    for field in LlmField::ALL {
        if let Some(AttrValue::Str(range)) = facts.attrs.get(field as usize) {
            let _ = scan::str_at(data, range);
        }
    }
    assert!(facts.largest_attribute as usize <= data.len());
    if let Ok(span) = opentelemetry_proto::tonic::trace::v1::Span::decode(data) {
        assert_eq!(&facts.trace_id.0[..], &span.trace_id[..]);
        assert_eq!(&facts.span_id[..], &span.span_id[..]);
        assert_eq!(trace_state, span.trace_state.as_bytes());
        assert_eq!(facts.start_ns, span.start_time_unix_nano);
        assert_eq!(facts.end_ns, span.end_time_unix_nano);
    }
}

/// Splitting a request into spans and re-framing the kept ones: the output is a request
/// that splits into exactly the spans kept, each carrying the threshold it was kept with,
/// and it decodes wherever the input did.
pub fn split_and_reframe(data: &[u8]) {
    let data = Bytes::copy_from_slice(data);
    let Ok(request) = view::ExportTraceServiceRequest::decode(data.clone()) else {
        return;
    };
    let threshold = Threshold::from_probability(0.25);
    let mut kept = Vec::new();
    for rs in request.resource_spans {
        for ss in rs.scope_spans {
            let origin = Arc::new(Origin {
                data: data.clone(),
                resource: rs.resource.clone(),
                resource_schema_url: rs.schema_url.clone(),
                scope: ss.scope,
                scope_schema_url: ss.schema_url,
                service: Arc::from("fuzz"),
                pin: None,
            });
            for span in ss.spans {
                let Ok(facts) = scan::scan_span(&span, &Conventions) else {
                    continue;
                };
                kept.push(KeptSpan::new(
                    HeldSpan::new(origin.clone(), &span, facts.trace_state, facts.is_root),
                    threshold,
                ));
            }
        }
    }
    let out = encode_request(&kept);
    let again = view::ExportTraceServiceRequest::decode(out.clone())
        .expect("a re-framed request splits again");
    let spans: Vec<Bytes> = again
        .resource_spans
        .into_iter()
        .flat_map(|rs| rs.scope_spans)
        .flat_map(|ss| ss.spans)
        .collect();
    assert_eq!(spans.len(), kept.len());
    for (span, k) in spans.iter().zip(&kept) {
        let facts = scan::scan_span(span, &Conventions).expect("a re-framed span scans");
        let original = scan::scan_span(k.span.bytes(), &Conventions).expect("scanned before");
        assert_eq!(facts.trace_id, original.trace_id);
        let ts = String::from_utf8_lossy(facts.trace_state(span)).into_owned();
        assert!(ts.contains("ot=th:"), "threshold written: {ts:?}");
    }
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest as Full;
    if Full::decode(data).is_ok() {
        Full::decode(&out[..]).expect("re-framed output of a decodable request decodes");
    }
}

/// OTLP/JSON: whatever converts to protobuf must be a request the pipeline can split.
pub fn otlp_json(data: &[u8]) {
    if let Ok(protobuf) = json::to_protobuf(data) {
        view::ExportTraceServiceRequest::decode(Bytes::from(protobuf.clone()))
            .expect("converted JSON is a valid request");
        llmtail::otlp::request::check(&protobuf).expect("converted JSON has valid framing");
        split_and_reframe(&protobuf);
    }
}

/// Config parsing and validation never panic, whatever the text.
pub fn config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Config::parse(text);
    }
}

/// A fuzz target's check.
pub type Target = fn(&[u8]);

/// The targets by name, as the fuzz directory and the replay test call them.
pub const TARGETS: &[(&str, Target)] = &[
    ("scan_span", scan_span),
    ("split_reframe", split_and_reframe),
    ("otlp_json", otlp_json),
    ("config", config),
];
