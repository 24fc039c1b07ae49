//! Sampling rules with the official OpenTelemetry Python SDK as the client: a condition on
//! an attribute of a non-root span keeps, a drop policy wins over an error keep, and the
//! rest is sampled consistently.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;

use crate::support::*;

#[derive(serde::Deserialize)]
struct Sent {
    trace_id: String,
    kind: String,
}

const TRACES: usize = 250;
const BASE_RATE: f64 = 0.25;

fn root(spans: &[Span]) -> &Span {
    spans
        .iter()
        .find(|s| s.parent_span_id.is_empty())
        .expect("a root span")
}

/// Runs `rule_traces.py` against the daemon; what it sent.
async fn send(daemon: &Daemon) -> Vec<Sent> {
    let manifest = daemon.dir.path().join("manifest.json");
    python_client("rule_traces.py", &daemon.endpoint(), TRACES, &manifest, &[]).await
}

fn config(sink: &Sink, extra: &str) -> String {
    format!(
        "sampling:
  decision_wait: 3s
  root_grace: 300ms
  base_rate: {BASE_RATE}
{extra}  policies:
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
    )
}

/// What the sampling rules decide for a trace of this kind.
fn would_keep(s: &Sent) -> bool {
    match s.kind.as_str() {
        "gold" | "error" => true,
        "health" => false,
        _ => consistent_keep(&bytes_of(&s.trace_id), BASE_RATE),
    }
}

