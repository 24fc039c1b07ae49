//! Accepted means delivered: against upstreams with the limits real ones have (a stock
//! grpcio server's 4 MiB message, an HTTP proxy's 413), through floods during outages in a
//! memory-limited cgroup, and through outages longer than the retry horizon with the
//! trace log. Each test counts that every span the receivers accepted arrives, once.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::support::*;
use llmtail_tools::loadgen::{self, Kind};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value::Value};
use opentelemetry_proto::tonic::trace::v1::Span;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// gRPC's default message limit, the upstream's in these tests.
const FOUR_MIB: usize = 4 << 20;

/// The tests of this file run one at a time: each floods the machine, and a flood beside
/// another test's would measure the two together.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn lost(m: &Metrics) -> f64 {
    m.sum("llmtail_spans_lost_total", &[])
}

/// Runs tests/python/emit_traces.py: `count` traces from the official Python SDK, each
/// LLM span carrying about `prompt_bytes` of prompt and completion.
async fn python_sdk(
    endpoint: &str,
    protocol: &str,
    count: usize,
    prompt_bytes: usize,
) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("manifest.json");
    let script = format!("{}/tests/python/emit_traces.py", env!("CARGO_MANIFEST_DIR"));
    let out = tokio::process::Command::new(python())
        .arg(script)
        .arg(endpoint)
        .arg(count.to_string())
        .arg(&manifest)
        .arg(protocol)
        .arg(prompt_bytes.to_string())
        .output()
        .await
        .expect("the Python SDK client runs");
    assert!(
        out.status.success(),
        "emit_traces.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sent: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    sent.iter()
        .map(|t| t["trace_id"].as_str().unwrap().to_owned())
        .collect()
}

/// Spans per trace of emit_traces.py: agent.run, the LLM call, a tool call.
const SDK_SPANS_PER_TRACE: usize = 3;

