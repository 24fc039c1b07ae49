//! End to end with the official OpenTelemetry SDKs as clients: Python (gRPC and HTTP
//! exporters) and JavaScript (OTLP/HTTP protobuf and JSON exporters). `.ci/run` installs
//! them (`tests/install-deps.sh`).
//!
//! Each client sends 300 traces of 3 spans (a request, an LLM call, a tool call): every
//! fifth is an error, slow (`llm.latency_ms`), expensive by cost attribute or expensive by
//! tokens × price, in turn; the rest are normal. The client writes a manifest of what it
//! sent, and the test checks what llmtail kept and counted against it.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::support::*;

#[derive(serde::Deserialize)]
struct Sent {
    trace_id: String,
    kind: String,
    model: String,
    input: u64,
    output: u64,
}

const TRACES: usize = 300;
const BASE_RATE: f64 = 0.25;

/// One SDK client and what llmtail should see from it.
struct Client {
    /// `python3` or `node`.
    program: &'static str,
    /// Under `tests/`.
    script: &'static str,
    endpoint_of: fn(&Daemon) -> String,
    /// The client's protocol argument.
    protocol_arg: &'static str,
    service: &'static str,
    /// The `protocol` label llmtail counts its spans under.
    protocol: &'static str,
    /// The model of the expensive-by-tokens traces (5,000 in, 2,000 out).
    expensive_model: &'static str,
}

// claude-opus-4 and claude-3-opus: 15 × 5000 + 75 × 2000 per million tokens = $0.225.
const EXPENSIVE_CALL_USD: f64 = 0.225;

/// Runs the client against a fresh daemon and checks the results.
async fn check_client(c: Client) {
    let Client {
        program,
        script,
        endpoint_of,
        protocol_arg: extra,
        service,
        protocol,
        expensive_model,
    } = c;
    let sink = Sink::start(0).await;
    let daemon = Daemon::start(&format!(
        "sampling:
  decision_wait: 3s
  root_grace: 300ms
  base_rate: {BASE_RATE}
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
    let script = format!("{}/tests/{script}", env!("CARGO_MANIFEST_DIR"));
    let mut cmd = tokio::process::Command::new(match program {
        "python3" => python(),
        other => other.into(),
    });
    cmd.arg(&script).arg(endpoint_of(&daemon));
    // Argument order: the Python client takes COUNT MANIFEST PROTOCOL, the Node one
    // PROTOCOL COUNT MANIFEST.
    if program == "node" {
        cmd.arg(extra).arg(TRACES.to_string()).arg(&manifest);
    } else {
        cmd.arg(TRACES.to_string()).arg(&manifest).arg(extra);
    }
    let out = cmd.output().await.expect("the client runs");
    assert!(
        out.status.success(),
        "{program} {script} failed (run tests/install-deps.sh): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sent: Vec<Sent> = serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    assert_eq!(sent.len(), TRACES);

    let expected: HashSet<String> = sent
        .iter()
        .filter(|s| s.kind != "normal" || consistent_keep(&unhex(&s.trace_id), BASE_RATE))
        .map(|s| s.trace_id.clone())
        .collect();
    let m = daemon
        .wait_metrics(Duration::from_secs(20), |m| {
            m.sum("llmtail_traces_total", &[]) == TRACES as f64
                && m.sum("llmtail_spans_exported_total", &[]) == (expected.len() * 3) as f64
        })
        .await;
    let got = sink.traces();
    let got_ids: HashSet<String> = got
        .keys()
        .map(|k| k.iter().map(|b| format!("{b:02x}")).collect())
        .collect();
    assert_eq!(got_ids, expected, "{}", daemon.log());
    assert!(
        got.values().all(|spans| spans.len() == 3),
        "every kept trace arrives whole"
    );

    let n = TRACES as f64;
    assert_eq!(
        m.sum("llmtail_spans_received_total", &[("protocol", protocol)]),
        n * 3.0
    );
    assert_eq!(
        m.sum("llmtail_llm_requests_total", &[("service", service)]),
        n
    );
    assert_eq!(
        m.sum("llmtail_llm_requests_total", &[("status", "error")]),
        15.0
    );
    let kept = |policy| {
        m.sum(
            "llmtail_traces_total",
            &[("decision", "kept"), ("policy", policy)],
        )
    };
    assert_eq!(kept("errors"), 15.0);
    assert_eq!(kept("slow"), 15.0);
    assert_eq!(kept("expensive"), 30.0);
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
    // The expensive-by-tokens model is priced from the built-in table: 15 calls.
    let cost = m.sum("llmtail_llm_cost_usd_total", &[("model", expensive_model)]);
    assert!(
        (cost - 15.0 * EXPENSIVE_CALL_USD).abs() < 1e-9,
        "{expensive_model}: {cost}"
    );
}

fn grpc_endpoint(d: &Daemon) -> String {
    d.endpoint()
}

fn http_base_url(d: &Daemon) -> String {
    format!("http://{}", d.http)
}

const PYTHON: Client = Client {
    program: "python3",
    script: "python/emit_traces.py",
    endpoint_of: grpc_endpoint,
    protocol_arg: "grpc",
    service: "py-agent",
    protocol: "grpc",
    expensive_model: "claude-opus-4",
};

const NODE: Client = Client {
    program: "node",
    script: "node/emit.mjs",
    endpoint_of: http_base_url,
    protocol_arg: "proto",
    service: "node-agent",
    protocol: "http_protobuf",
    expensive_model: "claude-3-opus-20240229",
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_over_grpc() {
    check_client(PYTHON).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_over_http_protobuf() {
    check_client(Client {
        endpoint_of: http_base_url,
        protocol_arg: "http",
        protocol: "http_protobuf",
        ..PYTHON
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn javascript_sdk_over_http_protobuf() {
    check_client(NODE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn javascript_sdk_over_http_json() {
    check_client(Client {
        protocol_arg: "json",
        protocol: "http_json",
        ..NODE
    })
    .await;
}