fn bytes_of(hex: &str) -> Vec<u8> {
    (0..hex.len() / 2)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditions_keep_and_drop_policies_win() {
    let sink = Sink::start(0).await;
    let daemon = Daemon::start(&config(&sink, ""));
    let sent = send(&daemon).await;
    let count = |kind: &str| sent.iter().filter(|s| s.kind == kind).count() as f64;
    let expected: HashSet<Vec<u8>> = sent
        .iter()
        .filter(|s| would_keep(s))
        .map(|s| bytes_of(&s.trace_id))
        .collect();
    let m = daemon
        .wait_metrics(Duration::from_secs(20), |m| {
            m.sum("llmtail_traces_total", &[]) == TRACES as f64
                && m.sum("llmtail_spans_exported_total", &[]) == (expected.len() * 2) as f64
        })
        .await;
    let got = sink.traces();
    let ids: HashSet<Vec<u8>> = got.keys().cloned().collect();
    assert_eq!(ids, expected, "{}", daemon.log());
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
    // Each kept root says why: the policy, p, and that its root arrived.
    let kinds: HashMap<Vec<u8>, &str> = sent
        .iter()
        .map(|s| (bytes_of(&s.trace_id), s.kind.as_str()))
        .collect();
    for (id, spans) in &got {
        let root = root(spans);
        let (policy, p) = match kinds[id] {
            "gold" => ("gold", 1.0),
            "error" => ("errors", 1.0),
            _ => ("base_rate", BASE_RATE),
        };
        assert_eq!(
            attr(root, "sampling.policy"),
            Some(&Value::StringValue(policy.into()))
        );
        assert_eq!(
            attr(root, "sampling.probability"),
            Some(&Value::DoubleValue(p))
        );
        assert_eq!(
            attr(root, "sampling.reason"),
            Some(&Value::StringValue("root".into()))
        );
        assert_eq!(attr(root, "sampling.dry_run.kept"), None);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_exports_everything_and_says_what_it_would_have_done() {
    let sink = Sink::start(0).await;
    let daemon = Daemon::start(&config(&sink, "  dry_run: true\n"));
    let sent = send(&daemon).await;
    let m = daemon
        .wait_metrics(Duration::from_secs(20), |m| {
            m.sum("llmtail_traces_total", &[]) == TRACES as f64
                && m.sum("llmtail_spans_exported_total", &[]) == (TRACES * 2) as f64
        })
        .await;
    let got = sink.traces();
    assert_eq!(got.len(), TRACES, "every trace is exported");
    let would_keep_count = sent.iter().filter(|s| would_keep(s)).count() as f64;
    assert_eq!(
        m.sum("llmtail_traces_total", &[("decision", "kept")]),
        would_keep_count
    );
    assert_eq!(
        m.sum(
            "llmtail_traces_total",
            &[("decision", "dropped"), ("policy", "health")]
        ),
        sent.iter().filter(|s| s.kind == "health").count() as f64
    );
    assert_eq!(
        m.sum("llmtail_spans_dropped_total", &[]),
        0.0,
        "nothing is dropped in a dry run"
    );
    for s in &sent {
        let spans = &got[&bytes_of(&s.trace_id)];
        assert_eq!(spans.len(), 2);
        let root = root(spans);
        assert_eq!(
            attr(root, "sampling.dry_run.kept"),
            Some(&Value::BoolValue(would_keep(s))),
            "{}",
            s.kind
        );
        if s.kind == "health" {
            assert_eq!(
                attr(root, "sampling.policy"),
                Some(&Value::StringValue("health".into()))
            );
        }
        // Everything is exported, so each span counts for itself downstream: th:0.
        for span in spans {
            assert!(span.trace_state.contains("th:0"), "{}", span.trace_state);
        }
    }
}

#[derive(serde::Deserialize)]
struct HeadSampled {
    trace_id: String,
    rv: String,
    th: String,
}

/// A head sampler's explicit randomness (`ot=rv:`) is the trace's R, not its trace id's
/// bits; a threshold R contradicts is erased on export.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_explicit_randomness_value_decides_and_contradicted_thresholds_are_erased() {
    const N: usize = 300;
    let sink = Sink::start(0).await;
    let daemon = Daemon::start(&format!(
        "sampling:\n  decision_wait: 3s\n  root_grace: 300ms\n  base_rate: {BASE_RATE}\nexporter:\n  otlp:\n    endpoint: {}\n  batch:\n    timeout: 50ms\n",
        sink.endpoint()
    ));
    let manifest = daemon.dir.path().join("manifest.json");
    let sent: Vec<HeadSampled> =
        python_client("head_sampled.py", &daemon.endpoint(), N, &manifest, &[]).await;
    // base_rate 0.25: T = 0xc0000000000000.
    let t = 0xc0_0000_0000_0000u64;
    let rv = |s: &HeadSampled| u64::from_str_radix(&s.rv, 16).unwrap();
    let expected: HashSet<Vec<u8>> = sent
        .iter()
        .filter(|s| rv(s) >= t)
        .map(|s| bytes_of(&s.trace_id))
        .collect();
    // The rv and the trace id disagree for many traces: the test tells them apart.
    let by_trace_id = sent
        .iter()
        .filter(|s| consistent_keep(&bytes_of(&s.trace_id), BASE_RATE) != (rv(s) >= t))
        .count();
    assert!(by_trace_id > N / 10, "{by_trace_id}");
    daemon
        .wait_metrics(Duration::from_secs(20), |m| {
            m.sum("llmtail_traces_total", &[]) == N as f64
                && m.sum("llmtail_spans_exported_total", &[]) == (expected.len() * 2) as f64
        })
        .await;
    let got = sink.traces();
    let ids: HashSet<Vec<u8>> = got.keys().cloned().collect();
    assert_eq!(ids, expected, "{}", daemon.log());
    let mut erased = 0;
    for s in sent.iter().filter(|s| rv(s) >= t) {
        // th:e (T = 0xe0…) stands only where R ≥ T; elsewhere it is erased and ours (c)
        // is written.
        let th = if s.th == "e" && rv(s) >= 0xe0_0000_0000_0000 {
            "e"
        } else {
            if s.th == "e" {
                erased += 1;
            }
            "c"
        };
        for span in &got[&bytes_of(&s.trace_id)] {
            assert_eq!(
                span.trace_state,
                format!("ot=th:{th};rv:{}", s.rv),
                "{}",
                s.trace_id
            );
        }
    }
    assert!(erased > 0, "some thresholds were contradicted");
}

/// `GET /debug/traces/{id}` for a held, a kept and a dropped trace, behind the admin token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_debug_endpoint_says_where_a_trace_is_and_why() {
    use llmtail_tools::loadgen::{self, Kind};
    use rand::SeedableRng;

    const TOKEN: &str = "debug-token-0123456789";
    let sink = Sink::start(0).await;
    // The harness's config ends in `admin:`; these lines continue it.
    let daemon = Daemon::start(&format!(
        "  debug_traces: true\n  bearer_tokens: [{TOKEN}]\nsampling:\n  decision_wait: 60s\n  root_grace: 200ms\n  base_rate: 0\n  policies:\n    - {{name: errors, type: error}}\nexporter:\n  otlp:\n    endpoint: {}\n  batch:\n    timeout: 50ms\n",
        sink.endpoint()
    ));
    let mut rng = rand::rngs::StdRng::seed_from_u64(21);
    let make = |rng: &mut rand::rngs::StdRng, kind| {
        loadgen::trace(rng, kind, loadgen::convention_for(0), now_ns())
    };
    let held = make(&mut rng, Kind::Normal);
    let kept = make(&mut rng, Kind::Error);
    let dropped = make(&mut rng, Kind::Normal);
    let mut spans: Vec<_> = held.spans[1..].to_vec(); // no root: held for decision_wait
    spans.extend(kept.spans.iter().cloned());
    spans.extend(dropped.spans.iter().cloned());
    client(&daemon.endpoint())
        .await
        .export(loadgen::request(spans))
        .await
        .unwrap();
    daemon
        .wait_metrics(Duration::from_secs(10), |m| {
            m.sum("llmtail_traces_total", &[]) == 2.0
        })
        .await;
    let get = |path: &str, token: Option<&str>| {
        let auth = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = auth
            .as_deref()
            .map(|a| vec![("authorization", a)])
            .unwrap_or_default();
        let (code, _, body) = http_request(daemon.admin, "GET", path, &headers, b"");
        let json: serde_json::Value =
            serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
        (code, json)
    };
    let path = |id: &[u8; 16]| format!("/debug/traces/{}", hex(id));

    let (code, _) = get(&path(&kept.trace_id), None);
    assert_eq!(code, 401, "the debug endpoint needs the admin token");
    let (code, _) = get(&path(&kept.trace_id), Some("wrong-token-0123456789"));
    assert_eq!(code, 401);

    let (code, j) = get(&path(&held.trace_id), Some(TOKEN));
    assert_eq!(code, 200, "{j}");
    assert_eq!(j["state"], "held");
    assert_eq!(j["spans"], held.spans.len() - 1);
    assert_eq!(j["root_seen"], false);
    assert!(j["decided_in_ms"].as_u64().unwrap() > 50_000, "{j}");

    let (code, j) = get(&path(&kept.trace_id), Some(TOKEN));
    assert_eq!(code, 200, "{j}");
    assert_eq!(
        (&j["state"], &j["decision"], &j["policy"], &j["reason"]),
        (
            &serde_json::json!("decided"),
            &serde_json::json!("kept"),
            &serde_json::json!("errors"),
            &serde_json::json!("root")
        ),
        "{j}"
    );
    assert_eq!(j["probability"], 1.0);

    let (code, j) = get(&path(&dropped.trace_id), Some(TOKEN));
    assert_eq!(code, 200, "{j}");
    assert_eq!(
        (&j["decision"], &j["policy"], &j["probability"]),
        (
            &serde_json::json!("dropped"),
            &serde_json::json!("base_rate"),
            &serde_json::json!(0.0)
        ),
        "{j}"
    );

    let (code, j) = get("/debug/traces/not-an-id", Some(TOKEN));
    assert_eq!(code, 400);
    assert!(j["error"].as_str().unwrap().contains("trace_id"), "{j}");
    let (code, j) = get(&path(&[0x5a; 16]), Some(TOKEN));
    assert_eq!((code, &j["state"]), (404, &serde_json::json!("unknown")));
    // /metrics stays open.
    assert_eq!(get("/metrics", None).0, 200);
}

/// `llmtail explain` on what the file exporter wrote: every trace the Python SDK sent,
/// decided by another config's rules as the daemon would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_replays_a_file_exporter_file_through_a_config() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("all.jsonl");
    // Keep everything, into a file.
    let daemon = Daemon::start(&format!(
        "sampling:\n  decision_wait: 3s\n  root_grace: 300ms\n  base_rate: 1.0\nexporter:\n  file:\n    path: {}\n  batch:\n    timeout: 50ms\n",
        file.display()
    ));
    let sent = send(&daemon).await;
    daemon
        .wait_metrics(Duration::from_secs(20), |m| {
            m.sum("llmtail_spans_exported_total", &[]) == (TRACES * 2) as f64
        })
        .await;
    // The rules under test, in a config of their own.
    let sink = Sink::unstarted(free_port());
    let rules = dir.path().join("rules.yaml");
    std::fs::write(&rules, config(&sink, "")).unwrap();
    let out = std::process::Command::new(binary())
        .arg("--config")
        .arg(&rules)
        .arg("explain")
        .arg(&file)
        .arg("--json")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let decided: HashMap<String, serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["trace_id"].as_str().unwrap().to_owned(), v)
        })
        .collect();
    assert_eq!(decided.len(), TRACES);
    for s in &sent {
        let d = &decided[&s.trace_id];
        let (decision, policy) = match s.kind.as_str() {
            "gold" => ("kept", "gold"),
            "health" => ("dropped", "health"),
            "error" => ("kept", "errors"),
            _ if would_keep(s) => ("kept", "base_rate"),
            _ => ("dropped", "base_rate"),
        };
        assert_eq!(
            (
                d["decision"].as_str(),
                d["policy"].as_str(),
                d["spans"].as_u64()
            ),
            (Some(decision), Some(policy), Some(2)),
            "{} {d}",
            s.kind
        );
    }
    // The table form ends with the counts.
    let table = std::process::Command::new(binary())
        .arg("--config")
        .arg(&rules)
        .arg("explain")
        .arg(&file)
        .output()
        .unwrap();
    let text = String::from_utf8(table.stdout).unwrap();
    let kept = sent.iter().filter(|s| would_keep(s)).count();
    assert!(
        text.lines()
            .last()
            .unwrap()
            .starts_with(&format!("{TRACES} traces: {kept} kept")),
        "{text}"
    );
}

