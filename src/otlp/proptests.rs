//! Property tests: on random spans encoded by `opentelemetry-proto`, the scanner reads
//! exactly what a full prost decode reads, and re-framed output decodes into exactly the
//! kept spans (with the tracestate change).

use std::sync::Arc;

use bytes::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{
    AnyValue, ArrayValue, InstrumentationScope, KeyValue, any_value::Value,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::span::{Event, Link};
use opentelemetry_proto::tonic::trace::v1::{Span, Status};
use proptest::prelude::*;
use prost::Message;

use super::reframe::{HeldSpan, KeptSpan, Origin, encode_request};
use super::scan::{AttrValue, Attrs, Reject};
use crate::llm::Conventions;

fn scan_span(span: &[u8]) -> Result<super::scan::SpanFacts, Reject> {
    super::scan::scan_span(span, &Conventions)
}
use super::tracestate::{Threshold, with_threshold};
use crate::llm::classify;

/// Every LLM key, and some that are not.
fn keys() -> Vec<&'static str> {
    crate::llm::conventions::CONVENTIONS
        .iter()
        .map(|(k, ..)| *k)
        .chain(["http.route", "service.name", "gen_ai.usage", "llm", ""])
        .collect()
}

fn any_value() -> impl Strategy<Value = Option<AnyValue>> {
    prop_oneof![
        Just(None),
        Just(Some(AnyValue { value: None })),
        "[a-z0-9.\\-]{0,12}".prop_map(|s| Some(AnyValue {
            value: Some(Value::StringValue(s))
        })),
        any::<i64>().prop_map(|i| Some(AnyValue {
            value: Some(Value::IntValue(i))
        })),
        any::<f64>().prop_map(|d| Some(AnyValue {
            value: Some(Value::DoubleValue(d))
        })),
        any::<bool>().prop_map(|b| Some(AnyValue {
            value: Some(Value::BoolValue(b))
        })),
        Just(Some(AnyValue {
            value: Some(Value::ArrayValue(ArrayValue {
                values: vec![AnyValue {
                    value: Some(Value::IntValue(3))
                }],
            })),
        })),
    ]
}

fn key_value() -> impl Strategy<Value = KeyValue> {
    (prop::sample::select(keys()), any_value()).prop_map(|(k, v)| KeyValue {
        key: k.to_owned(),
        value: v,
        ..Default::default()
    })
}

fn id(len: usize) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        8 => prop::collection::vec(any::<u8>(), len),
        1 => prop::collection::vec(any::<u8>(), 0..20),
        1 => Just(vec![0u8; len]),
    ]
}

fn span() -> impl Strategy<Value = Span> {
    (
        (id(16), id(8), prop_oneof![Just(Vec::new()), id(8)]),
        prop_oneof![
            Just(String::new()),
            Just("ot=th:8".to_owned()),
            Just("vendor=a,ot=rv:0123456789abcd;th:c".to_owned()),
            "[a-z]{1,5}=[a-z0-9]{1,8}",
        ],
        (any::<u64>(), any::<u64>(), any::<u32>(), 0i32..6),
        prop::collection::vec(key_value(), 0..8),
        prop::collection::vec(prop_oneof![Just("exception"), Just("log"), Just("")], 0..3),
        prop::option::of(0i32..4),
        "[ -~]{0,16}",
    )
        .prop_map(
            |(
                (trace_id, span_id, parent),
                trace_state,
                (start, end, flags, kind),
                attributes,
                events,
                status,
                name,
            )| Span {
                trace_id,
                span_id,
                parent_span_id: parent,
                trace_state,
                flags,
                name,
                kind,
                start_time_unix_nano: start,
                end_time_unix_nano: end,
                attributes,
                dropped_attributes_count: 1,
                events: events
                    .into_iter()
                    .map(|n| Event {
                        name: n.to_owned(),
                        time_unix_nano: 5,
                        ..Default::default()
                    })
                    .collect(),
                links: vec![Link {
                    trace_id: vec![1; 16],
                    span_id: vec![2; 8],
                    ..Default::default()
                }],
                status: status.map(|code| Status {
                    code,
                    message: "m".into(),
                }),
                ..Default::default()
            },
        )
}

/// What the scanner must find, computed from the fully decoded span.
fn expected_llm(span: &Span) -> Vec<Option<String>> {
    let mut best: Vec<Option<(u8, String)>> = vec![None; crate::llm::LlmField::COUNT];
    for kv in &span.attributes {
        let Some((field, prec)) = classify(kv.key.as_bytes()) else {
            continue;
        };
        let rendered = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
            Some(Value::StringValue(s)) => format!("s:{s}"),
            Some(Value::IntValue(i)) => format!("i:{i}"),
            Some(Value::DoubleValue(d)) => format!("d:{}", d.to_bits()),
            Some(Value::BoolValue(b)) => format!("b:{b}"),
            _ => continue,
        };
        let slot = &mut best[field as usize];
        if slot.as_ref().is_none_or(|(p, _)| prec < *p) {
            *slot = Some((prec, rendered));
        }
    }
    best.into_iter().map(|s| s.map(|(_, v)| v)).collect()
}

