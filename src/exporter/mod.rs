//! Exporting kept spans: batches bounded in spans and in bytes, a fixed number of
//! requests in flight, retries with exponential backoff and jitter, and requests split in
//! halves when the upstream says they are too large.
//!
//! Queued spans wait as they are: with the trace log, as pages of the log (an index entry
//! each in memory); a batch is encoded into its request only when a slot to send it is
//! free, so what waits out an outage costs the process no copies. Decided traces always
//! enter the queue: receivers refuse new data (see `Pipeline::overloaded`) long before
//! anything accepted would have to be dropped. A span is lost only for a [`Loss`] reason.

mod batcher;
mod delivery;

use batcher::{Batch, Batcher, Pending, encode_within};
use delivery::Worker;

pub mod config;

pub mod file;
pub mod legacy;
pub mod otlp;
pub mod otlp_http;

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
use crate::otlp::reframe::{KeptSpan, encode_request};
use crate::otlp::scan;
use crate::storage::TraceLog;
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
    OtlpGrpc(Box<otlp::OtlpGrpcSink>),
    OtlpHttp(Box<otlp_http::OtlpHttpSink>),
    File(file::FileSink),
}

impl Sink {
    /// Builds the sink an exporter's config describes.
    pub async fn from_config(cfg: &ExporterConfig) -> Result<Sink, SinkError> {
        match (&cfg.otlp, &cfg.file) {
            (Some(otlp), _) => match otlp.protocol {
                ExportProtocol::Grpc => {
                    otlp::OtlpGrpcSink::new(otlp).map(|s| Sink::OtlpGrpc(Box::new(s)))
                }
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

/// Share of `queue.max_spans` past which the queue counts as full for backpressure.
const HIGH_WATER: f64 = 0.9;

/// How often spans the upstream refused are reported in the log.
const REFUSALS_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// What a queued span costs in memory until the upstream answered for it: its
/// [`KeptSpan`] (48 bytes, in a batch's vector grown by doubling), its share of its
/// batch's marks and of its request's origin, and the allocator's slack (measured: ~96
/// bytes a span with 1,000,000 queued). The bytes it refers to are the log's pages, or
/// buffers charged to the budget themselves, as are a root's roll-up attributes.
const QUEUED_SPAN_BYTES: usize = 96;

/// Encoded bytes a span adds to a request beyond its own: its framing and the tracestate
/// written into it. Used to close batches before `batch.max_bytes`; the encoded request is
/// checked exactly afterwards.
const SPAN_FRAMING: usize = 48;

/// The receiving end's handle: kept spans enter here, never blocking the caller and never
/// refused.
pub struct ExportQueue {
    tx: mpsc::UnboundedSender<Vec<KeptSpan>>,
    /// The trace log, when there is one: queued spans are its pages, and what the upstream
    /// answered for is marked in it.
    log: Option<Arc<TraceLog>>,
    /// Whether a span too large for the upstream was reported (once per exporter).
    too_large_logged: AtomicBool,
    /// Requests or spans the upstream refused, reported at most every 10 s.
    refusals_logged: crate::telemetry::Throttle,
    /// Spans submitted and not yet answered for (exported or lost, or left in the log).
    queued: AtomicUsize,
    /// Backpressure mark without a trace log: receivers refuse past 90% of it.
    max_spans: usize,
    /// The exporter's name, the `exporter` label of its metrics.
    name: String,
    metrics: Arc<Metrics>,
    /// `llmtail_export_queue_spans{exporter}` and `llmtail_spans_exported_total{exporter}`,
    /// resolved once.
    queue_gauge: IntGauge,
    exported: IntCounter,
}

impl ExportQueue {
    /// Queues kept spans (of whole traces, or late spans).
    pub fn submit(&self, spans: Vec<KeptSpan>) {
        let n = spans.len();
        if n == 0 {
            return;
        }
        self.queued.fetch_add(n, Ordering::AcqRel);
        self.queue_gauge.add(n as i64);
        if let Err(mpsc::error::SendError(spans)) = self.tx.send(spans) {
            // What the trace log on disk holds is sent after the next start.
            let perishable = spans.iter().filter(|k| !self.survives(k)).count();
            self.count_lost(Loss::Shutdown, perishable);
            self.answered(n);
        }
    }

    /// Whether a queued span is sent after a restart if it is not delivered now: it is in
    /// a trace log on disk.
    fn survives(&self, k: &KeptSpan) -> bool {
        self.is_durable() && k.span.origin.pin.is_some()
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

    /// Reports spans the upstream refused for good, at most every 10 s.
    fn log_refusal(&self, spans: usize, message: &str) {
        if let Some(held_back) = self.refusals_logged.allow() {
            tracing::warn!(exporter = %self.name, spans, error = %message, similar_reports_held_back = held_back, "upstream refused spans for good; they are lost (llmtail_spans_lost_total{{reason=\"upstream_rejected\"}})");
        }
    }

    /// Whether kept spans survive a restart here (the trace log, on disk).
    pub fn is_durable(&self) -> bool {
        self.log.as_ref().is_some_and(|log| !log.in_memory())
    }

    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    /// Bookkeeping memory of the queued spans (the memory budget's share here; the
    /// buffers they refer to and the encodings being sent are charged to it directly).
    pub fn bookkeeping(&self) -> usize {
        self.queued() * QUEUED_SPAN_BYTES
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// True when the queue is nearly full: receivers then push back on senders. With the
    /// trace log, queued spans are its pages (an index entry each in memory): they wait in
    /// it, bounded by the log's bound and the memory budget, not by `queue.max_spans`.
    pub fn is_high(&self) -> bool {
        self.log.is_none() && self.queued() as f64 >= self.max_spans as f64 * HIGH_WATER
    }
}

/// Tuning of the exporter task.
#[derive(Clone)]
pub struct ExporterSettings {
    pub batch: BatchConfig,
    pub retry: RetryConfig,
    pub max_spans: usize,
    pub concurrency: usize,
    /// Encoded requests are charged to it.
    pub budget: Arc<Budget>,
    /// The trace log: kept spans in it wait out outages and are not lost to a restart,
    /// and what the upstream answered for is marked there.
    pub log: Option<Arc<TraceLog>>,
}

/// The exporter task's controls: `flush` asks it to send what is queued and stop;
/// `abort` (shutdown timeout) makes retries give up, counting what they held as lost.
#[derive(Clone, Default)]
pub struct ExporterControl {
    pub flush: CancellationToken,
    pub abort: CancellationToken,
}

/// Starts the exporter; returns the queue handle and the task, which ends after `flush`
/// once everything queued has been exported or counted as lost (or, with the trace log
/// on disk, left in it for the next start).
pub fn start(
    name: &str,
    sink: Sink,
    settings: ExporterSettings,
    metrics: Arc<Metrics>,
    control: ExporterControl,
) -> (Arc<ExportQueue>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let queue = Arc::new(ExportQueue {
        tx,
        log: settings.log.clone(),
        too_large_logged: AtomicBool::new(false),
        refusals_logged: crate::telemetry::Throttle::new(REFUSALS_LOG_INTERVAL),
        queued: AtomicUsize::new(0),
        max_spans: settings.max_spans,
        name: name.to_owned(),
        queue_gauge: metrics.export_queue_spans.with_label_values(&[name]),
        exported: metrics.spans_exported.with_label_values(&[name]),
        metrics: metrics.clone(),
    });
    let worker = Worker {
        sink: Arc::new(sink),
        retry: settings.retry.clone(),
        max_bytes: settings.batch.max_bytes.0,
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
        ready: VecDeque::new(),
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
                budget: Budget::new(),
                log: None,
            },
            metrics.clone(),
            control.clone(),
        );
        (queue, task, control, metrics)
    }

    /// An exporter to an upstream that refuses connections: one request in flight at a
    /// time, requests of at most 100 KB. Returns once the upstream has been tried (a
    /// retry counted) for the first of `spans`.
    async fn down_exporter(
        budget: Arc<Budget>,
        spans: Vec<KeptSpan>,
    ) -> (
        Arc<ExportQueue>,
        tokio::task::JoinHandle<()>,
        ExporterControl,
        Arc<Metrics>,
    ) {
        let cfg: ExporterConfig =
            serde_yaml_ng::from_str("otlp: {endpoint: 'http://127.0.0.1:1'}").unwrap();
        let sink = Sink::from_config(&cfg).await.unwrap();
        let metrics = Metrics::new();
        let control = ExporterControl::default();
        let (queue, task) = start(
            "test",
            sink,
            ExporterSettings {
                batch: BatchConfig {
                    max_spans: 4096,
                    max_bytes: ByteSize(100_000),
                    timeout: Dur(Duration::from_millis(10)),
                },
                retry: RetryConfig::default(),
                max_spans: 100_000,
                concurrency: 1,
                budget,
                log: None,
            },
            metrics.clone(),
            control.clone(),
        );
        queue.submit(spans);
        let retried = || metrics.export_retries.with_label_values(&["test"]).get();
        for _ in 0..200 {
            if retried() >= 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(retried() >= 1, "the upstream was never tried");
        (queue, task, control, metrics)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queued_spans_wait_unencoded_while_the_upstream_is_down() {
        let budget = Budget::new();
        // 3 MB of kept spans: 30 requests' worth.
        let (queue, _task, _control, metrics) =
            down_exporter(budget.clone(), kept(10, 5_000)).await;
        for _ in 1..60 {
            queue.submit(kept(10, 5_000));
        }
        // Another attempt since: every batch has long been closed (10 ms).
        let retried = || metrics.export_retries.with_label_values(&["test"]).get();
        for _ in 0..200 {
            if retried() >= 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(retried() >= 2, "the upstream was not tried again");
        // Only the request in flight is encoded: the rest wait as spans, a small entry each.
        assert!(
            budget.charged() <= 100_000,
            "encoded and waiting: {} bytes",
            budget.charged()
        );
        assert_eq!(queue.queued(), 600);
        assert!(queue.bookkeeping() >= 500 * QUEUED_SPAN_BYTES);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn spans_submitted_after_the_final_drain_are_counted() {
        // A request stays in flight (retrying) after the flush signal, so the exporter is
        // still running, its queue drained.
        let (queue, task, control, metrics) = down_exporter(Budget::new(), kept(10, 1_000)).await;
        control.flush.cancel();
        // A receiver still taking spans: each submit is either drained before the flush
        // takes effect or refused after it, and then counted lost; never left behind.
        let shutdown = || {
            metrics
                .spans_lost
                .with_label_values(&["test", Loss::Shutdown.label()])
                .get()
        };
        for _ in 0..250 {
            if shutdown() > 0 {
                break;
            }
            queue.submit(kept(1, 1_000));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            shutdown() > 0,
            "spans submitted after the drain were not counted"
        );
        control.abort.cancel();
        task.await.unwrap();
        // Everything submitted is answered for: exported, or counted lost.
        assert_eq!(queue.queued(), 0);
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
