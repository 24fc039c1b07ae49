//! Upstream faults, each against a sink that misbehaves on purpose: RESOURCE_EXHAUSTED with
//! and without RetryInfo, an upstream slower than the export timeout, partial success.
//! Over OTLP/HTTP: 429 with Retry-After and a permanent 400. (An unreachable upstream:
//! `upstream_down_for_ten_seconds_loses_nothing` in e2e_grpc.rs.)

use std::time::Duration;

use crate::support::*;
use llmtail_tools::loadgen::Kind;

/// base_rate 0 and an error policy: exactly the error traces are kept; one export request
/// in flight so the sink sees the batches one after another.
fn config(sink: &Sink, timeout: &str) -> String {
    format!(
        "sampling:\n  decision_wait: 2s\n  root_grace: 100ms\n  base_rate: 0.0\n  policies:\n    - {{name: errors, type: error}}\nexporter:\n  otlp:\n    endpoint: {}\n    timeout: {timeout}\n  batch:\n    timeout: 200ms\n  queue:\n    concurrency: 1\n  retry:\n    initial_interval: 50ms\n    max_interval: 200ms\n",
        sink.endpoint()
    )
}

/// Sends `n` four-span error traces in one request; returns the number of spans.
async fn send_errors(d: &Daemon, seed: u64, n: usize) -> usize {
    let traces = generated(seed, Kind::Error, n);
    send_traces(d, &traces).await;
    traces.iter().map(|t| t.spans.len()).sum()
}

