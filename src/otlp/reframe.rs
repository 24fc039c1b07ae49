//! Re-framing: kept spans, still as their original wire bytes, are written into a new
//! `ExportTraceServiceRequest`. Only the `trace_state` field of each span is replaced; every
//! other byte of the span, its resource and its scope is copied verbatim.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

use super::scan::TraceStateField;
use super::tracestate::{Threshold, with_threshold};
use super::wire::{put_len_field, put_varint};

const REQUEST_RESOURCE_SPANS: u32 = 1;
const RESOURCE_SPANS_RESOURCE: u32 = 1;
const RESOURCE_SPANS_SCOPE_SPANS: u32 = 2;
const RESOURCE_SPANS_SCHEMA_URL: u32 = 3;
const SCOPE_SPANS_SCOPE: u32 = 1;
const SCOPE_SPANS_SPANS: u32 = 2;
const SCOPE_SPANS_SCHEMA_URL: u32 = 3;
const SPAN_TRACE_STATE: u32 = 3;

/// The resource and instrumentation scope a span arrived with, shared (not copied) by every
/// span of one `ScopeSpans`; the bytes are slices of the original request.
#[derive(Debug)]
pub struct Origin {
    /// The buffer its spans' bytes are in: the request (the trace log's copy of it, with a
    /// log) or, for spans copied or rewritten apart from their request, their copies.
    pub data: Bytes,
    pub resource: Bytes,
    pub resource_schema_url: Bytes,
    pub scope: Bytes,
    pub scope_schema_url: Bytes,
    /// `service.name` of the resource, for LLM metric labels.
    pub service: Arc<str>,
    /// The trace log's record the request was written to: keeps its segment while any
    /// span of it is held, queued or in flight (none without a log). With one, the
    /// origin's and its spans' bytes are slices of the mapped segment, not of the heap.
    pub pin: Option<crate::storage::LogPin>,
}

impl Origin {
    /// The same resource and scope, its spans' bytes in `data`.
    pub fn with_data(&self, data: Bytes) -> Arc<Origin> {
        Arc::new(Origin {
            data,
            resource: self.resource.clone(),
            resource_schema_url: self.resource_schema_url.clone(),
            scope: self.scope.clone(),
            scope_schema_url: self.scope_schema_url.clone(),
            service: self.service.clone(),
            pin: self.pin.clone(),
        })
    }

    /// What spans exported together are grouped by: the same resource and scope (the
    /// same bytes, not equal ones) share one `ResourceSpans`/`ScopeSpans`.
    fn group_key(&self) -> [(usize, usize); 4] {
        let at = |b: &Bytes| (b.as_ptr() as usize, b.len());
        [
            at(&self.resource),
            at(&self.resource_schema_url),
            at(&self.scope),
            at(&self.scope_schema_url),
        ]
    }
}

/// A span held for a decision: where its bytes are in its origin's buffer, and where its
/// tracestate sits. 32 bytes: a million held spans cost 32 MB beside their bytes (which,
/// with the trace log, are the page cache's).
#[derive(Debug, Clone)]
pub struct HeldSpan {
    pub origin: Arc<Origin>,
    at: u32,
    len: u32,
    pub trace_state: Option<TraceStateField>,
    /// The trace's root (empty parent span id): where roll-ups go.
    pub is_root: bool,
}

impl HeldSpan {
    /// A span of `origin`: `span` is a slice of `origin.data` (a span that is not is given
    /// an origin of its own, with the same resource and scope).
    pub fn new(
        origin: Arc<Origin>,
        span: &Bytes,
        trace_state: Option<TraceStateField>,
        is_root: bool,
    ) -> HeldSpan {
        let at = (span.as_ptr() as usize).wrapping_sub(origin.data.as_ptr() as usize);
        let inside = at
            .checked_add(span.len())
            .is_some_and(|end| end <= origin.data.len() && end <= u32::MAX as usize);
        let (origin, at) = if inside {
            (origin, at)
        } else {
            (origin.with_data(span.clone()), 0)
        };
        HeldSpan {
            origin,
            at: at as u32,
            len: span.len() as u32,
            trace_state,
            is_root,
        }
    }

    /// The span as it arrived.
    pub fn bytes(&self) -> &[u8] {
        &self.origin.data[self.at as usize..][..self.len as usize]
    }

    /// The span as it arrived, sharing its origin's buffer.
    pub fn shared_bytes(&self) -> Bytes {
        let at = self.at as usize;
        self.origin.data.slice(at..at + self.len as usize)
    }

