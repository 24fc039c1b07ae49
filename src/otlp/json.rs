//! OTLP/JSON → OTLP protobuf, so JSON requests take the same zero-copy path as protobuf.
//!
//! Accepts what the OTLP/HTTP specification allows: lowerCamelCase field names and the
//! original snake_case ones, hex trace and span ids, enums as integers, 64-bit integers as
//! strings or numbers; unknown fields are ignored.

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;
use serde_json::Value;

/// Converts an OTLP/JSON `ExportTraceServiceRequest` into its protobuf encoding.
pub fn to_protobuf(json: &[u8]) -> Result<Vec<u8>, serde_json::Error> {
    let mut value: Value = serde_json::from_slice(json)?;
    camel_case_keys(&mut value);
    let request: ExportTraceServiceRequest = serde_json::from_value(value)?;
    Ok(request.encode_to_vec())
}

/// Renames every object key from snake_case to lowerCamelCase. Safe for OTLP: attribute
/// names are string values (`"key": "gen_ai.usage.input_tokens"`), never object keys.
fn camel_case_keys(value: &mut Value) {
    match value {
        Value::Object(map) => {
            if map.keys().any(|k| k.contains('_')) {
                let entries = std::mem::take(map);
                for (k, v) in entries {
                    map.insert(camel(&k), v);
                }
            }
            map.values_mut().for_each(camel_case_keys);
        }
        Value::Array(items) => items.iter_mut().for_each(camel_case_keys),
        _ => {}
    }
}

fn camel(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    let mut upper = false;
    for c in key.chars() {
        if c == '_' {
            upper = !out.is_empty();
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
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
        assert!(
            to_protobuf(
                b"{\"resourceSpans\":[{\"scopeSpans\":[{\"spans\":[{\"traceId\":\"xyz\"}]}]}]}"
            )
            .is_err()
        );
    }

    #[test]
    fn camel() {
        assert_eq!(super::camel("start_time_unix_nano"), "startTimeUnixNano");
        assert_eq!(super::camel("traceId"), "traceId");
        assert_eq!(super::camel("_x"), "x");
    }
}
