//! Upgrading from a release with the separate write-ahead log (`exporter.queue.directory`):
//! what it held is delivered, even when the new release is killed right after taking it
//! over. The old log is a real one, written by that release (tests/e2e/fixtures/queue-0.1).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::*;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/fixtures/queue-0.1")
}

/// The spans (trace id and span id) the old release itself delivered from that log.
fn delivered_by_the_old_release() -> HashSet<[u8; 24]> {
    let text = std::fs::read_to_string(fixture().join("delivered-by-0.1.txt")).unwrap();
    text.lines()
        .map(|line| {
            let hex = line.replace(' ', "");
            let mut id = [0u8; 24];
            for (i, b) in id.iter_mut().enumerate() {
                *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap();
            }
            id
        })
        .collect()
}

async fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let until = std::time::Instant::now() + timeout;
    while !done() {
        assert!(
            std::time::Instant::now() < until,
            "timed out waiting: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_delivers_what_the_old_write_ahead_log_held_even_across_a_kill_9() {
    let expected = delivered_by_the_old_release();
    assert_eq!(expected.len(), 240);
    let sink = Sink::start_counting(0).await;
    sink.set_mode(SINK_UNAVAILABLE);
    let data = tempfile::tempdir().unwrap();
    let queue = data.path().join("queue");
    let old = queue.join("default");
    std::fs::create_dir_all(&old).unwrap();
    for f in ["seg-00000000000000000000.wal", "acked.log"] {
        std::fs::copy(fixture().join("default").join(f), old.join(f)).unwrap();
    }
    // The old release's config, unchanged.
    let cfg = format!(
        "exporter:\n  otlp:\n    endpoint: {}\n  queue:\n    directory: {}\n  retry:\n    initial_interval: 100ms\n    max_interval: 300ms\nshutdown_timeout: 2s\n",
        sink.endpoint(),
        queue.display()
    );

    // 1. The upstream is down: the old log's spans move into the trace log (in the same
    //    directory) and wait there; the old segment goes once the trace log has synced them.
    let d = Daemon::start(&cfg);
    let m = d
        .wait_metrics(Duration::from_secs(20), |m| {
            m.sum("llmtail_export_queue_spans", &[]) == 240.0
        })
        .await;
    assert_eq!(
        m.sum("llmtail_export_queue_spans", &[]),
        240.0,
        "{}",
        d.log()
    );
    let segment = old.join("seg-00000000000000000000.wal");
    wait_until("the old segment removed", Duration::from_secs(20), || {
        !segment.exists()
    })
    .await;
    assert!(d.metrics().sum("llmtail_storage_bytes", &[]) > 0.0);
    assert!(d.log().contains("deprecated"), "{}", d.log());
    // 2. Killed before anything reached the upstream.
    d.signal("KILL");
    drop(d);

    // 3. Upstream back, restart: every span the old release would have delivered arrives,
    //    once, from the trace log's replay.
    sink.set_mode(SINK_OK);
    let d = Daemon::start(&cfg);
    let sink_ref = &sink;
    wait_until("every span delivered", Duration::from_secs(30), || {
        sink_ref.distinct_spans() >= expected.len()
    })
    .await;
    let m = d
        .wait_metrics(Duration::from_secs(10), |m| {
            m.sum("llmtail_spans_exported_total", &[]) == 240.0
        })
        .await;
    let ids: HashMap<[u8; 24], u32> = sink.ids();
    assert_eq!(ids.keys().copied().collect::<HashSet<_>>(), expected);
    assert!(ids.values().all(|&n| n == 1), "a span arrived twice");
    assert_eq!(
        m.sum(
            "llmtail_storage_replayed_spans_total",
            &[("disposition", "exported")]
        ),
        240.0
    );
    assert_eq!(m.sum("llmtail_spans_lost_total", &[]), 0.0);
    assert!(!old.exists(), "the old log's directory is left");
}
