//! Validation of the bytes llmtail forwards verbatim. A kept span is re-framed as it came,
//! so whatever an upstream's decoder would refuse in it (a string that is not UTF-8, a
//! field with the wrong wire type, values nested past decoders' recursion limits) would
//! make the upstream refuse the whole batch, other senders' spans included. Every span is
//! checked once at ingest against the OTLP schema, and every resource and scope once per
//! request; what fails is refused there, alone.
//!
//! Unknown fields are allowed (proto3 decoders keep or skip them), as long as their wire
//! type is one protobuf has.

use thiserror::Error;

use super::wire::{Malformed, Reader, WireType};

/// Levels of `array_value` / `kvlist_value` nesting allowed inside one attribute value.
/// Decoders stop at a total message depth of 100 (protobuf-java, prost); a span sits four
/// levels deep in a request and each nested value costs two, so 32 leaves room to spare.
pub const MAX_VALUE_DEPTH: usize = 32;

/// What is wrong with a message, naming the field (dotted path of OTLP field names).
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
#[error("{field}: {problem}")]
pub struct Invalid {
    pub field: &'static str,
    pub problem: &'static str,
}

/// How a field's value must look on the wire.
#[derive(Clone, Copy)]
enum Kind {
    /// `string`: length-delimited, UTF-8.
    Str,
    /// A trace or span id: empty, or exactly this many bytes (decoders such as the
    /// Collector's refuse any other length).
    Id(usize),
    /// Integers, enums and bools.
    Varint,
    Fixed64,
    Fixed32,
    Msg(&'static Schema),
    /// `KeyValue`, the most common message in a span, read without the table; the names
    /// of its key and value fields.
    Attributes(&'static str, &'static str),
}

struct Schema {
    name: &'static str,
    /// Known fields, numbered consecutively (looked up by index).
    fields: &'static [(u32, &'static str, Kind)],
}

impl Schema {
    #[inline]
    fn field(&self, number: u32) -> Option<(&'static str, Kind)> {
        let first = self.fields.first()?.0;
        let (n, name, kind) = *self.fields.get(number.checked_sub(first)? as usize)?;
        (n == number).then_some((name, kind))
    }
}

static EVENT: Schema = Schema {
    name: "events",
    fields: &[
        (1, "events.time_unix_nano", Kind::Fixed64),
        (2, "events.name", Kind::Str),
        (
            3,
            "events.attributes",
            Kind::Attributes("events.attributes.key", "events.attributes.value"),
        ),
        (4, "events.dropped_attributes_count", Kind::Varint),
    ],
};

static LINK: Schema = Schema {
    name: "links",
    fields: &[
        (1, "links.trace_id", Kind::Id(16)),
        (2, "links.span_id", Kind::Id(8)),
        (3, "links.trace_state", Kind::Str),
        (
            4,
            "links.attributes",
            Kind::Attributes("links.attributes.key", "links.attributes.value"),
        ),
        (5, "links.dropped_attributes_count", Kind::Varint),
        (6, "links.flags", Kind::Fixed32),
    ],
};

static STATUS: Schema = Schema {
    name: "status",
    fields: &[
        (2, "status.message", Kind::Str),
        (3, "status.code", Kind::Varint),
    ],
};

static SPAN: Schema = Schema {
    name: "span",
    fields: &[
        (1, "trace_id", Kind::Id(16)),
        (2, "span_id", Kind::Id(8)),
        (3, "trace_state", Kind::Str),
        (4, "parent_span_id", Kind::Id(8)),
        (5, "name", Kind::Str),
        (6, "kind", Kind::Varint),
        (7, "start_time_unix_nano", Kind::Fixed64),
        (8, "end_time_unix_nano", Kind::Fixed64),
        (
            9,
            "attributes",
            Kind::Attributes("attributes.key", "attributes.value"),
        ),
        (10, "dropped_attributes_count", Kind::Varint),
        (11, "events", Kind::Msg(&EVENT)),
        (12, "dropped_events_count", Kind::Varint),
        (13, "links", Kind::Msg(&LINK)),
        (14, "dropped_links_count", Kind::Varint),
        (15, "status", Kind::Msg(&STATUS)),
        (16, "flags", Kind::Fixed32),
    ],
};

