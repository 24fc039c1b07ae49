//! Scaling a cluster out and in under traffic without splitting a trace: a fourth replica
//! joining by reloaded static peers, a rolling restart of every replica under load, and
//! five replicas found by DNS (a hosts file the test controls) scaled out and in. In each,
//! every trace arrives whole and once if the consistent rule or a policy keeps it, and not
//! at all otherwise.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use crate::cluster::{
    BASE_RATE, arrived, config, expected, generate, scatter, scatter_spans, settled, start_replicas,
};
use crate::support::*;
use llmtail_tools::loadgen::{self, GeneratedTrace, Kind};
use opentelemetry_proto::tonic::trace::v1::Span;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Every trace arrived whole (its four spans, none twice) if the rule or a policy keeps
/// it, and not at all otherwise; returns how many arrived in part (always 0 here). On
/// failure, names every wrong trace and adds `report` (what the replicas say).
fn assert_whole_or(
    sink: &Sink,
    traces: &[GeneratedTrace],
    report: &dyn Fn(&[String]) -> String,
) -> usize {
    let got = arrived(sink);
    let mut split = 0;
    let mut wrong = Vec::new();
    for t in traces {
        let n = got.get(t.trace_id.as_slice()).copied().unwrap_or(0);
        split += usize::from(n != 0 && n != 4);
        let kept = t.kind != Kind::Normal || consistent_keep(&t.trace_id, BASE_RATE);
        if n != if kept { 4 } else { 0 } {
            wrong.push((t.kind, hex(&t.trace_id), n));
        }
    }
    if !wrong.is_empty() {
        let ids: Vec<String> = wrong.iter().map(|w| w.1.clone()).collect();
        panic!(
            "{} traces arrived wrong (kind, id, spans): {wrong:?}\n{}",
            wrong.len(),
            report(&ids)
        );
    }
    split
}

fn assert_whole(sink: &Sink, traces: &[GeneratedTrace]) -> usize {
    assert_whole_or(sink, traces, &|_| String::new())
}

fn sum(replicas: &[&Daemon], metric: &str) -> f64 {
    replicas.iter().map(|d| d.metrics().sum(metric, &[])).sum()
}

/// What the replicas say, for a failed assertion: each one's split traces by reason,
/// where it has each of `ids` (`/debug/traces`), and its log; then the logs of replicas
/// replaced before (`gone`).
fn report(replicas: &[&Daemon], gone: &[String], ids: &[String]) -> String {
    let mut out = String::new();
    for (i, d) in replicas.iter().enumerate() {
        let m = d.metrics();
        for reason in [
            "decided_here",
            "decided_before_handoff",
            "decided_elsewhere",
            "unknown_outcome",
        ] {
            let n = m.sum("llmtail_cluster_split_traces_total", &[("reason", reason)]);
            if n > 0.0 {
                out.push_str(&format!("replica {i}: {n} split, {reason}\n"));
            }
        }
        for id in ids.iter().take(5) {
            let answer = http_get(d.admin, &format!("/debug/traces/{id}"));
            out.push_str(&format!("replica {i}: {id}: {answer:?}\n"));
        }
        out.push_str(&format!("--- replica {i} log ---\n{}\n", d.log()));
    }
    for (i, log) in gone.iter().enumerate() {
        out.push_str(&format!("--- replaced replica {i} log ---\n{log}\n"));
    }
    out
}

/// Waits until every replica has `n` members in its ring.
async fn ring_of(replicas: &[&Daemon], n: f64) {
    for d in replicas {
        let m = d
            .wait_metrics(Duration::from_secs(15), |m| {
                m.sum("llmtail_cluster_peers", &[]) == n
            })
            .await;
        assert_eq!(m.sum("llmtail_cluster_peers", &[]), n, "{}", d.log());
    }
}

/// Waits until the sink has every span of the traces expected to be kept.
async fn all_arrived(sink: &Sink, traces: &[GeneratedTrace]) {
    all_arrived_or(sink, traces, &|_| String::new()).await;
}

