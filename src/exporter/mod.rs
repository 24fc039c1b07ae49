//! Exporting kept spans: batches bounded in spans and in bytes, a queue of encoded requests
//! (in memory, or in a write-ahead log that spills to disk), a fixed number of requests in
//! flight, retries with exponential backoff and jitter, and requests split in halves when
//! the upstream says they are too large.
//!
//! Decided traces always enter the queue: receivers refuse new data (see
//! `Pipeline::overloaded`) long before anything accepted would have to be dropped. A span
//! is lost only for a [`Loss`] reason.

mod batcher;
mod delivery;

use batcher::{Batcher, Encoded, Logged, Payload, Pending, Queued, encode_within};
use delivery::Worker;

pub mod config;

pub mod file;
pub mod otlp;
pub mod otlp_http;
pub mod wal;

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::Rng;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use prometheus::{IntCounter, IntGauge};

use crate::memory::Budget;
use crate::memory::SPAN_OVERHEAD;
use crate::otlp::reframe::{KeptSpan, encode_request, split_request};
use crate::otlp::scan;
use crate::telemetry::{Loss, Metrics};
use config::{BatchConfig, ExportProtocol, ExporterConfig, RetryConfig};

/// How an upstream answered an export request it did not fully accept.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// Worth trying again (e.g. UNAVAILABLE, a broken connection), optionally after the
    /// delay the upstream asked for.
    #[error("{0}")]
    Retryable(String, Option<Duration>),
    /// Will fail the same way every time (e.g. INVALID_ARGUMENT).
    #[error("{0}")]
    Permanent(String),
    /// The request is larger than the upstream accepts (gRPC RESOURCE_EXHAUSTED saying so,
    /// HTTP 413): smaller requests will go through.
    #[error("{0}")]
    TooLarge(String),
    /// The upstream cannot decode the request or refuses its content (gRPC
    /// INVALID_ARGUMENT, HTTP 400): the spans at fault are found by sending it in halves.
    #[error("{0}")]
    BadData(String),
}

/// The spans of an accepted request that the upstream nevertheless rejected (OTLP partial
/// success), with its explanation. Not retried, per the specification.
#[derive(Debug, Default)]
pub struct Rejected {
    pub spans: u64,
    pub message: String,
}

/// An exporter that cannot be set up (bad endpoint, unreadable TLS files, ...).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SinkError(pub String);

/// Where kept spans go.
pub enum Sink {
    OtlpGrpc(otlp::OtlpGrpcSink),
    OtlpHttp(Box<otlp_http::OtlpHttpSink>),
    File(file::FileSink),
}

impl Sink {
    /// Builds the sink an exporter's config describes.
    pub async fn from_config(cfg: &ExporterConfig) -> Result<Sink, SinkError> {
        match (&cfg.otlp, &cfg.file) {
            (Some(otlp), _) => match otlp.protocol {
                ExportProtocol::Grpc => otlp::OtlpGrpcSink::new(otlp).map(Sink::OtlpGrpc),
                ExportProtocol::HttpProtobuf => {
                    otlp_http::OtlpHttpSink::new(otlp).map(|s| Sink::OtlpHttp(Box::new(s)))
                }
            },
            (None, Some(file)) => file::FileSink::open(&file.path)
                .await
                .map(Sink::File)
                .map_err(|e| SinkError(format!("cannot open {}: {e}", file.path.display()))),
            (None, None) => Err(SinkError("no otlp or file section".into())),
        }
    }

    /// Sends one encoded `ExportTraceServiceRequest`; on success returns what of it the
    /// upstream rejected (OTLP partial success).
    async fn send(&self, request: Bytes) -> Result<Rejected, SendError> {
        match self {
            Sink::OtlpGrpc(s) => s.send(request).await,
            Sink::OtlpHttp(s) => s.send(request).await,
            Sink::File(s) => s.send(request).await,
        }
    }
}

/// What became of a request appended to the write-ahead log.
enum Appended {
    Written(Encoded),
    /// No room: nothing counted yet.
    Full,
    /// The log cannot be written: counted lost.
    Failed,
}