static ENTITY_REF: Schema = Schema {
    name: "entity_refs",
    fields: &[
        (1, "entity_refs.schema_url", Kind::Str),
        (2, "entity_refs.type", Kind::Str),
        (3, "entity_refs.id_keys", Kind::Str),
        (4, "entity_refs.description_keys", Kind::Str),
    ],
};

static RESOURCE: Schema = Schema {
    name: "resource",
    fields: &[
        (
            1,
            "resource.attributes",
            Kind::Attributes("resource.attributes.key", "resource.attributes.value"),
        ),
        (2, "resource.dropped_attributes_count", Kind::Varint),
        (3, "resource.entity_refs", Kind::Msg(&ENTITY_REF)),
    ],
};

static SCOPE: Schema = Schema {
    name: "scope",
    fields: &[
        (1, "scope.name", Kind::Str),
        (2, "scope.version", Kind::Str),
        (
            3,
            "scope.attributes",
            Kind::Attributes("scope.attributes.key", "scope.attributes.value"),
        ),
        (4, "scope.dropped_attributes_count", Kind::Varint),
    ],
};

// AnyValue and the two messages that nest it.
const ANY_STRING: u32 = 1;
const ANY_BOOL: u32 = 2;
const ANY_INT: u32 = 3;
const ANY_DOUBLE: u32 = 4;
const ANY_ARRAY: u32 = 5;
const ANY_KVLIST: u32 = 6;
const ANY_BYTES: u32 = 7;
const ANY_STRING_STRINDEX: u32 = 8;

/// Checks one encoded `Span`.
pub fn span(bytes: &[u8]) -> Result<(), Invalid> {
    message(bytes, &SPAN, 0)
}

/// Checks one encoded `Resource`.
pub fn resource(bytes: &[u8]) -> Result<(), Invalid> {
    message(bytes, &RESOURCE, 0)
}

/// Checks one encoded `InstrumentationScope`.
pub fn scope(bytes: &[u8]) -> Result<(), Invalid> {
    message(bytes, &SCOPE, 0)
}

/// Checks a `string` field's bytes (e.g. a schema URL).
#[inline]
pub fn utf8(bytes: &[u8], field: &'static str) -> Result<(), Invalid> {
    // Most keys and values are short ASCII; prompts of kilobytes are checked with SIMD at
    // several GB/s.
    if bytes.is_ascii() || simdutf8::basic::from_utf8(bytes).is_ok() {
        return Ok(());
    }
    Err(not_utf8(field))
}

#[cold]
fn not_utf8(field: &'static str) -> Invalid {
    Invalid {
        field,
        problem: "not valid UTF-8",
    }
}

fn malformed(field: &'static str) -> impl Fn(Malformed) -> Invalid {
    move |m| Invalid {
        field,
        problem: m.0,
    }
}

#[cold]
fn wrong_wire_type(field: &'static str) -> Invalid {
    Invalid {
        field,
        problem: "wrong wire type for this field",
    }
}

fn message(bytes: &[u8], schema: &'static Schema, depth: usize) -> Result<(), Invalid> {
    let mut r = Reader::new(bytes);
    while !r.is_empty() {
        let (number, wire) = r.tag().map_err(malformed(schema.name))?;
        let Some((name, kind)) = schema.field(number) else {
            r.skip(wire).map_err(malformed(schema.name))?;
            continue;
        };
        value(&mut r, wire, kind, name, depth)?;
    }
    Ok(())
}

fn value(
    r: &mut Reader<'_>,
    wire: WireType,
    kind: Kind,
    name: &'static str,
    depth: usize,
) -> Result<(), Invalid> {
    let expected = match kind {
        Kind::Varint => WireType::Varint,
        Kind::Fixed64 => WireType::Fixed64,
        Kind::Fixed32 => WireType::Fixed32,
        Kind::Str | Kind::Id(_) | Kind::Msg(_) | Kind::Attributes(..) => WireType::Len,
    };
    if wire != expected {
        return Err(wrong_wire_type(name));
    }
    if wire != WireType::Len {
        return r.skip(wire).map_err(malformed(name));
    }
    let payload = r.len_delimited().map_err(malformed(name))?.1;
    match kind {
        Kind::Str => utf8(payload, name),
        Kind::Attributes(key, value) => attribute(payload, key, value, depth),
        Kind::Msg(schema) => message(payload, schema, depth),
        Kind::Id(len) if !payload.is_empty() && payload.len() != len => Err(Invalid {
            field: name,
            problem: "an id of the wrong length",
        }),
        _ => Ok(()),
    }
}

