//! LLM intelligence, black-box: roll-ups on kept roots, privacy, anomalies, session keeps,
//! the pricing file, the `pricing` command, spend per user, GenAI metrics.

use std::time::Duration;

use crate::support::*;
use llmtail_tools::loadgen::{self, Convention, GeneratedTrace, Kind};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value::Value};
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use rand::SeedableRng;
use rand::rngs::StdRng;

fn string(k: &str, v: &str) -> KeyValue {
    KeyValue {
        key: k.into(),
        value: Some(AnyValue {
            value: Some(Value::StringValue(v.into())),
        }),
        ..Default::default()
    }
}

fn double(k: &str, v: f64) -> KeyValue {
    KeyValue {
        key: k.into(),
        value: Some(AnyValue {
            value: Some(Value::DoubleValue(v)),
        }),
        ..Default::default()
    }
}

fn config(
    sink: &Sink,
    base_rate: f64,
    wait: &str,
    grace: &str,
    policies: &str,
    llm: &str,
) -> String {
    format!(
        "sampling:\n  decision_wait: {wait}\n  root_grace: {grace}\n  base_rate: {base_rate}\n  policies:\n{policies}exporter:\n  otlp:\n    endpoint: {}\n  batch:\n    timeout: 50ms\n{llm}",
        sink.endpoint()
    )
}

const ERRORS: &str = "    - {name: errors, type: error}\n";

async fn send(d: &Daemon, spans: Vec<Span>) {
    client(&d.endpoint())
        .await
        .export(loadgen::request(spans))
        .await
        .unwrap();
}