/// Every trace arrived whole (3 spans) and no span twice.
fn assert_whole_and_once(log: &PySinkLog, traces: &[String]) {
    let distinct: HashSet<&(String, String)> = log.spans.iter().collect();
    assert_eq!(distinct.len(), log.spans.len(), "a span arrived twice");
    let mut per_trace: HashMap<&str, usize> = HashMap::new();
    for (t, _) in &log.spans {
        *per_trace.entry(t.as_str()).or_default() += 1;
    }
    for t in traces {
        assert_eq!(
            per_trace.get(t.as_str()),
            Some(&SDK_SPANS_PER_TRACE),
            "trace {t}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompt_carrying_spans_reach_a_stock_grpc_upstream_with_its_4_mib_limit() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let sink = PySink::start("grpc", None);
    // Shipped exporter defaults (gzip, batch.max_spans 4096, batch.max_bytes): only the
    // upstream and the sampling rate are set.
    let daemon = Daemon::launch_opts(
        &format!(
            "sampling:\n  decision_wait: 5s\n  root_grace: 200ms\n  base_rate: 1.0\nexporter:\n  otlp:\n    endpoint: {}\n",
            sink.endpoint()
        ),
        Launch {
            max_request_bytes: Some(16 << 20),
            ..Launch::default()
        },
    );
    let traces = python_sdk(&daemon.endpoint(), "grpc", 6000, 5000).await;
    let expected = traces.len() * SDK_SPANS_PER_TRACE;
    assert_eq!(
        daemon.metrics().sum("llmtail_spans_received_total", &[]),
        expected as f64,
        "the SDK's spans were not all accepted"
    );
    let got = sink.wait_for_spans(expected, Duration::from_secs(90)).await;
    let m = daemon.metrics();
    assert_eq!(lost(&m), 0.0, "{}", daemon.log());
    assert_eq!(got, expected, "{}", daemon.log());
    let log = sink.log();
    assert_whole_and_once(&log, &traces);
    // ~30 MB of spans went in requests under the limit, none refused.
    let biggest = *log.requests.iter().max().unwrap();
    assert!(biggest <= FOUR_MIB, "a request of {biggest} bytes");
    assert!(log.requests.len() >= 8, "{} requests", log.requests.len());
    assert_eq!(m.sum("llmtail_spans_exported_total", &[]), expected as f64);
}

/// A backend pod restarted in a rollout: the upstream (a grpcio server taking 1.5 s per
/// request) is killed with SIGKILL while requests are in progress and comes back on its
/// port 3 s later. A connection that breaks mid-request is no answer from the upstream:
/// those requests are retried, and nothing is lost (before: counted `upstream_rejected`,
/// "Unknown: transport error").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_killed_mid_request_and_restarted_on_its_port_loses_nothing() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut sink = PySink::start_slow("grpc", None, Duration::from_millis(1500));
    let daemon = Daemon::start(&format!(
        "sampling:\n  root_grace: 200ms\n  base_rate: 1.0\nexporter:\n  otlp:\n    endpoint: {}\n  batch:\n    max_spans: 60\n    timeout: 50ms\n  retry:\n    initial_interval: 200ms\n    max_interval: 1s\n",
        sink.endpoint()
    ));
    let traces = python_sdk(&daemon.endpoint(), "grpc", 400, 2000).await;
    let expected = traces.len() * SDK_SPANS_PER_TRACE;
    // Requests of 60 spans, 4 in flight, 1.5 s each: once the first is taken, others are
    // in progress.
    sink.wait_for_spans(1, Duration::from_secs(30)).await;
    sink.kill();
    let taken_before = sink.log().spans.len();
    assert!(taken_before < expected, "all taken before the kill");
    // The pod's restart.
    tokio::time::sleep(Duration::from_secs(3)).await;
    sink.restart();
    let distinct = |sink: &PySink| sink.log().spans.into_iter().collect::<HashSet<_>>().len();
    // Until everything arrived, or something was counted lost (what the fix prevents).
    let until = std::time::Instant::now() + Duration::from_secs(90);
    while distinct(&sink) < expected
        && lost(&daemon.metrics()) == 0.0
        && std::time::Instant::now() < until
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let m = daemon.metrics();
    assert_eq!(lost(&m), 0.0, "{}", daemon.log());
    assert!(
        m.sum("llmtail_export_retries_total", &[]) > 0.0,
        "no request was in progress at the kill"
    );
    assert_eq!(distinct(&sink), expected, "{}", daemon.log());
    let mut per_trace: HashMap<String, HashSet<String>> = HashMap::new();
    for (t, span) in sink.log().spans {
        per_trace.entry(t).or_default().insert(span);
    }
    for t in &traces {
        assert_eq!(
            per_trace.get(t).map(HashSet::len),
            Some(SDK_SPANS_PER_TRACE)
        );
    }
}

/// A backend whose open connection hangs while new connections work (a load balancer with
/// a dead pod behind it): after a request gets no answer within the export timeout, the
/// next goes on a new connection, and exports resume (before: every retry waited on the
/// dead connection, and nothing arrived).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_leave_a_hung_connection_for_a_new_one() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let sink = Sink::start_counting(0).await;
    let proxy = FreezingProxy::start(sink.port).await;
    let daemon = Daemon::start(&format!(
        "sampling:\n  root_grace: 100ms\n  base_rate: 1.0\nexporter:\n  otlp:\n    endpoint: {}\n    timeout: 2s\n  batch:\n    timeout: 50ms\n  retry:\n    initial_interval: 200ms\n    max_interval: 1s\n    max_elapsed: 120s\n",
        proxy.endpoint()
    ));
    let mut rng = StdRng::seed_from_u64(7);
    let mut sent = 0;
    let mut first = send_until(&daemon, &mut rng, |_| {
        sent += 1;
        sent > 3
    })
    .await;
    // Delivered through the proxy: the connection is open.
    assert_delivered_once(&sink, &first, &daemon).await;
    assert_eq!(proxy.connections(), 1);
    proxy.freeze();
    let mut sent = 0;
    let second = send_until(&daemon, &mut rng, |_| {
        sent += 1;
        sent > 3
    })
    .await;
    first.extend(second);
    assert_delivered_once(&sink, &first, &daemon).await;
    assert!(proxy.connections() >= 2, "{}", daemon.log());
    assert_eq!(lost(&daemon.metrics()), 0.0);
}

