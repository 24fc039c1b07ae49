//! OTLP/JSON → OTLP protobuf, so JSON requests take the same zero-copy path as protobuf.
//!
//! Accepts what the OTLP/HTTP specification allows: lowerCamelCase field names and the
//! original snake_case ones, hex trace and span ids, enums as integers, 64-bit integers as
//! strings or numbers; unknown fields are ignored.

use std::fmt;

use base64::Engine;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::wire::{put_len_field, put_varint};

/// Converts an OTLP/JSON `ExportTraceServiceRequest` into its protobuf encoding.
///
/// The JSON is transcoded as it is parsed, straight into protobuf: no tree of JSON values
/// or of message structs is built (either costs tens of bytes per `{}`: 5.3 million empty
/// objects took 1.55 GB), so memory is the output plus the nested message being written.
/// An id that is not hex is written as a one-byte id, so that span alone is refused (as
/// an id of the wrong length is in protobuf) and the rest of the request is taken.
pub fn to_protobuf(json: &[u8]) -> Result<Vec<u8>, serde_json::Error> {
    // Protobuf is smaller than the JSON it comes from (every JSON field spells its name),
    // so one allocation of the input's size is enough, trimmed after if much is spare.
    let mut out = Vec::with_capacity(json.len());
    let mut de = serde_json::Deserializer::from_slice(json);
    let present = match (Message {
        schema: &REQUEST,
        out: &mut out,
    })
    .deserialize(&mut de)
    {
        Ok(present) => present,
        // Read again, tracking the path, to name the field: tracking costs a third of
        // the throughput, so only a request that failed pays for it.
        Err(e) => return Err(with_path(json).unwrap_or(e)),
    };
    if !present {
        return Err(de::Error::custom(
            "expected an ExportTraceServiceRequest, found null",
        ));
    }
    de.end()?;
    if out.capacity() > out.len() + out.len() / 4 {
        out.shrink_to_fit();
    }
    Ok(out)
}

/// The error of reading `json` with the path to the value at fault:
/// `resourceSpans[0].scopeSpans[0].spans[3].kind: …`.
fn with_path(json: &[u8]) -> Option<serde_json::Error> {
    let mut out = Vec::new();
    let mut de = serde_json::Deserializer::from_slice(json);
    let mut track = serde_path_to_error::Track::new();
    let e = Message {
        schema: &REQUEST,
        out: &mut out,
    }
    .deserialize(serde_path_to_error::Deserializer::new(&mut de, &mut track))
    .err()?;
    let path = track.path().to_string();
    Some(if path.is_empty() || path == "." {
        e
    } else {
        de::Error::custom(format!("{path}: {e}"))
    })
}

