//! Black-box tests: the real binary, real sockets, an OTLP sink as the upstream.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::support::*;
use llmtail::otlp::codec::{Prost, RawCodec};
use llmtail_tools::loadgen::{self, Convention, GeneratedTrace, Kind};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use opentelemetry_proto::tonic::common::v1::{AnyValue, any_value::Value};
use opentelemetry_proto::tonic::trace::v1::Span;
use rand::SeedableRng;
use rand::rngs::StdRng;

const POLICIES: &str = "  policies:
    - {name: errors, type: error}
    - {name: slow, type: latency, threshold_ms: 5000}
    - {name: expensive, type: cost, threshold_usd: 0.10}
";

fn generate(rng: &mut StdRng, kinds: &[(Kind, usize)]) -> Vec<GeneratedTrace> {
    let mut out = Vec::new();
    for &(kind, n) in kinds {
        for _ in 0..n {
            let c = loadgen::convention_for(out.len());
            out.push(loadgen::trace(rng, kind, c, now_ns()));
        }
    }
    out
}

/// Sends the traces with each trace's spans split over two requests, second half first,
/// so traces are assembled from several requests and roots do not always come first.
async fn send_split(endpoint: &str, traces: &[GeneratedTrace]) {
    let mut client = client(endpoint).await;
    for chunk in traces.chunks(20) {
        let second: Vec<Span> = chunk.iter().flat_map(|t| t.spans[2..].to_vec()).collect();
        let first: Vec<Span> = chunk.iter().flat_map(|t| t.spans[..2].to_vec()).collect();
        for spans in [second, first] {
            let resp = client
                .export(loadgen::request(spans))
                .await
                .unwrap()
                .into_inner();
            assert!(resp.partial_success.is_none(), "{resp:?}");
        }
    }
}

