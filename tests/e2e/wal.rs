//! The durable export queue: kept traces decided while the upstream is down survive
//! `kill -9` and a graceful stop, and arrive after the restart; a full log counts its loss.

use std::collections::HashSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::support::*;
use llmtail_tools::loadgen::{self, Kind};
use rand::SeedableRng;
use rand::rngs::StdRng;

fn config(sink: &Sink, wal: &std::path::Path, extra: &str) -> String {
    format!(
        "sampling:\n  decision_wait: 2s\n  root_grace: 100ms\n  base_rate: 0.0\n  policies:\n    - {{name: errors, type: error}}\nexporter:\n  otlp:\n    endpoint: {}\n  batch:\n    timeout: 50ms\n  queue:\n    directory: {}\n{extra}  retry:\n    initial_interval: 100ms\n    max_interval: 300ms\nshutdown_timeout: 2s\n",
        sink.endpoint(),
        wal.display()
    )
}

async fn send_errors(d: &Daemon, seed: u64, n: usize) -> HashSet<Vec<u8>> {
    // One request per trace.
    let traces = generated(seed, Kind::Error, n);
    for t in &traces {
        send_traces(d, std::slice::from_ref(t)).await;
    }
    traces.iter().map(|t| t.trace_id.to_vec()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_traces_survive_kill_9_and_a_graceful_stop_while_the_upstream_is_down() {
    // The upstream is down (UNAVAILABLE) until step 3.
    let sink = Sink::start(0).await;
    sink.set_mode(SINK_UNAVAILABLE);
    let wal = tempfile::tempdir().unwrap();
    let cfg = config(&sink, wal.path(), "");

    // 1. Upstream down; 20 error traces decided and written ahead; then kill -9.
    let d = Daemon::start(&cfg);
    let mut expected = send_errors(&d, 31, 20).await;
    d.wait_metrics(Duration::from_secs(10), |m| {
        m.sum("llmtail_export_queue_spans", &[]) == 80.0
    })
    .await;
    assert!(d.metrics().sum("llmtail_export_wal_bytes", &[]) > 0.0);
    d.signal("KILL");
    drop(d);

    // 2. Restart, upstream still down: the 20 are replayed into the queue; 10 more are
    //    decided; a graceful stop cannot deliver them but loses nothing: exit 0.
    let mut d = Daemon::start(&cfg);
    expected.extend(send_errors(&d, 32, 10).await);
    d.wait_metrics(Duration::from_secs(10), |m| {
        m.sum("llmtail_export_queue_spans", &[]) == 120.0
    })
    .await;
    d.sigterm();
    let status = d.wait_exit(Duration::from_secs(10));
    // Exit 1 would mean spans were counted lost at shutdown.
    assert!(status.success(), "{status:?}: {}", d.log());
    drop(d);

    // 3. Upstream back, restart: every kept trace arrives whole, once.
    sink.set_mode(SINK_OK);
    let d = Daemon::start(&cfg);
    assert_eq!(sink.wait_for_spans(120, Duration::from_secs(15)).await, 120);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sink.spans().len(), 120, "nothing sent twice");
    let traces = sink.traces();
    assert_eq!(traces.keys().cloned().collect::<HashSet<_>>(), expected);
    assert!(traces.values().all(|spans| spans.len() == 4));
    // Acknowledged records leave the disk.
    d.wait_metrics(Duration::from_secs(5), |m| {
        m.sum("llmtail_export_wal_bytes", &[]) == 0.0
    })
    .await;
    assert_eq!(d.metrics().sum("llmtail_export_wal_bytes", &[]), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nearly_full_log_refuses_new_data_and_counts_any_loss_once() {
    let sink = Sink::start(0).await;
    sink.set_mode(SINK_UNAVAILABLE);
    let wal = tempfile::tempdir().unwrap();
    // Room for a few 4-span records only.
    let d = Daemon::start(&config(&sink, wal.path(), "    max_disk_bytes: 4KiB\n"));
    let mut rng = StdRng::seed_from_u64(33);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let mut c = client(&d.endpoint()).await;
    let mut accepted = 0.0;
    let mut refused = 0;
    // Traces are written to the log when decided (100 ms after their root): sent faster
    // than that, every one would be accepted before the log filled. So after the first
    // five, the log is waited for to hold something; then traces go on until one is
    // refused (at most 400).
    for i in 0..400 {
        if i == 5 {
            d.wait_metrics(Duration::from_secs(10), |m| {
                m.sum("llmtail_export_wal_bytes", &[]) > 0.0
            })
            .await;
        }
        let t = loadgen::trace(&mut rng, Kind::Error, loadgen::convention_for(i), now);
        match c.export(loadgen::request(t.spans.clone())).await {
            Ok(_) => accepted += t.spans.len() as f64,
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
                assert!(status.message().contains("max_disk_bytes"), "{status:?}");
                refused += 1;
                if refused >= 3 {
                    break;
                }
            }
        }
    }
    // Before the log would overflow, receivers push back instead of accepting data
    // that could only be lost.
    assert!(
        refused > 0 && accepted > 0.0,
        "{refused} refused, {accepted} accepted"
    );
    let m = d
        .wait_metrics(Duration::from_secs(10), |m| {
            m.sum("llmtail_export_queue_spans", &[]) + m.sum("llmtail_spans_lost_total", &[])
                == accepted
        })
        .await;
    assert_eq!(
        m.sum("llmtail_export_queue_spans", &[]) + m.sum("llmtail_spans_lost_total", &[]),
        accepted,
        "every accepted span is queued or counted lost"
    );
    assert_eq!(
        m.sum(
            "llmtail_requests_refused_total",
            &[("reason", "durable_queue")]
        ),
        refused as f64
    );
    assert!(m.sum("llmtail_export_wal_bytes", &[]) <= 4096.0);
    // What did not fit in spite of the refusals (traces held when they began) is counted
    // as `wal_full` and said once.
    let lost = m.sum("llmtail_spans_lost_total", &[("reason", "wal_full")]);
    assert_eq!(lost, m.sum("llmtail_spans_lost_total", &[]));
    let log = d.log();
    let said = log.matches("write-ahead log is full").count();
    assert_eq!(said, usize::from(lost > 0.0), "{log}");
}