/// Share of `queue.max_spans` past which the queue counts as full for backpressure.
const HIGH_WATER: f64 = 0.9;

/// How often a full or failing write-ahead log is reported in the log.
const WAL_FULL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Encoded bytes a span adds to a request beyond its own: its framing and the tracestate
/// written into it. Used to close batches before `batch.max_bytes`; the encoded request is
/// checked exactly afterwards.
const SPAN_FRAMING: usize = 48;

/// The receiving end's handle: kept spans enter here, never blocking the caller and never
/// refused.
pub struct ExportQueue {
    tx: mpsc::UnboundedSender<Queued>,
    /// `batch.max_bytes`: records of the durable queue are requests of at most this.
    max_bytes: usize,
    /// The durable queue's log, when `queue.directory` is set.
    wal: Option<Arc<wal::Wal>>,
    /// The trace log, when `storage.directory` is set.
    log: Option<Arc<crate::storage::TraceLog>>,
    max_disk_bytes: usize,
    /// When a full or failing log was last reported.
    wal_full_logged: parking_lot::Mutex<Option<Instant>>,
    /// Whether a span too large for the upstream was reported (once per exporter).
    too_large_logged: AtomicBool,
    /// Requests or spans the upstream refused, reported at most every 10 s.
    refusals_logged: crate::telemetry::Throttle,
    /// Spans submitted and not yet answered for (exported or lost, or left in the log).
    queued: AtomicUsize,
    /// Of those, spans not yet encoded into a request: their bookkeeping counts in the
    /// memory budget (encoded requests are charged to it themselves).
    unencoded: AtomicUsize,
    /// Backpressure mark: receivers refuse past 90% of it.
    max_spans: usize,
    /// The exporter's name, the `exporter` label of its metrics.
    name: String,
    metrics: Arc<Metrics>,
    /// `llmtail_export_queue_spans{exporter}` and `llmtail_spans_exported_total{exporter}`,
    /// resolved once.
    queue_gauge: IntGauge,
    exported: IntCounter,
    wal_bytes: IntGauge,
}

impl ExportQueue {
    /// Queues kept spans (of whole traces, or late spans). With a durable queue they are
    /// written to the log here, when their trace is decided, so a crash right after loses
    /// nothing decided.
    pub fn submit(&self, spans: Vec<KeptSpan>) {
        let n = spans.len();
        if n == 0 {
            return;
        }
        self.queued.fetch_add(n, Ordering::AcqRel);
        self.queue_gauge.add(n as i64);
        if self.wal.is_none() {
            self.unencoded.fetch_add(n, Ordering::AcqRel);
            let unlogged = spans.iter().filter(|k| k.span.origin.pin.is_none()).count();
            if self.tx.send(Queued::Spans(spans)).is_err() {
                self.unencoded.fetch_sub(n, Ordering::AcqRel);
                // What the trace log holds is sent after the next start.
                self.count_lost(Loss::Shutdown, unlogged);
                self.answered(n);
            }
            return;
        }
        let mut requests = Vec::new();
        encode_within(&spans, self.max_bytes, &mut requests);
        let mut written = Vec::new();
        let mut start = 0;
        for (request, n) in requests {
            self.write_ahead(&spans[start..start + n], &request, &mut written);
            start += n;
        }
        drop(spans);
        for encoded in written {
            let n = encoded.spans;
            if self.tx.send(Queued::Encoded(encoded)).is_err() {
                // Stays in the log for the next start.
                self.answered(n);
            }
        }
    }