fn sampler_config(sink: &Sink, base_rate: f64, wait: &str, grace: &str) -> String {
    format!(
        "sampling:\n  decision_wait: {wait}\n  root_grace: {grace}\n  base_rate: {base_rate}\n{POLICIES}exporter:\n  otlp:\n    endpoint: {}\n  batch:\n    timeout: 50ms\n  retry:\n    initial_interval: 100ms\n    max_interval: 1s\n",
        sink.endpoint()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interesting_traces_arrive_whole_and_the_rest_follow_the_consistent_rule() {
    let sink = Sink::start(0).await;
    let daemon = Daemon::start(&sampler_config(&sink, 0.3, "3s", "300ms"));
    let mut rng = StdRng::seed_from_u64(1);
    let traces = generate(
        &mut rng,
        &[
            (Kind::Error, 30),
            (Kind::SlowDuration, 30),
            (Kind::SlowLatencyAttr, 30),
            (Kind::ExpensiveAttr, 30),
            (Kind::ExpensiveTokens, 30),
            (Kind::Normal, 400),
        ],
    );
    send_split(&daemon.endpoint(), &traces).await;

    let expected: HashSet<Vec<u8>> = traces
        .iter()
        .filter(|t| t.kind.is_interesting() || consistent_keep(&t.trace_id, 0.3))
        .map(|t| t.trace_id.to_vec())
        .collect();
    let m = daemon
        .wait_metrics(Duration::from_secs(20), |m| {
            m.sum("llmtail_traces_total", &[]) == traces.len() as f64
                && m.sum("llmtail_spans_exported_total", &[]) == (expected.len() * 4) as f64
        })
        .await;
    let got = sink.traces();
    assert_eq!(got.len(), expected.len(), "{}", daemon.log());
    for t in &traces {
        let arrived = got.get(&t.trace_id[..]);
        if !expected.contains(&t.trace_id[..]) {
            assert!(
                arrived.is_none(),
                "{:?} trace should have been dropped",
                t.kind
            );
            continue;
        }
        let arrived = arrived.unwrap_or_else(|| panic!("{:?} trace missing", t.kind));
        let mut ids: Vec<_> = arrived.iter().map(|s| s.span_id.clone()).collect();
        ids.sort();
        let mut want: Vec<_> = t.spans.iter().map(|s| s.span_id.clone()).collect();
        want.sort();
        assert_eq!(ids, want, "{:?} trace must arrive whole", t.kind);
        // p = 0.3 (the f64 just below 0.3): T = round(0.7000…011 · 2^56) = 0xb3333333333334.
        let th = if t.kind.is_interesting() {
            "ot=th:0"
        } else {
            "ot=th:b3333333333334"
        };
        assert!(
            arrived.iter().all(|s| s.trace_state == th),
            "{:?}",
            arrived[0].trace_state
        );
    }

    // Metrics equal what was sent.
    let n = traces.len() as f64;
    let kept_normal = expected.len() - 150;
    assert_eq!(
        m.sum("llmtail_spans_received_total", &[("protocol", "grpc")]),
        n * 4.0
    );
    assert_eq!(
        m.sum(
            "llmtail_traces_total",
            &[("decision", "kept"), ("policy", "errors")]
        ),
        30.0
    );
    assert_eq!(
        m.sum(
            "llmtail_traces_total",
            &[("decision", "kept"), ("policy", "slow")]
        ),
        60.0
    );
    assert_eq!(
        m.sum(
            "llmtail_traces_total",
            &[("decision", "kept"), ("policy", "expensive")]
        ),
        60.0
    );
    assert_eq!(
        m.sum(
            "llmtail_traces_total",
            &[("decision", "kept"), ("policy", "base_rate")]
        ),
        kept_normal as f64
    );
    assert_eq!(
        m.sum("llmtail_traces_total", &[("decision", "dropped")]),
        (400 - kept_normal) as f64
    );
    assert_eq!(
        m.sum("llmtail_spans_dropped_total", &[]),
        ((400 - kept_normal) * 4) as f64
    );
    assert_eq!(
        m.sum("llmtail_llm_requests_total", &[("service", "chat-api")]),
        n
    );
    assert_eq!(
        m.sum("llmtail_llm_requests_total", &[("status", "error")]),
        30.0
    );
    let mut per_model: HashMap<&str, (f64, f64, f64)> = HashMap::new();
    for t in &traces {
        let e = per_model.entry(t.model).or_default();
        e.0 += t.input_tokens as f64;
        e.1 += t.output_tokens as f64;
        e.2 += t.cost_usd;
    }
    for (model, (input, output, cost)) in per_model {
        let labels = |ty| [("model", model), ("type", ty)];
        assert_eq!(
            m.sum("llmtail_llm_tokens_total", &labels("input")),
            input,
            "{model}"
        );
        assert_eq!(
            m.sum("llmtail_llm_tokens_total", &labels("output")),
            output,
            "{model}"
        );
        let got_cost = m.sum("llmtail_llm_cost_usd_total", &[("model", model)]);
        assert!(
            (got_cost - cost).abs() < 1e-9,
            "{model}: {got_cost} vs {cost}"
        );
    }
    assert_eq!(m.sum("llmtail_llm_latency_seconds_count", &[]), n);
    assert_eq!(m.sum("llmtail_decision_delay_seconds_count", &[]), n);
    assert_eq!(m.sum("llmtail_spans_lost_total", &[]), 0.0);
    let m = daemon
        .wait_metrics(Duration::from_secs(5), |m| {
            m.sum("llmtail_buffer_traces", &[]) == 0.0
        })
        .await;
    assert_eq!(m.sum("llmtail_buffer_traces", &[]), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_spans_follow_their_traces_decision_both_ways() {
    let sink = Sink::start(0).await;
    let daemon = Daemon::start(&sampler_config(&sink, 0.0, "10s", "200ms"));
    let mut rng = StdRng::seed_from_u64(2);
    let kept = loadgen::trace(&mut rng, Kind::Error, Convention::GenAi, now_ns());
    let dropped = loadgen::trace(&mut rng, Kind::Normal, Convention::Seed, now_ns());
    let mut c = client(&daemon.endpoint()).await;
    let early: Vec<Span> = kept.spans[..2]
        .iter()
        .chain(&dropped.spans[..2])
        .cloned()
        .collect();
    c.export(loadgen::request(early)).await.unwrap();
    daemon
        .wait_metrics(Duration::from_secs(10), |m| {
            m.sum("llmtail_traces_total", &[]) == 2.0
        })
        .await;
    let late: Vec<Span> = kept.spans[2..]
        .iter()
        .chain(&dropped.spans[2..])
        .cloned()
        .collect();
    c.export(loadgen::request(late)).await.unwrap();
    let m = daemon
        .wait_metrics(Duration::from_secs(10), |m| {
            m.sum("llmtail_spans_exported_total", &[]) == 4.0
        })
        .await;
    assert_eq!(
        m.sum("llmtail_late_spans_total", &[("decision", "kept")]),
        2.0
    );
    assert_eq!(
        m.sum("llmtail_late_spans_total", &[("decision", "dropped")]),
        2.0
    );
    assert_eq!(
        m.sum("llmtail_spans_dropped_total", &[("reason", "late")]),
        2.0
    );
    let got = sink.traces();
    assert_eq!(got.len(), 1);
    assert_eq!(got[&kept.trace_id[..]].len(), 4);
    assert!(
        got[&kept.trace_id[..]]
            .iter()
            .all(|s| s.trace_state == "ot=th:0")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_for_ten_seconds_loses_nothing() {
    // Down as a reachable upstream answering UNAVAILABLE: a closed port could be taken by
    // another test's server meanwhile (ports come from the same ephemeral range).
    let sink = Sink::start(0).await;
    sink.set_mode(SINK_UNAVAILABLE);
    let daemon = Daemon::start(&sampler_config(&sink, 0.0, "2s", "100ms"));
    let mut rng = StdRng::seed_from_u64(3);
    let traces = generate(&mut rng, &[(Kind::Error, 50), (Kind::Normal, 50)]);
    send_split(&daemon.endpoint(), &traces).await;
    daemon
        .wait_metrics(Duration::from_secs(10), |m| {
            m.sum("llmtail_traces_total", &[]) == 100.0
        })
        .await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(
        daemon.metrics().sum("llmtail_spans_exported_total", &[]),
        0.0
    );
    assert_eq!(
        daemon.metrics().sum("llmtail_export_queue_spans", &[]),
        200.0
    );
    sink.set_mode(SINK_OK);
    assert_eq!(
        sink.wait_for_spans(200, Duration::from_secs(20)).await,
        200,
        "{}",
        daemon.log()
    );
    let m = daemon.metrics();
    assert_eq!(m.sum("llmtail_spans_exported_total", &[]), 200.0);
    assert_eq!(m.sum("llmtail_spans_lost_total", &[]), 0.0);
    let got = sink.traces();
    for t in traces.iter().filter(|t| t.kind == Kind::Error) {
        assert_eq!(got[&t.trace_id[..]].len(), 4);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exports_pending_traces_before_exit() {
    let sink = Sink::start(0).await;
    let mut daemon = Daemon::start(&sampler_config(&sink, 1.0, "60s", "30s"));
    let mut rng = StdRng::seed_from_u64(4);
    let traces = generate(&mut rng, &[(Kind::Error, 20), (Kind::Normal, 20)]);
    send_split(&daemon.endpoint(), &traces).await;
    let m = daemon
        .wait_metrics(Duration::from_secs(5), |m| {
            m.sum("llmtail_buffer_traces", &[]) == 40.0
        })
        .await;
    assert_eq!(m.sum("llmtail_buffer_traces", &[]), 40.0);
    daemon.sigterm();
    let status = daemon.wait_exit(Duration::from_secs(25));
    assert!(status.success(), "exit {status}: {}", daemon.log());
    assert_eq!(sink.spans().len(), 160);
    assert_eq!(sink.traces().len(), 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_spans_are_rejected_one_by_one_and_bad_requests_get_grpc_errors() {
    let sink = Sink::start(0).await;
    let daemon = Daemon::start(&sampler_config(&sink, 1.0, "1s", "100ms"));
    let mut rng = StdRng::seed_from_u64(5);
    let good = loadgen::trace(&mut rng, Kind::Normal, Convention::GenAi, now_ns());
    let mut spans = good.spans.clone();
    let mut short_trace_id = good.spans[0].clone();
    short_trace_id.trace_id = vec![1; 8];
    let mut zero_span_id = good.spans[0].clone();
    zero_span_id.span_id = vec![0; 8];
    let mut no_span_id = good.spans[0].clone();
    no_span_id.span_id = Vec::new();
    spans.extend([short_trace_id, zero_span_id, no_span_id]);
    let mut c = client(&daemon.endpoint()).await;
    let resp = c
        .export(loadgen::request(spans))
        .await
        .unwrap()
        .into_inner();
    let partial = resp.partial_success.expect("partial success");
    assert_eq!(partial.rejected_spans, 3);
    assert!(
        partial.error_message.contains("trace id must be 16 bytes"),
        "{}",
        partial.error_message
    );

    // Undecodable body → INVALID_ARGUMENT; the daemon keeps serving.
    let channel = tonic::transport::Endpoint::from_shared(daemon.endpoint())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut raw = tonic::client::Grpc::new(channel.clone());
    raw.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
    );
    let garbage = bytes::Bytes::from_static(&[0x0a, 0xff, 0xff, 0xff, 0x0f, 0x01]);
    let err = raw
        .unary(
            tonic::Request::new(garbage),
            path.clone(),
            RawCodec::<bytes::Bytes, Prost<ExportTraceServiceResponse>>::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");

    // Oversized (the harness sets max_request_bytes: 1000000) → RESOURCE_EXHAUSTED.
    let mut big = loadgen::trace(&mut rng, Kind::Normal, Convention::GenAi, now_ns());
    big.spans[0].name = "x".repeat(1_100_000);
    let err = c.export(loadgen::request(big.spans)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    // The same oversized request gzip-compressed is refused after decompression too.
    let mut gz = client(&daemon.endpoint())
        .await
        .send_compressed(tonic::codec::CompressionEncoding::Gzip);
    let mut big = loadgen::trace(&mut rng, Kind::Normal, Convention::GenAi, now_ns());
    big.spans[0].name = "x".repeat(1_100_000);
    let err = gz.export(loadgen::request(big.spans)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");

    // A gzip request within limits is accepted.
    let zipped = loadgen::trace(&mut rng, Kind::Error, Convention::Seed, now_ns());
    let resp = gz
        .export(loadgen::request(zipped.spans.clone()))
        .await
        .unwrap()
        .into_inner();
    assert!(resp.partial_success.is_none());

    let m = daemon
        .wait_metrics(Duration::from_secs(10), |m| {
            m.sum("llmtail_spans_exported_total", &[]) == 8.0
        })
        .await;
    assert_eq!(
        m.sum(
            "llmtail_spans_rejected_total",
            &[("reason", "invalid_trace_id")]
        ),
        1.0
    );
    assert_eq!(
        m.sum(
            "llmtail_spans_rejected_total",
            &[("reason", "invalid_span_id")]
        ),
        2.0
    );
    assert_eq!(m.sum("llmtail_spans_received_total", &[]), 8.0);
    assert_eq!(sink.traces().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_upstream_errors_are_not_retried_but_counted_as_lost() {
    let sink = Sink::start(0).await;
    sink.set_mode(SINK_INVALID_ARGUMENT);
    let daemon = Daemon::start(&sampler_config(&sink, 0.0, "1s", "100ms"));
    let mut rng = StdRng::seed_from_u64(6);
    let traces = generate(&mut rng, &[(Kind::Error, 5)]);
    send_split(&daemon.endpoint(), &traces).await;
    let m = daemon
        .wait_metrics(Duration::from_secs(10), |m| {
            m.sum("llmtail_spans_lost_total", &[]) == 20.0
        })
        .await;
    assert_eq!(
        m.sum(
            "llmtail_spans_lost_total",
            &[("reason", "upstream_rejected")]
        ),
        20.0
    );
    let calls = sink.calls();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(sink.calls(), calls, "a permanent error must not be retried");
    assert_eq!(daemon.metrics().sum("llmtail_export_queue_spans", &[]), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_exporter_writes_otlp_json_lines() {
    let daemon = Daemon::start(&format!(
        "sampling:\n  decision_wait: 1s\n  root_grace: 100ms\n  base_rate: 0\n{POLICIES}exporter:\n  file:\n    path: out.jsonl\n  batch:\n    timeout: 50ms\n"
    ));
    let mut rng = StdRng::seed_from_u64(7);
    let traces = generate(&mut rng, &[(Kind::Error, 3), (Kind::Normal, 3)]);
    send_split(&daemon.endpoint(), &traces).await;
    daemon
        .wait_metrics(Duration::from_secs(10), |m| {
            m.sum("llmtail_spans_exported_total", &[]) == 12.0
        })
        .await;
    let text = std::fs::read_to_string(daemon.dir.path().join("out.jsonl")).unwrap();
    let mut ids = HashSet::new();
    for line in text.lines() {
        // Canonical OTLP/JSON: absent fields are left out, never `null`.
        assert!(!line.contains(":null"), "{line}");
        let req: opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest =
            serde_json::from_str(line).unwrap();
        for s in req
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .flat_map(|s| &s.spans)
        {
            ids.insert(s.trace_id.clone());
            assert_eq!(s.trace_state, "ot=th:0");
        }
    }
    let want: HashSet<Vec<u8>> = traces
        .iter()
        .filter(|t| t.kind == Kind::Error)
        .map(|t| t.trace_id.to_vec())
        .collect();
    assert_eq!(ids, want);
}

#[test]
fn validate_lists_every_problem_with_path_and_line() {
    let (code, err) = validate(
        "sampling:\n  base_rate: 7\n  colour: red\nexporter:\n  otlp:\n    endpoint: tempo:4317\n",
    );
    assert_eq!(code, Some(2));
    assert!(err.contains("line 2: sampling.base_rate"), "{err}");
    assert!(err.contains("line 3: sampling.colour"), "{err}");
    assert!(err.contains("line 6: exporter.otlp.endpoint"), "{err}");

    let shipped = include_str!("../../config.yaml");
    let (code, err) = validate(shipped);
    assert_eq!(code, Some(0), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpriced_calls_are_counted_and_config_prices_apply() {
    let sink = Sink::start(0).await;
    let daemon = Daemon::start(&format!(
        "{}llm:\n  pricing:\n    - {{match: \"acme-large*\", input_per_mtok: 2.0, output_per_mtok: 4.0}}\n    - {{match: \"gpt-4o-mini*\", input_per_mtok: 1.0, output_per_mtok: 1.0}}\n",
        sampler_config(&sink, 1.0, "1s", "100ms")
    ));
    let mut rng = StdRng::seed_from_u64(8);
    let mut spans = Vec::new();
    for (model, input, output) in [
        ("acme-large-2", 1_000_000, 500_000),
        ("my-fine-tune", 10, 20),
        ("gpt-4o-mini", 1_000_000, 1_000_000),
    ] {
        let mut t = loadgen::trace(&mut rng, Kind::Normal, Convention::GenAi, now_ns());
        for kv in &mut t.spans[1].attributes {
            let value = match kv.key.as_str() {
                "gen_ai.request.model" | "gen_ai.response.model" => {
                    Value::StringValue(model.into())
                }
                "gen_ai.usage.input_tokens" => Value::IntValue(input),
                "gen_ai.usage.output_tokens" => Value::IntValue(output),
                _ => continue,
            };
            kv.value = Some(AnyValue { value: Some(value) });
        }
        spans.extend(t.spans);
    }
    client(&daemon.endpoint())
        .await
        .export(loadgen::request(spans))
        .await
        .unwrap();
    // A scrape reads families in name order: one that counts every request may have read
    // the cost family (named before it) a call earlier. Wait for all of them.
    let m = daemon
        .wait_metrics(Duration::from_secs(10), |m| {
            m.sum("llmtail_llm_requests_total", &[]) == 3.0
                && m.sum("llmtail_llm_cost_usd_total", &[]) >= 6.0
                && m.sum("llmtail_llm_unpriced_calls_total", &[]) == 1.0
        })
        .await;
    assert_eq!(
        m.sum("llmtail_llm_cost_usd_total", &[("model", "acme-large-2")]),
        4.0
    );
    // The config entry overrides the built-in gpt-4o-mini price (0.15/0.60).
    assert_eq!(
        m.sum("llmtail_llm_cost_usd_total", &[("model", "gpt-4o-mini")]),
        2.0
    );
    assert_eq!(
        m.sum(
            "llmtail_llm_unpriced_calls_total",
            &[("model", "my-fine-tune")]
        ),
        1.0
    );
    assert_eq!(
        m.sum("llmtail_llm_cost_usd_total", &[("model", "my-fine-tune")]),
        0.0
    );
    assert_eq!(
        m.sum(
            "llmtail_llm_tokens_total",
            &[("model", "my-fine-tune"), ("type", "output")]
        ),
        20.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_timeout_with_upstream_down_exits_nonzero_and_counts_the_loss() {
    let down = Sink::start(0).await;
    down.set_mode(SINK_UNAVAILABLE);
    let mut daemon = Daemon::start(&format!(
        "{}shutdown_timeout: 3s\n",
        sampler_config(&down, 0.0, "30s", "10s")
    ));
    assert_eq!(http_get(daemon.admin, "/healthz").map(|r| r.0), Some(200));
    let mut rng = StdRng::seed_from_u64(9);
    let traces = generate(&mut rng, &[(Kind::Error, 10)]);
    send_split(&daemon.endpoint(), &traces).await;
    daemon.sigterm();
    // Still flushing (the upstream is down, for the 3 s timeout): alive, but no longer ready.
    let end = std::time::Instant::now() + Duration::from_secs(2);
    while http_get(daemon.admin, "/readyz").map(|r| r.0) == Some(200)
        && std::time::Instant::now() < end
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(http_get(daemon.admin, "/readyz").map(|r| r.0), Some(503));
    assert_eq!(http_get(daemon.admin, "/healthz").map(|r| r.0), Some(200));
    let status = daemon.wait_exit(Duration::from_secs(15));
    assert_eq!(status.code(), Some(1), "{}", daemon.log());
    assert!(
        daemon.log().contains("40 spans could not be exported"),
        "{}",
        daemon.log()
    );
}