fn any_value(bytes: &[u8], name: &'static str, depth: usize) -> Result<(), Invalid> {
    if depth >= MAX_VALUE_DEPTH {
        return Err(too_deep(name));
    }
    let mut r = Reader::new(bytes);
    while !r.is_empty() {
        match r.tag().map_err(malformed(name))? {
            (ANY_STRING, WireType::Len) => string(&mut r, name)?,
            (ANY_BOOL | ANY_INT | ANY_STRING_STRINDEX, WireType::Varint) => {
                r.varint().map_err(malformed(name))?;
            }
            (ANY_DOUBLE, WireType::Fixed64) => {
                r.fixed64().map_err(malformed(name))?;
            }
            (ANY_BYTES, WireType::Len) => {
                r.len_delimited().map_err(malformed(name))?;
            }
            (number @ (ANY_ARRAY | ANY_KVLIST), WireType::Len) => {
                let list = r.len_delimited().map_err(malformed(name))?.1;
                list_values(list, number == ANY_KVLIST, name, depth + 1)?;
            }
            (ANY_STRING..=ANY_STRING_STRINDEX, _) => return Err(wrong_wire_type(name)),
            (_, wire) => r.skip(wire).map_err(malformed(name))?,
        }
    }
    Ok(())
}

/// A `string` field's payload: length-delimited, UTF-8.
#[inline]
fn string(r: &mut Reader<'_>, name: &'static str) -> Result<(), Invalid> {
    let s = r.len_delimited().map_err(malformed(name))?.1;
    utf8(s, name)
}

/// One `KeyValue` (an attribute), the most common message in a span: read directly,
/// without the schema table.
fn attribute(
    bytes: &[u8],
    key: &'static str,
    value: &'static str,
    depth: usize,
) -> Result<(), Invalid> {
    let mut r = Reader::new(bytes);
    while !r.is_empty() {
        match r.tag().map_err(malformed(key))? {
            (1, WireType::Len) => string(&mut r, key)?,
            (2, WireType::Len) => {
                let any = r.len_delimited().map_err(malformed(value))?.1;
                any_value(any, value, depth)?;
            }
            (3, WireType::Varint) => {
                r.varint().map_err(malformed(key))?;
            }
            (1..=3, _) => return Err(wrong_wire_type(key)),
            (_, wire) => r.skip(wire).map_err(malformed(key))?,
        }
    }
    Ok(())
}

#[cold]
fn too_deep(field: &'static str) -> Invalid {
    Invalid {
        field,
        problem: "value nested deeper than 32 levels",
    }
}