    /// Writes one encoded request of `spans` to the log, pushing what was written to
    /// `out`. When the log has no room for the whole request, its traces go in one record
    /// each, as many as fit: only the traces that do not fit are lost (counted), not the
    /// whole of a decision tick's batch.
    fn write_ahead(&self, spans: &[KeptSpan], request: &[u8], out: &mut Vec<Encoded>) {
        match self.append(request, spans.len()) {
            Appended::Written(encoded) => out.push(encoded),
            Appended::Failed => {}
            Appended::Full if spans.len() == 1 => self.lost_to_full_log(1),
            Appended::Full => {
                let mut lost = 0;
                let by_trace = |a: &KeptSpan, b: &KeptSpan| {
                    scan::trace_id(a.span.bytes()) == scan::trace_id(b.span.bytes())
                };
                for trace in spans.chunk_by(by_trace) {
                    // Its spans' bytes alone are a lower bound of its request: no need to
                    // encode what cannot fit.
                    let least: usize = trace.iter().map(|k| k.span.len()).sum();
                    if least + wal::RECORD_HEADER > self.disk_room().unwrap_or(0) {
                        lost += trace.len();
                        continue;
                    }
                    match self.append(&encode_request(trace), trace.len()) {
                        Appended::Written(encoded) => out.push(encoded),
                        Appended::Full => lost += trace.len(),
                        Appended::Failed => {}
                    }
                }
                self.lost_to_full_log(lost);
            }
        }
    }

    /// Appends a request to the log. A log that cannot be written counts the spans lost
    /// here; a full one leaves that to the caller.
    fn append(&self, request: &[u8], spans: usize) -> Appended {
        let Some(wal) = self.wal.as_ref() else {
            unreachable!("write_ahead is called for a durable queue only");
        };
        match wal.append(spans as u32, request) {
            Ok(Some(at)) => {
                self.wal_bytes.set(wal.bytes() as i64);
                // On disk now; read back for each attempt (from the page cache, usually),
                // so a long outage holds no memory for it.
                Appended::Written(Encoded {
                    spans,
                    payload: Payload::Disk(at),
                    record: Some(at.id),
                    logged: Logged::default(),
                })
            }
            Ok(None) => Appended::Full,
            Err(e) => {
                self.count_lost(Loss::WalError, spans);
                self.answered(spans);
                self.log_wal_problem(&format!(
                    "cannot write the write-ahead log: {e}; kept spans are lost"
                ));
                Appended::Failed
            }
        }
    }

    fn lost_to_full_log(&self, spans: usize) {
        if spans == 0 {
            return;
        }
        self.count_lost(Loss::WalFull, spans);
        self.answered(spans);
        self.log_wal_problem(
            "the write-ahead log is full (queue.max_disk_bytes); kept spans are lost",
        );
    }

    fn count_lost(&self, reason: Loss, n: usize) {
        if n > 0 {
            self.metrics
                .spans_lost
                .with_label_values(&[self.name.as_str(), reason.label()])
                .inc_by(n as u64);
        }
    }

    /// Takes `n` spans off the queue (exported, lost, or left in the log at shutdown).
    fn answered(&self, n: usize) {
        self.queued.fetch_sub(n, Ordering::AcqRel);
        self.queue_gauge.sub(n as i64);
    }

    /// Reports a full or failing log, at most every [`WAL_FULL_LOG_INTERVAL`].
    fn log_wal_problem(&self, message: &str) {
        let mut last = self.wal_full_logged.lock();
        if last.is_none_or(|t| t.elapsed() >= WAL_FULL_LOG_INTERVAL) {
            *last = Some(Instant::now());
            tracing::error!(exporter = %self.name, "{message}");
        }
    }

    /// Reports spans the upstream refused for good, at most every 10 s.
    fn log_refusal(&self, spans: usize, message: &str) {
        if let Some(held_back) = self.refusals_logged.allow() {
            tracing::warn!(exporter = %self.name, spans, error = %message, similar_reports_held_back = held_back, "upstream refused spans for good; they are lost (llmtail_spans_lost_total{{reason=\"upstream_rejected\"}})");
        }
    }

    /// Whether kept spans survive a restart here (the trace log, or a write-ahead log).
    pub fn is_durable(&self) -> bool {
        self.wal.is_some() || self.log.is_some()
    }

    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    /// Bookkeeping memory of the spans not yet encoded (the memory budget's share here;
    /// the buffers they refer to and the encoded requests are charged to it directly).
    pub fn bookkeeping(&self) -> usize {
        self.unencoded.load(Ordering::Relaxed) * SPAN_OVERHEAD
    }