fn trace(rng: &mut StdRng, kind: Kind) -> GeneratedTrace {
    loadgen::trace(rng, kind, Convention::GenAi, now_ns())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_roots_carry_the_trace_totals_and_spend_is_counted_per_user() {
    let sink = Sink::start(0).await;
    let d = Daemon::start(&config(&sink, 0.0, "2s", "100ms", ERRORS, ""));
    let mut rng = StdRng::seed_from_u64(41);
    let mut t = trace(&mut rng, Kind::Error);
    t.spans[0].attributes.push(string("user.id", "user-7"));
    t.spans[0].attributes.push(string("session.id", "sess-1"));
    // A second LLM call in the same trace.
    let mut second = t.spans[1].clone();
    second.span_id = vec![9; 8];
    t.spans.push(second);
    send(&d, t.spans.clone()).await;
    assert_eq!(
        sink.wait_for_spans(5, Duration::from_secs(10)).await,
        5,
        "{}",
        d.log()
    );
    let root = sink
        .spans()
        .into_iter()
        .find(|s| s.parent_span_id.is_empty())
        .expect("the root arrives");
    assert_eq!(attr(&root, "llm.trace.calls"), Some(&Value::IntValue(2)));
    assert_eq!(
        attr(&root, "llm.trace.input_tokens"),
        Some(&Value::IntValue(2 * t.input_tokens as i64))
    );
    assert_eq!(
        attr(&root, "llm.trace.output_tokens"),
        Some(&Value::IntValue(2 * t.output_tokens as i64))
    );
    let Some(Value::DoubleValue(cost)) = attr(&root, "llm.trace.cost_usd") else {
        panic!("no cost")
    };
    assert!((cost - 2.0 * t.cost_usd).abs() < 1e-12);
    assert_eq!(
        attr(&root, "sampling.policy"),
        Some(&Value::StringValue("errors".into()))
    );
    // The other attributes are untouched, and no other span got a roll-up.
    assert_eq!(
        attr(&root, "http.route"),
        Some(&Value::StringValue("/v1/chat".into()))
    );
    assert!(
        sink.spans()
            .iter()
            .filter(|s| attr(s, "llm.trace.calls").is_some())
            .count()
            == 1
    );

    let m = d.metrics();
    assert!(
        (m.sum("llmtail_llm_user_cost_usd_total", &[("user", "user-7")]) - 2.0 * t.cost_usd).abs()
            < 1e-12
    );
    assert_eq!(
        m.sum(
            "llmtail_llm_user_tokens_total",
            &[("user", "user-7"), ("type", "input")]
        ),
        2.0 * t.input_tokens as f64
    );
    assert!(
        m.sum(
            "llmtail_llm_session_cost_usd_total",
            &[("session", "sess-1")]
        ) > 0.0
    );
    // GenAI semantic-convention metrics, with their labels.
    let genai = [
        ("gen_ai_request_model", t.model),
        ("gen_ai_token_type", "input"),
        ("gen_ai_provider_name", "openai"),
    ];
    assert_eq!(m.sum("gen_ai_client_token_usage_count", &genai), 2.0);
    assert_eq!(
        m.sum("gen_ai_client_token_usage_sum", &genai),
        2.0 * t.input_tokens as f64
    );
    assert_eq!(
        m.sum(
            "gen_ai_client_operation_duration_seconds_count",
            &[("error_type", "_OTHER")]
        ),
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn privacy_leaves_no_prompt_text_in_the_exported_bytes() {
    let sink = Sink::start(0).await;
    let d = Daemon::start(&config(
        &sink,
        1.0,
        "2s",
        "100ms",
        ERRORS,
        "llm:\n  privacy:\n    content: drop\n    mask:\n      attributes: [\"user.email\"]\n      patterns: [email]\n",
    ));
    let mut rng = StdRng::seed_from_u64(42);
    let mut t = trace(&mut rng, Kind::Normal);
    let secret = "my password is hunter2-7f3a";
    t.spans[1].attributes.push(string(
        "gen_ai.input.messages",
        &format!("[{{\"role\":\"user\",\"content\":\"{secret}\"}}]"),
    ));
    t.spans[1]
        .attributes
        .push(string("gen_ai.output.messages", "hunter2-7f3a noted"));
    t.spans[0]
        .attributes
        .push(string("user.email", "mail me at jane@example.com"));
    send(&d, t.spans.clone()).await;
    assert_eq!(sink.wait_for_spans(4, Duration::from_secs(10)).await, 4);
    let exported: Vec<u8> = sink
        .requests()
        .iter()
        .flat_map(|r| r.encode_to_vec())
        .collect();
    let text = String::from_utf8_lossy(&exported);
    assert!(
        !text.contains("hunter2-7f3a") && !text.contains("jane@example.com"),
        "content leaked"
    );
    assert!(text.contains("mail me at [REDACTED]"));
    assert!(
        text.contains("gpt-4o-mini"),
        "everything else is still there"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_anomalous_call_is_counted_and_kept_by_the_anomaly_policy() {
    let sink = Sink::start(0).await;
    let d = Daemon::start(&config(
        &sink,
        0.0,
        "2s",
        "100ms",
        "    - {name: odd, type: anomaly}\n",
        "",
    ));
    let mut rng = StdRng::seed_from_u64(43);
    let mut spans = Vec::new();
    for i in 0..40 {
        let mut t = trace(&mut rng, Kind::Normal);
        t.spans[1]
            .attributes
            .push(double("llm.latency_ms", 1000.0 + f64::from(i % 7) * 20.0));
        spans.extend(t.spans);
    }
    send(&d, spans).await;
    let mut slow = trace(&mut rng, Kind::Normal);
    slow.spans[1]
        .attributes
        .push(double("llm.latency_ms", 9000.0));
    send(&d, slow.spans.clone()).await;
    let m = d
        .wait_metrics(Duration::from_secs(10), |m| {
            m.sum("llmtail_traces_total", &[]) == 41.0
        })
        .await;
    assert_eq!(
        m.sum("llmtail_llm_anomalies_total", &[("kind", "latency")]),
        1.0
    );
    assert_eq!(
        m.sum(
            "llmtail_traces_total",
            &[("decision", "kept"), ("policy", "odd")]
        ),
        1.0
    );
    assert_eq!(sink.wait_for_spans(4, Duration::from_secs(5)).await, 4);
    assert!(sink.traces().contains_key(&slow.trace_id[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_policy_keeps_the_conversation_around_an_error() {
    let sink = Sink::start(0).await;
    let d = Daemon::start(&config(
        &sink,
        0.0,
        "3s",
        "100ms",
        "    - {name: errors, type: error}\n    - {name: conversation, type: session, window: 1m}\n",
        "",
    ));
    let mut rng = StdRng::seed_from_u64(44);
    // The generator gives every LLM span `session.id: sess-42`; replace it.
    let in_session = |t: &mut GeneratedTrace, s: &str| {
        t.spans[1].attributes.retain(|a| a.key != "session.id");
        t.spans[1].attributes.push(string("session.id", s));
    };
    // Before the incident, still buffered (no root yet: decided at decision_wait).
    let mut before = trace(&mut rng, Kind::Normal);
    in_session(&mut before, "conv-1");
    send(&d, before.spans[1..].to_vec()).await;
    let mut incident = trace(&mut rng, Kind::Error);
    in_session(&mut incident, "conv-1");
    send(&d, incident.spans.clone()).await;
    d.wait_metrics(Duration::from_secs(5), |m| {
        m.sum("llmtail_traces_total", &[("policy", "errors")]) == 1.0
    })
    .await;
    // After the incident, same session; and a trace of another session.
    let mut after = trace(&mut rng, Kind::Normal);
    in_session(&mut after, "conv-1");
    let mut other = trace(&mut rng, Kind::Normal);
    in_session(&mut other, "conv-2");
    send(&d, [after.spans.clone(), other.spans.clone()].concat()).await;
    let m = d
        .wait_metrics(Duration::from_secs(10), |m| {
            m.sum("llmtail_traces_total", &[]) == 4.0
        })
        .await;
    assert_eq!(
        m.sum(
            "llmtail_traces_total",
            &[("decision", "kept"), ("policy", "conversation")]
        ),
        2.0
    );
    sink.wait_for_spans(11, Duration::from_secs(5)).await;
    let got = sink.traces();
    assert!(got.contains_key(&before.trace_id[..]) && got.contains_key(&after.trace_id[..]));
    assert!(!got.contains_key(&other.trace_id[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pricing_file_is_reloaded_without_a_restart() {
    let sink = Sink::start(0).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("prices.yaml");
    std::fs::write(&file, "[]\n").unwrap();
    let d = Daemon::start(&config(
        &sink,
        0.0,
        "1s",
        "100ms",
        ERRORS,
        &format!(
            "llm:\n  pricing_file: {}\n  pricing_reload_interval: 100ms\n",
            file.display()
        ),
    ));
    let mut rng = StdRng::seed_from_u64(45);
    let with_model = |rng: &mut StdRng| {
        let mut t = trace(rng, Kind::Normal);
        for kv in &mut t.spans[1].attributes {
            if kv.key.ends_with(".model") {
                kv.value = Some(AnyValue {
                    value: Some(Value::StringValue("acme-x-1".into())),
                });
            }
        }
        t
    };
    let t = with_model(&mut rng);
    send(&d, t.spans).await;
    d.wait_metrics(Duration::from_secs(5), |m| {
        m.sum("llmtail_llm_unpriced_calls_total", &[("model", "acme-x-1")]) == 1.0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    std::fs::write(
        &file,
        "- {match: \"acme-x*\", input_per_mtok: 1000000, output_per_mtok: 0}\n",
    )
    .unwrap();
    d.wait_metrics(Duration::from_secs(5), |m| {
        m.sum("llmtail_pricing_file_reloads_total", &[("result", "ok")]) >= 1.0
    })
    .await;
    let t = with_model(&mut rng);
    let input = t.input_tokens as f64;
    send(&d, t.spans).await;
    let m = d
        .wait_metrics(Duration::from_secs(5), |m| {
            m.sum("llmtail_llm_cost_usd_total", &[("model", "acme-x-1")]) > 0.0
        })
        .await;
    assert_eq!(
        m.sum("llmtail_llm_cost_usd_total", &[("model", "acme-x-1")]),
        input
    );
    assert_eq!(
        m.sum("llmtail_llm_unpriced_calls_total", &[("model", "acme-x-1")]),
        1.0
    );
}

#[test]
fn the_pricing_command_prints_the_match_and_the_cost() {
    let run = |args: &[&str]| {
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new(binary())
            .current_dir(dir.path())
            .arg("pricing")
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, out) = run(&[
        "us.anthropic.claude-sonnet-4-20250514-v1:0",
        "--input",
        "300000",
        "--output",
        "1000",
    ]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("matched:     claude-sonnet-4 (built-in"),
        "{out}"
    );
    assert!(out.contains("above 200000 input tokens"), "{out}");
    // Long-context tier: 300,000 × $6 + 1,000 × $22.50 per million.
    assert!(out.contains("$1.822500"), "{out}");
    let (code, out) = run(&["o3-pro"]);
    assert_eq!(code, Some(1));
    assert!(out.contains("no price"));

    // Where a call's cost comes from: OpenLIT's 0 on priced tokens is unknown, not free.
    let (code, out) = run(&[
        "gpt-4o",
        "--input",
        "1200",
        "--cache-read",
        "1000",
        "--output",
        "300",
        "--cost-attribute",
        "0",
        "--scope",
        "openlit.instrumentation.openai",
    ]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("library:     OpenLIT"), "{out}");
    assert!(
        out.contains("call cost:   $0.004750 from the price table: the span's cost attribute of 0 is taken as unknown"),
        "{out}"
    );
    let (_, out) = run(&["gpt-4o", "--input", "1200", "--cost-attribute", "0.5"]);
    assert!(
        out.contains("call cost:   $0.500000 from the span's cost attribute"),
        "{out}"
    );
    let (_, out) = run(&["gpt-4o", "--input", "1000"]);
    assert!(
        out.contains("call cost:   $0.002500 from the price table, on the call's tokens"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_target_controller_lowers_the_base_rate_to_the_budget() {
    let sink = Sink::start(0).await;
    let d = Daemon::start(&format!(
        "sampling:\n  decision_wait: 1s\n  root_grace: 50ms\n  base_rate: 1.0\n  target_kept_traces_per_second: 20\n  target_interval: 300ms\n  policies:\n{ERRORS}exporter:\n  otlp:\n    endpoint: {}\n",
        sink.endpoint()
    ));
    let m = d
        .wait_metrics(Duration::from_secs(3), |m| {
            m.sum("llmtail_sampling_probability", &[("service", "*")]) > 0.0
        })
        .await;
    assert_eq!(
        m.sum("llmtail_sampling_probability", &[("service", "*")]),
        1.0
    );
    // 40 normal traces every ~100 ms for 5 seconds; the budget of 20/s then means
    // p ≈ 20 / (traces per second sent).
    let mut rng = StdRng::seed_from_u64(46);
    let mut c = client(&d.endpoint()).await;
    let started = std::time::Instant::now();
    for _ in 0..50 {
        let spans = (0..40)
            .flat_map(|_| trace(&mut rng, Kind::Normal).spans)
            .collect();
        c.export(loadgen::request(spans)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let want = 20.0 / (2000.0 / started.elapsed().as_secs_f64());
    let p = d
        .metrics()
        .sum("llmtail_sampling_probability", &[("service", "*")]);
    assert!(
        p > want / 2.0 && p < want * 2.0,
        "base rate {p}, budget says {want}"
    );
}