/// How a JSON value becomes a protobuf field.
#[derive(Clone, Copy)]
enum Kind {
    Str,
    /// A trace or span id: hex in JSON, raw bytes of this length in protobuf.
    Id(usize),
    /// `bytes`: base64 in JSON.
    Base64,
    Fixed64,
    Fixed32,
    /// Unsigned integers and enums (varint), as numbers or strings.
    Uint,
    /// `int64` (varint, two's complement), as numbers or strings.
    Int,
    Double,
    Bool,
    Msg(&'static Schema),
    /// A JSON array of messages: one field per element.
    Repeated(&'static Schema),
}

struct Schema {
    /// (lowerCamelCase name, snake_case name, field number, kind)
    fields: &'static [(&'static str, &'static str, u32, Kind)],
}

impl Schema {
    fn field(&self, key: &str) -> Option<(u32, Kind)> {
        self.fields
            .iter()
            .find(|(camel, snake, _, _)| *camel == key || *snake == key)
            .map(|(_, _, n, k)| (*n, *k))
    }
}

static REQUEST: Schema = Schema {
    fields: &[(
        "resourceSpans",
        "resource_spans",
        1,
        Kind::Repeated(&RESOURCE_SPANS),
    )],
};
static RESOURCE_SPANS: Schema = Schema {
    fields: &[
        ("resource", "resource", 1, Kind::Msg(&RESOURCE)),
        ("scopeSpans", "scope_spans", 2, Kind::Repeated(&SCOPE_SPANS)),
        ("schemaUrl", "schema_url", 3, Kind::Str),
    ],
};
static RESOURCE: Schema = Schema {
    fields: &[
        ("attributes", "attributes", 1, Kind::Repeated(&KEY_VALUE)),
        (
            "droppedAttributesCount",
            "dropped_attributes_count",
            2,
            Kind::Uint,
        ),
    ],
};
static SCOPE_SPANS: Schema = Schema {
    fields: &[
        ("scope", "scope", 1, Kind::Msg(&SCOPE)),
        ("spans", "spans", 2, Kind::Repeated(&SPAN)),
        ("schemaUrl", "schema_url", 3, Kind::Str),
    ],
};
static SCOPE: Schema = Schema {
    fields: &[
        ("name", "name", 1, Kind::Str),
        ("version", "version", 2, Kind::Str),
        ("attributes", "attributes", 3, Kind::Repeated(&KEY_VALUE)),
        (
            "droppedAttributesCount",
            "dropped_attributes_count",
            4,
            Kind::Uint,
        ),
    ],
};
static SPAN: Schema = Schema {
    fields: &[
        ("traceId", "trace_id", 1, Kind::Id(16)),
        ("spanId", "span_id", 2, Kind::Id(8)),
        ("traceState", "trace_state", 3, Kind::Str),
        ("parentSpanId", "parent_span_id", 4, Kind::Id(8)),
        ("name", "name", 5, Kind::Str),
        ("kind", "kind", 6, Kind::Uint),
        (
            "startTimeUnixNano",
            "start_time_unix_nano",
            7,
            Kind::Fixed64,
        ),
        ("endTimeUnixNano", "end_time_unix_nano", 8, Kind::Fixed64),
        ("attributes", "attributes", 9, Kind::Repeated(&KEY_VALUE)),
        (
            "droppedAttributesCount",
            "dropped_attributes_count",
            10,
            Kind::Uint,
        ),
        ("events", "events", 11, Kind::Repeated(&EVENT)),
        ("droppedEventsCount", "dropped_events_count", 12, Kind::Uint),
        ("links", "links", 13, Kind::Repeated(&LINK)),
        ("droppedLinksCount", "dropped_links_count", 14, Kind::Uint),
        ("status", "status", 15, Kind::Msg(&STATUS)),
        ("flags", "flags", 16, Kind::Fixed32),
    ],
};
static EVENT: Schema = Schema {
    fields: &[
        ("timeUnixNano", "time_unix_nano", 1, Kind::Fixed64),
        ("name", "name", 2, Kind::Str),
        ("attributes", "attributes", 3, Kind::Repeated(&KEY_VALUE)),
        (
            "droppedAttributesCount",
            "dropped_attributes_count",
            4,
            Kind::Uint,
        ),
    ],
};
static LINK: Schema = Schema {
    fields: &[
        ("traceId", "trace_id", 1, Kind::Id(16)),
        ("spanId", "span_id", 2, Kind::Id(8)),
        ("traceState", "trace_state", 3, Kind::Str),
        ("attributes", "attributes", 4, Kind::Repeated(&KEY_VALUE)),
        (
            "droppedAttributesCount",
            "dropped_attributes_count",
            5,
            Kind::Uint,
        ),
        ("flags", "flags", 6, Kind::Fixed32),
    ],
};
static STATUS: Schema = Schema {
    fields: &[
        ("message", "message", 2, Kind::Str),
        ("code", "code", 3, Kind::Uint),
    ],
};
static KEY_VALUE: Schema = Schema {
    fields: &[
        ("key", "key", 1, Kind::Str),
        ("value", "value", 2, Kind::Msg(&ANY_VALUE)),
    ],
};
static ANY_VALUE: Schema = Schema {
    fields: &[
        ("stringValue", "string_value", 1, Kind::Str),
        ("boolValue", "bool_value", 2, Kind::Bool),
        ("intValue", "int_value", 3, Kind::Int),
        ("doubleValue", "double_value", 4, Kind::Double),
        ("arrayValue", "array_value", 5, Kind::Msg(&ARRAY_VALUE)),
        ("kvlistValue", "kvlist_value", 6, Kind::Msg(&KEY_VALUE_LIST)),
        ("bytesValue", "bytes_value", 7, Kind::Base64),
    ],
};
static ARRAY_VALUE: Schema = Schema {
    fields: &[("values", "values", 1, Kind::Repeated(&ANY_VALUE))],
};
static KEY_VALUE_LIST: Schema = Schema {
    fields: &[("values", "values", 1, Kind::Repeated(&KEY_VALUE))],
};

/// A JSON object transcoded into the fields of one protobuf message, appended to `out`.
struct Message<'a> {
    schema: &'static Schema,
    out: &'a mut Vec<u8>,
}

/// Transcodes the object; `false` when it was `null` (the message absent).
impl<'de> DeserializeSeed<'de> for Message<'_> {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Message<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an OTLP/JSON object")
    }

    /// `null` for a message is the message absent.
    fn visit_unit<E: de::Error>(self) -> Result<bool, E> {
        Ok(false)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            match self.schema.field(&key) {
                Some((number, kind)) => map.next_value_seed(Field {
                    number,
                    kind,
                    out: self.out,
                })?,
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(true)
    }
}

