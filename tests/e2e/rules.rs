//! Sampling rules with the official OpenTelemetry Python SDK as the client: a condition on
//! an attribute of a non-root span keeps, a drop policy wins over an error keep, and the
//! rest is sampled consistently.

use std::collections::HashSet;
use std::time::Duration;

use crate::support::*;

#[derive(serde::Deserialize)]
struct Sent {
    trace_id: String,
    kind: String,
}

const TRACES: usize = 250;
const BASE_RATE: f64 = 0.25;

fn bytes_of(hex: &str) -> Vec<u8> {
    (0..hex.len() / 2)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditions_keep_and_drop_policies_win() {
    let sink = Sink::start(0).await;
    let daemon = Daemon::start(&format!(
        "sampling:
  decision_wait: 3s
  root_grace: 300ms
  base_rate: {BASE_RATE}
  policies:
    - name: health
      type: drop
      condition: {{field: span_name, root: true, regex: '^GET /(healthz|ready)$'}}
    - {{name: errors, type: error}}
    - name: gold
      type: condition
      condition:
        all:
          - {{attribute: customer.tier, one_of: [gold, platinum]}}
          - {{resource_attribute: service.name, equals: py-shop}}
exporter:
  otlp:
    endpoint: {}
  batch:
    timeout: 50ms
",
        sink.endpoint()
    ));
    let manifest = daemon.dir.path().join("manifest.json");
    let script = format!("{}/tests/python/rule_traces.py", env!("CARGO_MANIFEST_DIR"));
    let out = tokio::process::Command::new(python())
        .arg(&script)
        .arg(daemon.endpoint())
        .arg(TRACES.to_string())
        .arg(&manifest)
        .output()
        .await
        .expect("the client runs");
    assert!(
        out.status.success(),
        "{script} failed (run tests/install-deps.sh): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sent: Vec<Sent> = serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    assert_eq!(sent.len(), TRACES);
    let count = |kind: &str| sent.iter().filter(|s| s.kind == kind).count() as f64;
    let expected: HashSet<Vec<u8>> = sent
        .iter()
        .filter(|s| match s.kind.as_str() {
            "gold" | "error" => true,
            "health" => false,
            _ => consistent_keep(&bytes_of(&s.trace_id), BASE_RATE),
        })
        .map(|s| bytes_of(&s.trace_id))
        .collect();
    let m = daemon
        .wait_metrics(Duration::from_secs(20), |m| {
            m.sum("llmtail_traces_total", &[]) == TRACES as f64
                && m.sum("llmtail_spans_exported_total", &[]) == (expected.len() * 2) as f64
        })
        .await;
    let got: HashSet<Vec<u8>> = sink.traces().keys().cloned().collect();
    assert_eq!(got, expected, "{}", daemon.log());
    let traces = |decision, policy| {
        m.sum(
            "llmtail_traces_total",
            &[("decision", decision), ("policy", policy)],
        )
    };
    assert_eq!(traces("kept", "gold"), count("gold"));
    assert_eq!(traces("kept", "errors"), count("error"));
    assert_eq!(traces("dropped", "health"), count("health"));
    assert_eq!(traces("kept", "health"), 0.0);
}
