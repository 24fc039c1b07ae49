//! Three replicas on 127.0.0.1 with static peers: the client sends every span of every
//! trace to a random replica; each trace is decided whole by its owner, exactly once, and
//! base-rate decisions follow the consistent rule. Then one replica stops mid-trace: it
//! hands what it holds to the others, and no trace is split.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::support::*;
use llmtail_tools::loadgen::{self, GeneratedTrace, Kind};
use opentelemetry_proto::tonic::trace::v1::Span;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub(crate) const BASE_RATE: f64 = 0.3;

/// A replica of `ports` (itself at `me`), with `/debug/traces` on (a failed test asks every
/// replica where its wrong traces are). The tests send the rest of a trace seconds after
/// its first spans and a ring change, on a loaded box: `overlap` covers that (its default,
/// `decision_wait` + two refreshes, is 3.4 s here). Every replica holds its spans in a
/// trace log (in memory: a replica started again on the same port starts empty, as a new
/// pod would), so forwarding, hand-off and take-over run on spans mapped from the log.
pub(crate) fn config(sink: &Sink, ports: &[u16], me: u16) -> String {
    let peers: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    format!(
        "  debug_traces: true\nsampling:\n  decision_wait: 3s\n  root_grace: 500ms\n  base_rate: {BASE_RATE}\n  policies:\n    - {{name: errors, type: error}}\n    - {{name: slow, type: latency, threshold_ms: 5000}}\n    - {{name: expensive, type: cost, threshold_usd: 0.10}}\ncluster:\n  peers: [{}]\n  self: 127.0.0.1:{me}\n  refresh_interval: 200ms\n  peer_retry_interval: 60s\n  overlap: 30s\nexporter:\n  otlp:\n    endpoint: {}\n  batch:\n    timeout: 50ms\nstorage:\n  memory: true\n  max_disk_bytes: 256MiB\nshutdown_timeout: 5s\n",
        peers.join(", "),
        sink.endpoint()
    )
}

pub(crate) fn generate(rng: &mut StdRng, n: usize) -> Vec<GeneratedTrace> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    (0..n)
        .map(|i| {
            let kind = loadgen::pick_kind(rng, 0.15, 0.1, 0.1);
            loadgen::trace(rng, kind, loadgen::convention_for(i), now)
        })
        .collect()
}

/// Sends every span to a random one of `replicas`, 80 spans per round.
pub(crate) async fn scatter_spans(rng: &mut StdRng, replicas: &[&Daemon], spans: Vec<Span>) {
    let mut clients = Vec::new();
    for d in replicas {
        clients.push(client(&d.endpoint()).await);
    }
    for chunk in spans.chunks(80) {
        let mut per: Vec<Vec<Span>> = vec![Vec::new(); replicas.len()];
        for span in chunk {
            per[rng.random_range(0..replicas.len())].push(span.clone());
        }
        for (c, spans) in clients.iter_mut().zip(per) {
            if !spans.is_empty() {
                c.export(loadgen::request(spans)).await.unwrap();
            }
        }
    }
}

/// Sends every span to a random one of `replicas`, 20 traces per round.
pub(crate) async fn scatter(rng: &mut StdRng, replicas: &[&Daemon], traces: &[GeneratedTrace]) {
    let mut clients = Vec::new();
    for d in replicas {
        clients.push(client(&d.endpoint()).await);
    }
    for chunk in traces.chunks(20) {
        let mut per: Vec<Vec<Span>> = vec![Vec::new(); replicas.len()];
        for span in chunk.iter().flat_map(|t| &t.spans) {
            per[rng.random_range(0..replicas.len())].push(span.clone());
        }
        for (c, spans) in clients.iter_mut().zip(per) {
            if !spans.is_empty() {
                c.export(loadgen::request(spans)).await.unwrap();
            }
        }
    }
}

pub(crate) fn expected(traces: &[GeneratedTrace]) -> HashSet<Vec<u8>> {
    traces
        .iter()
        .filter(|t| t.kind != Kind::Normal || consistent_keep(&t.trace_id, BASE_RATE))
        .map(|t| t.trace_id.to_vec())
        .collect()
}

