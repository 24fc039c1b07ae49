//! End to end with the official OpenTelemetry Python SDK as the client
//! (`opentelemetry-sdk` + `opentelemetry-exporter-otlp-proto-grpc`, installed by `.ci/run`).

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::*;

#[derive(serde::Deserialize)]
struct Sent {
    trace_id: String,
    kind: String,
    model: String,
    input: u64,
    output: u64,
}

fn hex(id: &[u8]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_traces_are_sampled_and_counted() {
    let sink = Sink::start(free_port()).await;
    let daemon = Daemon::start(&format!(
        "sampling:
  decision_wait: 3s
  root_grace: 300ms
  base_rate: 0.25
  policies:
    - {{name: errors, type: error}}
    - {{name: slow, type: latency, threshold_ms: 5000}}
    - {{name: expensive, type: cost, threshold_usd: 0.10}}
exporter:
  otlp:
    endpoint: {}
  batch:
    timeout: 50ms
",
        sink.endpoint()
    ));
    let manifest = daemon.dir.path().join("manifest.json");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/emit_traces.py");
    let out = tokio::process::Command::new("python3")
        .arg(script)
        .arg(daemon.endpoint())
        .arg("300")
        .arg(&manifest)
        .output()
        .await
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "the Python SDK client failed (run `pip install -r tests/python/requirements.txt`): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sent: Vec<Sent> = serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    assert_eq!(sent.len(), 300);

    let expected: HashSet<&str> = sent
        .iter()
        .filter(|s| {
            let id: Vec<u8> = (0..16)
                .map(|i| u8::from_str_radix(&s.trace_id[2 * i..2 * i + 2], 16).unwrap())
                .collect();
            s.kind != "normal" || consistent_keep(&id, 0.25)
        })
        .map(|s| s.trace_id.as_str())
        .collect();
    let m = daemon
        .wait_metrics(Duration::from_secs(20), |m| {
            m.sum("llmtail_traces_total", &[]) == 300.0
                && m.sum("llmtail_spans_exported_total", &[]) == (expected.len() * 3) as f64
        })
        .await;
    let got = sink.traces();
    let got_ids: HashSet<String> = got.keys().map(|k| hex(k)).collect();
    let expected_ids: HashSet<String> = expected.iter().map(|s| s.to_string()).collect();
    assert_eq!(got_ids, expected_ids, "{}", daemon.log());
    assert!(
        got.values().all(|spans| spans.len() == 3),
        "every kept trace arrives whole"
    );

    assert_eq!(
        m.sum("llmtail_spans_received_total", &[("protocol", "grpc")]),
        900.0
    );
    assert_eq!(
        m.sum("llmtail_llm_requests_total", &[("service", "py-agent")]),
        300.0
    );
    assert_eq!(
        m.sum("llmtail_llm_requests_total", &[("status", "error")]),
        15.0
    );
    assert_eq!(
        m.sum(
            "llmtail_traces_total",
            &[("decision", "kept"), ("policy", "errors")]
        ),
        15.0
    );
    assert_eq!(
        m.sum(
            "llmtail_traces_total",
            &[("decision", "kept"), ("policy", "slow")]
        ),
        15.0
    );
    assert_eq!(
        m.sum(
            "llmtail_traces_total",
            &[("decision", "kept"), ("policy", "expensive")]
        ),
        30.0
    );
    let mut tokens: HashMap<&str, (f64, f64)> = HashMap::new();
    for s in &sent {
        let e = tokens.entry(s.model.as_str()).or_default();
        e.0 += s.input as f64;
        e.1 += s.output as f64;
    }
    for (model, (input, output)) in tokens {
        assert_eq!(
            m.sum(
                "llmtail_llm_tokens_total",
                &[("model", model), ("type", "input")]
            ),
            input
        );
        assert_eq!(
            m.sum(
                "llmtail_llm_tokens_total",
                &[("model", model), ("type", "output")]
            ),
            output
        );
    }
    // claude-opus-4 is priced from the table: 15 × 5000 + 75 × 2000 per million = $0.225.
    let opus = m.sum("llmtail_llm_cost_usd_total", &[("model", "claude-opus-4")]);
    assert!((opus - 15.0 * 0.225).abs() < 1e-9, "{opus}");
}