fn rendered_llm(attrs: &Attrs, bytes: &[u8]) -> Vec<Option<String>> {
    crate::llm::LlmField::ALL
        .into_iter()
        .map(|f| {
            attrs.get(f as usize).map(|v| match v {
                AttrValue::Str(r) => format!(
                    "s:{}",
                    String::from_utf8_lossy(super::scan::str_at(bytes, r))
                ),
                AttrValue::Int(i) => format!("i:{i}"),
                AttrValue::Double(d) => format!("d:{}", d.to_bits()),
                AttrValue::Bool(b) => format!("b:{b}"),
            })
        })
        .collect()
}

fn origin(n: u8) -> Arc<Origin> {
    let resource = Resource {
        attributes: vec![KeyValue {
            key: "service.name".into(),
            value: Some(AnyValue {
                value: Some(Value::StringValue(format!("svc-{n}"))),
            }),
            ..Default::default()
        }],
        ..Default::default()
    };
    let scope = InstrumentationScope {
        name: format!("scope-{n}"),
        ..Default::default()
    };
    Arc::new(Origin {
        data: Bytes::new(),
        resource: Bytes::from(resource.encode_to_vec()),
        resource_schema_url: Bytes::from(if n.is_multiple_of(2) {
            ""
        } else {
            "https://schema/1"
        }),
        scope: Bytes::from(scope.encode_to_vec()),
        scope_schema_url: Bytes::new(),
        service: Arc::from(format!("svc-{n}")),
        pin: None,
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn scanner_reads_what_prost_reads(span in span()) {
        let bytes = span.encode_to_vec();
        let decoded = Span::decode(&bytes[..]).unwrap();
        let valid_trace = decoded.trace_id.len() == 16 && decoded.trace_id != [0; 16];
        let valid_span = decoded.span_id.len() == 8 && decoded.span_id != [0; 8];
        match scan_span(&bytes) {
            Err(Reject::InvalidTraceId) => prop_assert!(!valid_trace),
            Err(Reject::InvalidSpanId) => prop_assert!(valid_trace && !valid_span),
            Err(e) => prop_assert!(false, "prost-encoded span must scan: {e}"),
            Ok(facts) => {
                let largest = decoded.attributes.iter().map(|kv| kv.encoded_len()).max().unwrap_or(0);
                prop_assert_eq!(facts.largest_attribute as usize, largest);
                prop_assert!(valid_trace && valid_span);
                prop_assert_eq!(&facts.trace_id.0[..], &decoded.trace_id[..]);
                prop_assert_eq!(&facts.span_id[..], &decoded.span_id[..]);
                prop_assert_eq!(facts.is_root, decoded.parent_span_id.iter().all(|b| *b == 0));
                prop_assert_eq!(facts.start_ns, decoded.start_time_unix_nano);
                prop_assert_eq!(facts.end_ns, decoded.end_time_unix_nano);
                prop_assert_eq!(facts.status_error, decoded.status.as_ref().is_some_and(|s| s.code == 2));
                prop_assert_eq!(facts.has_exception_event, decoded.events.iter().any(|e| e.name == "exception"));
                prop_assert_eq!(facts.trace_state(&bytes), decoded.trace_state.as_bytes());
                prop_assert_eq!(rendered_llm(&facts.attrs, &bytes), expected_llm(&decoded));
            }
        }
    }

    #[test]
    fn every_encoded_span_with_well_sized_ids_validates(span in span()) {
        let sized = |id: &[u8], n: usize| id.is_empty() || id.len() == n;
        let ids_ok = sized(&span.trace_id, 16)
            && sized(&span.span_id, 8)
            && sized(&span.parent_span_id, 8)
            && span.links.iter().all(|l| sized(&l.trace_id, 16) && sized(&l.span_id, 8));
        prop_assert_eq!(super::validate::span(&span.encode_to_vec()).is_ok(), ids_ok);
    }

    /// What validation passes, the reference decoder decodes: a span with random bytes
    /// overwritten or inserted either fails validation or decodes with prost.
    #[test]
    fn what_validates_decodes(
        span in span(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), any::<bool>()), 1..4),
    ) {
        let mut bytes = span.encode_to_vec();
        for (at, byte, insert) in edits {
            let i = at.index(bytes.len() + 1);
            if insert || i == bytes.len() {
                bytes.insert(i, byte);
            } else {
                bytes[i] = byte;
            }
        }
        if super::validate::span(&bytes).is_ok() {
            prop_assert!(Span::decode(&bytes[..]).is_ok(), "{:?} {:02x?}", Span::decode(&bytes[..]), bytes);
        }
    }

    /// OTLP/JSON written by opentelemetry-proto's serde support (camelCase, hex ids)
    /// transcodes to exactly the request it came from.
    #[test]
    fn json_transcodes_to_the_request_it_describes(spans in prop::collection::vec(span(), 1..5)) {
        let sized = |id: &mut Vec<u8>, n: usize| if !id.is_empty() && id.len() != n { id.resize(n, 7) };
        let spans: Vec<Span> = spans
            .into_iter()
            .map(|mut s| {
                sized(&mut s.trace_id, 16);
                sized(&mut s.span_id, 8);
                sized(&mut s.parent_span_id, 8);
                // JSON has no NaN or infinity as numbers.
                s.attributes.retain(|kv| !matches!(
                    kv.value.as_ref().and_then(|v| v.value.as_ref()),
                    Some(Value::DoubleValue(d)) if !d.is_finite()
                ));
                s
            })
            .collect();
        let request = ExportTraceServiceRequest {
            resource_spans: vec![opentelemetry_proto::tonic::trace::v1::ResourceSpans {
                resource: Some(Resource { attributes: vec![], ..Default::default() }),
                scope_spans: vec![opentelemetry_proto::tonic::trace::v1::ScopeSpans {
                    scope: Some(InstrumentationScope { name: "s".into(), ..Default::default() }),
                    spans,
                    schema_url: "https://schema".into(),
                }],
                schema_url: String::new(),
            }],
        };
        let json = serde_json::to_vec(&request).unwrap();
        let converted = super::json::to_protobuf(&json)
            .map_err(|e| TestCaseError::fail(format!("{e}: {}", String::from_utf8_lossy(&json))))?;
        let back = ExportTraceServiceRequest::decode(&converted[..]).unwrap();
        prop_assert_eq!(back, request);
    }

    /// Whatever JSON transcodes is a request the pipeline can walk and prost can decode.
    #[test]
    fn transcoded_json_always_decodes(
        spans in prop::collection::vec(span(), 1..3),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let request = ExportTraceServiceRequest {
            resource_spans: vec![opentelemetry_proto::tonic::trace::v1::ResourceSpans {
                scope_spans: vec![opentelemetry_proto::tonic::trace::v1::ScopeSpans {
                    spans,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        let Ok(mut json) = serde_json::to_vec(&request) else { return Ok(()) };
        for (at, byte) in edits {
            let i = at.index(json.len());
            json[i] = byte;
        }
        if let Ok(converted) = super::json::to_protobuf(&json) {
            prop_assert!(super::request::check(&converted).is_ok());
            prop_assert!(ExportTraceServiceRequest::decode(&converted[..]).is_ok());
        }
    }

    #[test]
    fn scanner_never_panics_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = scan_span(&bytes);
    }

    #[test]
    fn reframed_output_decodes_into_exactly_the_kept_spans(
        spans in prop::collection::vec((span(), 0u8..3, any::<bool>(), 0.0f64..=1.0), 1..12),
    ) {
        let origins: Vec<Arc<Origin>> = (0..3).map(origin).collect();
        let mut kept = Vec::new();
        let mut expected: Vec<(u8, Span)> = Vec::new();
        for (mut span, o, keep, p) in spans {
            span.trace_id = vec![7; 16];
            span.span_id = vec![9; 8];
            let bytes = Bytes::from(span.encode_to_vec());
            let facts = scan_span(&bytes).unwrap();
            if !keep {
                continue;
            }
            let threshold = Threshold::from_probability(p);
            let r = crate::otlp::TraceId([7; 16]).randomness();
            span.trace_state = String::from_utf8(with_threshold(span.trace_state.as_bytes(), threshold, || r)).unwrap();
            expected.push((o, span));
            // Not a slice of its origin's buffer: each span gets an origin of its own,
            // with the same resource and scope, and is still grouped under them.
            kept.push(KeptSpan::new(HeldSpan::new(origins[o as usize].clone(), &bytes, facts.trace_state, false), threshold));
        }
        let out = ExportTraceServiceRequest::decode(encode_request(&kept)).unwrap();
        let mut got: Vec<(u8, Span)> = Vec::new();
        for rs in out.resource_spans {
            let resource = rs.resource.unwrap_or_default();
            let o = origins.iter().position(|o| o.resource == resource.encode_to_vec()).unwrap() as u8;
            prop_assert_eq!(rs.schema_url.as_bytes(), &origins[o as usize].resource_schema_url[..]);
            prop_assert_eq!(rs.scope_spans.len(), 1);
            for ss in rs.scope_spans {
                prop_assert_eq!(ss.scope.unwrap_or_default().encode_to_vec(), origins[o as usize].scope.to_vec());
                got.extend(ss.spans.into_iter().map(|s| (o, s)));
            }
        }
        // Within one origin the order is kept; across origins spans are grouped.
        expected.sort_by_key(|(o, _)| *o);
        got.sort_by_key(|(o, _)| *o);
        prop_assert_eq!(got, expected);
    }
}