/// `ArrayValue` (repeated AnyValue, field 1) or `KeyValueList` (repeated KeyValue, field 1).
fn list_values(
    bytes: &[u8],
    key_values: bool,
    name: &'static str,
    depth: usize,
) -> Result<(), Invalid> {
    let mut r = Reader::new(bytes);
    while !r.is_empty() {
        let (number, wire) = r.tag().map_err(malformed(name))?;
        if number != 1 {
            r.skip(wire).map_err(malformed(name))?;
            continue;
        }
        if wire != WireType::Len {
            return Err(wrong_wire_type(name));
        }
        let item = r.len_delimited().map_err(malformed(name))?.1;
        if key_values {
            attribute(item, name, name, depth)?;
        } else {
            any_value(item, name, depth)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::common::v1::{
        AnyValue, ArrayValue, InstrumentationScope, KeyValue, any_value::Value,
    };
    use opentelemetry_proto::tonic::trace::v1::{Span, span};
    use prost::Message;

    use super::*;
    use crate::otlp::wire::put_len_field;

    fn good_span() -> Span {
        Span {
            trace_id: vec![1; 16],
            span_id: vec![2; 8],
            name: "chat model".into(),
            attributes: vec![KeyValue {
                key: "gen_ai.request.model".into(),
                value: Some(AnyValue {
                    value: Some(Value::StringValue("gpt-4o".into())),
                }),
                ..Default::default()
            }],
            events: vec![span::Event {
                name: "exception".into(),
                ..Default::default()
            }],
            links: vec![span::Link {
                trace_id: vec![3; 16],
                span_id: vec![4; 8],
                trace_state: "ot=th:8".into(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn nested(depth: usize) -> AnyValue {
        let mut v = AnyValue {
            value: Some(Value::IntValue(1)),
        };
        for _ in 0..depth {
            v = AnyValue {
                value: Some(Value::ArrayValue(ArrayValue { values: vec![v] })),
            };
        }
        v
    }

    #[test]
    fn a_well_formed_span_with_unknown_fields_passes() {
        let mut bytes = good_span().encode_to_vec();
        put_len_field(&mut bytes, 99, b"\xff\xfe future field, any bytes");
        assert_eq!(span(&bytes), Ok(()));
        let scope_bytes = InstrumentationScope {
            name: "openinference".into(),
            version: "1.0".into(),
            ..Default::default()
        }
        .encode_to_vec();
        assert_eq!(scope(&scope_bytes), Ok(()));
    }

    #[test]
    fn invalid_utf8_anywhere_names_the_field() {
        // The name, then a string attribute value, then an event name.
        let mut s = good_span().encode_to_vec();
        let at = s.windows(6).position(|w| w == b"chat m").unwrap();
        s[at..at + 3].copy_from_slice(&[0xff, 0xfe, 0xc0]);
        assert_eq!(span(&s).unwrap_err().field, "name");

        let mut s = good_span().encode_to_vec();
        let at = s.windows(6).position(|w| w == b"gpt-4o").unwrap();
        s[at] = 0xff;
        assert_eq!(span(&s).unwrap_err().field, "attributes.value");

        let mut s = good_span().encode_to_vec();
        let at = s.windows(9).position(|w| w == b"exception").unwrap();
        s[at] = 0xc0;
        assert_eq!(span(&s).unwrap_err().field, "events.name");
    }

    #[test]
    fn a_wrong_wire_type_is_refused() {
        let mut s = good_span().encode_to_vec();
        // Field 5 (name) as a varint.
        s.extend_from_slice(&[5 << 3, 1]);
        let err = span(&s).unwrap_err();
        assert_eq!(err.field, "name");
        assert!(err.problem.contains("wire type"));
        // Field 7 (start time) as length-delimited.
        let mut s = good_span().encode_to_vec();
        put_len_field(&mut s, 7, b"12345678");
        assert_eq!(span(&s).unwrap_err().field, "start_time_unix_nano");
    }

    #[test]
    fn deep_nesting_is_refused_at_the_limit() {
        let with_value = |v: AnyValue| {
            let mut s = good_span();
            s.attributes.push(KeyValue {
                key: "deep".into(),
                value: Some(v),
                ..Default::default()
            });
            s.encode_to_vec()
        };
        assert_eq!(span(&with_value(nested(MAX_VALUE_DEPTH - 1))), Ok(()));
        let err = span(&with_value(nested(150))).unwrap_err();
        assert!(err.problem.contains("nested"), "{err}");
        // What passes, the reference decoder (prost, recursion limit 100) decodes.
        Span::decode(&with_value(nested(MAX_VALUE_DEPTH - 1))[..]).unwrap();
    }

    #[test]
    fn every_field_is_found_by_its_number() {
        for schema in [
            &SPAN,
            &EVENT,
            &LINK,
            &STATUS,
            &RESOURCE,
            &SCOPE,
            &ENTITY_REF,
        ] {
            for (number, name, _) in schema.fields {
                assert_eq!(schema.field(*number).map(|f| f.0), Some(*name));
            }
            assert!(schema.field(0).is_none() && schema.field(1000).is_none());
        }
    }

    #[test]
    fn random_bytes_as_a_scope_are_refused() {
        assert!(scope(&[0xff, 0xff, 0xff, 0x07, 0x01]).is_err());
        assert!(scope(&[0x0a, 0x05, b'a']).is_err(), "length past the end");
        assert!(resource(&[0x0b]).is_err(), "group wire type");
    }
}
