//! Exporters, black-box: OTLP/HTTP upstream with gzip and an API key, TLS and mutual TLS
//! upstreams with a CA made in the test, and several exporters at once.

use std::time::Duration;

use crate::support::*;
use llmtail_tools::loadgen::Kind;

const SAMPLING: &str = "sampling:\n  decision_wait: 2s\n  root_grace: 100ms\n  base_rate: 0.0\n  policies:\n    - {name: errors, type: error}\n";
const FAST: &str = "    batch:\n      timeout: 50ms\n    retry:\n      initial_interval: 100ms\n      max_interval: 500ms\n";

async fn send_errors(d: &Daemon, seed: u64, n: usize) -> Vec<[u8; 16]> {
    let traces = generated(seed, Kind::Error, n);
    send_traces(d, &traces).await;
    traces.iter().map(|t| t.trace_id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_protobuf_upstream_gets_gzip_and_the_api_key_from_the_environment() {
    let secret = "s3cr3t-key-4f9a";
    let sink = HttpSink::start(0, secret, None).await;
    let d = Daemon::start_env(
        &format!(
            "{SAMPLING}exporters:\n  - name: vendor\n    otlp:\n      protocol: http/protobuf\n      endpoint: http://127.0.0.1:{}/otlp\n      headers:\n        x-api-key: ${{env:VENDOR_KEY}}\n{FAST}",
            sink.port
        ),
        &[("VENDOR_KEY", secret)],
    );
    send_errors(&d, 31, 5).await;
    assert_eq!(
        sink.wait_for_spans(20, Duration::from_secs(10)).await,
        20,
        "{}",
        d.log()
    );
    let m = d.metrics();
    assert_eq!(
        m.sum("llmtail_spans_exported_total", &[("exporter", "vendor")]),
        20.0
    );
    assert!(sink.spans().iter().all(|s| s.trace_state == "ot=th:0"));
    let metrics_text = http_get(d.admin, "/metrics").unwrap().1;
    assert!(
        !metrics_text.contains(secret) && !d.log().contains(secret),
        "the key leaked"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_api_key_is_a_permanent_error_counted_as_lost() {
    let sink = HttpSink::start(0, "right", None).await;
    let d = Daemon::start(&format!(
        "{SAMPLING}exporter:\n  otlp:\n    protocol: http/protobuf\n    endpoint: http://127.0.0.1:{}/otlp\n    headers: {{x-api-key: wrong}}\n  batch:\n    timeout: 50ms\n",
        sink.port
    ));
    send_errors(&d, 32, 3).await;
    let m = d
        .wait_metrics(Duration::from_secs(10), |m| {
            m.sum("llmtail_spans_lost_total", &[]) == 12.0
        })
        .await;
    assert_eq!(
        m.sum(
            "llmtail_spans_lost_total",
            &[("exporter", "default"), ("reason", "upstream_rejected")]
        ),
        12.0
    );
    let refused = sink.unauthorized.load(std::sync::atomic::Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        sink.unauthorized.load(std::sync::atomic::Ordering::SeqCst),
        refused,
        "401 is not retried"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_upstream_over_mutual_tls_with_a_private_ca() {
    let pki = Pki::new();
    let sink = Sink::start_mtls(0, &pki).await;
    let d = Daemon::start(&format!(
        "{SAMPLING}exporter:\n  otlp:\n    endpoint: https://localhost:{}\n    tls:\n      ca_file: {}\n      cert_file: {}\n      key_file: {}\n  batch:\n    timeout: 50ms\n",
        sink.port,
        pki.path("ca.pem"),
        pki.path("client.pem"),
        pki.path("client-key.pem"),
    ));
    let ids = send_errors(&d, 33, 4).await;
    assert_eq!(
        sink.wait_for_spans(16, Duration::from_secs(10)).await,
        16,
        "{}",
        d.log()
    );
    let got = sink.traces();
    assert!(ids.iter().all(|id| got.contains_key(&id[..])));

    // Without the client certificate the upstream refuses the handshake: nothing arrives,
    // the spans wait in the queue for retries.
    let d2 = Daemon::start(&format!(
        "{SAMPLING}exporter:\n  otlp:\n    endpoint: https://localhost:{}\n    tls:\n      ca_file: {}\n  batch:\n    timeout: 50ms\n",
        sink.port,
        pki.path("ca.pem"),
    ));
    send_errors(&d2, 34, 1).await;
    d2.wait_metrics(Duration::from_secs(5), |m| {
        m.sum("llmtail_export_queue_spans", &[]) == 4.0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(d2.metrics().sum("llmtail_spans_exported_total", &[]), 0.0);
    assert_eq!(sink.spans().len(), 16);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_upstream_over_tls_with_a_private_ca() {
    let pki = Pki::new();
    let sink = HttpSink::start(0, "k", Some(&pki)).await;
    let d = Daemon::start(&format!(
        "{SAMPLING}exporter:\n  otlp:\n    protocol: http/protobuf\n    endpoint: https://localhost:{}/otlp\n    headers: {{x-api-key: k}}\n    tls:\n      ca_file: {}\n  batch:\n    timeout: 50ms\n",
        sink.port,
        pki.path("ca.pem"),
    ));
    send_errors(&d, 35, 2).await;
    assert_eq!(
        sink.wait_for_spans(8, Duration::from_secs(10)).await,
        8,
        "{}",
        d.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_exporters_each_get_every_kept_trace_and_a_down_one_blocks_no_other() {
    let grpc = Sink::start(0).await;
    let vendor = HttpSink::start(0, "k", None).await;
    vendor.down.store(true, std::sync::atomic::Ordering::SeqCst);
    let http_port = vendor.port;
    let d = Daemon::start(&format!(
        "{SAMPLING}exporters:\n  - name: tempo\n    otlp:\n      endpoint: {}\n{FAST}  - name: vendor\n    otlp:\n      protocol: http/protobuf\n      endpoint: http://127.0.0.1:{http_port}/otlp\n      headers: {{x-api-key: k}}\n{FAST}",
        grpc.endpoint()
    ));
    send_errors(&d, 36, 5).await;
    // The vendor is down: tempo still gets everything at once.
    assert_eq!(grpc.wait_for_spans(20, Duration::from_secs(10)).await, 20);
    let m = d
        .wait_metrics(Duration::from_secs(5), |m| {
            m.sum("llmtail_export_queue_spans", &[("exporter", "vendor")]) == 20.0
                && m.sum("llmtail_spans_exported_total", &[("exporter", "tempo")]) == 20.0
        })
        .await;
    assert_eq!(
        m.sum("llmtail_spans_exported_total", &[("exporter", "tempo")]),
        20.0
    );
    assert_eq!(
        m.sum("llmtail_spans_exported_total", &[("exporter", "vendor")]),
        0.0
    );
    // The vendor comes up and catches up from its own queue.
    vendor
        .down
        .store(false, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        vendor.wait_for_spans(20, Duration::from_secs(10)).await,
        20,
        "{}",
        d.log()
    );
    let m = d.metrics();
    assert_eq!(
        m.sum("llmtail_spans_exported_total", &[("exporter", "vendor")]),
        20.0
    );
    assert_eq!(m.sum("llmtail_spans_lost_total", &[]), 0.0);
}

#[test]
fn exporter_config_problems_are_reported() {
    let (code, err) = validate(
        "exporters:\n  - name: a\n    otlp:\n      endpoint: https://x:4317\n      protocol: carrier-pigeon\n      tls:\n        cert_file: /nonexistent.pem\n  - otlp:\n      endpoint: http://y:4317\n",
    );
    assert_eq!(code, Some(2));
    assert!(err.contains("exporters[0].otlp.protocol"), "{err}");
    assert!(err.contains("exporters[0].otlp.tls"), "{err}");
    assert!(
        err.contains("exporters[1]: every entry of exporters needs a name"),
        "{err}"
    );
    // A file in a directory that does not exist is reported before the daemon would
    // start and exit on it.
    let (code, err) =
        validate("exporter:\n  file:\n    path: /nonexistent-llmtail-dir/kept.jsonl\n");
    assert_eq!(code, Some(2));
    assert!(
        err.contains("exporter.file.path")
            && err.contains("/nonexistent-llmtail-dir does not exist"),
        "{err}"
    );
}
