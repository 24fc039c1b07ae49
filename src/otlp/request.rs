//! Walking an `ExportTraceServiceRequest` without decoding it: resources, scopes and spans
//! are handed out as slices of the request buffer, and nothing is allocated per message.
//! (Decoding into message structs would cost ~100 bytes for each empty `ResourceSpans`, two
//! bytes on the wire: a 16 MiB request of them took 1.3 GB.)
//!
//! [`check`] reads the request's framing once (tags and lengths of the three outer levels,
//! never a span's inside), so a request that is not an `ExportTraceServiceRequest` at all
//! is refused whole before anything of it is taken; the walkers then cannot fail.

use bytes::Bytes;

use super::wire::{Malformed, Reader, WireType};

const REQUEST_RESOURCE_SPANS: u32 = 1;
const RS_RESOURCE: u32 = 1;
const RS_SCOPE_SPANS: u32 = 2;
const RS_SCHEMA_URL: u32 = 3;
const SS_SCOPE: u32 = 1;
const SS_SPANS: u32 = 2;
const SS_SCHEMA_URL: u32 = 3;

/// What [`check`] counted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub resource_spans: usize,
    pub scope_spans: usize,
    pub spans: usize,
}

/// Where the framing of a request is broken.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[error("{place}: {why}")]
pub struct BadFrame {
    pub place: String,
    pub why: Malformed,
}

/// Reads the framing of the request, its `ResourceSpans` and their `ScopeSpans`.
pub fn check(request: &[u8]) -> Result<Shape, BadFrame> {
    let mut shape = Shape::default();
    let at = |place: String| move |why: Malformed| BadFrame { place, why };
    let mut r = Reader::new(request);
    while !r.is_empty() {
        let place = || format!("resource_spans[{}]", shape.resource_spans);
        match r.tag().map_err(at(place()))? {
            (REQUEST_RESOURCE_SPANS, WireType::Len) => {
                let rs = r.len_delimited().map_err(at(place()))?.1;
                let mut scopes = 0;
                let mut rr = Reader::new(rs);
                while !rr.is_empty() {
                    let tag = rr.tag().map_err(at(place()))?;
                    if tag == (RS_SCOPE_SPANS, WireType::Len) {
                        let place = format!("{}.scope_spans[{scopes}]", place());
                        let ss = rr.len_delimited().map_err(at(place.clone()))?.1;
                        shape.spans += check_scope_spans(ss).map_err(at(place))?;
                        scopes += 1;
                    } else {
                        expect_len(tag, &[RS_RESOURCE, RS_SCHEMA_URL]).map_err(at(place()))?;
                        rr.skip(tag.1).map_err(at(place()))?;
                    }
                }
                shape.scope_spans += scopes;
                shape.resource_spans += 1;
            }
            (REQUEST_RESOURCE_SPANS, _) => {
                return Err(BadFrame {
                    place: place(),
                    why: Malformed("wrong wire type for resource_spans"),
                });
            }
            (_, wire) => r.skip(wire).map_err(at(place()))?,
        }
    }
    Ok(shape)
}

/// Known fields of the outer messages must be length-delimited; unknown ones may be anything.
fn expect_len((field, wire): (u32, WireType), known: &[u32]) -> Result<(), Malformed> {
    if known.contains(&field) && wire != WireType::Len {
        return Err(Malformed("wrong wire type for a field"));
    }
    Ok(())
}

fn check_scope_spans(ss: &[u8]) -> Result<usize, Malformed> {
    let mut spans = 0;
    let mut r = Reader::new(ss);
    while !r.is_empty() {
        let tag = r.tag()?;
        expect_len(tag, &[SS_SCOPE, SS_SPANS, SS_SCHEMA_URL])?;
        spans += usize::from(tag.0 == SS_SPANS);
        r.skip(tag.1)?;
    }
    Ok(spans)
}

/// One `ResourceSpans` of a checked request.
pub struct ResourceSpans {
    pub resource: Bytes,
    pub schema_url: Bytes,
    body: Bytes,
}

/// One `ScopeSpans` of a checked request.
pub struct ScopeSpans {
    pub scope: Bytes,
    pub schema_url: Bytes,
    body: Bytes,
}

/// Length-delimited fields numbered `number` of `msg`, as slices of it. Stops at the first
/// framing error, which a checked request does not have.
fn fields(msg: &Bytes, number: u32) -> impl Iterator<Item = Bytes> {
    let msg = msg.clone();
    let mut pos = 0;
    std::iter::from_fn(move || {
        let mut r = Reader::new(&msg[pos..]);
        while !r.is_empty() {
            let tag = r.tag().ok()?;
            if tag == (number, WireType::Len) {
                let payload = r.len_delimited().ok()?.1;
                let found = msg.slice_ref(payload);
                pos += r.pos();
                return Some(found);
            }
            r.skip(tag.1).ok()?;
        }
        pos = msg.len();
        None
    })
}