/// [`all_arrived`], with `report` added to a failure.
async fn all_arrived_or(
    sink: &Sink,
    traces: &[GeneratedTrace],
    report: &dyn Fn(&[String]) -> String,
) {
    let want: HashSet<Vec<u8>> = expected(traces);
    let end = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let got = arrived(sink);
        let have: usize = want
            .iter()
            .map(|id| got.get(id).copied().unwrap_or(0))
            .sum();
        if have == want.len() * 4 {
            return;
        }
        if std::time::Instant::now() > end {
            // Which ones, and how.
            assert_whole_or(sink, traces, report);
            panic!("{have} of {} spans arrived", want.len() * 4);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every kept trace arrives whole (and no other at all), and no replica counted a split;
/// a failure says what each replica, and each replaced one (`gone`: their logs), saw.
async fn whole_and_never_split(
    sink: &Sink,
    traces: &[GeneratedTrace],
    replicas: &[&Daemon],
    gone: &[String],
) {
    let why = |ids: &[String]| report(replicas, gone, ids);
    all_arrived_or(sink, traces, &why).await;
    settled(replicas).await;
    assert_eq!(assert_whole_or(sink, traces, &why), 0);
    assert_eq!(
        sum(replicas, "llmtail_cluster_split_traces_total"),
        0.0,
        "{}",
        why(&[])
    );
}

fn heads_and_tails(traces: &[GeneratedTrace]) -> (Vec<Span>, Vec<Span>) {
    (
        traces.iter().flat_map(|t| t.spans[..2].to_vec()).collect(),
        traces.iter().flat_map(|t| t.spans[2..].to_vec()).collect(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fourth_replica_joins_by_reloaded_peers_without_splitting_a_trace() {
    let sink = Sink::start(0).await;
    let ports = [free_port(), free_port(), free_port(), free_port()];
    let three = &ports[..3];
    let mut replicas = start_replicas(&sink, three);
    let mut rng = StdRng::seed_from_u64(51);

    // Mid-trace: the first two spans of 400 traces reach the three.
    let traces = generate(&mut rng, 400);
    let (heads, tails) = heads_and_tails(&traces);
    scatter_spans(&mut rng, &replicas.iter().collect::<Vec<_>>(), heads).await;

    // A fourth starts with all four as its peers; the three take it in on SIGHUP.
    let fourth = Daemon::start_at(ports[3], &config(&sink, &ports, ports[3]));
    for (d, p) in replicas.iter().zip(three) {
        d.reload_at(*p, &config(&sink, &ports, *p));
    }
    replicas.push(fourth);
    let all: Vec<&Daemon> = replicas.iter().collect();
    ring_of(&all, 4.0).await;

    // The rest of those traces, and 200 new ones, reach all four.
    scatter_spans(&mut rng, &all, tails).await;
    let after = generate(&mut rng, 200);
    scatter(&mut rng, &all, &after).await;
    all_arrived(&sink, &[traces.clone(), after.clone()].concat()).await;
    settled(&all).await;

    let split = assert_whole(&sink, &traces) + assert_whole(&sink, &after);
    assert_eq!(split, 0);
    assert_eq!(sum(&all, "llmtail_cluster_split_traces_total"), 0.0);
    for d in &all[..3] {
        assert!(d.metrics().sum("llmtail_cluster_ring_changes_total", &[]) >= 1.0);
    }
    // The new member decides the new traces it owns.
    let decided_by_fourth = all[3].metrics().sum("llmtail_traces_total", &[]);
    assert!(
        (10.0..=120.0).contains(&decided_by_fourth),
        "{decided_by_fourth}"
    );
    let decided = sum(&all, "llmtail_traces_total");
    assert_eq!(decided, 600.0, "each trace decided once");
    eprintln!("scale-out: 0 of 600 split; the fourth decided {decided_by_fourth}");
}

/// Sends traces in rounds until told to stop, each span to a random replica (another if
/// that one does not answer): the first two spans of this round's 20 traces with the last
/// two of the previous round's, so every trace is in flight across a round. Returns every
/// trace sent.
async fn load(
    endpoints: Vec<String>,
    seed: u64,
    rounds: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
) -> Vec<GeneratedTrace> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut sent: Vec<GeneratedTrace> = Vec::new();
    let mut pending: Vec<Span> = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(40));
    loop {
        tick.tick().await;
        let stopping = stop.load(Ordering::SeqCst);
        let mut spans = std::mem::take(&mut pending);
        if !stopping {
            let round = generate(&mut rng, 20);
            let (heads, tails) = heads_and_tails(&round);
            spans.extend(heads);
            pending = tails;
            sent.extend(round);
        }
        let mut per: Vec<Vec<Span>> = vec![Vec::new(); endpoints.len()];
        for span in spans {
            per[rng.random_range(0..endpoints.len())].push(span);
        }
        for (first, spans) in per.into_iter().enumerate() {
            if spans.is_empty() {
                continue;
            }
            send_somewhere(&endpoints, first, spans).await;
        }
        rounds.fetch_add(1, Ordering::SeqCst);
        if stopping {
            return sent;
        }
    }
}

/// Sends `spans` to `endpoints[first]`, or to the next one that answers (a replica being
/// restarted refuses connections): for up to 20 s.
async fn send_somewhere(endpoints: &[String], first: usize, spans: Vec<Span>) {
    let end = std::time::Instant::now() + Duration::from_secs(20);
    let mut i = first;
    loop {
        let endpoint = &endpoints[i % endpoints.len()];
        let sent = match tonic::transport::Endpoint::from_shared(endpoint.clone())
            .unwrap()
            .connect_timeout(Duration::from_secs(1))
            .connect()
            .await
        {
            Ok(channel) => {
                let mut c = opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient::new(channel);
                c.export(loadgen::request(spans.clone())).await.is_ok()
            }
            Err(_) => false,
        };
        if sent {
            return;
        }
        assert!(
            std::time::Instant::now() < end,
            "no replica took spans for 20 s"
        );
        i += 1;
        if i % endpoints.len() == first {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Waits until the load generator has sent `n` more rounds.
async fn rounds_pass(rounds: &AtomicUsize, n: usize) {
    let target = rounds.load(Ordering::SeqCst) + n;
    let end = std::time::Instant::now() + Duration::from_secs(30);
    while rounds.load(Ordering::SeqCst) < target {
        assert!(std::time::Instant::now() < end, "the load stalled");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_under_load_splits_no_trace() {
    let sink = Sink::start(0).await;
    let ports = [free_port(), free_port(), free_port()];
    let mut replicas = start_replicas(&sink, &ports);
    let endpoints: Vec<String> = replicas.iter().map(Daemon::endpoint).collect();
    let rounds = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let sender = tokio::spawn(load(endpoints, 61, rounds.clone(), stop.clone()));
    rounds_pass(&rounds, 10).await;

    // Each replica in turn: SIGTERM (it hands off and leaves), then a new process on the
    // same address, which joins again.
    let mut handed = 0;
    let mut gone = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        replicas[i].sigterm();
        assert!(replicas[i].wait_exit(Duration::from_secs(15)).success());
        let log = replicas[i].log();
        gone.push(log.clone());
        let line = log
            .lines()
            .find(|l| l.contains("handed held traces to their new owners"))
            .unwrap_or_else(|| panic!("no hand-off: {log}"));
        assert!(line.contains("spans_kept_here=0"), "{line}");
        handed += line
            .split("traces=")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .and_then(|n| n.parse::<usize>().ok())
            .expect("a trace count");
        replicas[i] = Daemon::start_at(*port, &config(&sink, &ports, *port));
        ring_of(&replicas.iter().collect::<Vec<_>>(), 3.0).await;
        rounds_pass(&rounds, 10).await;
    }
    stop.store(true, Ordering::SeqCst);
    let traces = sender.await.unwrap();
    let all: Vec<&Daemon> = replicas.iter().collect();
    whole_and_never_split(&sink, &traces, &all, &gone).await;
    assert!(
        handed > 0,
        "the stopping replicas held nothing: the test tests nothing"
    );
    eprintln!(
        "rolling restart: {} traces, {handed} handed off, 0 split",
        traces.len()
    );
}

/// A rolling restart replaces replicas one after another faster than long traces end: a
/// trace in flight across two replacements (handed off by the first to go, held by its
/// new owner through the first one's return and the second one's going) arrives whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_in_flight_across_two_replacements_arrives_whole() {
    let sink = Sink::start(0).await;
    let ports = [free_port(), free_port(), free_port()];
    // Traces wait for their root up to 20 s: both replacements happen while they do.
    let body =
        |me: u16| config(&sink, &ports, me).replace("decision_wait: 3s", "decision_wait: 20s");
    let mut replicas: Vec<Daemon> = ports
        .iter()
        .map(|p| Daemon::start_at(*p, &body(*p)))
        .collect();
    let mut rng = StdRng::seed_from_u64(81);
    let traces = generate(&mut rng, 300);
    // Their middle spans first; the root and the last span after both replacements.
    let early: Vec<Span> = traces.iter().flat_map(|t| t.spans[1..3].to_vec()).collect();
    let late: Vec<Span> = traces
        .iter()
        .flat_map(|t| [t.spans[0].clone(), t.spans[3].clone()])
        .collect();
    scatter_spans(&mut rng, &replicas.iter().collect::<Vec<_>>(), early).await;
    let mut gone = Vec::new();
    for i in 0..2 {
        replicas[i].sigterm();
        assert!(replicas[i].wait_exit(Duration::from_secs(15)).success());
        gone.push(replicas[i].log());
        replicas[i] = Daemon::start_at(ports[i], &body(ports[i]));
        ring_of(&replicas.iter().collect::<Vec<_>>(), 3.0).await;
    }
    let all: Vec<&Daemon> = replicas.iter().collect();
    scatter_spans(&mut rng, &all, late).await;
    whole_and_never_split(&sink, &traces, &all, &gone).await;
}

/// The config of a replica at `ip` found through `llmtail-peers` (the hosts file).
fn dns_config(sink: &Sink, ip: &str, port: u16) -> String {
    config(sink, &[port], port).replace(
        &format!("  peers: [127.0.0.1:{port}]\n  self: 127.0.0.1:{port}\n"),
        &format!("  dns: llmtail-peers:{port}\n  self: {ip}:{port}\n"),
    )
}

/// Rewrites the hosts file in place (the daemons see it through a bind mount of the file).
fn publish(hosts: &std::path::Path, ips: &[&str]) {
    let mut text = String::from("127.0.0.1 localhost\n");
    for ip in ips {
        text.push_str(&format!("{ip} llmtail-peers\n"));
    }
    std::fs::write(hosts, text).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_replicas_found_by_dns_scale_out_and_in_without_splitting_a_trace() {
    let sink = Sink::start(0).await;
    let port = free_port();
    let ips = [
        "127.0.0.2",
        "127.0.0.3",
        "127.0.0.4",
        "127.0.0.5",
        "127.0.0.6",
    ];
    let dir = tempfile::tempdir().unwrap();
    let hosts = dir.path().join("hosts");
    publish(&hosts, &ips[..4]);
    let start = |ip: &str| {
        let endpoint = format!("{ip}:{port}");
        Daemon::launch_opts(
            &dns_config(&sink, ip, port),
            Launch {
                grpc_endpoint: Some(&endpoint),
                hosts: Some(&hosts),
                ..Default::default()
            },
        )
    };
    let mut replicas: Vec<Daemon> = ips[..4].iter().map(|ip| start(ip)).collect();
    ring_of(&replicas.iter().collect::<Vec<_>>(), 4.0).await;
    let mut rng = StdRng::seed_from_u64(71);

    // Scale out: a fifth appears in DNS mid-trace.
    let first = generate(&mut rng, 300);
    let (heads, tails) = heads_and_tails(&first);
    scatter_spans(&mut rng, &replicas.iter().collect::<Vec<_>>(), heads).await;
    // (It starts, then its address is published, as a pod's is once it is ready.)
    replicas.push(start(ips[4]));
    publish(&hosts, &ips);
    ring_of(&replicas.iter().collect::<Vec<_>>(), 5.0).await;
    scatter_spans(&mut rng, &replicas.iter().collect::<Vec<_>>(), tails).await;
    all_arrived(&sink, &first).await;
    assert_eq!(assert_whole(&sink, &first), 0);

    // Scale in: one goes, mid-trace (SIGTERM, and gone from DNS as it stops).
    let second = generate(&mut rng, 300);
    let (heads, tails) = heads_and_tails(&second);
    scatter_spans(&mut rng, &replicas.iter().collect::<Vec<_>>(), heads).await;
    let mut gone = replicas.remove(1);
    gone.sigterm();
    publish(&hosts, &[ips[0], ips[2], ips[3], ips[4]]);
    assert!(gone.wait_exit(Duration::from_secs(15)).success());
    let left: Vec<&Daemon> = replicas.iter().collect();
    ring_of(&left, 4.0).await;
    scatter_spans(&mut rng, &left, tails).await;

    let traces = [first, second].concat();
    all_arrived(&sink, &traces).await;
    settled(&left).await;
    assert_eq!(assert_whole(&sink, &traces), 0);
    assert_eq!(sum(&left, "llmtail_cluster_split_traces_total"), 0.0);
    assert!(sum(&left, "llmtail_cluster_ring_changes_total") >= 8.0);
    eprintln!("dns: 0 of 600 split");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forward_sent_again_after_an_unknown_outcome_is_taken_once() {
    let sink = Sink::start(0).await;
    let (me, peer) = (free_port(), free_port());
    let d = Daemon::start_at(me, &config(&sink, &[me, peer], me));
    let traces = generated(81, Kind::Error, 5);
    let spans: Vec<Span> = traces.iter().flat_map(|t| t.spans.clone()).collect();
    let mut c = client(&d.endpoint()).await;
    let forwarded = |key: &str| {
        let mut req = tonic::Request::new(loadgen::request(spans.clone()));
        let m = req.metadata_mut();
        m.insert(
            "x-llmtail-forwarded",
            format!("127.0.0.1:{peer}").parse().unwrap(),
        );
        m.insert("x-llmtail-route", "final".parse().unwrap());
        m.insert("x-llmtail-batch", key.parse().unwrap());
        req
    };
    // The peer's first attempt, and the same batch again (its answer was lost).
    c.export(forwarded("5eed0000000000000000000000000001"))
        .await
        .unwrap();
    c.export(forwarded("5eed0000000000000000000000000001"))
        .await
        .unwrap();
    let want = traces.len() * 4;
    assert_eq!(
        sink.wait_for_spans(want, Duration::from_secs(10)).await,
        want
    );
    let m = d
        .wait_metrics(Duration::from_secs(5), |m| {
            m.sum("llmtail_traces_total", &[]) == traces.len() as f64
        })
        .await;
    assert_eq!(m.sum("llmtail_cluster_duplicate_batches_total", &[]), 1.0);
    assert_eq!(
        m.sum("llmtail_cluster_spans_received_total", &[]),
        want as f64
    );
    assert_eq!(sink.spans().len(), want, "taken once");
    arrived(&sink);
    // A key that is not one is refused, naming the header.
    let err = c.export(forwarded("not-hex")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("x-llmtail-batch"), "{err:?}");
}