    pub fn len(&self) -> usize {
        self.len as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The same span with other bytes (rewritten or copied), in an origin of their own.
    pub fn with_bytes(&self, bytes: Bytes, trace_state: Option<TraceStateField>) -> HeldSpan {
        HeldSpan {
            origin: self.origin.with_data(bytes.clone()),
            at: 0,
            len: bytes.len() as u32,
            trace_state,
            is_root: self.is_root,
        }
    }

    /// A span under an empty resource and scope of service `svc`, its origin's buffer its
    /// bytes alone (unit tests).
    #[cfg(test)]
    pub fn lone(bytes: Bytes, pin: Option<crate::storage::LogPin>, is_root: bool) -> HeldSpan {
        let origin = Arc::new(Origin {
            data: bytes.clone(),
            resource: Bytes::new(),
            resource_schema_url: Bytes::new(),
            scope: Bytes::new(),
            scope_schema_url: Bytes::new(),
            service: Arc::from("svc"),
            pin,
        });
        HeldSpan::new(origin, &bytes, None, is_root)
    }

    fn trace_state_value(&self) -> &[u8] {
        self.trace_state
            .as_ref()
            .map_or(&[][..], |ts| &self.bytes()[ts.value()])
    }
}

/// A kept span and the threshold of its trace's decision.
#[derive(Debug, Clone)]
pub struct KeptSpan {
    pub span: HeldSpan,
    pub threshold: Threshold,
    /// Encoded fields appended to the span on export (the root's roll-up attributes and
    /// sampling reason; boxed to keep every other span small).
    pub extra: Option<Box<Bytes>>,
}

impl KeptSpan {
    pub fn new(span: HeldSpan, threshold: Threshold) -> KeptSpan {
        KeptSpan {
            span,
            threshold,
            extra: None,
        }
    }
}

fn len_field_size(field: u32, len: usize) -> usize {
    varint_size(u64::from(field) << 3) + varint_size(len as u64) + len
}

fn varint_size(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

/// One span as it will be written: the bytes around its old tracestate field, and the new
/// tracestate value.
struct SpanPlan<'a> {
    before: &'a [u8],
    after: &'a [u8],
    trace_state: Cow<'a, [u8]>,
    extra: &'a [u8],
}

impl SpanPlan<'_> {
    fn len(&self) -> usize {
        let ts = if self.trace_state.is_empty() {
            0
        } else {
            len_field_size(SPAN_TRACE_STATE, self.trace_state.len())
        };
        self.before.len() + ts + self.after.len() + self.extra.len()
    }

    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.before);
        if !self.trace_state.is_empty() {
            put_len_field(out, SPAN_TRACE_STATE, &self.trace_state);
        }
        out.extend_from_slice(self.after);
        out.extend_from_slice(self.extra);
    }
}

/// The tracestate each threshold gives a span that arrived without one (most spans): worked
/// out once per batch instead of once per span.
struct FreshTraceStates(Vec<(Threshold, Vec<u8>)>);

impl FreshTraceStates {
    fn new(spans: &[KeptSpan]) -> Self {
        let mut fresh: Vec<(Threshold, Vec<u8>)> = Vec::new();
        for k in spans {
            if k.span.trace_state.is_none() && !fresh.iter().any(|(t, _)| *t == k.threshold) {
                fresh.push((k.threshold, with_threshold(&[], k.threshold, || 0)));
            }
        }
        FreshTraceStates(fresh)
    }

    fn get(&self, t: Threshold) -> Option<&[u8]> {
        self.0.iter().find(|(x, _)| *x == t).map(|(_, ts)| &ts[..])
    }
}

fn plan<'a>(kept: &'a KeptSpan, fresh: &'a FreshTraceStates) -> SpanPlan<'a> {
    let bytes = kept.span.bytes();
    let trace_state = match (&kept.span.trace_state, fresh.get(kept.threshold)) {
        (None, Some(ts)) => Cow::Borrowed(ts),
        _ => Cow::Owned(with_threshold(
            kept.span.trace_state_value(),
            kept.threshold,
            // Read only when the span carries a threshold already (head sampling).
            || super::scan::trace_id(bytes).map_or(0, |id| id.randomness()),
        )),
    };
    let extra = kept.extra.as_deref().map_or(&[][..], |b| &b[..]);
    match &kept.span.trace_state {
        Some(ts) => SpanPlan {
            before: &bytes[..ts.field().start],
            after: &bytes[ts.field().end..],
            trace_state,
            extra,
        },
        None => SpanPlan {
            before: bytes,
            after: &[],
            trace_state,
            extra,
        },
    }
}