    /// Room left in the durable queue's log, when there is one.
    pub fn disk_room(&self) -> Option<usize> {
        self.wal
            .as_ref()
            .map(|wal| self.max_disk_bytes.saturating_sub(wal.bytes() as usize))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// True when the queue is nearly full: receivers then push back on senders. A durable
    /// queue is bounded by its disk instead (see [`ExportQueue::disk_room`]); with the trace
    /// log, queued spans are its pages (a 48-byte entry each in memory): they wait in it,
    /// bounded by the log's bound and the memory budget, not by `queue.max_spans`.
    pub fn is_high(&self) -> bool {
        self.wal.is_none()
            && self.log.is_none()
            && self.queued() as f64 >= self.max_spans as f64 * HIGH_WATER
    }
}

/// Tuning of the exporter task.
#[derive(Clone)]
pub struct ExporterSettings {
    pub batch: BatchConfig,
    pub retry: RetryConfig,
    pub max_spans: usize,
    pub concurrency: usize,
    /// The durable queue's log and the records it replays, when there is one.
    pub wal: Option<(Arc<wal::Wal>, Vec<wal::Location>)>,
    /// `queue.max_disk_bytes`.
    pub max_disk_bytes: usize,
    /// Encoded requests (and records read back) are charged to it.
    pub budget: Arc<Budget>,
    /// The trace log: kept spans in it are not lost to a restart, and what the upstream
    /// answered for is marked there.
    pub log: Option<Arc<crate::storage::TraceLog>>,
}

/// The exporter task's controls: `flush` asks it to send what is queued and stop;
/// `abort` (shutdown timeout) makes retries give up, counting what they held as lost.
#[derive(Clone, Default)]
pub struct ExporterControl {
    pub flush: CancellationToken,
    pub abort: CancellationToken,
}

/// Starts the exporter; returns the queue handle and the task, which ends after `flush`
/// once everything queued has been exported or counted as lost (or, with a durable queue,
/// left in the log for the next start).
pub fn start(
    name: &str,
    sink: Sink,
    settings: ExporterSettings,
    metrics: Arc<Metrics>,
    control: ExporterControl,
) -> (Arc<ExportQueue>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let (wal, replay) = match settings.wal.clone() {
        Some((wal, replay)) => (Some(wal), replay),
        None => (None, Vec::new()),
    };
    let queue = Arc::new(ExportQueue {
        tx,
        wal: wal.clone(),
        log: settings.log.clone(),
        max_disk_bytes: settings.max_disk_bytes,
        max_bytes: settings.batch.max_bytes.0,
        wal_full_logged: parking_lot::Mutex::new(None),
        too_large_logged: AtomicBool::new(false),
        refusals_logged: crate::telemetry::Throttle::new(WAL_FULL_LOG_INTERVAL),
        wal_bytes: metrics.export_wal_bytes.with_label_values(&[name]),
        queued: AtomicUsize::new(0),
        unencoded: AtomicUsize::new(0),
        max_spans: settings.max_spans,
        name: name.to_owned(),
        queue_gauge: metrics.export_queue_spans.with_label_values(&[name]),
        exported: metrics.spans_exported.with_label_values(&[name]),
        metrics: metrics.clone(),
    });
    let mut ready = VecDeque::new();
    if let Some(wal) = &wal {
        queue.wal_bytes.set(wal.bytes() as i64);
        if !replay.is_empty() {
            let spans: u64 = replay.iter().map(|r| u64::from(r.spans)).sum();
            tracing::info!(
                exporter = name,
                records = replay.len(),
                spans,
                "sending what the write-ahead log holds from before the restart"
            );
        }
        // Replayed records stay on disk until their turn: a log of any size replays in
        // little memory, and receivers are not refused because of it.
        for at in replay {
            let n = at.spans as usize;
            queue.queued.fetch_add(n, Ordering::AcqRel);
            queue.queue_gauge.add(n as i64);
            ready.push_back(Encoded {
                spans: n,
                payload: Payload::Disk(at),
                record: Some(at.id),
                logged: Logged::default(),
            });
        }
    }
    let worker = Worker {
        sink: Arc::new(sink),
        retry: settings.retry.clone(),
        queue: queue.clone(),
        abort: control.abort.clone(),
        retries: metrics.export_retries.with_label_values(&[name]),
        budget: settings.budget.clone(),
    };
    let batcher = Batcher {
        in_flight: Arc::new(Semaphore::new(settings.concurrency)),
        settings,
        worker,
        pending: Pending::default(),
        ready,
    };
    let task = tokio::spawn(batcher.run(rx, control));
    (queue, task)
}

/// `prefix` followed by `data` gzip-compressed at `level` (1–9), in one buffer.
pub(crate) fn gzip(prefix: &[u8], data: &[u8], level: u32) -> Result<Vec<u8>, SendError> {
    use std::io::Write;
    let mut out = Vec::with_capacity(prefix.len() + data.len() / 4);
    out.extend_from_slice(prefix);
    let mut enc = flate2::write::GzEncoder::new(out, flate2::Compression::new(level.clamp(1, 9)));
    enc.write_all(data)
        .and_then(|()| enc.finish())
        .map_err(|e| SendError::Permanent(format!("gzip failed: {e}")))
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::otlp::reframe::{HeldSpan, Origin};
    use crate::otlp::tracestate::Threshold;
    use crate::units::{ByteSize, Dur};

    /// `n` kept spans of `size` bytes each (a valid span: trace id, then padding in the
    /// name field), under one resource.
    fn kept(n: usize, size: usize) -> Vec<KeptSpan> {
        let mut span = b"\x0a\x10aaaaaaaaaaaaaaaa".to_vec();
        crate::otlp::wire::put_len_field(&mut span, 5, &vec![b'x'; size.saturating_sub(24)]);
        let span = Bytes::from(span);
        let origin = Arc::new(Origin {
            data: span.clone(),
            resource: Bytes::from_static(b"\x0a\x00"),
            resource_schema_url: Bytes::new(),
            scope: Bytes::new(),
            scope_schema_url: Bytes::new(),
            service: Arc::from("svc"),
            pin: None,
        });
        (0..n)
            .map(|_| {
                KeptSpan::new(
                    HeldSpan::new(origin.clone(), &span, None, false),
                    Threshold::ALWAYS,
                )
            })
            .collect()
    }

    async fn file_exporter(
        dir: &std::path::Path,
        max_spans: usize,
        max_bytes: usize,
    ) -> (
        Arc<ExportQueue>,
        tokio::task::JoinHandle<()>,
        ExporterControl,
        Arc<Metrics>,
    ) {
        let path = dir.join("out.jsonl");
        let sink = Sink::File(file::FileSink::open(&path).await.expect("a file sink"));
        let metrics = Metrics::new();
        let control = ExporterControl::default();
        let (queue, task) = start(
            "test",
            sink,
            ExporterSettings {
                batch: BatchConfig {
                    max_spans,
                    max_bytes: ByteSize(max_bytes),
                    timeout: Dur(Duration::from_millis(10)),
                },
                retry: RetryConfig::default(),
                max_spans: 10,
                concurrency: 1,
                wal: None,
                max_disk_bytes: 0,
                budget: Budget::new(),
                log: None,
            },
            metrics.clone(),
            control.clone(),
        );
        (queue, task, control, metrics)
    }

    /// `traces` traces of `spans` spans of `size` bytes each, trace after trace.
    fn kept_traces(traces: u8, spans: usize, size: usize) -> Vec<KeptSpan> {
        (0..traces)
            .flat_map(|t| {
                kept(spans, size).into_iter().map(move |mut k| {
                    let mut bytes = k.span.bytes().to_vec();
                    bytes[2] = t;
                    k.span = k.span.with_bytes(Bytes::from(bytes), None);
                    k
                })
            })
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_larger_than_the_logs_room_loses_only_the_traces_that_do_not_fit() {
        let dir = tempfile::tempdir().unwrap();
        // 60 KiB of log, and an upstream that refuses connections: nothing is acknowledged.
        let (wal, replay) = wal::Wal::open(dir.path(), 60 * 1024, false).unwrap();
        let wal = Arc::new(wal);
        let cfg: ExporterConfig =
            serde_yaml_ng::from_str("otlp: {endpoint: 'http://127.0.0.1:1'}").unwrap();
        let sink = Sink::from_config(&cfg).await.unwrap();
        let metrics = Metrics::new();
        let (queue, _task) = start(
            "test",
            sink,
            ExporterSettings {
                batch: BatchConfig::default(),
                retry: RetryConfig::default(),
                max_spans: 100_000,
                concurrency: 1,
                wal: Some((wal.clone(), replay)),
                max_disk_bytes: 60 * 1024,
                budget: Budget::new(),
                log: None,
            },
            metrics.clone(),
            ExporterControl::default(),
        );
        // One decision tick: 20 traces of 4 spans of 2 KB (~160 KB) in one request.
        queue.submit(kept_traces(20, 4, 2_000));
        let lost = metrics
            .spans_lost
            .with_label_values(&["test", Loss::WalFull.label()])
            .get();
        // Before, the whole request was lost (80 spans); now the traces that fit are in the
        // log, each whole, and only the others are lost.
        let written: u32 = {
            let (_, replay) = wal::Wal::open(dir.path(), 60 * 1024, false).unwrap();
            replay.iter().map(|at| at.spans).sum()
        };
        assert_eq!(written as u64 + lost, 80, "written {written}, lost {lost}");
        assert!((24..=28).contains(&written), "written {written}");
        assert_eq!(written % 4, 0, "whole traces only: {written}");
        assert_eq!(queue.queued(), written as usize);
        assert!(wal.bytes() <= 60 * 1024);
    }

    #[test]
    fn requests_are_encoded_within_max_bytes() {
        let spans = kept(100, 10_000);
        let mut out = Vec::new();
        encode_within(&spans, 64 * 1024, &mut out);
        assert!(out.iter().all(|(r, _)| r.len() <= 64 * 1024));
        assert_eq!(out.iter().map(|(_, n)| n).sum::<usize>(), 100);
        // A span larger than the bound goes alone (the upstream decides).
        let mut out = Vec::new();
        encode_within(&kept(3, 100_000), 64 * 1024, &mut out);
        assert_eq!(out.iter().map(|(_, n)| *n).collect::<Vec<_>>(), [1, 1, 1]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_queue_takes_everything_decided_and_batches_stay_within_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let (queue, task, control, metrics) = file_exporter(dir.path(), 4096, 100_000).await;
        // Far past queue.max_spans (10): nothing is refused or lost; the queue says it is
        // high, so receivers push back instead.
        for _ in 0..30 {
            queue.submit(kept(10, 5_000));
        }
        assert!(queue.is_high());
        control.flush.cancel();
        task.await.unwrap();
        assert_eq!(
            metrics.spans_exported.with_label_values(&["test"]).get(),
            300
        );
        assert_eq!(queue.queued(), 0);
        let lost: u64 = prometheus::core::Collector::collect(&metrics.spans_lost)
            .iter()
            .flat_map(|f| f.get_metric())
            .map(|m| m.get_counter().get_value() as u64)
            .sum();
        assert_eq!(lost, 0);
        let lines = std::fs::read_to_string(dir.path().join("out.jsonl")).unwrap();
        let requests: Vec<&str> = lines.lines().collect();
        // 300 spans of ~5 KB in requests of at most ~100 KB: at least 15 requests.
        assert!(requests.len() >= 15, "{} requests", requests.len());
        for line in requests {
            let request: opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest =
                serde_json::from_str(line).unwrap();
            assert!(prost::Message::encoded_len(&request) <= 100_000);
        }
    }
}