/// One field's JSON value, appended to `out` as that protobuf field.
struct Field<'a> {
    number: u32,
    kind: Kind,
    out: &'a mut Vec<u8>,
}

impl Field<'_> {
    fn key(&mut self, wire: u64) {
        put_varint(self.out, (u64::from(self.number) << 3) | wire);
    }

    fn varint(&mut self, v: u64) {
        self.key(0);
        put_varint(self.out, v);
    }

    fn fixed64(&mut self, v: u64) {
        self.key(1);
        self.out.extend_from_slice(&v.to_le_bytes());
    }

    fn number<E: de::Error>(
        mut self,
        unsigned: Option<u64>,
        signed: Option<i64>,
        float: Option<f64>,
    ) -> Result<(), E> {
        let whole = || {
            unsigned
                .or_else(|| signed.and_then(|i| u64::try_from(i).ok()))
                .or_else(|| {
                    float
                        .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f < 1.8e19)
                        .map(|f| f as u64)
                })
        };
        match self.kind {
            Kind::Fixed64 => {
                self.fixed64(whole().ok_or_else(|| E::custom("expected a non-negative integer"))?)
            }
            Kind::Fixed32 => {
                let v = whole()
                    .and_then(|v| u32::try_from(v).ok())
                    .ok_or_else(|| E::custom("expected a 32-bit unsigned integer"))?;
                self.key(5);
                self.out.extend_from_slice(&v.to_le_bytes());
            }
            Kind::Uint => {
                self.varint(whole().ok_or_else(|| E::custom("expected a non-negative integer"))?)
            }
            Kind::Int => {
                let v = signed
                    .or_else(|| unsigned.and_then(|u| i64::try_from(u).ok()))
                    .or_else(|| {
                        float
                            .filter(|f| f.fract() == 0.0 && f.abs() < 9.2e18)
                            .map(|f| f as i64)
                    })
                    .ok_or_else(|| E::custom("expected a 64-bit integer"))?;
                self.varint(v as u64);
            }
            Kind::Double => {
                let v = float
                    .or(signed.map(|i| i as f64))
                    .or(unsigned.map(|u| u as f64))
                    .unwrap_or_default();
                self.fixed64(v.to_bits());
            }
            _ => return Err(E::custom("unexpected number")),
        }
        Ok(())
    }
}

impl<'de> DeserializeSeed<'de> for Field<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        match self.kind {
            Kind::Msg(schema) => {
                let mut body = Vec::new();
                if (Message {
                    schema,
                    out: &mut body,
                })
                .deserialize(d)?
                {
                    put_len_field(self.out, self.number, &body);
                }
                Ok(())
            }
            _ => d.deserialize_any(self),
        }
    }
}