/// The last occurrences of two length-delimited fields (protobuf's rule for a
/// non-repeated field), empty when absent; one pass.
fn last_two(buf: &Bytes, a: u32, b: u32) -> (Bytes, Bytes) {
    let (mut found_a, mut found_b) = (Bytes::new(), Bytes::new());
    let mut r = Reader::new(buf);
    while !r.is_empty() {
        let Ok(tag) = r.tag() else { break };
        if tag.1 == WireType::Len && (tag.0 == a || tag.0 == b) {
            let Ok((_, payload)) = r.len_delimited() else {
                break;
            };
            let slot = if tag.0 == a {
                &mut found_a
            } else {
                &mut found_b
            };
            *slot = buf.slice_ref(payload);
        } else if r.skip(tag.1).is_err() {
            break;
        }
    }
    (found_a, found_b)
}

/// The request's `ResourceSpans`, in order.
pub fn resource_spans(request: &Bytes) -> impl Iterator<Item = ResourceSpans> {
    fields(request, REQUEST_RESOURCE_SPANS).map(|body| {
        let (resource, schema_url) = last_two(&body, RS_RESOURCE, RS_SCHEMA_URL);
        ResourceSpans {
            resource,
            schema_url,
            body,
        }
    })
}

impl ResourceSpans {
    pub fn scope_spans(&self) -> impl Iterator<Item = ScopeSpans> {
        fields(&self.body, RS_SCOPE_SPANS).map(|body| {
            let (scope, schema_url) = last_two(&body, SS_SCOPE, SS_SCHEMA_URL);
            ScopeSpans {
                scope,
                schema_url,
                body,
            }
        })
    }
}

impl ScopeSpans {
    pub fn spans(&self) -> impl Iterator<Item = Bytes> {
        fields(&self.body, SS_SPANS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::otlp::view;
    use prost::Message;

    fn request() -> view::ExportTraceServiceRequest {
        view::ExportTraceServiceRequest {
            resource_spans: vec![
                view::ResourceSpans {
                    resource: Bytes::from_static(b"\x0a\x00"),
                    scope_spans: vec![
                        view::ScopeSpans {
                            scope: Bytes::from_static(b"\x0a\x01s"),
                            spans: vec![Bytes::from_static(b"a"), Bytes::from_static(b"bc")],
                            schema_url: Bytes::from_static(b"https://x"),
                        },
                        view::ScopeSpans::default(),
                    ],
                    schema_url: Bytes::new(),
                },
                view::ResourceSpans::default(),
            ],
        }
    }

    #[test]
    fn walks_what_prost_decodes() {
        let want = request();
        let bytes = Bytes::from(want.encode_to_vec());
        assert_eq!(
            check(&bytes),
            Ok(Shape {
                resource_spans: 2,
                scope_spans: 2,
                spans: 2
            })
        );
        let mut got = view::ExportTraceServiceRequest::default();
        for rs in resource_spans(&bytes) {
            got.resource_spans.push(view::ResourceSpans {
                resource: rs.resource.clone(),
                schema_url: rs.schema_url.clone(),
                scope_spans: rs
                    .scope_spans()
                    .map(|ss| view::ScopeSpans {
                        scope: ss.scope.clone(),
                        schema_url: ss.schema_url.clone(),
                        spans: ss.spans().collect(),
                    })
                    .collect(),
            });
        }
        assert_eq!(got, want);
    }

    #[test]
    fn broken_framing_names_the_place() {
        let mut bytes = request().encode_to_vec();
        bytes.extend_from_slice(&[0x0a, 0x03, 0x12, 0x05, 0x12]);
        let err = check(&bytes).unwrap_err();
        assert_eq!(err.place, "resource_spans[2].scope_spans[0]");
        assert!(check(&[0x10, 0x01]).is_ok(), "an unknown varint field");
        assert!(check(&[0x15]).is_err(), "a truncated fixed32");
        assert!(check(&[0x0a, 0x02, 0x0a, 0x05]).is_err());
        assert!(check(&[0x08, 0x00]).is_err(), "resource_spans as a varint");
    }

    #[test]
    fn empty_messages_cost_nothing() {
        let flood: Vec<u8> = [0x0a, 0x00].repeat(1 << 20);
        let shape = check(&flood).unwrap();
        assert_eq!(shape.resource_spans, 1 << 20);
        let bytes = Bytes::from(flood);
        let spans: usize = resource_spans(&bytes)
            .map(|rs| rs.scope_spans().map(|ss| ss.spans().count()).sum::<usize>())
            .sum();
        assert_eq!(spans, 0);
    }
}
