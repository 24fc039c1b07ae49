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

/// A tmpfs of `size` mounted for the test, unmounted when dropped (needs root, as CI has).
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("mount runs");
        assert!(status.success(), "mounting a tmpfs needs root");
        Tmpfs(dir)
    }

    fn path(&self) -> &Path {
        self.0.path()
    }

    /// Fills the filesystem with a file of its own, as a neighbour would; returns its path.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let path = self.path().join("ballast");
        let mut f = std::fs::File::create(&path).unwrap();
        let chunk = vec![0u8; 64 << 10];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.flush();
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.0.path())
            .status();
    }
}

/// The disk fills up under the log (a neighbour takes the free space) while the upstream
/// is down: requests are refused retryably (gRPC UNAVAILABLE) and `/readyz` says so, no
/// acknowledged span is lost, and once space and the upstream return, everything
/// acknowledged arrives and the log takes requests again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_retryably_and_loses_nothing_acknowledged() {
    let sink = Sink::start(0).await;
    sink.set_mode(SINK_UNAVAILABLE);
    let disk = Tmpfs::mount("16m");
    let cfg = config(&sink, disk.path(), "  root_grace: 100ms\n", "");
    let d = Daemon::start(&cfg);
    let mut c = client(&d.endpoint()).await;
    let traces = generated(266, Kind::Error, 400);
    let mut acked: HashSet<Vec<u8>> = HashSet::new();
    let mut refused = Vec::new();
    let mut ballast = None;
    let mut not_ready = false;
    for (i, t) in traces.iter().enumerate() {
        if i == 20 {
            ballast = Some(disk.fill());
        }
        match c
            .export(llmtail_tools::loadgen::request(t.spans.clone()))
            .await
        {
            Ok(_) => {
                acked.insert(t.trace_id.to_vec());
            }
            Err(status) => {
                refused.push(status.code());
                not_ready |= http_get(d.admin, "/readyz").is_some_and(|(code, _)| code == 503);
            }
        }
    }
    assert!(acked.len() >= 20, "{} acknowledged", acked.len());
    assert!(!refused.is_empty(), "the full disk refused nothing");
    assert!(
        refused.iter().all(|c| *c == tonic::Code::Unavailable),
        "{refused:?}"
    );
    let m = d.metrics();
    assert!(
        not_ready || m.sum("llmtail_storage_write_errors_total", &[]) == 0.0,
        "a failed write turns /readyz to 503"
    );
    // Room and the upstream come back.
    std::fs::remove_file(ballast.unwrap()).unwrap();
    sink.set_mode(SINK_OK);
    let want = acked.len() * 4;
    d.wait_metrics(Duration::from_secs(30), |m| {
        m.sum("llmtail_spans_exported_total", &[]) >= want as f64
    })
    .await;
    let got: HashSet<Vec<u8>> = sink.traces().keys().cloned().collect();
    assert!(acked.is_subset(&got), "{}", d.log());
    let more = generated(267, Kind::Error, 10);
    let mut c = client(&d.endpoint()).await;
    let mut taken = 0;
    for t in &more {
        // The bound is read again every second: the first may still be refused.
        for _ in 0..50 {
            if c.export(llmtail_tools::loadgen::request(t.spans.clone()))
                .await
                .is_ok()
            {
                taken += 1;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert_eq!(taken, 10);
    assert_eq!(http_get(d.admin, "/readyz").map(|r| r.0), Some(200));
    let lost = d.metrics().sum("llmtail_spans_lost_total", &[]);
    assert_eq!(lost, 0.0);
}

/// The regret window: a trace dropped by the base rate (p = 0) is turned to keep when a
/// late span brings an error, and every span of it arrives — the four sent before the
/// decision, read back from the log, and the late one — its root saying why. A late span
/// that changes nothing leaves its trace dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_error_within_the_regret_window_turns_a_dropped_trace_to_keep() {
    let sink = Sink::start(0).await;
    let storage = tempfile::tempdir().unwrap();
    let cfg = config(&sink, storage.path(), "  root_grace: 100ms\n", "");
    let d = Daemon::start(&cfg);
    let healthy = generated(268, Kind::Normal, 2);
    send_each(&d, &healthy).await;
    d.wait_metrics(Duration::from_secs(10), |m| {
        m.sum("llmtail_traces_total", &[("decision", "dropped")]) == 2.0
    })
    .await;
    // A late span for each: an error for the first, a plain one for the second.
    let failing = generated(269, Kind::Error, 1);
    let error_span = failing[0]
        .spans
        .iter()
        .find(|s| s.status.as_ref().is_some_and(|st| st.code == 2))
        .expect("an error span")
        .clone();
    let late =
        |t: &GeneratedTrace, template: &opentelemetry_proto::tonic::trace::v1::Span, id: u8| {
            let root = t
                .spans
                .iter()
                .find(|s| s.parent_span_id.is_empty())
                .unwrap();
            let mut span = template.clone();
            span.trace_id = t.trace_id.to_vec();
            span.span_id = vec![id; 8];
            span.parent_span_id = root.span_id.clone();
            span
        };
    let plain_span = healthy[1].spans[1].clone();
    let mut c = client(&d.endpoint()).await;
    c.export(llmtail_tools::loadgen::request(vec![
        late(&healthy[0], &error_span, 0xe1),
        late(&healthy[1], &plain_span, 0xe2),
    ]))
    .await
    .unwrap();
    let want = healthy[0].spans.len() + 1;
    let m = d
        .wait_metrics(Duration::from_secs(10), |m| {
            m.sum("llmtail_spans_exported_total", &[]) >= want as f64
        })
        .await;
    assert_eq!(
        m.sum("llmtail_traces_redecided_total", &[]),
        1.0,
        "{}",
        d.log()
    );
    let got = sink.traces();
    assert_eq!(got.len(), 1, "only the failing trace is kept");
    let spans = &got[&healthy[0].trace_id.to_vec()];
    assert_eq!(
        spans.len(),
        want,
        "whole: the spans before the decision too"
    );
    let root = spans.iter().find(|s| s.parent_span_id.is_empty()).unwrap();
    assert_eq!(
        attr(root, "sampling.reason").and_then(|v| match v {
            opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(s) =>
                Some(s.as_str()),
            _ => None,
        }),
        Some("regret_window")
    );
    assert!(!got.contains_key(healthy[1].trace_id.as_slice()));
}

/// kill -9 at 20 random moments under production-shaped load (the mix: 20 services, Zipf
/// users, agent traces, KB prompts; every trace kept, p = 1, its root's grace 1 s): some
/// traces held, some being exported, requests in flight. Started again each time on the
/// same log: every span of every acknowledged request reaches the upstream; spans sent
/// twice stay within what the upstream took in the second before each kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_under_load_loses_nothing_acknowledged() {
    use rand::{Rng, SeedableRng};
    use std::sync::{Arc, Mutex};
    let sink = Sink::start_counting(0).await;
    let storage = tempfile::tempdir().unwrap();
    let cfg = format!(
        "sampling:
  root_grace: 1s
  base_rate: 1.0
exporter:
  otlp:
    endpoint: {}
  batch:
    timeout: 50ms
storage:
  directory: {}
",
        sink.endpoint(),
        storage.path().display()
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(2626);
    let acked: Arc<Mutex<HashSet<[u8; 24]>>> = Arc::default();
    let mut kills = Vec::new();
    for round in 0..20u64 {
        let d = Daemon::start(&cfg);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sender = tokio::spawn({
            let (endpoint, acked, stop) = (d.endpoint(), acked.clone(), stop.clone());
            async move {
                let mix = llmtail_tools::mix::Mix::default();
                let mut rng = rand::rngs::StdRng::seed_from_u64(round);
                let mut c = client(&endpoint).await;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let (request, _) = mix.request(&mut rng, 256, now_ns());
                    let ids = span_ids(&request);
                    match c.export(request).await {
                        Ok(_) => acked.lock().unwrap().extend(ids),
                        // Killed: what was in flight was never acknowledged.
                        Err(_) => break,
                    }
                }
            }
        });
        tokio::time::sleep(Duration::from_millis(rng.random_range(200..2000))).await;
        d.signal("KILL");
        kills.push(std::time::Instant::now());
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = sender.await;
        drop(d);
    }
    let d = Daemon::start(&cfg);
    let acked = acked.lock().unwrap().clone();
    let end = std::time::Instant::now() + Duration::from_secs(90);
    let missing = loop {
        let ids = sink.ids();
        let missing = acked.iter().filter(|id| !ids.contains_key(*id)).count();
        if missing == 0 || std::time::Instant::now() > end {
            break missing;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(acked.len() > 20_000, "{} spans acknowledged", acked.len());
    assert_eq!(
        missing,
        0,
        "{missing} of {} acknowledged spans never arrived\n{}",
        acked.len(),
        d.log()
    );
    let ids = sink.ids();
    let twice: usize = ids.values().map(|n| *n as usize - 1).sum();
    let window: usize = kills
        .iter()
        .map(|k| sink.received_between(*k - Duration::from_secs(1), *k))
        .sum();
    eprintln!(
        "{} spans acknowledged over 20 kills, all delivered; {twice} sent twice, within the {window} the upstream took in the second before a kill",
        acked.len()
    );
    assert!(twice <= window, "{twice} duplicates > {window}");
}

/// Segments freed out of order under an upstream that flaps (down and up every 1–3 s) for
/// 60 s under production-shaped load, every trace kept: the log (2 MiB, about 15 requests:
/// full within each outage, even in a debug build) never takes more than `max_disk_bytes`
/// (receivers refuse retryably instead), everything acknowledged arrives,
/// and once all is delivered the log takes no room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_upstream_keeps_the_log_within_its_bound_and_frees_it_after() {
    let storage = tempfile::tempdir().unwrap();
    let place = format!("directory: {}", storage.path().display());
    flapping_upstream(&place, Duration::from_secs(60)).await;
    let files: Vec<_> = std::fs::read_dir(storage.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("seg-"))
        .collect();
    assert!(files.is_empty(), "{files:?}");
}

/// The same with the log in memory (`storage.memory`): the same bound, backpressure and
/// nothing lost; its segments freed once all is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_in_memory_under_a_flapping_upstream_is_bounded_and_loses_nothing() {
    flapping_upstream("memory: true", Duration::from_secs(30)).await;
}

