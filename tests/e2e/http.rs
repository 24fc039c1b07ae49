//! OTLP/HTTP receiver, black-box: protobuf and JSON bodies, compression, errors, CORS,
//! backpressure.

use std::io::Write;
use std::time::Duration;

use crate::support::*;
use llmtail_tools::loadgen::{self, Convention, Kind};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use prost::Message;
use rand::SeedableRng;
use rand::rngs::StdRng;

const PB: (&str, &str) = ("Content-Type", "application/x-protobuf");
const JSON: (&str, &str) = ("Content-Type", "application/json");

fn config(sink: &Sink, base_rate: f64) -> String {
    format!(
        "sampling:\n  decision_wait: 2s\n  root_grace: 100ms\n  base_rate: {base_rate}\n  policies:\n    - {{name: errors, type: error}}\nexporter:\n  otlp:\n    endpoint: {}\n  batch:\n    timeout: 50ms\n",
        sink.endpoint()
    )
}

/// A hand-written OTLP/JSON request: one trace of a root and an LLM span with the given
/// trace id, in camelCase or snake_case, with int64s as strings or numbers.
fn json_body(trace_id: &str, snake: bool) -> String {
    let body = format!(
        r#"{{"resourceSpans":[{{"resource":{{"attributes":[{{"key":"service.name","value":{{"stringValue":"js-web"}}}}]}},
        "scopeSpans":[{{"scope":{{"name":"manual"}},"spans":[
          {{"traceId":"{trace_id}","spanId":"1111111111111111","name":"POST /chat","kind":2,
            "startTimeUnixNano":"1700000000000000000","endTimeUnixNano":1700000001000000000,
            "status":{{"code":2,"message":"boom"}},"unknownField":[1,2]}},
          {{"traceId":"{trace_id}","spanId":"2222222222222222","parentSpanId":"1111111111111111","name":"chat",
            "startTimeUnixNano":1700000000100000000,"endTimeUnixNano":"1700000000900000000",
            "attributes":[{{"key":"gen_ai.request.model","value":{{"stringValue":"gpt-4o"}}}},
                          {{"key":"gen_ai.usage.input_tokens","value":{{"intValue":"1000"}}}},
                          {{"key":"gen_ai.usage.output_tokens","value":{{"intValue":100}}}}]}}]}}]}}]}}"#
    );
    if !snake {
        return body;
    }
    body.replace("resourceSpans", "resource_spans")
        .replace("scopeSpans", "scope_spans")
        .replace("stringValue", "string_value")
        .replace("intValue", "int_value")
        .replace("traceId", "trace_id")
        .replace("spanId", "span_id")
        .replace("parentSpanId", "parent_span_id")
        .replace("startTimeUnixNano", "start_time_unix_nano")
        .replace("endTimeUnixNano", "end_time_unix_nano")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protobuf_and_json_bodies_in_every_encoding_take_the_same_path() {
    let sink = Sink::start(0).await;
    let d = Daemon::start(&config(&sink, 0.0));
    let mut rng = StdRng::seed_from_u64(21);
    let mut kept = Vec::new();

    // Protobuf: plain, gzip, deflate, zstd.
    for encoding in ["identity", "gzip", "deflate", "zstd"] {
        let t = loadgen::trace(&mut rng, Kind::Error, Convention::GenAi, now_ns());
        let raw = loadgen::request(t.spans.clone()).encode_to_vec();
        let body = match encoding {
            "gzip" => gzip(&raw),
            "deflate" => {
                let mut e =
                    flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
                e.write_all(&raw).unwrap();
                e.finish().unwrap()
            }
            "zstd" => ruzstd::encoding::compress_to_vec(
                &raw[..],
                ruzstd::encoding::CompressionLevel::Fastest,
            ),
            _ => raw,
        };
        let (status, headers, resp) = http_request(
            d.http,
            "POST",
            "/v1/traces",
            &[PB, ("Content-Encoding", encoding)],
            &body,
        );
        assert_eq!(
            status,
            200,
            "{encoding}: {}",
            String::from_utf8_lossy(&resp)
        );
        assert_eq!(headers["content-type"], "application/x-protobuf");
        assert!(
            ExportTraceServiceResponse::decode(&resp[..])
                .unwrap()
                .partial_success
                .is_none()
        );
        kept.push(t.trace_id.to_vec());
    }

    // JSON: both casings, plain and gzip.
    for (i, (snake, gz)) in [(false, false), (true, false), (false, true), (true, true)]
        .into_iter()
        .enumerate()
    {
        let id = format!("{:032x}", 0xabc0 + i);
        let body = json_body(&id, snake);
        let (body, enc) = if gz {
            (gzip(body.as_bytes()), "gzip")
        } else {
            (body.into_bytes(), "identity")
        };
        let (status, headers, resp) = http_request(
            d.http,
            "POST",
            "/v1/traces",
            &[JSON, ("Content-Encoding", enc)],
            &body,
        );
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&resp));
        assert_eq!(headers["content-type"], "application/json");
        let resp: serde_json::Value = serde_json::from_slice(&resp).unwrap();
        assert!(
            resp.get("partialSuccess").is_none_or(|p| p.is_null()),
            "{resp}"
        );
        kept.push(
            (0..16)
                .map(|b| u8::from_str_radix(&id[2 * b..2 * b + 2], 16).unwrap())
                .collect(),
        );
    }

    let m = d
        .wait_metrics(Duration::from_secs(10), |m| {
            m.sum("llmtail_spans_exported_total", &[]) == 24.0
        })
        .await;
    assert_eq!(
        m.sum(
            "llmtail_spans_received_total",
            &[("protocol", "http_protobuf")]
        ),
        16.0
    );
    assert_eq!(
        m.sum("llmtail_spans_received_total", &[("protocol", "http_json")]),
        8.0
    );
    assert_eq!(
        m.sum(
            "llmtail_traces_total",
            &[("decision", "kept"), ("policy", "errors")]
        ),
        8.0
    );
    // The JSON traces' LLM calls are counted like any other: 4 × 1000 input tokens.
    assert_eq!(
        m.sum(
            "llmtail_llm_tokens_total",
            &[("service", "js-web"), ("type", "input")]
        ),
        4000.0
    );
    assert_eq!(
        m.sum("llmtail_llm_cost_usd_total", &[("service", "js-web")]),
        4.0 * (1000.0 * 2.5 + 100.0 * 10.0) / 1e6
    );
    let got = sink.traces();
    for id in &kept {
        assert!(
            got.get(id).is_some_and(|s| s.len() >= 2),
            "trace {id:02x?} missing"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_the_right_status_and_the_daemon_keeps_serving() {
    let sink = Sink::start(0).await;
    let d = Daemon::start(&config(&sink, 1.0));

    // Malformed JSON → 400 with a JSON google.rpc.Status.
    let (status, headers, body) = http_request(
        d.http,
        "POST",
        "/v1/traces",
        &[JSON],
        b"{\"resourceSpans\": [",
    );
    assert_eq!(status, 400);
    assert_eq!(headers["content-type"], "application/json");
    let st: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(st["code"], 3);
    assert!(
        st["message"].as_str().unwrap().contains("OTLP/JSON"),
        "{st}"
    );

    // A value that cannot be read → 400 naming its field.
    let (status, _, body) = http_request(
        d.http,
        "POST",
        "/v1/traces",
        &[JSON],
        br#"{"resourceSpans":[{"scopeSpans":[{"spans":[{"traceId":"5b8efff798038103d269b633813fc60c","spanId":"eee19b7ec3c1b174","name":"a","startTimeUnixNano":"zz"}]}]}]}"#,
    );
    assert_eq!(status, 400);
    let st: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert!(
        st["message"]
            .as_str()
            .unwrap()
            .contains("resourceSpans[0].scopeSpans[0].spans[0].startTimeUnixNano: "),
        "{st}"
    );

    // Undecodable protobuf → 400 with a protobuf google.rpc.Status.
    let (status, _, body) = http_request(
        d.http,
        "POST",
        "/v1/traces",
        &[PB],
        &[0x0a, 0xff, 0xff, 0xff, 0x0f, 0x01],
    );
    assert_eq!(status, 400);
    let st = llmtail::receiver::http::RpcStatus::decode(&body[..]).unwrap();
    assert_eq!(st.code, 3);
    assert!(st.message.contains("not a valid OTLP"), "{}", st.message);

    // Wrong content type → 415; wrong method → 405; unknown encoding → 415.
    assert_eq!(
        http_request(
            d.http,
            "POST",
            "/v1/traces",
            &[("Content-Type", "text/plain")],
            b"x"
        )
        .0,
        415
    );
    assert_eq!(http_request(d.http, "GET", "/v1/traces", &[], b"").0, 405);
    assert_eq!(
        http_request(
            d.http,
            "POST",
            "/v1/traces",
            &[PB, ("Content-Encoding", "br")],
            b"x"
        )
        .0,
        415
    );
    assert_eq!(
        http_request(d.http, "POST", "/v1/metrics", &[PB], b"").0,
        404
    );

    // Oversized (the harness sets max_request_bytes: 1000000) → 413, plain and as a gzip bomb.
    let (status, _, _) = http_request(d.http, "POST", "/v1/traces", &[PB], &vec![0u8; 1_500_000]);
    assert_eq!(status, 413);
    let bomb = gzip(&vec![0u8; 50_000_000]);
    assert!(bomb.len() < 100_000, "a small body: {}", bomb.len());
    let (status, _, _) = http_request(
        d.http,
        "POST",
        "/v1/traces",
        &[PB, ("Content-Encoding", "gzip")],
        &bomb,
    );
    assert_eq!(status, 413);

    // Individually invalid spans → partial success, in JSON.
    let body = json_body(&format!("{:032x}", 7), false)
        .replace("\"spanId\":\"1111111111111111\"", "\"spanId\":\"\"");
    let (status, _, resp) = http_request(d.http, "POST", "/v1/traces", &[JSON], body.as_bytes());
    assert_eq!(status, 200);
    let resp: serde_json::Value = serde_json::from_slice(&resp).unwrap();
    assert_eq!(
        resp["partialSuccess"]["rejectedSpans"]
            .as_i64()
            .or_else(|| resp["partialSuccess"]["rejectedSpans"]
                .as_str()
                .and_then(|s| s.parse().ok())),
        Some(1),
        "{resp}"
    );

    // Still serving, over HTTP and gRPC.
    let mut rng = StdRng::seed_from_u64(22);
    let t = loadgen::trace(&mut rng, Kind::Normal, Convention::Seed, now_ns());
    let (status, _, _) = http_request(
        d.http,
        "POST",
        "/v1/traces",
        &[PB],
        &loadgen::request(t.spans).encode_to_vec(),
    );
    assert_eq!(status, 200);
    let t = loadgen::trace(&mut rng, Kind::Normal, Convention::Seed, now_ns());
    client(&d.endpoint())
        .await
        .export(loadgen::request(t.spans))
        .await
        .unwrap();
    let m = d
        .wait_metrics(Duration::from_secs(10), |m| {
            m.sum("llmtail_spans_exported_total", &[]) == 9.0
        })
        .await;
    assert_eq!(
        m.sum(
            "llmtail_spans_rejected_total",
            &[("reason", "invalid_span_id")]
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_preflight_allows_configured_origins_only() {
    let sink = Sink::start(0).await;
    let d = Daemon::start_with(
        "    cors:\n      allowed_origins: [\"https://app.example.com\"]\n      allowed_headers: [x-tenant]\n",
        &config(&sink, 1.0),
    );
    let preflight = |origin| {
        http_request(
            d.http,
            "OPTIONS",
            "/v1/traces",
            &[
                ("Origin", origin),
                ("Access-Control-Request-Method", "POST"),
                ("Access-Control-Request-Headers", "content-type,x-tenant"),
            ],
            b"",
        )
    };
    let (status, headers, _) = preflight("https://app.example.com");
    assert!(status == 200 || status == 204, "{status}");
    assert_eq!(
        headers["access-control-allow-origin"],
        "https://app.example.com"
    );
    assert!(headers["access-control-allow-headers"].contains("x-tenant"));
    let (_, headers, _) = preflight("https://evil.example.net");
    assert!(!headers.contains_key("access-control-allow-origin"));
    let mut rng = StdRng::seed_from_u64(23);
    let t = loadgen::trace(&mut rng, Kind::Normal, Convention::Seed, now_ns());
    let (status, headers, _) = http_request(
        d.http,
        "POST",
        "/v1/traces",
        &[PB, ("Origin", "https://app.example.com")],
        &loadgen::request(t.spans).encode_to_vec(),
    );
    assert_eq!(status, 200);
    assert_eq!(
        headers["access-control-allow-origin"],
        "https://app.example.com"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_export_queue_pushes_back_with_retryable_errors() {
    let down = Sink::start(0).await;
    down.set_mode(SINK_UNAVAILABLE);
    let d = Daemon::start(&format!(
        "sampling:\n  decision_wait: 1s\n  root_grace: 50ms\n  base_rate: 1.0\nexporter:\n  otlp:\n    endpoint: {}\n  batch:\n    max_spans: 8\n    timeout: 10ms\n  queue:\n    max_spans: 40\n",
        down.endpoint()
    ));
    let mut rng = StdRng::seed_from_u64(24);
    let t = loadgen::trace(&mut rng, Kind::Normal, Convention::Seed, now_ns());
    let spans: Vec<_> = (0..10)
        .flat_map(|_| loadgen::trace(&mut rng, Kind::Normal, Convention::Seed, now_ns()).spans)
        .collect();
    let (status, _, _) = http_request(
        d.http,
        "POST",
        "/v1/traces",
        &[PB],
        &loadgen::request(spans).encode_to_vec(),
    );
    assert_eq!(status, 200);
    d.wait_metrics(Duration::from_secs(10), |m| {
        m.sum("llmtail_export_queue_spans", &[]) == 40.0
    })
    .await;
    let body = loadgen::request(t.spans.clone()).encode_to_vec();
    let (status, headers, _) = http_request(d.http, "POST", "/v1/traces", &[PB], &body);
    assert_eq!(status, 503);
    assert!(headers["retry-after"].parse::<u64>().is_ok());
    let err = client(&d.endpoint())
        .await
        .export(loadgen::request(t.spans))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
    let m = d.metrics();
    assert_eq!(
        m.sum(
            "llmtail_requests_refused_total",
            &[("reason", "overloaded")]
        ),
        2.0
    );
    assert_eq!(m.sum("llmtail_spans_lost_total", &[]), 0.0);
}
