//! The trace log (`storage.directory`): what was acknowledged survives `kill -9` whether
//! its trace was held, kept or being exported; a restart sends nothing twice that the
//! upstream had answered for; a torn last record costs only itself; a full disk refuses
//! retryably and loses nothing acknowledged.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use crate::support::*;
use llmtail_tools::loadgen::{GeneratedTrace, Kind};

fn config(sink: &Sink, storage: &Path, sampling: &str, storage_extra: &str) -> String {
    format!(
        "sampling:
{sampling}  base_rate: 0.0
  policies:
    - {{name: errors, type: error}}
exporter:
  otlp:
    endpoint: {}
  batch:
    timeout: 50ms
  retry:
    initial_interval: 100ms
    max_interval: 300ms
storage:
  directory: {}
{storage_extra}shutdown_timeout: 3s
",
        sink.endpoint(),
        storage.display()
    )
}

/// Sends each trace in a request of its own; returns the ids of those acknowledged.
async fn send_each(d: &Daemon, traces: &[GeneratedTrace]) -> HashSet<Vec<u8>> {
    let mut c = client(&d.endpoint()).await;
    let mut acked = HashSet::new();
    for t in traces {
        let request = llmtail_tools::loadgen::request(t.spans.clone());
        if c.export(request).await.is_ok() {
            acked.insert(t.trace_id.to_vec());
        }
    }
    acked
}

/// Every span of the sink, counted by (trace id, span id).
fn arrivals(sink: &Sink) -> HashMap<(Vec<u8>, Vec<u8>), u32> {
    let mut out = HashMap::new();
    for s in sink.spans() {
        *out.entry((s.trace_id, s.span_id)).or_insert(0) += 1;
    }
    out
}

/// The case: 300 error traces acknowledged and still held (their root's grace is
/// 8 s) when the process is killed; started again on the same config, all 300 arrive,
/// whole and once, when they are due.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_held_at_kill_9_arrive_after_the_restart() {
    let sink = Sink::start(0).await;
    let storage = tempfile::tempdir().unwrap();
    let cfg = config(&sink, storage.path(), "  root_grace: 8s\n", "");
    let d = Daemon::start(&cfg);
    let traces = generated(261, Kind::Error, 300);
    let acked = send_each(&d, &traces).await;
    assert_eq!(acked.len(), 300);
    let m = d
        .wait_metrics(Duration::from_secs(5), |m| {
            m.sum("llmtail_buffer_traces", &[]) == 300.0
        })
        .await;
    assert_eq!(m.sum("llmtail_buffer_traces", &[]), 300.0, "all held");
    assert_eq!(sink.spans().len(), 0);
    d.signal("KILL");
    drop(d);

    let d = Daemon::start(&cfg);
    let m = d
        .wait_metrics(Duration::from_secs(30), |m| {
            m.sum("llmtail_spans_exported_total", &[]) >= 1200.0
        })
        .await;
    assert_eq!(
        m.sum(
            "llmtail_storage_replayed_spans_total",
            &[("disposition", "held")]
        ),
        1200.0
    );
    let got = sink.traces();
    assert_eq!(
        got.keys().cloned().collect::<HashSet<_>>(),
        acked,
        "{}",
        d.log()
    );
    assert!(got.values().all(|spans| spans.len() == 4));
    assert!(arrivals(&sink).values().all(|n| *n == 1), "none twice");
    // Everything done: the log frees its segments.
    let m = d
        .wait_metrics(Duration::from_secs(10), |m| {
            m.sum("llmtail_storage_segments", &[]) == 0.0
        })
        .await;
    assert_eq!(m.sum("llmtail_storage_segments", &[]), 0.0);
}

/// Kept traces the upstream took before the kill are not sent again, though the segment
/// they are in is still on disk (a held trace keeps it): the marks say they were
/// delivered. The held one arrives after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_sends_nothing_the_upstream_had_taken() {
    let sink = Sink::start(0).await;
    let storage = tempfile::tempdir().unwrap();
    let cfg = config(
        &sink,
        storage.path(),
        "  root_grace: 100ms\n  idle_timeout: 4s\n",
        "",
    );
    let d = Daemon::start(&cfg);
    // A trace without its root is held for idle_timeout; it pins the first segment.
    let mut held = generated(262, Kind::Error, 1);
    held[0].spans.retain(|s| !s.parent_span_id.is_empty());
    let held_spans = held[0].spans.len();
    send_each(&d, &held).await;
    let kept = generated(263, Kind::Error, 100);
    assert_eq!(send_each(&d, &kept).await.len(), 100);
    d.wait_metrics(Duration::from_secs(15), |m| {
        m.sum("llmtail_storage_marks_total", &[("kind", "delivered")]) >= 100.0
            && m.sum("llmtail_spans_exported_total", &[]) >= 400.0
    })
    .await;
    assert_eq!(sink.spans().len(), 400);
    d.signal("KILL");
    drop(d);

    let d = Daemon::start(&cfg);
    let m = d
        .wait_metrics(Duration::from_secs(20), |m| {
            m.sum("llmtail_spans_exported_total", &[]) >= held_spans as f64
        })
        .await;
    assert_eq!(
        m.sum(
            "llmtail_storage_replayed_spans_total",
            &[("disposition", "skipped")]
        ),
        400.0,
        "{}",
        d.log()
    );
    assert_eq!(sink.spans().len(), 400 + held_spans);
    assert!(arrivals(&sink).values().all(|n| *n == 1), "none twice");
}

/// A record torn by a crash mid-write (the newest segment cut inside its last record):
/// every record before the tear is delivered, and the log takes new requests after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_last_record_costs_only_itself() {
    let sink = Sink::start(0).await;
    let storage = tempfile::tempdir().unwrap();
    let cfg = config(&sink, storage.path(), "  root_grace: 6s\n", "");
    let d = Daemon::start(&cfg);
    let traces = generated(264, Kind::Error, 50);
    assert_eq!(send_each(&d, &traces).await.len(), 50);
    d.signal("KILL");
    drop(d);
    let segment = std::fs::read_dir(storage.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.extension().is_some_and(|x| x == "log")
                && p.file_name().unwrap().to_string_lossy().starts_with("seg-")
        })
        .max()
        .expect("a segment");
    let len = std::fs::metadata(&segment).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&segment)
        .unwrap()
        .set_len(len - 100)
        .unwrap();

    let d = Daemon::start(&cfg);
    let last = traces.last().unwrap().trace_id.to_vec();
    let before: HashSet<Vec<u8>> = traces[..49].iter().map(|t| t.trace_id.to_vec()).collect();
    let more = generated(265, Kind::Error, 10);
    let acked_after = send_each(&d, &more).await;
    assert_eq!(acked_after.len(), 10);
    d.wait_metrics(Duration::from_secs(30), |m| {
        m.sum("llmtail_spans_exported_total", &[]) >= (59 * 4) as f64
    })
    .await;
    let got: HashSet<Vec<u8>> = sink.traces().keys().cloned().collect();
    assert!(before.is_subset(&got), "{}", d.log());
    assert!(acked_after.is_subset(&got));
    assert!(!got.contains(&last), "the torn record's trace is gone");
    assert!(d.log().contains("torn"), "{}", d.log());
}