impl<'de> Visitor<'de> for Field<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an OTLP/JSON field value")
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_bool<E: de::Error>(mut self, v: bool) -> Result<(), E> {
        match self.kind {
            Kind::Bool => {
                self.varint(u64::from(v));
                Ok(())
            }
            _ => Err(E::custom("unexpected boolean")),
        }
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.number(Some(v), None, None)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.number(None, Some(v), None)
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        self.number(None, None, Some(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        match self.kind {
            Kind::Str => put_len_field(self.out, self.number, v.as_bytes()),
            Kind::Id(len) => {
                let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
                let id = (v.len() == 2 * len)
                    .then(|| {
                        v.as_bytes()
                            .chunks(2)
                            .map(|p| Some(hex(p[0])? << 4 | hex(p[1])?))
                            .collect::<Option<Vec<u8>>>()
                    })
                    .flatten();
                // Empty means absent; anything else that is not hex becomes a one-byte id,
                // which the span's validation refuses (that span alone).
                match (v.is_empty(), id) {
                    (true, _) => {}
                    (false, Some(id)) => put_len_field(self.out, self.number, &id),
                    (false, None) => put_len_field(self.out, self.number, &[0]),
                }
            }
            Kind::Base64 => {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(v)
                    .map_err(|e| E::custom(format!("bytesValue is not base64: {e}")))?;
                put_len_field(self.out, self.number, &bytes);
            }
            Kind::Double => {
                let f = match v {
                    "NaN" => f64::NAN,
                    "Infinity" => f64::INFINITY,
                    "-Infinity" => f64::NEG_INFINITY,
                    other => other.parse().map_err(|_| E::custom("expected a number"))?,
                };
                return self.number(None, None, Some(f));
            }
            Kind::Fixed64 | Kind::Fixed32 | Kind::Uint => {
                let n = v
                    .parse::<u64>()
                    .map_err(|_| E::custom("expected an unsigned integer"))?;
                return self.number(Some(n), None, None);
            }
            Kind::Int => {
                let n = v
                    .parse::<i64>()
                    .map_err(|_| E::custom("expected an integer"))?;
                return self.number(None, Some(n), None);
            }
            _ => return Err(E::custom("unexpected string")),
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Kind::Repeated(schema) = self.kind else {
            return Err(de::Error::custom("unexpected array"));
        };
        let mut body = Vec::new();
        loop {
            body.clear();
            match seq.next_element_seed(Message {
                schema,
                out: &mut body,
            })? {
                None => return Ok(()),
                Some(false) => return Err(de::Error::custom("null in a list of messages")),
                Some(true) => {}
            }
            put_len_field(self.out, self.number, &body);
        }
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use prost::Message as _;

    use super::*;

    #[test]
    fn both_casings_hex_ids_and_string_or_number_int64s() {
        let camel = br#"{"resourceSpans":[{"resource":{"attributes":[{"key":"service.name","value":{"stringValue":"svc"}}]},
            "scopeSpans":[{"scope":{"name":"s"},"spans":[{"traceId":"5b8efff798038103d269b633813fc60c",
            "spanId":"eee19b7ec3c1b174","parentSpanId":"","name":"chat","kind":3,
            "startTimeUnixNano":"1544712660000000000","endTimeUnixNano":1544712661000000000,
            "attributes":[{"key":"gen_ai.usage.input_tokens","value":{"intValue":"42"}},
                          {"key":"llm.cost_usd","value":{"doubleValue":0.5}}],
            "status":{"code":2},"somethingNew":{"x":1}}]}]}]}"#;
        let snake = br#"{"resource_spans":[{"resource":{"attributes":[{"key":"service.name","value":{"string_value":"svc"}}]},
            "scope_spans":[{"scope":{"name":"s"},"spans":[{"trace_id":"5b8efff798038103d269b633813fc60c",
            "span_id":"eee19b7ec3c1b174","parent_span_id":"","name":"chat","kind":3,
            "start_time_unix_nano":1544712660000000000,"end_time_unix_nano":"1544712661000000000",
            "attributes":[{"key":"gen_ai.usage.input_tokens","value":{"int_value":42}},
                          {"key":"llm.cost_usd","value":{"double_value":0.5}}],
            "status":{"code":2}}]}]}]}"#;
        let a = ExportTraceServiceRequest::decode(&to_protobuf(camel).unwrap()[..]).unwrap();
        let b = ExportTraceServiceRequest::decode(&to_protobuf(snake).unwrap()[..]).unwrap();
        assert_eq!(a, b);
        let span = &a.resource_spans[0].scope_spans[0].spans[0];
        assert_eq!(span.trace_id[0], 0x5b);
        assert_eq!(span.span_id.len(), 8);
        assert_eq!(span.start_time_unix_nano, 1_544_712_660_000_000_000);
        assert_eq!(span.end_time_unix_nano, 1_544_712_661_000_000_000);
        assert_eq!(span.kind, 3);
        assert_eq!(span.status.as_ref().unwrap().code, 2);
        assert_eq!(span.attributes.len(), 2);
    }

    #[test]
    fn malformed_json_is_an_error() {
        assert!(to_protobuf(b"{\"resourceSpans\": [").is_err());
        assert!(to_protobuf(b"null").is_err());
        // A value that cannot be read is named by its path.
        let e = to_protobuf(
            br#"{"resourceSpans":[{"scopeSpans":[{"spans":[{"name":"a"},{"name":"b","kind":"zz"}]}]}]}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("resourceSpans[0].scopeSpans[0].spans[1].kind: "),
            "{e}"
        );
        assert!(to_protobuf(b"{\"resourceSpans\":[null]}").is_err());
        assert!(to_protobuf(b"{\"resourceSpans\":[{\"scopeSpans\":{}}]}").is_err());
    }

    #[test]
    fn a_bad_id_costs_its_span_only() {
        let json = br#"{"resourceSpans":[{"scopeSpans":[{"spans":[
            {"traceId":"5b8efff798038103d269b633813fc60c","spanId":"eee19b7ec3c1b174","parentSpanId":"zz"},
            {"traceId":"5B8EFFF798038103D269B633813FC60C","spanId":"eee19b7ec3c1b175"}]}]}]}"#;
        let request = ExportTraceServiceRequest::decode(&to_protobuf(json).unwrap()[..]).unwrap();
        let spans = &request.resource_spans[0].scope_spans[0].spans;
        assert_eq!(
            spans[0].parent_span_id,
            vec![0],
            "refused later by validation"
        );
        assert!(crate::otlp::validate::span(&spans[0].encode_to_vec()).is_err());
        assert_eq!(spans[1].trace_id[0], 0x5b, "upper-case hex is hex");
        // 32 bytes, but not 32 hex digits (multi-byte characters): not an id, no panic.
        let odd =
            r#"{"resourceSpans":[{"scopeSpans":[{"spans":[{"traceId":"ééééééééééééééé00"}]}]}]}"#;
        let request =
            ExportTraceServiceRequest::decode(&to_protobuf(odd.as_bytes()).unwrap()[..]).unwrap();
        assert_eq!(
            request.resource_spans[0].scope_spans[0].spans[0].trace_id,
            vec![0]
        );
        assert!(crate::otlp::validate::span(&spans[1].encode_to_vec()).is_ok());
    }

    #[test]
    fn values_of_every_kind_and_unknown_fields() {
        let json = br#"{"resourceSpans":[{"scopeSpans":[{"spans":[{"traceId":"5b8efff798038103d269b633813fc60c",
            "spanId":"eee19b7ec3c1b174","flags":257,"attributes":[
            {"key":"b","value":{"boolValue":true}},
            {"key":"i","value":{"intValue":"-5"}},
            {"key":"d","value":{"doubleValue":"NaN"}},
            {"key":"x","value":{"bytesValue":"aGk="}},
            {"key":"a","value":{"arrayValue":{"values":[{"intValue":0},{"kvlistValue":{"values":[{"key":"k","value":{"stringValue":"v"}}]}}]}}},
            {"key":"n","value":null}],
            "future":{"deep":[[[{"a":1}]]]},"links":[{"traceId":"","spanId":"eee19b7ec3c1b174"}]}]}]}]}"#;
        let request = ExportTraceServiceRequest::decode(&to_protobuf(json).unwrap()[..]).unwrap();
        let span = &request.resource_spans[0].scope_spans[0].spans[0];
        assert_eq!(span.flags, 257);
        let v = |i: usize| format!("{:?}", span.attributes[i].value);
        assert!(v(0).contains("BoolValue(true)"));
        assert!(v(1).contains("IntValue(-5)"));
        assert!(v(2).contains("DoubleValue(NaN)"));
        assert!(v(3).contains("BytesValue([104, 105])"));
        assert!(v(4).contains("IntValue(0)") && v(4).contains("StringValue(\"v\")"));
        assert_eq!(span.attributes[5].value, None);
        assert_eq!(span.links[0].span_id.len(), 8);
        assert!(to_protobuf(br#"{"resourceSpans":[{"scopeSpans":[{"spans":[{"attributes":[{"key":"x","value":{"bytesValue":"!!"}}]}]}]}]}"#).is_err());
    }

    #[test]
    fn empty_objects_cost_no_more_than_their_bytes() {
        let mut json = b"{\"resourceSpans\":[".to_vec();
        for i in 0..1_000_000 {
            json.extend_from_slice(if i == 0 { b"{}" } else { b",{}" });
        }
        json.extend_from_slice(b"]}");
        let out = to_protobuf(&json).unwrap();
        // Two bytes per empty ResourceSpans, written as they are read.
        assert_eq!(out.len(), 2_000_000);
        assert!(
            out.capacity() <= json.len(),
            "{} > {}",
            out.capacity(),
            json.len()
        );
    }
}