/// Writes `spans` as one encoded `ExportTraceServiceRequest`, grouping spans that share an
/// [`Origin`] under one `ResourceSpans`/`ScopeSpans`; each span's tracestate carries its
/// threshold.
pub fn encode_request(spans: &[KeptSpan]) -> Bytes {
    let fresh = FreshTraceStates::new(spans);
    encode_plans(spans.iter().map(|k| (&k.span.origin, plan(k, &fresh))))
}

/// Writes held spans exactly as they arrived (tracestate untouched, nothing appended): the
/// request a replica forwards to the trace's owner.
pub fn encode_verbatim(spans: &[HeldSpan]) -> Bytes {
    encode_plans(spans.iter().map(|s| {
        (
            &s.origin,
            SpanPlan {
                before: s.bytes(),
                after: &[],
                trace_state: Cow::Borrowed(&[][..]),
                extra: &[],
            },
        )
    }))
}

/// The spans of an encoded request, taken in place (slices of it), each under its own
/// resource and scope, with its tracestate found; `pin`, if any, is their origins' (the
/// request is a record of the trace log). `None` when it does not decode.
pub fn spans_in(request: &Bytes, pin: Option<crate::storage::LogPin>) -> Option<Vec<HeldSpan>> {
    use prost::Message;
    let decoded = super::view::ExportTraceServiceRequest::decode(request.clone()).ok()?;
    let mut spans = Vec::new();
    // (Only the decision reads the service label.)
    let service: Arc<str> = Arc::from("");
    for rs in decoded.resource_spans {
        for ss in rs.scope_spans {
            let origin = Arc::new(Origin {
                data: request.clone(),
                resource: rs.resource.clone(),
                resource_schema_url: rs.schema_url.clone(),
                scope: ss.scope,
                scope_schema_url: ss.schema_url,
                service: service.clone(),
                pin: pin.clone(),
            });
            spans.extend(ss.spans.iter().map(|bytes| {
                let trace_state = super::scan::trace_state_field(bytes).ok().flatten();
                HeldSpan::new(origin.clone(), bytes, trace_state, false)
            }));
        }
    }
    Some(spans)
}

fn encode_plans<'a>(items: impl Iterator<Item = (&'a Arc<Origin>, SpanPlan<'a>)>) -> Bytes {
    // Group by origin in first-seen order; a map keeps this linear when a batch gathers
    // spans from thousands of small requests.
    let mut index: HashMap<[(usize, usize); 4], usize, foldhash::fast::RandomState> =
        HashMap::default();
    let mut groups: Vec<(&Arc<Origin>, Vec<SpanPlan<'_>>)> = Vec::new();
    for (origin, plan) in items {
        let i = *index.entry(origin.group_key()).or_insert_with(|| {
            groups.push((origin, Vec::new()));
            groups.len() - 1
        });
        groups[i].1.push(plan);
    }
    // Sizes first, so the request is written into one exactly sized buffer.
    let sizes: Vec<(usize, usize)> = groups
        .iter()
        .map(|(origin, plans)| {
            let scope_spans_len = optional_len(SCOPE_SPANS_SCOPE, &origin.scope)
                + plans
                    .iter()
                    .map(|p| len_field_size(SCOPE_SPANS_SPANS, p.len()))
                    .sum::<usize>()
                + optional_len(SCOPE_SPANS_SCHEMA_URL, &origin.scope_schema_url);
            let resource_spans_len = optional_len(RESOURCE_SPANS_RESOURCE, &origin.resource)
                + len_field_size(RESOURCE_SPANS_SCOPE_SPANS, scope_spans_len)
                + optional_len(RESOURCE_SPANS_SCHEMA_URL, &origin.resource_schema_url);
            (scope_spans_len, resource_spans_len)
        })
        .collect();
    let total = sizes
        .iter()
        .map(|(_, rs)| len_field_size(REQUEST_RESOURCE_SPANS, *rs))
        .sum();
    let mut out = Vec::with_capacity(total);
    for ((origin, plans), (scope_spans_len, resource_spans_len)) in groups.iter().zip(sizes) {
        put_key_len(&mut out, REQUEST_RESOURCE_SPANS, resource_spans_len);
        put_optional(&mut out, RESOURCE_SPANS_RESOURCE, &origin.resource);
        put_key_len(&mut out, RESOURCE_SPANS_SCOPE_SPANS, scope_spans_len);
        put_optional(&mut out, SCOPE_SPANS_SCOPE, &origin.scope);
        for p in plans {
            put_key_len(&mut out, SCOPE_SPANS_SPANS, p.len());
            p.write(&mut out);
        }
        put_optional(&mut out, SCOPE_SPANS_SCHEMA_URL, &origin.scope_schema_url);
        put_optional(
            &mut out,
            RESOURCE_SPANS_SCHEMA_URL,
            &origin.resource_schema_url,
        );
    }
    debug_assert_eq!(out.len(), total);
    Bytes::from(out)
}