#[derive(serde::Deserialize)]
struct Keyed {
    trace_id: String,
    route: String,
    at: f64,
}

/// The dynamic policy on a skewed route mix from the Python SDK, sent to two replicas
/// alike: after the first windows, about 1 in 10 traces is kept (within ±40%), rare
/// routes far more often than the common one, and both replicas decide nearly every trace
/// the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dynamic_policy_converges_and_replicas_agree() {
    const N: usize = 4000;
    const SECONDS: f64 = 8.0;
    let config = |sink: &Sink| {
        format!(
            "sampling:\n  decision_wait: 3s\n  root_grace: 200ms\n  policies:\n    - name: routes\n      type: dynamic\n      goal_rate: 10\n      window: 1s\n      key:\n        - {{resource_attribute: service.name}}\n        - {{attribute: http.route, root: true}}\n        - {{field: status}}\nexporter:\n  otlp:\n    endpoint: {}\n  batch:\n    timeout: 50ms\n",
            sink.endpoint()
        )
    };
    let (sink_a, sink_b) = (Sink::start(0).await, Sink::start(0).await);
    let (a, b) = (
        Daemon::start(&config(&sink_a)),
        Daemon::start(&config(&sink_b)),
    );
    let seconds = SECONDS.to_string();
    let extra = [seconds.as_str()];
    let (endpoint_a, endpoint_b) = (a.endpoint(), b.endpoint());
    let (manifest_a, manifest_b) = (
        a.dir.path().join("manifest.json"),
        b.dir.path().join("manifest.json"),
    );
    let (sent, _): (Vec<Keyed>, Vec<Keyed>) = tokio::join!(
        python_client("keyed_traces.py", &endpoint_a, N, &manifest_a, &extra),
        python_client("keyed_traces.py", &endpoint_b, N, &manifest_b, &extra),
    );
    for d in [&a, &b] {
        d.wait_metrics(Duration::from_secs(30), |m| {
            m.sum("llmtail_traces_total", &[]) == N as f64
                && m.sum("llmtail_spans_exported_total", &[])
                    == 2.0 * m.sum("llmtail_traces_total", &[("decision", "kept")])
        })
        .await;
    }
    let kept_a: HashSet<Vec<u8>> = sink_a.traces().keys().cloned().collect();
    let kept_b: HashSet<Vec<u8>> = sink_b.traces().keys().cloned().collect();
    // After the first 2 s (two windows: the moving average has counts to go on).
    let settled: Vec<&Keyed> = sent.iter().filter(|s| s.at >= 2.0).collect();
    let kept = |set: &HashSet<Vec<u8>>, route: Option<&str>| {
        let of: Vec<&&Keyed> = settled
            .iter()
            .filter(|s| route.is_none_or(|r| s.route == r))
            .collect();
        let k = of
            .iter()
            .filter(|s| set.contains(&bytes_of(&s.trace_id)))
            .count();
        (k as f64 / of.len() as f64, of.len())
    };
    let (share, n) = kept(&kept_a, None);
    assert!(
        (0.06..=0.14).contains(&share),
        "kept share {share} of {n} traces (goal 1 in 10)"
    );
    let (common, _) = kept(&kept_a, Some("/api/r00"));
    let rare: Vec<&str> = ["/api/r15", "/api/r18", "/api/r20", "/api/r22", "/api/r24"].into();
    let rare_share = {
        let of: Vec<&&Keyed> = settled
            .iter()
            .filter(|s| rare.contains(&s.route.as_str()))
            .collect();
        of.iter()
            .filter(|s| kept_a.contains(&bytes_of(&s.trace_id)))
            .count() as f64
            / of.len() as f64
    };
    assert!(
        rare_share > 4.0 * common,
        "rare routes {rare_share} vs the commonest {common}"
    );
    // Both replicas saw the same traces: their decisions agree on nearly all of them.
    let disagree = settled
        .iter()
        .filter(|s| {
            let id = bytes_of(&s.trace_id);
            kept_a.contains(&id) != kept_b.contains(&id)
        })
        .count();
    assert!(
        disagree * 100 <= settled.len() * 3,
        "{disagree} of {} decisions differ between the replicas",
        settled.len()
    );
    eprintln!(
        "dynamic: kept {share:.3} of {n}; commonest route {common:.3}, rare routes {rare_share:.3}; {disagree} of {} decisions differ",
        settled.len()
    );
    let m = a.metrics();
    assert!(
        m.sum(
            "llmtail_dynamic_sampling_probability",
            &[("policy", "routes"), ("key", "py-routes|/api/r00|ok")]
        ) > 0.0
    );
}