/// Sends the realistic mix for `run` while the upstream flaps (down and up for 1–3 s each)
/// to a log (`place`: its `storage` key) of 2 MiB in 64 KiB segments: the log never passes
/// its bound, receivers refuse when it is full, every acknowledged span arrives once the
/// upstream stays up, and the log ends empty.
async fn flapping_upstream(place: &str, run: Duration) {
    use rand::{Rng, SeedableRng};
    const MAX_DISK: f64 = (2 << 20) as f64;
    let sink = Sink::start_counting(0).await;
    let d = Daemon::start(&format!(
        "sampling:
  root_grace: 200ms
  base_rate: 1.0
exporter:
  otlp:
    endpoint: {}
  batch:
    timeout: 50ms
  retry:
    initial_interval: 100ms
    max_interval: 500ms
storage:
  {place}
  segment_bytes: 64KiB
  max_disk_bytes: 2MiB
",
        sink.endpoint(),
    ));
    let mix = llmtail_tools::mix::Mix::default();
    let mut rng = rand::rngs::StdRng::seed_from_u64(2627);
    let mut c = client(&d.endpoint()).await;
    let mut acked: HashSet<[u8; 24]> = HashSet::new();
    let (mut refused, mut most) = (0usize, 0f64);
    let started = std::time::Instant::now();
    let mut flip_at = started;
    let mut down = false;
    while started.elapsed() < run {
        if std::time::Instant::now() >= flip_at {
            down = !down;
            sink.set_mode(if down { SINK_UNAVAILABLE } else { SINK_OK });
            flip_at += Duration::from_millis(rng.random_range(1000..3000));
        }
        let (request, _) = mix.request(&mut rng, 256, now_ns());
        let ids = span_ids(&request);
        match c.export(request).await {
            Ok(_) => acked.extend(ids),
            Err(status) => {
                // Refused retryably. A refusal answered before the request's body has all
                // arrived can reach the client as the stream's reset (CANCELLED), which
                // OTLP clients retry too.
                assert!(
                    matches!(
                        status.code(),
                        tonic::Code::Unavailable | tonic::Code::Cancelled
                    ),
                    "{status:?}"
                );
                refused += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let m = d.metrics();
        most = most.max(m.sum("llmtail_storage_bytes", &[]));
        assert!(
            m.sum("llmtail_storage_bytes", &[]) <= MAX_DISK,
            "the log passed its bound: {} bytes, {} segments, marks {:?}",
            m.sum("llmtail_storage_bytes", &[]),
            m.sum("llmtail_storage_segments", &[]),
            (
                m.sum("llmtail_storage_marks_total", &[("kind", "decided")]),
                m.sum("llmtail_storage_marks_total", &[("kind", "delivered")])
            )
        );
    }
    sink.set_mode(SINK_OK);
    let m = d
        .wait_metrics(Duration::from_secs(60), |m| {
            m.sum("llmtail_storage_bytes", &[]) == 0.0
                && m.sum("llmtail_export_queue_spans", &[]) == 0.0
        })
        .await;
    let ids = sink.ids();
    let missing = acked.iter().filter(|id| !ids.contains_key(*id)).count();
    eprintln!(
        "{} spans acknowledged, {refused} requests refused; the log took at most {most} bytes of {MAX_DISK}",
        acked.len()
    );
    assert_eq!(missing, 0, "{}", d.log());
    assert!(refused > 0, "the bound was never reached");
    assert_eq!(
        m.sum("llmtail_storage_bytes", &[]),
        0.0,
        "all delivered: the log is empty"
    );
    assert_eq!(m.sum("llmtail_spans_lost_total", &[]), 0.0);
    let m = d
        .wait_metrics(Duration::from_secs(5), |m| {
            m.sum("llmtail_storage_segments", &[]) == 0.0
        })
        .await;
    assert_eq!(m.sum("llmtail_storage_segments", &[]), 0.0);
}

/// With the trace log, kept spans waiting out an outage are the log's pages: the export
/// queue holds past `queue.max_spans` (1,000 here) without making receivers refuse, and
/// everything arrives once the upstream is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_spans_wait_out_an_outage_in_the_log_past_the_queues_span_bound() {
    use rand::SeedableRng;
    let sink = Sink::start_counting(0).await;
    sink.set_mode(SINK_UNAVAILABLE);
    let storage = tempfile::tempdir().unwrap();
    let d = Daemon::start(&format!(
        "sampling:
  root_grace: 100ms
  base_rate: 1.0
exporter:
  otlp:
    endpoint: {}
  batch:
    timeout: 50ms
    max_spans: 500
  queue:
    max_spans: 1000
  retry:
    initial_interval: 100ms
    max_interval: 300ms
storage:
  directory: {}
  max_disk_bytes: 256MiB
",
        sink.endpoint(),
        storage.path().display()
    ));
    let mix = llmtail_tools::mix::Mix::default();
    let mut rng = rand::rngs::StdRng::seed_from_u64(31);
    let mut c = client(&d.endpoint()).await;
    let mut acked: HashSet<[u8; 24]> = HashSet::new();
    send_mix(&mut c, &mix, &mut rng, &mut acked, 10).await;
    // Decided and queued, past the queue's span bound (refusal would start at 900).
    let m = d
        .wait_metrics(Duration::from_secs(20), |m| {
            m.sum("llmtail_export_queue_spans", &[]) >= 2000.0
        })
        .await;
    assert!(
        m.sum("llmtail_export_queue_spans", &[]) >= 2000.0,
        "{}",
        d.log()
    );
    send_mix(&mut c, &mix, &mut rng, &mut acked, 30).await;
    sink.set_mode(SINK_OK);
    d.wait_metrics(Duration::from_secs(60), |m| {
        m.sum("llmtail_export_queue_spans", &[]) == 0.0
            && m.sum("llmtail_storage_bytes", &[]) == 0.0
    })
    .await;
    let ids = sink.ids();
    let missing = acked.iter().filter(|id| !ids.contains_key(*id)).count();
    assert_eq!(missing, 0, "of {} acknowledged\n{}", acked.len(), d.log());
    assert_eq!(d.metrics().sum("llmtail_spans_lost_total", &[]), 0.0);
}

/// Sends `n` requests of 256 spans of the realistic mix, each of which must be acknowledged;
/// adds their spans' ids to `acked`.
async fn send_mix(
    c: &mut opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient<
        tonic::transport::Channel,
    >,
    mix: &llmtail_tools::mix::Mix,
    rng: &mut rand::rngs::StdRng,
    acked: &mut HashSet<[u8; 24]>,
    n: usize,
) {
    for _ in 0..n {
        let (request, _) = mix.request(rng, 256, now_ns());
        let ids = span_ids(&request);
        if let Err(status) = c.export(request).await {
            panic!("refused with the queue in the log: {status:?}");
        }
        acked.extend(ids);
    }
}
