//! Accepted means delivered: against upstreams with the limits real ones have (a stock
//! grpcio server's 4 MiB message, an HTTP proxy's 413), through floods during outages in a
//! memory-limited cgroup, and through outages longer than the retry horizon with the
//! durable queue. Each test counts that every span the receivers accepted arrives, once.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use llmtail::loadgen::{self, Kind};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value::Value};
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// gRPC's default message limit, the upstream's in these tests.
const FOUR_MIB: usize = 4 << 20;

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

fn lost(m: &Metrics) -> f64 {
    m.sum("llmtail_spans_lost_total", &[])
}

/// Runs tests/python/emit_traces.py: `count` traces from the official Python SDK, each
/// LLM span carrying about `prompt_bytes` of prompt and completion.
async fn python_sdk(endpoint: &str, protocol: &str, count: usize, prompt_bytes: usize) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("manifest.json");
    let script = format!("{}/tests/python/emit_traces.py", env!("CARGO_MANIFEST_DIR"));
    let out = tokio::process::Command::new(python())
        .arg(script)
        .arg(endpoint)
        .arg(count.to_string())
        .arg(&manifest)
        .arg(protocol)
        .arg(prompt_bytes.to_string())
        .output()
        .await
        .expect("the Python SDK client runs");
    assert!(
        out.status.success(),
        "emit_traces.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sent: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    sent.iter()
        .map(|t| t["trace_id"].as_str().unwrap().to_owned())
        .collect()
}

/// Spans per trace of emit_traces.py: agent.run, the LLM call, a tool call.
const SDK_SPANS_PER_TRACE: usize = 3;

/// Every trace arrived whole (3 spans) and no span twice.
fn assert_whole_and_once(log: &PySinkLog, traces: &[String]) {
    let distinct: HashSet<&(String, String)> = log.spans.iter().collect();
    assert_eq!(distinct.len(), log.spans.len(), "a span arrived twice");
    let mut per_trace: HashMap<&str, usize> = HashMap::new();
    for (t, _) in &log.spans {
        *per_trace.entry(t.as_str()).or_default() += 1;
    }
    for t in traces {
        assert_eq!(per_trace.get(t.as_str()), Some(&SDK_SPANS_PER_TRACE), "trace {t}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompt_carrying_spans_reach_a_stock_grpc_upstream_with_its_4_mib_limit() {
    let sink = PySink::start("grpc", None);
    // Shipped exporter defaults (gzip, batch.max_spans 4096, batch.max_bytes): only the
    // upstream and the sampling rate are set.
    let daemon = Daemon::launch_opts(
        &format!(
            "sampling:\n  decision_wait: 5s\n  root_grace: 200ms\n  base_rate: 1.0\nexporter:\n  otlp:\n    endpoint: {}\n",
            sink.endpoint()
        ),
        Launch {
            max_request_bytes: Some(16 << 20),
            ..Launch::default()
        },
    );
    let traces = python_sdk(&daemon.endpoint(), "grpc", 6000, 5000).await;
    let expected = traces.len() * SDK_SPANS_PER_TRACE;
    let got = sink.wait_for_spans(expected, Duration::from_secs(90)).await;
    let m = daemon.metrics();
    assert_eq!(lost(&m), 0.0, "{}", daemon.log());
    assert_eq!(got, expected, "{}", daemon.log());
    let log = sink.log();
    assert_whole_and_once(&log, &traces);
    // ~30 MB of spans went in requests under the limit, none refused.
    let biggest = *log.requests.iter().max().unwrap();
    assert!(biggest <= FOUR_MIB, "a request of {biggest} bytes");
    assert!(log.requests.len() >= 8, "{} requests", log.requests.len());
    assert_eq!(m.sum("llmtail_spans_exported_total", &[]), expected as f64);
}

/// A span of about `bytes` (two attributes of half that each), in a trace of its own.
fn huge_span(bytes: usize) -> Span {
    let mut rng = StdRng::seed_from_u64(99);
    let mut span = loadgen::trace(&mut rng, Kind::Normal, loadgen::convention_for(0), now_ns())
        .spans
        .remove(0);
    for key in ["gen_ai.input.messages", "gen_ai.output.messages"] {
        span.attributes.push(KeyValue {
            key: key.into(),
            value: Some(AnyValue {
                value: Some(Value::StringValue("x".repeat(bytes / 2))),
            }),
            ..Default::default()
        });
    }
    span
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_upstream_answering_413_gets_halves_and_only_a_span_too_large_alone_is_lost() {
    const LIMIT: usize = 1 << 20;
    let sink = PySink::start("http", Some(LIMIT));
    // Batches allowed far over the upstream's limit: its 413s must split them.
    let daemon = Daemon::launch_opts(
        &format!(
            "sampling:\n  decision_wait: 5s\n  root_grace: 200ms\n  base_rate: 1.0\nexporter:\n  otlp:\n    endpoint: {}\n    protocol: http/protobuf\n  batch:\n    max_bytes: 16MiB\n    timeout: 500ms\n",
            sink.endpoint()
        ),
        Launch {
            max_request_bytes: Some(16 << 20),
            ..Launch::default()
        },
    );
    let http_endpoint = format!("http://{}", daemon.http);
    let traces = python_sdk(&http_endpoint, "http", 1500, 5000).await;
    // One span of ~1.4 MB: over the upstream's limit even alone.
    let mut client = client(&daemon.endpoint()).await;
    let huge = huge_span(1_400_000);
    client
        .export(loadgen::request(vec![huge]))
        .await
        .expect("accepted: llmtail's own limits allow it");
    let expected = traces.len() * SDK_SPANS_PER_TRACE;
    let got = sink.wait_for_spans(expected, Duration::from_secs(90)).await;
    let m = daemon
        .wait_metrics(Duration::from_secs(30), |m| lost(m) >= 1.0)
        .await;
    assert_eq!(got, expected, "{}", daemon.log());
    let log = sink.log();
    assert_whole_and_once(&log, &traces);
    assert!(!log.refused.is_empty(), "the upstream never said 413");
    assert!(log.requests.iter().all(|&r| r <= LIMIT));
    assert_eq!(
        m.sum("llmtail_spans_lost_total", &[("reason", "span_too_large")]),
        1.0
    );
    assert_eq!(lost(&m), 1.0);
    let log_text = daemon.log();
    assert_eq!(
        log_text.matches("a span alone is larger than the upstream accepts").count(),
        1,
        "reported once, with sizes: {log_text}"
    );
}