fn lost(m: &Metrics, reason: &str) -> f64 {
    m.sum("llmtail_spans_lost_total", &[("reason", reason)])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resource_exhausted_with_retry_info_waits_as_told_then_delivers() {
    let sink = Sink::start(0).await;
    let told = Duration::from_millis(800);
    let code = tonic::Code::ResourceExhausted;
    sink.fault_next(&[
        Fault::Status(code, Some(told)),
        Fault::Status(code, Some(told)),
    ]);
    let daemon = Daemon::start(&config(&sink, "5s"));
    let n = send_errors(&daemon, 1, 5).await;
    assert_eq!(sink.wait_for_spans(n, Duration::from_secs(15)).await, n);
    let times = sink.call_times();
    assert!(times.len() >= 3, "{} calls", times.len());
    for pair in times[..3].windows(2) {
        // The retry backoff here is 50–200 ms: only RetryInfo explains the longer waits.
        assert!(
            pair[1] - pair[0] >= told,
            "retried after {:?}",
            pair[1] - pair[0]
        );
    }
    let m = daemon.metrics();
    assert_eq!(m.sum("llmtail_export_retries_total", &[]), 2.0);
    assert_eq!(m.sum("llmtail_spans_lost_total", &[]), 0.0);
    assert_eq!(m.sum("llmtail_spans_exported_total", &[]), n as f64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resource_exhausted_without_retry_info_is_permanent() {
    let sink = Sink::start(0).await;
    sink.fault_next(&[Fault::Status(tonic::Code::ResourceExhausted, None)]);
    let daemon = Daemon::start(&config(&sink, "5s"));
    let n = send_errors(&daemon, 2, 5).await;
    let m = daemon
        .wait_metrics(Duration::from_secs(10), |m| {
            m.sum("llmtail_spans_lost_total", &[]) >= n as f64
        })
        .await;
    assert_eq!(lost(&m, "upstream_rejected"), n as f64);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(sink.calls(), 1, "not retried");
    assert!(sink.spans().is_empty());
    assert_eq!(
        daemon.metrics().sum("llmtail_export_retries_total", &[]),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_slower_than_the_timeout_is_retried() {
    let sink = Sink::start(0).await;
    sink.fault_next(&[Fault::Slow(Duration::from_secs(3))]);
    let daemon = Daemon::start(&config(&sink, "500ms"));
    let n = send_errors(&daemon, 3, 5).await;
    assert_eq!(sink.wait_for_spans(n, Duration::from_secs(15)).await, n);
    let times = sink.call_times();
    // The second attempt came after the 500 ms timeout, long before the slow call ended.
    let gap = times[1] - times[0];
    assert!(
        gap >= Duration::from_millis(450) && gap < Duration::from_secs(3),
        "{gap:?}"
    );
    let m = daemon.metrics();
    assert!(m.sum("llmtail_export_retries_total", &[]) >= 1.0);
    assert_eq!(m.sum("llmtail_spans_lost_total", &[]), 0.0);
    assert!(
        daemon.log().contains("no answer")
            || daemon.log().contains("Timeout")
            || daemon.log().contains("timed out"),
        "the timeout is logged: {}",
        daemon.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_success_counts_the_rejected_spans_and_logs_the_reason() {
    let sink = Sink::start(0).await;
    sink.fault_next(&[Fault::Partial(3, "three spans had bad timestamps")]);
    let daemon = Daemon::start(&config(&sink, "5s"));
    let n = send_errors(&daemon, 4, 5).await;
    let m = daemon
        .wait_metrics(Duration::from_secs(10), |m| {
            m.sum("llmtail_spans_exported_total", &[]) + m.sum("llmtail_spans_lost_total", &[])
                >= n as f64
        })
        .await;
    assert_eq!(lost(&m, "upstream_partial_rejection"), 3.0);
    assert_eq!(m.sum("llmtail_spans_exported_total", &[]), (n - 3) as f64);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sink.calls(), 1, "a partial success is not retried");
    assert!(daemon.log().contains("three spans had bad timestamps"));
}

/// An OTLP/HTTP upstream that answers each request with the next status of its script
/// (then 200), stores what it accepted, and records when each request came.
struct ScriptedHttpSink {
    port: u16,
    accepted: std::sync::Arc<std::sync::Mutex<Vec<usize>>>,
    times: std::sync::Arc<std::sync::Mutex<Vec<std::time::Instant>>>,
}

impl ScriptedHttpSink {
    async fn start(script: Vec<(u16, Option<&'static str>)>) -> ScriptedHttpSink {
        use axum::http::{HeaderMap, StatusCode};
        use opentelemetry_proto::tonic::collector::trace::v1::{
            ExportTraceServiceRequest, ExportTraceServiceResponse,
        };
        use prost::Message;
        use std::sync::{Arc, Mutex};
        let accepted: Arc<Mutex<Vec<usize>>> = Arc::default();
        let times: Arc<Mutex<Vec<std::time::Instant>>> = Arc::default();
        let script = Arc::new(Mutex::new(std::collections::VecDeque::from(script)));
        let (acc, ts) = (accepted.clone(), times.clone());
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: axum::body::Bytes| {
                let (acc, ts, script) = (acc.clone(), ts.clone(), script.clone());
                async move {
                    ts.lock().unwrap().push(std::time::Instant::now());
                    let mut headers = HeaderMap::new();
                    if let Some((code, retry_after)) = script.lock().unwrap().pop_front() {
                        if let Some(secs) = retry_after {
                            headers.insert("retry-after", secs.parse().unwrap());
                        }
                        return (StatusCode::from_u16(code).unwrap(), headers, Vec::new());
                    }
                    let req = ExportTraceServiceRequest::decode(&body[..]).unwrap();
                    let n = req
                        .resource_spans
                        .iter()
                        .flat_map(|rs| &rs.scope_spans)
                        .map(|ss| ss.spans.len())
                        .sum();
                    acc.lock().unwrap().push(n);
                    headers.insert("content-type", "application/x-protobuf".parse().unwrap());
                    (
                        StatusCode::OK,
                        headers,
                        ExportTraceServiceResponse::default().encode_to_vec(),
                    )
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        ScriptedHttpSink {
            port,
            accepted,
            times,
        }
    }

    fn config(&self) -> String {
        format!(
            "sampling:\n  decision_wait: 2s\n  root_grace: 100ms\n  base_rate: 0.0\n  policies:\n    - {{name: errors, type: error}}\nexporter:\n  otlp:\n    protocol: http/protobuf\n    compression: none\n    endpoint: http://127.0.0.1:{}\n  batch:\n    timeout: 200ms\n  queue:\n    concurrency: 1\n  retry:\n    initial_interval: 50ms\n    max_interval: 200ms\n",
            self.port
        )
    }

    fn spans(&self) -> usize {
        self.accepted.lock().unwrap().iter().sum()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_429_with_retry_after_waits_as_told_and_400_is_searched_by_halves() {
    let sink = ScriptedHttpSink::start(vec![(429, Some("1")), (503, None)]).await;
    let daemon = Daemon::start(&sink.config());
    let n = send_errors(&daemon, 5, 5).await;
    let m = daemon
        .wait_metrics(Duration::from_secs(15), |m| {
            m.sum("llmtail_spans_exported_total", &[]) == n as f64
        })
        .await;
    assert_eq!(sink.spans(), n);
    assert_eq!(m.sum("llmtail_export_retries_total", &[]), 2.0);
    let times = sink.times.lock().unwrap().clone();
    // Retry-After: 1 outweighs the 50 ms backoff.
    assert!(
        times[1] - times[0] >= Duration::from_secs(1),
        "{:?}",
        times[1] - times[0]
    );

    // A 400 is not retried as it was: the request is sent in halves, to find the spans at
    // fault. Here the upstream refused it once, so both halves go through.
    let refusing_once = ScriptedHttpSink::start(vec![(400, None)]).await;
    let daemon = Daemon::start(&refusing_once.config());
    let n = send_errors(&daemon, 6, 5).await;
    let m = daemon
        .wait_metrics(Duration::from_secs(10), |m| {
            m.sum("llmtail_spans_exported_total", &[]) >= n as f64
        })
        .await;
    assert_eq!(m.sum("llmtail_spans_exported_total", &[]), n as f64);
    assert_eq!(m.sum("llmtail_spans_lost_total", &[]), 0.0);
    assert_eq!(refusing_once.spans(), n);
    assert_eq!(
        refusing_once.times.lock().unwrap().len(),
        3,
        "the request, then its halves"
    );

    // Refused however it is cut: every span lost as upstream_rejected, after a bounded
    // number of sends (never the same request twice).
    let refusing = ScriptedHttpSink::start(vec![(400, None); 1000]).await;
    let daemon = Daemon::start(&refusing.config());
    let n = send_errors(&daemon, 6, 5).await;
    let m = daemon
        .wait_metrics(Duration::from_secs(10), |m| {
            m.sum("llmtail_spans_lost_total", &[]) >= n as f64
        })
        .await;
    assert_eq!(lost(&m, "upstream_rejected"), n as f64);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sends = refusing.times.lock().unwrap().len();
    assert!(
        sends < 2 * n && sends <= 65,
        "{sends} sends for {n} spans: halves only, bounded"
    );
}
