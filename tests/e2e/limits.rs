//! Bounded memory and size limits: the soft mark decides the oldest traces early, the hard
//! mark refuses with retryable errors until memory falls, a huge trace is decided at
//! `max_spans_per_trace`, oversized spans and attributes are refused one by one.

use std::time::Duration;

use crate::support::*;
use llmtail_tools::loadgen::{self, Kind};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value::Value};
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use rand::SeedableRng;
use rand::rngs::StdRng;

fn normal_spans(rng: &mut StdRng, traces: usize) -> Vec<Span> {
    (0..traces)
        .flat_map(|i| loadgen::trace(rng, Kind::Normal, loadgen::convention_for(i), now_ns()).spans)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_limits_decide_early_then_refuse_until_the_upstream_drains() {
    let sink = Sink::start(0).await;
    sink.set_mode(SINK_UNAVAILABLE);
    let config = format!(
        "sampling:\n  decision_wait: 60s\n  root_grace: 60s\n  base_rate: 1.0\nlimits:\n  max_buffer_bytes: 2MiB\n  soft_mark: 0.5\nexporter:\n  otlp:\n    endpoint: {}\n  batch:\n    timeout: 50ms\n  queue:\n    max_spans: 1000000\n  retry:\n    initial_interval: 100ms\n    max_interval: 200ms\n",
        sink.endpoint()
    );
    let daemon = Daemon::start(&config);
    let mut client = client(&daemon.endpoint()).await;
    let mut rng = StdRng::seed_from_u64(11);
    let mut accepted = 0usize;
    let mut refusal = None;
    for _ in 0..60 {
        let spans = normal_spans(&mut rng, 100);
        let n = spans.len();
        match client.export(loadgen::request(spans)).await {
            Ok(_) => accepted += n,
            Err(status) => {
                refusal = Some(status);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let status = refusal.expect("the hard mark refuses within 60 requests of ~200 KB");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("max_buffer_bytes"), "{status:?}");
    // OTLP/HTTP senders get 503 with Retry-After (a body is charged to the budget before
    // it is read, so one of ~200 KB does not fit either).
    let body = loadgen::request(normal_spans(&mut rng, 100)).encode_to_vec();
    let (code, headers, _) = http_request(
        daemon.http,
        "POST",
        "/v1/traces",
        &[("content-type", "application/x-protobuf")],
        &body,
    );
    assert_eq!(code, 503);
    assert!(headers.contains_key("retry-after"));
    // Past the soft mark, traces old enough to be decided (250 ms) are decided early; the
    // hard mark may refuse before the first of them is that old.
    let m = daemon
        .wait_metrics(Duration::from_secs(5), |m| {
            m.sum("llmtail_early_decisions_total", &[("reason", "memory")]) > 0.0
        })
        .await;
    assert!(m.sum("llmtail_early_decisions_total", &[("reason", "memory")]) > 0.0);
    assert!(
        m.sum(
            "llmtail_early_decision_delay_seconds_count",
            &[("reason", "memory")]
        ) > 0.0
    );
    for protocol in ["grpc", "http_protobuf"] {
        assert_eq!(
            m.sum(
                "llmtail_requests_refused_total",
                &[("reason", "memory"), ("protocol", protocol)]
            ),
            1.0,
            "{protocol}"
        );
    }
    assert_eq!(
        m.sum("llmtail_buffer_limit_bytes", &[]),
        2.0 * 1024.0 * 1024.0
    );

    // The upstream comes back: the queue drains, memory falls, data is accepted again.
    sink.set_mode(SINK_OK);
    let mut accepted_again = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let spans = normal_spans(&mut rng, 10);
        let n = spans.len();
        if client.export(loadgen::request(spans)).await.is_ok() {
            accepted += n;
            accepted_again = true;
            break;
        }
    }
    assert!(accepted_again, "requests are accepted once memory falls");
    // Everything accepted arrives (base_rate 1.0): nothing was lost to the limit.
    daemon.sigterm();
    assert_eq!(
        sink.wait_for_spans(accepted, Duration::from_secs(20)).await,
        accepted
    );
    assert_eq!(sink.spans().len(), accepted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_trace_is_decided_at_max_spans_per_trace() {
    let sink = Sink::start(0).await;
    let config = format!(
        "sampling:\n  decision_wait: 30s\n  root_grace: 30s\n  base_rate: 1.0\nlimits:\n  max_spans_per_trace: 50\nexporter:\n  otlp:\n    endpoint: {}\n  batch:\n    timeout: 50ms\n",
        sink.endpoint()
    );
    let daemon = Daemon::start(&config);
    let mut rng = StdRng::seed_from_u64(12);
    let template = loadgen::trace(&mut rng, Kind::Normal, loadgen::convention_for(0), now_ns());
    let agent_loop: Vec<Span> = (0..120u64)
        .map(|i| Span {
            span_id: (i + 1).to_be_bytes().to_vec(),
            parent_span_id: vec![9; 8],
            ..template.spans[1].clone()
        })
        .collect();
    let mut client = client(&daemon.endpoint()).await;
    for chunk in agent_loop.chunks(40) {
        client
            .export(loadgen::request(chunk.to_vec()))
            .await
            .unwrap();
    }
    // Long before decision_wait: the first 50 spans as the decided trace, the other 70
    // follow its decision as late spans.
    assert_eq!(sink.wait_for_spans(120, Duration::from_secs(10)).await, 120);
    let m = daemon.metrics();
    assert_eq!(
        m.sum("llmtail_early_decisions_total", &[("reason", "max_spans")]),
        1.0
    );
    assert_eq!(
        m.sum("llmtail_late_spans_total", &[("decision", "kept")]),
        70.0
    );
    assert_eq!(m.sum("llmtail_buffer_traces", &[]), 0.0);
}

fn attribute(key: &str, len: usize) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(Value::StringValue("x".repeat(len))),
        }),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_spans_and_attributes_are_refused_one_by_one() {
    let sink = Sink::start(0).await;
    let config = format!(
        "sampling:\n  decision_wait: 1s\n  root_grace: 100ms\n  base_rate: 1.0\nlimits:\n  max_span_bytes: 3000\n  max_attribute_bytes: 500\nexporter:\n  otlp:\n    endpoint: {}\n  batch:\n    timeout: 50ms\n",
        sink.endpoint()
    );
    let daemon = Daemon::start(&config);
    let mut rng = StdRng::seed_from_u64(13);
    let trace = loadgen::trace(&mut rng, Kind::Normal, loadgen::convention_for(1), now_ns());
    let mut big_attribute = trace.spans[2].clone();
    big_attribute
        .attributes
        .push(attribute("gen_ai.prompt", 600));
    let mut big_span = trace.spans[3].clone();
    for i in 0..10 {
        big_span
            .attributes
            .push(attribute(&format!("tool.arg.{i}"), 400));
    }
    let spans = vec![
        trace.spans[0].clone(),
        trace.spans[1].clone(),
        big_attribute,
        big_span,
    ];
    let response = client(&daemon.endpoint())
        .await
        .export(loadgen::request(spans))
        .await
        .unwrap()
        .into_inner();
    let partial = response.partial_success.expect("partial success");
    assert_eq!(partial.rejected_spans, 2);
    assert!(partial.error_message.contains("limits.max_"), "{partial:?}");
    let m = daemon.metrics();
    assert_eq!(
        m.sum(
            "llmtail_spans_rejected_total",
            &[("reason", "attribute_too_large")]
        ),
        1.0
    );
    assert_eq!(
        m.sum(
            "llmtail_spans_rejected_total",
            &[("reason", "span_too_large")]
        ),
        1.0
    );
    // The two valid spans go on as usual.
    assert_eq!(sink.wait_for_spans(2, Duration::from_secs(10)).await, 2);
}