/// A span of about `bytes` (two attributes of half that each), in a trace of its own.
fn huge_span(bytes: usize) -> Span {
    let mut rng = StdRng::seed_from_u64(99);
    let mut span = loadgen::trace(&mut rng, Kind::Normal, loadgen::convention_for(0), now_ns())
        .spans
        .remove(0);
    for key in ["gen_ai.input.messages", "gen_ai.output.messages"] {
        span.attributes.push(KeyValue {
            key: key.into(),
            value: Some(AnyValue {
                value: Some(Value::StringValue("x".repeat(bytes / 2))),
            }),
            ..Default::default()
        });
    }
    span
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_upstream_answering_413_gets_halves_and_only_a_span_too_large_alone_is_lost() {
    let _serial = ONE_AT_A_TIME.lock().await;
    const LIMIT: usize = 1 << 20;
    let sink = PySink::start("http", Some(LIMIT));
    // Batches allowed far over the upstream's limit: its 413s must split them.
    let daemon = Daemon::launch_opts(
        &format!(
            "sampling:\n  decision_wait: 5s\n  root_grace: 200ms\n  base_rate: 1.0\nexporter:\n  otlp:\n    endpoint: {}\n    protocol: http/protobuf\n  batch:\n    max_bytes: 16MiB\n    timeout: 500ms\n",
            sink.endpoint()
        ),
        Launch {
            max_request_bytes: Some(16 << 20),
            ..Launch::default()
        },
    );
    let http_endpoint = format!("http://{}", daemon.http);
    let traces = python_sdk(&http_endpoint, "http", 1500, 5000).await;
    // One span of ~1.4 MB: over the upstream's limit even alone.
    let mut client = client(&daemon.endpoint()).await;
    let huge = huge_span(1_400_000);
    client
        .export(loadgen::request(vec![huge]))
        .await
        .expect("accepted: llmtail's own limits allow it");
    let expected = traces.len() * SDK_SPANS_PER_TRACE;
    let got = sink.wait_for_spans(expected, Duration::from_secs(90)).await;
    let m = daemon
        .wait_metrics(Duration::from_secs(30), |m| lost(m) >= 1.0)
        .await;
    assert_eq!(got, expected, "{}", daemon.log());
    let log = sink.log();
    assert_whole_and_once(&log, &traces);
    assert!(!log.refused.is_empty(), "the upstream never said 413");
    assert!(log.requests.iter().all(|&r| r <= LIMIT));
    assert_eq!(
        m.sum("llmtail_spans_lost_total", &[("reason", "span_too_large")]),
        1.0
    );
    assert_eq!(lost(&m), 1.0);
    let log_text = daemon.log();
    assert_eq!(
        log_text
            .matches("a span alone is larger than the upstream accepts")
            .count(),
        1,
        "reported once, with sizes: {log_text}"
    );
}

/// A heavy-tailed id in 1..=n (log-uniform: a few ids are very common, most are rare), as
/// users and sessions of a chat product are.
fn heavy_tailed(rng: &mut StdRng, n: u64) -> u64 {
    (n as f64).powf(rng.random::<f64>()) as u64
}

/// A request shaped like production: 128 four-span traces (the SDKs' 512-span batch), users
/// from 20,000 and sessions from 100,000, heavy-tailed, and 10% of LLM calls carrying
/// 2–8 KB of prompt and completion.
fn production_request(rng: &mut StdRng) -> ExportTraceServiceRequest {
    let mut spans = Vec::with_capacity(512);
    for i in 0..128 {
        let kind = loadgen::pick_kind(rng, 0.05, 0.03, 0.02);
        let mut trace = loadgen::trace(rng, kind, loadgen::convention_for(i), now_ns());
        let user = format!("user-{}", heavy_tailed(rng, 20_000));
        let session = format!("sess-{}", heavy_tailed(rng, 100_000));
        let prompt = rng.random_bool(0.1).then(|| rng.random_range(2_000..8_000));
        for attr in &mut trace.spans[1].attributes {
            let value = match attr.key.as_str() {
                "user.id" => user.clone(),
                "session.id" => session.clone(),
                _ => continue,
            };
            attr.value = Some(AnyValue {
                value: Some(Value::StringValue(value)),
            });
        }
        if let Some(bytes) = prompt {
            trace.spans[1].attributes.push(KeyValue {
                key: "gen_ai.input.messages".into(),
                value: Some(AnyValue {
                    value: Some(Value::StringValue("lorem ipsum ".repeat(bytes / 12))),
                }),
                ..Default::default()
            });
        }
        spans.extend(trace.spans);
    }
    loadgen::request(spans)
}

fn span_key(span: &Span) -> [u8; 24] {
    let mut id = [0u8; 24];
    id[..16].copy_from_slice(&span.trace_id);
    id[16..].copy_from_slice(&span.span_id);
    id
}

/// What a flood's senders got through.
#[derive(Default)]
struct Flooded {
    accepted: HashSet<[u8; 24]>,
    refused: u64,
}

/// `senders` clients send production-shaped requests as fast as they are answered until
/// `until`; a refused request is dropped by its sender after a short pause (as an SDK's
/// queue overflowing would), so only what was accepted is owed.
async fn flood(endpoint: &str, senders: usize, until: tokio::time::Instant) -> Flooded {
    let mut tasks = Vec::new();
    for seed in 0..senders as u64 {
        let endpoint = endpoint.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut client = client(&endpoint).await;
            let mut rng = StdRng::seed_from_u64(1000 + seed);
            let mut out = Flooded::default();
            while tokio::time::Instant::now() < until {
                let request = production_request(&mut rng);
                let ids: Vec<[u8; 24]> = request
                    .resource_spans
                    .iter()
                    .flat_map(|rs| &rs.scope_spans)
                    .flat_map(|ss| &ss.spans)
                    .map(span_key)
                    .collect();
                match client.export(request).await {
                    Ok(r) => {
                        assert!(r.into_inner().partial_success.is_none());
                        out.accepted.extend(ids);
                    }
                    Err(status) => {
                        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
                        out.refused += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
            out
        }));
    }
    let mut all = Flooded::default();
    for t in tasks {
        let part = t.await.unwrap();
        all.accepted.extend(part.accepted);
        all.refused += part.refused;
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_during_an_outage_in_a_384_mib_cgroup_delivers_everything_accepted() {
    let _serial = ONE_AT_A_TIME.lock().await;
    const LIMIT: u64 = 384 << 20;
    let cgroup = MemoryCgroup::create("llmtail-flood", LIMIT);
    let sink = Sink::start_counting(0).await;
    sink.set_mode(SINK_UNAVAILABLE);
    // Defaults derived from the cgroup's limit; no durable queue; retries well past the
    // outage.
    let daemon = Daemon::launch_opts(
        &format!(
            "sampling:\n  decision_wait: 5s\n  root_grace: 1s\n  base_rate: 1.0\nexporter:\n  otlp:\n    endpoint: {}\n  retry:\n    initial_interval: 100ms\n    max_interval: 1s\n",
            sink.endpoint()
        ),
        Launch {
            max_request_bytes: Some(16 << 20),
            cgroup: Some(&cgroup),
            ..Launch::default()
        },
    );
    let m = daemon.metrics();
    assert_eq!(
        m.sum("llmtail_buffer_limit_bytes", &[]),
        (LIMIT as f64 * 0.4).floor(),
        "the budget is derived from the process's own cgroup"
    );
    let start = tokio::time::Instant::now();
    let endpoint = daemon.endpoint();
    let flooding =
        tokio::spawn(async move { flood(&endpoint, 4, start + Duration::from_secs(16)).await });
    // The upstream is down for the first 12 seconds of the flood; meanwhile the most the
    // budget counted is noted, to compare with the group's peak.
    let mut budget_peak = 0.0f64;
    while tokio::time::Instant::now() < start + Duration::from_secs(12) {
        budget_peak = budget_peak.max(daemon.metrics().sum("llmtail_memory_bytes", &[]));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sink.set_mode(SINK_OK);
    let flooded = flooding.await.unwrap();
    let accepted = flooded.accepted.len();
    assert!(flooded.refused > 0, "the flood never met backpressure");
    let mut delivered = 0;
    for _ in 0..1200 {
        delivered = sink.distinct_spans();
        if delivered >= accepted {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let m = daemon.metrics();
    let peak = cgroup.peak_bytes();
    println!(
        "flood: accepted {accepted} spans, refused {} requests, delivered {delivered}, peak memory {} MiB of {} MiB, budget counted at most {} MiB",
        flooded.refused,
        peak >> 20,
        LIMIT >> 20,
        budget_peak as u64 >> 20,
    );
    assert_eq!(cgroup.oom_kills(), 0, "OOM-killed");
    assert_eq!(lost(&m), 0.0, "{}", daemon.log());
    assert!(m.sum("llmtail_requests_refused_total", &[]) > 0.0);
    let ids = sink.ids();
    assert!(ids.values().all(|&n| n == 1), "a span arrived twice");
    assert_eq!(
        delivered, accepted,
        "accepted spans missing at the upstream"
    );
    assert!(flooded.accepted.iter().all(|id| ids.contains_key(id)));
    assert!(peak < LIMIT);
}

/// Sends production-shaped requests until `enough` holds, retrying refused ones (as an
/// SDK does) after a short pause; returns the ids of every span accepted.
async fn send_until(
    daemon: &Daemon,
    rng: &mut StdRng,
    mut enough: impl FnMut(&Daemon) -> bool,
) -> HashSet<[u8; 24]> {
    let mut client = client(&daemon.endpoint()).await;
    let mut accepted = HashSet::new();
    for _ in 0..5000 {
        if enough(daemon) {
            return accepted;
        }
        let request = production_request(rng);
        let ids: Vec<[u8; 24]> = request
            .resource_spans
            .iter()
            .flat_map(|rs| &rs.scope_spans)
            .flat_map(|ss| &ss.spans)
            .map(span_key)
            .collect();
        let mut refusals = 0;
        while let Err(status) = client.export(request.clone()).await {
            assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
            refusals += 1;
            assert!(refusals < 600, "refused for 30 s: {}", daemon.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        accepted.extend(ids);
    }
    panic!("the condition never held: {}", daemon.log());
}

/// Waits until the counting sink holds `accepted`, then checks it holds exactly that, once.
async fn assert_delivered_once(sink: &Sink, accepted: &HashSet<[u8; 24]>, daemon: &Daemon) {
    for _ in 0..1200 {
        if sink.distinct_spans() >= accepted.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ids = sink.ids();
    assert!(ids.values().all(|&n| n == 1), "a span arrived twice");
    assert_eq!(ids.len(), accepted.len(), "{}", daemon.log());
    assert!(accepted.iter().all(|id| ids.contains_key(id)));
}

fn durable_config(sink: &Sink, extra: &str) -> String {
    format!(
        "sampling:\n  decision_wait: 2s\n  root_grace: 200ms\n  base_rate: 1.0\nexporter:\n  otlp:\n    endpoint: {}\n  retry:\n    initial_interval: 100ms\n    max_interval: 500ms\n    max_elapsed: 2s\nstorage:\n  directory: log\n{extra}",
        sink.endpoint()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_longer_than_the_retry_horizon_loses_nothing_with_the_trace_log() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let sink = Sink::start_counting(0).await;
    sink.set_mode(SINK_UNAVAILABLE);
    let daemon = Daemon::launch_opts(
        &durable_config(&sink, ""),
        Launch {
            max_request_bytes: Some(16 << 20),
            ..Launch::default()
        },
    );
    let mut rng = StdRng::seed_from_u64(4);
    let mut sent = 0;
    let accepted = send_until(&daemon, &mut rng, |_| {
        sent += 1;
        sent > 40
    })
    .await;
    // Retries every 500 ms at most: 20 of them outlast retry.max_elapsed (2 s) several
    // times over.
    let m = daemon
        .wait_metrics(Duration::from_secs(60), |m| {
            m.sum("llmtail_export_retries_total", &[]) >= 20.0
        })
        .await;
    assert!(m.sum("llmtail_export_retries_total", &[]) >= 20.0);
    assert_eq!(lost(&m), 0.0, "{}", daemon.log());
    assert!(m.sum("llmtail_storage_bytes", &[]) > 0.0);
    sink.set_mode(SINK_OK);
    assert_delivered_once(&sink, &accepted, &daemon).await;
    // Delivered: no segment is held any more.
    let m = daemon
        .wait_metrics(Duration::from_secs(10), |m| {
            m.sum("llmtail_storage_segments", &[]) == 0.0
        })
        .await;
    assert_eq!(
        m.sum("llmtail_storage_segments", &[]),
        0.0,
        "delivered segments stay"
    );
    assert_eq!(lost(&m), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_a_log_larger_than_the_memory_budget_replays_it_all() {
    let _serial = ONE_AT_A_TIME.lock().await;
    const BUDGET: f64 = (16 << 20) as f64;
    let sink = Sink::start_counting(0).await;
    sink.set_mode(SINK_UNAVAILABLE);
    let config = durable_config(
        &sink,
        "limits:\n  max_buffer_bytes: 16MiB\nshutdown_timeout: 2s\n",
    );
    let launch = |dir| Launch {
        max_request_bytes: Some(16 << 20),
        dir: Some(dir),
        ..Launch::default()
    };
    let mut first = Daemon::launch_opts(&config, launch(tempfile::tempdir().unwrap()));
    let mut rng = StdRng::seed_from_u64(5);
    // The log grows to twice the memory budget while memory stays within it (the upstream
    // is down: every span is kept and queued, ~96 bytes of the budget each and a kept
    // root's roll-up attributes, and a quarter of the budget is the decision cache's).
    let mut accepted = send_until(&first, &mut rng, |d| {
        d.metrics().sum("llmtail_storage_bytes", &[]) > 2.0 * BUDGET
    })
    .await;
    let m = first.metrics();
    assert_eq!(lost(&m), 0.0, "{}", first.log());
    let log_bytes = m.sum("llmtail_storage_bytes", &[]);
    // What the running process needs to queue all of it: an index entry per span.
    let running = first.anon_rss();
    first.sigterm();
    assert!(first.wait_exit(Duration::from_secs(30)).success());
    // Same directory, upstream still down: the log replays from disk, so the new process
    // takes new data at once and stays small.
    let dir = std::mem::replace(&mut first.dir, tempfile::tempdir().unwrap());
    drop(first);
    let second = Daemon::launch_opts(&config, launch(dir));
    let mut sent = 0;
    accepted.extend(
        send_until(&second, &mut rng, |_| {
            sent += 1;
            sent > 10
        })
        .await,
    );
    // The replay puts what the log holds back in the queue (kept before, not delivered),
    // reading it in place: it costs the process what queueing it cost before the restart,
    // not a copy of the log (its pages are page cache, not the process's heap).
    let queued = |m: &Metrics| m.sum("llmtail_export_queue_spans", &[]) as usize;
    let mut anon = 0;
    let until = std::time::Instant::now() + Duration::from_secs(60);
    let m = loop {
        anon = anon.max(second.anon_rss());
        let m = second.metrics();
        if queued(&m) >= accepted.len() * 9 / 10 || std::time::Instant::now() > until {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        queued(&m) >= accepted.len() * 9 / 10,
        "{} of {} accepted queued, replayed {:?}, held {}: {}",
        queued(&m),
        accepted.len(),
        m.sum("llmtail_storage_replayed_spans_total", &[]),
        m.sum("llmtail_buffer_spans", &[]),
        second.log()
    );
    assert_eq!(
        m.sum("llmtail_requests_refused_total", &[]),
        0.0,
        "refused while replaying"
    );
    println!(
        "restart: a log of {} MiB replayed with at most {} MiB of anonymous memory; {} MiB before the restart (budget {} MiB)",
        log_bytes as u64 >> 20,
        anon >> 20,
        running >> 20,
        BUDGET as u64 >> 20
    );
    assert!(
        (anon as f64) < running as f64 + log_bytes / 2.0,
        "replay held the log in memory: {anon} bytes, {running} before the restart, a log of {log_bytes}"
    );
    sink.set_mode(SINK_OK);
    assert_delivered_once(&sink, &accepted, &second).await;
    assert_eq!(lost(&second.metrics()), 0.0);
}