/// Spans at the sink by trace, with a check that no span arrived twice.
pub(crate) fn arrived(sink: &Sink) -> HashMap<Vec<u8>, usize> {
    let spans = sink.spans();
    let unique: HashSet<(Vec<u8>, Vec<u8>)> = spans
        .iter()
        .map(|s| (s.trace_id.clone(), s.span_id.clone()))
        .collect();
    assert_eq!(unique.len(), spans.len(), "a span arrived twice");
    let mut by_trace = HashMap::new();
    for s in spans {
        *by_trace.entry(s.trace_id).or_insert(0) += 1;
    }
    by_trace
}

/// One replica at each of `ports`, all of them its peers.
pub(crate) fn start_replicas(sink: &Sink, ports: &[u16]) -> Vec<Daemon> {
    ports
        .iter()
        .map(|p| Daemon::start_at(*p, &config(sink, ports, *p)))
        .collect()
}

/// Waits until every replica holds nothing and has nothing queued: every trace sent so far
/// is decided and exported (or forwarded and then so).
pub(crate) async fn settled(replicas: &[&Daemon]) {
    // The gauges are refreshed every decision tick (10 ms): a reading taken right after the
    // last send may predate it, so only readings 100 ms later count.
    let fresh = std::time::Instant::now() + Duration::from_millis(100);
    for d in replicas {
        let m = d
            .wait_metrics(Duration::from_secs(30), |m| {
                std::time::Instant::now() >= fresh
                    && m.sum("llmtail_buffer_traces", &[]) == 0.0
                    && m.sum("llmtail_export_queue_spans", &[]) == 0.0
            })
            .await;
        assert_eq!(
            m.sum("llmtail_buffer_traces", &[]),
            0.0,
            "still held after 30 s"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_decide_every_trace_whole_and_survive_losing_one() {
    let sink = Sink::start(0).await;
    let ports = [free_port(), free_port(), free_port()];
    let mut replicas = start_replicas(&sink, &ports);
    let mut rng = StdRng::seed_from_u64(41);

    // 1. All three up.
    let first = generate(&mut rng, 300);
    scatter(&mut rng, &replicas.iter().collect::<Vec<_>>(), &first).await;
    let want = expected(&first);
    let spans_wanted = want.len() * 4;
    assert_eq!(
        sink.wait_for_spans(spans_wanted, Duration::from_secs(20))
            .await,
        spans_wanted
    );
    settled(&replicas.iter().collect::<Vec<_>>()).await;
    let got = arrived(&sink);
    assert_eq!(got.keys().cloned().collect::<HashSet<_>>(), want);
    assert!(
        got.values().all(|n| *n == 4),
        "every kept trace arrives whole"
    );
    let forwarded: f64 = replicas
        .iter()
        .map(|d| {
            d.metrics()
                .sum("llmtail_cluster_spans_forwarded_total", &[])
        })
        .sum();
    let received: f64 = replicas
        .iter()
        .map(|d| d.metrics().sum("llmtail_cluster_spans_received_total", &[]))
        .sum();
    // About two thirds of the spans land on a replica that does not own their trace.
    assert!((600.0..1000.0).contains(&forwarded), "{forwarded}");
    assert_eq!(forwarded, received);
    for d in &replicas {
        let m = d.metrics();
        assert_eq!(m.sum("llmtail_cluster_peers", &[]), 3.0);
        // What it took went through its trace log (in memory).
        assert!(m.sum("llmtail_storage_appended_bytes_total", &[]) > 0.0);
    }
    // Each trace was decided once, by its owner.
    let decided: f64 = replicas
        .iter()
        .map(|d| d.metrics().sum("llmtail_traces_total", &[]))
        .sum();
    assert_eq!(decided, 300.0);

    // 2. Scale-in mid-trace: the first two spans (root and LLM call) of 400 traces go to
    //    all three replicas; then one replica stops (SIGTERM: it hands its recent decisions
    //    and the traces it holds to their new owners and leaves); the last two spans of
    //    each trace go to the other two. Every trace is decided whole, once, as the rule
    //    and the policies say — those the stopped replica owned included.
    let mid = generate(&mut rng, 400);
    let heads: Vec<Span> = mid.iter().flat_map(|t| t.spans[..2].to_vec()).collect();
    let tails: Vec<Span> = mid.iter().flat_map(|t| t.spans[2..].to_vec()).collect();
    scatter_spans(&mut rng, &replicas.iter().collect::<Vec<_>>(), heads).await;
    let mut gone = replicas.pop().unwrap();
    gone.sigterm();
    assert!(gone.wait_exit(Duration::from_secs(15)).success());
    let log = gone.log();
    assert!(
        log.contains("handed held traces to their new owners"),
        "{log}"
    );
    let left: Vec<&Daemon> = replicas.iter().collect();
    for d in &left {
        d.wait_metrics(Duration::from_secs(10), |m| {
            m.sum("llmtail_cluster_peers", &[]) == 2.0
        })
        .await;
    }
    scatter_spans(&mut rng, &left, tails).await;
    settled(&left).await;
    let got = arrived(&sink);
    let mut split = 0;
    for t in &mid {
        let n = got.get(t.trace_id.as_slice()).copied().unwrap_or(0);
        let kept = t.kind != Kind::Normal || consistent_keep(&t.trace_id, BASE_RATE);
        split += usize::from(n != 0 && n != 4);
        assert_eq!(n, if kept { 4 } else { 0 }, "{:?} trace", t.kind);
    }
    assert_eq!(split, 0);
    let sum = |name: &str| left.iter().map(|d| d.metrics().sum(name, &[])).sum::<f64>();
    // The stopped replica left before it stopped listening: no forward to it failed.
    assert_eq!(sum("llmtail_cluster_forward_failures_total"), 0.0);
    assert_eq!(sum("llmtail_cluster_split_traces_total"), 0.0);
    let taken = sum("llmtail_cluster_taken_over_traces_total")
        + sum("llmtail_cluster_taken_over_decisions_total");
    assert!(taken > 0.0, "the stopped replica handed nothing over");
    eprintln!(
        "scale-in: {} traces and {} decisions taken over, 0 of 400 split",
        sum("llmtail_cluster_taken_over_traces_total"),
        sum("llmtail_cluster_taken_over_decisions_total")
    );

    // 3. Traces sent after that are decided whole again.
    let before = sink.spans().len();
    let second = generate(&mut rng, 200);
    scatter(&mut rng, &left, &second).await;
    let want2 = expected(&second);
    settled(&left).await;
    let got = arrived(&sink);
    for id in &want2 {
        assert_eq!(got.get(id).copied(), Some(4), "trace {id:?} whole");
    }
    for t in second
        .iter()
        .filter(|t| !want2.contains(t.trace_id.as_slice()))
    {
        assert!(
            !got.contains_key(t.trace_id.as_slice()),
            "dropped trace exported"
        );
    }
    // Nothing was lost to the upstream while the ring changed.
    let lost: f64 = left
        .iter()
        .map(|d| d.metrics().sum("llmtail_spans_lost_total", &[]))
        .sum();
    assert_eq!(lost, 0.0);
    assert!(sink.spans().len() >= before + want2.len() * 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_forward_to_each_other_over_mutual_tls_with_a_token() {
    let pki = Pki::new();
    let sink = Sink::start(0).await;
    let ports = [free_port(), free_port()];
    let token = "peer-token-0123456789abcdef";
    let grpc_tls = format!(
        "    tls:\n      cert_file: {}\n      key_file: {}\n      client_ca_file: {}\n",
        pki.path("server.pem"),
        pki.path("server-key.pem"),
        pki.path("ca.pem"),
    );
    let auth = format!("  auth:\n    bearer_tokens: [\"{token}\"]\n");
    let cluster_tls = format!(
        "  tls:\n    ca_file: {}\n    cert_file: {}\n    key_file: {}\n",
        pki.path("ca.pem"),
        pki.path("client.pem"),
        pki.path("client-key.pem"),
    );
    let replicas: Vec<Daemon> = ports
        .iter()
        .map(|p| {
            let body = config(&sink, &ports, *p).replace(
                "  peer_retry_interval: 60s\n",
                &format!("  peer_retry_interval: 60s\n{cluster_tls}"),
            );
            Daemon::start_at_with(*p, &grpc_tls, &auth, &body)
        })
        .collect();
    let mut rng = StdRng::seed_from_u64(43);
    let traces = generate(&mut rng, 100);
    let mut clients = Vec::new();
    for d in &replicas {
        clients.push(mtls_client(d, &pki, true).await.expect("mTLS"));
    }
    for chunk in traces.chunks(20) {
        let mut per: Vec<Vec<Span>> = vec![Vec::new(); 2];
        for span in chunk.iter().flat_map(|t| &t.spans) {
            per[rng.random_range(0..2)].push(span.clone());
        }
        for (c, spans) in clients.iter_mut().zip(per) {
            let mut req = tonic::Request::new(loadgen::request(spans));
            req.metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
            c.export(req).await.unwrap();
        }
    }
    let want = expected(&traces);
    assert_eq!(
        sink.wait_for_spans(want.len() * 4, Duration::from_secs(20))
            .await,
        want.len() * 4
    );
    let got = arrived(&sink);
    assert_eq!(got.keys().cloned().collect::<HashSet<_>>(), want);
    assert!(got.values().all(|n| *n == 4));
    let m: Vec<Metrics> = replicas.iter().map(|d| d.metrics()).collect();
    let forwarded: f64 = m
        .iter()
        .map(|m| m.sum("llmtail_cluster_spans_forwarded_total", &[]))
        .sum();
    assert!(forwarded > 0.0);
    assert_eq!(
        m.iter()
            .map(|m| m.sum("llmtail_cluster_forward_failures_total", &[]))
            .sum::<f64>(),
        0.0
    );
    assert_eq!(
        m.iter()
            .map(|m| m.sum("llmtail_auth_failures_total", &[]))
            .sum::<f64>(),
        0.0
    );
}

/// A replica stops while the peer it forwards to hangs (a frozen node: it accepts
/// connections and answers nothing). Forwarding gets half the shutdown timeout; what it
/// could not send is counted lost with reason `shutdown`, and the replica's own traces
/// still reach the upstream in the other half. Every span sent either arrives or is
/// counted: before, the forwarded ones vanished and the log said `ended=flushed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_stopping_beside_a_hung_peer_counts_what_it_could_not_forward() {
    let sink = Sink::start(0).await;
    let ports = [free_port(), free_port()];
    let mut replicas = start_replicas(&sink, &ports);
    for d in &replicas {
        let m = d
            .wait_metrics(Duration::from_secs(20), |m| {
                m.sum("llmtail_cluster_peers", &[]) == 2.0
            })
            .await;
        assert_eq!(m.sum("llmtail_cluster_peers", &[]), 2.0, "{}", d.log());
    }
    let hung = replicas.pop().unwrap();
    hung.signal("STOP");

    // Error traces only: each is kept, so each span must arrive or be counted lost.
    let mut rng = StdRng::seed_from_u64(43);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let traces: Vec<GeneratedTrace> = (0..200)
        .map(|i| loadgen::trace(&mut rng, Kind::Error, loadgen::convention_for(i), now))
        .collect();
    let total: usize = traces.iter().map(|t| t.spans.len()).sum();
    let stopping = &mut replicas[0];
    scatter(&mut rng, &[&*stopping], &traces).await;
    let m = stopping
        .wait_metrics(Duration::from_secs(20), |m| {
            m.sum("llmtail_spans_received_total", &[]) == total as f64
        })
        .await;
    assert_eq!(m.sum("llmtail_spans_received_total", &[]), total as f64);

    stopping.sigterm();
    // shutdown_timeout is 5 s.
    let status = stopping.wait_exit(Duration::from_secs(20));
    let log = stopping.log();
    assert_eq!(
        status.code(),
        Some(1),
        "the timeout cut the flush short: {log}"
    );
    assert!(
        log.contains("forwarding to peers did not finish before the shutdown timeout"),
        "{log}"
    );
    let lost: usize = log
        .lines()
        .filter(|l| l.contains("llmtail stopped"))
        .find_map(|l| l.split("lost_spans=").nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no lost_spans in the last line: {log}"));
    let arrived = sink.spans().len();
    // The hung peer owns about half the traces, the stopping replica the rest.
    assert!(
        lost > total / 4 && arrived > total / 4,
        "lost {lost}, arrived {arrived} of {total}"
    );
    assert_eq!(
        lost + arrived,
        total,
        "every span arrived or was counted lost: {log}"
    );
    drop(hung);
}