/// Size of a length-delimited field that is omitted when empty (proto3 default).
fn optional_len(field: u32, payload: &[u8]) -> usize {
    if payload.is_empty() {
        0
    } else {
        len_field_size(field, payload.len())
    }
}

fn put_optional(out: &mut Vec<u8>, field: u32, payload: &[u8]) {
    if !payload.is_empty() {
        put_len_field(out, field, payload);
    }
}

fn put_key_len(out: &mut Vec<u8>, field: u32, len: usize) {
    put_varint(out, (u64::from(field) << 3) | 2);
    put_varint(out, len as u64);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_requests_spans_are_taken_in_place_and_keep_their_resources_and_thresholds() {
        use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
        use opentelemetry_proto::tonic::common::v1::InstrumentationScope;
        use opentelemetry_proto::tonic::resource::v1::Resource;
        use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
        use prost::Message;
        // Span 5 was kept at p = 1/2 by whoever encoded the request (its trace's
        // randomness, 0x85…, is above that threshold: consistent).
        let span = |i: u8| Span {
            trace_id: vec![0x80 | i; 16],
            span_id: vec![i; 8],
            name: format!("span {i}"),
            trace_state: if i == 5 {
                "ot=th:8".into()
            } else {
                String::new()
            },
            ..Default::default()
        };
        let resource_spans = |service: &str, ids: std::ops::Range<u8>| ResourceSpans {
            resource: Some(Resource {
                attributes: vec![opentelemetry_proto::tonic::common::v1::KeyValue {
                    key: "service.name".into(),
                    value: Some(opentelemetry_proto::tonic::common::v1::AnyValue {
                        value: Some(
                            opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(
                                service.into(),
                            ),
                        ),
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: format!("scope-{service}"),
                    ..Default::default()
                }),
                spans: ids.map(span).collect(),
                schema_url: String::new(),
            }],
            schema_url: "https://opentelemetry.io/schemas/1.30.0".into(),
        };
        let request = ExportTraceServiceRequest {
            resource_spans: vec![resource_spans("a", 0..3), resource_spans("b", 3..7)],
        };
        let encoded = Bytes::from(request.encode_to_vec());
        let spans = spans_in(&encoded, None).unwrap();
        assert_eq!(spans.len(), 7);
        assert!(
            spans
                .iter()
                .all(|s| s.origin.data.as_ptr() == encoded.as_ptr())
        );
        assert_eq!(
            spans
                .iter()
                .map(|s| s.trace_state.is_some())
                .collect::<Vec<_>>(),
            [false, false, false, false, false, true, false]
        );
        let (a, b) = spans.split_at(3);
        let (first, second) = (encode_verbatim(a), encode_verbatim(b));
        let spans_by_service = |bytes: &Bytes| {
            ExportTraceServiceRequest::decode(bytes.clone())
                .unwrap()
                .resource_spans
                .into_iter()
                .flat_map(|rs| {
                    let rs2 = rs.clone();
                    rs.scope_spans.into_iter().flat_map(move |ss| {
                        let rs3 = rs2.clone();
                        ss.spans.into_iter().map(move |s| {
                            (
                                rs3.resource.clone(),
                                rs3.schema_url.clone(),
                                ss.scope.clone(),
                                s,
                            )
                        })
                    })
                })
                .collect::<Vec<_>>()
        };
        let mut halves = spans_by_service(&first);
        halves.extend(spans_by_service(&second));
        assert_eq!(halves, spans_by_service(&encoded));
        // Kept again at p = 1, a span keeps the stricter threshold it carries.
        let kept: Vec<KeptSpan> = spans
            .into_iter()
            .map(|s| KeptSpan::new(s, Threshold::ALWAYS))
            .collect();
        let states: Vec<String> = spans_by_service(&encode_request(&kept))
            .into_iter()
            .map(|(_, _, _, s)| s.trace_state)
            .collect();
        assert_eq!(states[5], "ot=th:8");
        assert_eq!(states[0], "ot=th:0");
        assert!(spans_in(&Bytes::from_static(b"\x0a\x05junk"), None).is_none());
    }

    #[test]
    fn varint_sizes() {
        for v in [0u64, 1, 127, 128, 16383, 16384, u64::MAX] {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            assert_eq!(varint_size(v), out.len(), "{v}");
        }
    }
}
