//! Long LLM agent runs through the real OpenTelemetry Python SDK, with default timing: each
//! step's spans sent as they end, the root span last, the failure or the cost blow-up in
//! the last step. Every failing or expensive run must arrive whole; a healthy one whole or
//! not at all (by the consistent base rate); each run decided once.

use std::collections::HashMap;
use std::time::Duration;

use crate::support::*;

#[derive(serde::Deserialize)]
struct Run {
    trace_id: String,
    kind: String,
    spans: usize,
}

const BASE_RATE: f64 = 0.1;

/// `runs` runs of `steps` steps of `step_seconds` each against a daemon on the shipped
/// policies (slow raised past the runs' length — 120 s, or twice a run — so only the last
/// step decides) and default timing.
async fn agent_runs(runs: usize, steps: usize, step_seconds: f64) {
    let slow_ms = (2.0 * steps as f64 * step_seconds * 1000.0).max(120_000.0) as u64;
    let sink = Sink::start(0).await;
    let daemon = Daemon::start(&format!(
        "sampling:
  base_rate: {BASE_RATE}
  policies:
    - {{name: errors, type: error}}
    - {{name: slow, type: latency, threshold_ms: {slow_ms}}}
    - {{name: expensive, type: cost, threshold_usd: 0.10}}
exporter:
  otlp:
    endpoint: {}
storage:
  directory: llmtail-data
",
        sink.endpoint()
    ));
    let manifest = daemon.dir.path().join("runs.json");
    let sent: Vec<Run> = python_client(
        "agent_runs.py",
        &daemon.endpoint(),
        runs,
        &manifest,
        &[&steps.to_string(), &step_seconds.to_string()],
    )
    .await;
    let expected: HashMap<Vec<u8>, &Run> = sent
        .iter()
        .map(|r| (unhex(&r.trace_id), r))
        .filter(|(id, r)| r.kind != "healthy" || consistent_keep(id, BASE_RATE))
        .collect();
    let spans: usize = expected.values().map(|r| r.spans).sum();
    // Each run is decided root_grace after its root, which the client sent last.
    let m = daemon
        .wait_metrics(Duration::from_secs(30), |m| {
            m.sum("llmtail_traces_total", &[]) == runs as f64
                && m.sum("llmtail_spans_exported_total", &[]) >= spans as f64
        })
        .await;
    let got = sink.traces();
    for r in &sent {
        let id = unhex(&r.trace_id);
        let arrived = got.get(&id).map_or(0, Vec::len);
        let want = if expected.contains_key(&id) {
            r.spans
        } else {
            0
        };
        assert_eq!(
            arrived,
            want,
            "{} run {} sent {} spans: {arrived} arrived\n{}",
            r.kind,
            r.trace_id,
            r.spans,
            daemon.log()
        );
    }
    assert_eq!(got.len(), expected.len());
    assert_eq!(m.sum("llmtail_traces_total", &[]), runs as f64);
    assert_eq!(
        m.sum("llmtail_late_spans_total", &[]),
        0.0,
        "every run decided once, whole"
    );
    for kind in ["failing", "expensive"] {
        let n = sent.iter().filter(|r| r.kind == kind).count();
        assert!(n > 0, "the client sent {kind} runs");
    }
}

/// 40 runs of 40 s, a step every 2 s: the case the issue measured (18 of 20 failing runs
/// were lost with a 10 s decision_wait).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_second_agent_runs_failing_or_expensive_at_the_end_arrive_whole() {
    agent_runs(40, 20, 2.0).await;
}

/// 6 runs of 10 minutes, a step every 60 s (each step's spans reach llmtail up to 5 s
/// after they end): well past any fixed decision window, shorter than idle_timeout's gaps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_minute_agent_runs_a_step_a_minute_arrive_whole() {
    agent_runs(6, 10, 60.0).await;
}
