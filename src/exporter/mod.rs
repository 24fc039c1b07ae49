//! Exporting kept spans: a bounded queue, batching by size and time, a fixed number of
//! requests in flight, and retries with exponential backoff and jitter.

pub mod file;
pub mod otlp;
pub mod otlp_http;
pub mod wal;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::Rng;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use prometheus::{IntCounter, IntGauge};

use crate::config::{BatchConfig, ExportProtocol, ExporterConfig, RetryConfig};
use crate::otlp::reframe::{KeptSpan, encode_request};
use crate::telemetry::{Metrics, lost};

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

/// Share of `queue.max_spans` past which the queue counts as full for backpressure.
const HIGH_WATER: f64 = 0.9;

/// What travels from the queue to the batcher: spans (memory-only queue), or records
/// already in the write-ahead log (durable queue).
enum Queued {
    Spans(Vec<KeptSpan>),
    Record(wal::Record),
}

/// How often a full write-ahead log is reported in the log.
const WAL_FULL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The receiving end's handle: kept spans enter here, never blocking the caller.
pub struct ExportQueue {
    tx: mpsc::UnboundedSender<Queued>,
    /// The durable queue's log, when `queue.directory` is set.
    wal: Option<Arc<wal::Wal>>,
    /// When a full log was last reported.
    wal_full_logged: parking_lot::Mutex<Option<Instant>>,
    /// Spans submitted and not yet exported or lost; bounded by `max_spans`.
    queued: Arc<AtomicUsize>,
    /// Their memory (wire bytes and per-span bookkeeping), counted against
    /// `limits.max_buffer_bytes` with the held traces.
    queued_bytes: AtomicUsize,
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
    /// Queues the spans of one kept trace (or late spans); when the queue is full they are
    /// counted as lost with reason `queue_full`.
    pub fn submit(&self, spans: Vec<KeptSpan>) {
        let n = spans.len();
        if n == 0 {
            return;
        }
        let bytes = memory_of(&spans);
        let admitted = self
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                (q + n <= self.max_spans).then_some(q + n)
            })
            .is_ok();
        if !admitted {
            self.count_lost(lost::QUEUE_FULL, n);
            return;
        }
        let item = match &self.wal {
            None => Queued::Spans(spans),
            Some(wal) => match self.write_ahead(wal, spans) {
                Some(record) => Queued::Record(record),
                None => {
                    self.queued.fetch_sub(n, Ordering::AcqRel);
                    return;
                }
            },
        };
        self.enqueue(item, n, bytes);
    }

    fn enqueue(&self, item: Queued, n: usize, bytes: usize) {
        self.queue_gauge.add(n as i64);
        self.queued_bytes.fetch_add(bytes, Ordering::Relaxed);
        if self.tx.send(item).is_err() {
            // The exporter has already stopped (only after shutdown has flushed).
            self.release(n, bytes, lost::SHUTDOWN);
        }
    }

    /// Appends kept spans to the write-ahead log; `None` (counted as lost) when the log is
    /// full or cannot be written.
    fn write_ahead(&self, wal: &wal::Wal, spans: Vec<KeptSpan>) -> Option<wal::Record> {
        let n = spans.len();
        let payload = encode_request(&spans);
        drop(spans);
        let failure = match wal.append(n as u32, &payload) {
            Ok(Some(id)) => {
                self.wal_bytes.set(wal.bytes() as i64);
                return Some(wal::Record {
                    id,
                    spans: n as u32,
                    payload,
                });
            }
            Ok(None) => (
                lost::WAL_FULL,
                "the write-ahead log is full (queue.max_disk_bytes); kept spans are lost"
                    .to_owned(),
            ),
            Err(e) => (
                lost::WAL_ERROR,
                format!("cannot write the write-ahead log: {e}; kept spans are lost"),
            ),
        };
        self.count_lost(failure.0, n);
        let mut last = self.wal_full_logged.lock();
        if last.is_none_or(|t| t.elapsed() >= WAL_FULL_LOG_INTERVAL) {
            *last = Some(Instant::now());
            tracing::error!(exporter = %self.name, "{}", failure.1);
        }
        None
    }

    fn count_lost(&self, reason: &str, n: usize) {
        self.metrics
            .spans_lost
            .with_label_values(&[self.name.as_str(), reason])
            .inc_by(n as u64);
    }

    /// Takes `n` spans of `bytes` memory off the queue as lost for `reason`.
    fn release(&self, n: usize, bytes: usize, reason: &str) {
        self.count_lost(reason, n);
        self.dequeue(n, bytes);
    }

    /// Takes `n` spans of `bytes` memory off the queue as exported.
    fn exported(&self, n: usize, bytes: usize) {
        self.exported.inc_by(n as u64);
        self.dequeue(n, bytes);
    }

    /// Whether kept spans survive a restart here (a write-ahead log).
    pub fn is_durable(&self) -> bool {
        self.wal.is_some()
    }

    fn dequeue(&self, n: usize, bytes: usize) {
        self.queued.fetch_sub(n, Ordering::AcqRel);
        self.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
        self.queue_gauge.sub(n as i64);
    }

    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    /// Memory of the queued spans.
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes.load(Ordering::Relaxed)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// True when the queue is nearly full: receivers then push back on senders.
    pub fn is_high(&self) -> bool {
        self.queued() as f64 >= self.max_spans as f64 * HIGH_WATER
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
    pub wal: Option<(Arc<wal::Wal>, Vec<wal::Record>)>,
}

/// The exporter task's controls: `flush` asks it to send what is queued and stop;
/// `abort` (shutdown timeout) makes retries give up, counting what they held as lost.
#[derive(Clone, Default)]
pub struct ExporterControl {
    pub flush: CancellationToken,
    pub abort: CancellationToken,
}

/// Starts the exporter; returns the queue handle and the task, which ends after `flush`
/// once everything queued has been exported or counted as lost.
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
        wal_full_logged: parking_lot::Mutex::new(None),
        wal_bytes: metrics.export_wal_bytes.with_label_values(&[name]),
        queued: Arc::new(AtomicUsize::new(0)),
        queued_bytes: AtomicUsize::new(0),
        max_spans: settings.max_spans,
        name: name.to_owned(),
        queue_gauge: metrics.export_queue_spans.with_label_values(&[name]),
        exported: metrics.spans_exported.with_label_values(&[name]),
        metrics: metrics.clone(),
    });
    if let Some(wal) = &wal {
        queue.wal_bytes.set(wal.bytes() as i64);
        if !replay.is_empty() {
            let spans: u64 = replay.iter().map(|r| u64::from(r.spans)).sum();
            tracing::info!(
                exporter = name,
                records = replay.len(),
                spans,
                "replaying the write-ahead log"
            );
        }
    }
    // Replayed records are on disk already: admitted whatever the queue's bound.
    for record in replay {
        let (n, bytes) = (record.spans as usize, record.payload.len());
        queue.queued.fetch_add(n, Ordering::AcqRel);
        queue.enqueue(Queued::Record(record), n, bytes);
    }
    let worker = Worker {
        sink: Arc::new(sink),
        retry: settings.retry.clone(),
        queue: queue.clone(),
        abort: control.abort.clone(),
        retries: metrics.export_retries.with_label_values(&[name]),
    };
    let task = tokio::spawn(run_batcher(rx, settings, worker, control.flush));
    (queue, task)
}

#[derive(Clone)]
struct Worker {
    sink: Arc<Sink>,
    retry: RetryConfig,
    queue: Arc<ExportQueue>,
    abort: CancellationToken,
    /// `llmtail_export_retries_total{exporter}`.
    retries: IntCounter,
}

/// One export request's worth: spans to encode, and records already encoded (a
/// concatenation of encoded `ExportTraceServiceRequest`s is one such request).
#[derive(Default)]
struct Batch {
    spans: Vec<KeptSpan>,
    records: Vec<wal::Record>,
    /// Spans of the records.
    record_spans: usize,
}

impl Batch {
    fn len(&self) -> usize {
        self.spans.len() + self.record_spans
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn add(&mut self, item: Queued) {
        match item {
            Queued::Spans(spans) => self.spans.extend(spans),
            Queued::Record(r) => {
                self.record_spans += r.spans as usize;
                self.records.push(r);
            }
        }
    }

    /// Takes at most `max` spans off the front (records are never split).
    fn take(&mut self, max: usize) -> Batch {
        if self.len() <= max {
            return std::mem::take(self);
        }
        let mut out = Batch::default();
        if !self.spans.is_empty() {
            let rest = self.spans.split_off(self.spans.len().min(max));
            out.spans = std::mem::replace(&mut self.spans, rest);
        }
        while let Some(r) = self.records.first()
            && (out.is_empty() || out.len() + r.spans as usize <= max)
        {
            let r = self.records.remove(0);
            self.record_spans -= r.spans as usize;
            out.record_spans += r.spans as usize;
            out.records.push(r);
        }
        out
    }
}

async fn run_batcher(
    mut rx: mpsc::UnboundedReceiver<Queued>,
    settings: ExporterSettings,
    worker: Worker,
    flush: CancellationToken,
) {
    let in_flight = Arc::new(Semaphore::new(settings.concurrency));
    let max = settings.batch.max_spans;
    let mut pending = Batch::default();
    let mut deadline = tokio::time::Instant::now();
    loop {
        tokio::select! {
            biased;
            () = flush.cancelled() => break,
            item = rx.recv() => {
                let Some(item) = item else { break };
                if pending.is_empty() {
                    deadline = tokio::time::Instant::now() + settings.batch.timeout.0;
                }
                pending.add(item);
                while pending.len() >= max {
                    send_batch(&worker, &in_flight, pending.take(max)).await;
                    deadline = tokio::time::Instant::now() + settings.batch.timeout.0;
                }
            }
            () = tokio::time::sleep_until(deadline), if !pending.is_empty() => {
                send_batch(&worker, &in_flight, std::mem::take(&mut pending)).await;
            }
        }
    }
    // Flush: everything submitted before the flush signal is in the channel by now.
    while let Ok(item) = rx.try_recv() {
        pending.add(item);
    }
    while !pending.is_empty() {
        send_batch(&worker, &in_flight, pending.take(max)).await;
    }
    // Wait for every request in flight to finish (each honours `abort`).
    let _all = in_flight.acquire_many(settings.concurrency as u32).await;
}

/// Waits for a free slot, then sends the batch on its own task.
async fn send_batch(worker: &Worker, in_flight: &Arc<Semaphore>, batch: Batch) {
    let Ok(permit) = in_flight.clone().acquire_owned().await else {
        return;
    };
    let worker = worker.clone();
    tokio::spawn(async move {
        worker.export(batch).await;
        drop(permit);
    });
}

impl Worker {
    async fn export(&self, batch: Batch) {
        let n = batch.len();
        let bytes =
            memory_of(&batch.spans) + batch.records.iter().map(|r| r.payload.len()).sum::<usize>();
        let ids: Vec<u64> = batch.records.iter().map(|r| r.id).collect();
        let request = if batch.records.is_empty() {
            encode_request(&batch.spans)
        } else if batch.spans.is_empty() && batch.records.len() == 1 {
            batch.records[0].payload.clone()
        } else {
            let mut out = encode_request(&batch.spans).to_vec();
            for r in &batch.records {
                out.extend_from_slice(&r.payload);
            }
            Bytes::from(out)
        };
        drop(batch);
        let started = Instant::now();
        let mut backoff = self.retry.initial_interval.0;
        let mut attempt = 0u32;
        let outcome: Result<Rejected, &'static str> = loop {
            attempt += 1;
            let sent = tokio::select! {
                biased;
                () = self.abort.cancelled() => break Err(lost::SHUTDOWN),
                sent = self.sink.send(request.clone()) => sent,
            };
            match sent {
                Ok(rejected) => break Ok(rejected),
                Err(SendError::Permanent(msg)) => {
                    tracing::warn!(exporter = self.queue.name(), spans = n, error = %msg, "upstream rejected an export request permanently; spans lost");
                    break Err(lost::REJECTED);
                }
                Err(SendError::Retryable(msg, hint)) => {
                    self.retries.inc();
                    // The upstream's own delay (RetryInfo, Retry-After) is the least wait.
                    let wait = jittered(backoff).max(hint.unwrap_or_default());
                    if started.elapsed() + wait > self.retry.max_elapsed.0 {
                        tracing::warn!(exporter = self.queue.name(), spans = n, attempts = attempt, error = %msg, "export retries exhausted; spans lost");
                        break Err(lost::RETRIES_EXHAUSTED);
                    }
                    if attempt == 1 {
                        tracing::warn!(exporter = self.queue.name(), spans = n, error = %msg, retry_in = ?wait, "export failed; retrying");
                    } else {
                        tracing::debug!(exporter = self.queue.name(), spans = n, attempt, error = %msg, retry_in = ?wait, "export failed again");
                    }
                    tokio::select! {
                        biased;
                        () = self.abort.cancelled() => break Err(lost::SHUTDOWN),
                        () = tokio::time::sleep(wait) => {}
                    }
                    backoff = (backoff * 2).min(self.retry.max_interval.0);
                }
            }
        };
        match outcome {
            Ok(rejected) => {
                let spans = (rejected.spans as usize).min(n);
                self.queue.exported(n - spans, bytes);
                if spans > 0 || !rejected.message.is_empty() {
                    tracing::warn!(exporter = self.queue.name(), spans = n, rejected = spans, message = %rejected.message, "upstream accepted an export request in part");
                }
                if spans > 0 {
                    self.queue.release(spans, 0, lost::PARTIAL);
                }
            }
            Err(lost::SHUTDOWN) if !ids.is_empty() => {
                // Still in the write-ahead log: sent after the next start, not lost.
                self.queue.dequeue(n, bytes);
                return;
            }
            Err(reason) => self.queue.release(n, bytes, reason),
        }
        // Answered for (accepted, or refused for good): the log need not keep it.
        if let Some(wal) = &self.queue.wal {
            if let Err(e) = wal.ack(&ids) {
                tracing::error!(exporter = self.queue.name(), error = %e, "cannot update the write-ahead log; records may be sent again after a restart");
            }
            self.queue.wal_bytes.set(wal.bytes() as i64);
        }
    }
}

/// Memory of queued spans as `limits.max_buffer_bytes` counts it.
fn memory_of(spans: &[KeptSpan]) -> usize {
    spans
        .iter()
        .map(|k| k.span.bytes.len() + crate::buffer::SPAN_OVERHEAD)
        .sum()
}

/// Full backoff ± 50%, so replicas that failed together do not retry together.
fn jittered(d: Duration) -> Duration {
    d.mul_f64(rand::rng().random_range(0.5..1.5))
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::config::{Compression, Dur, ExportProtocol, OtlpExporterConfig};
    use crate::otlp::reframe::{HeldSpan, Origin};
    use crate::otlp::tracestate::Threshold;

    fn kept(n: usize) -> Vec<KeptSpan> {
        let origin = Arc::new(Origin {
            resource: Bytes::new(),
            resource_schema_url: Bytes::new(),
            scope: Bytes::new(),
            scope_schema_url: Bytes::new(),
            service: Arc::from("svc"),
        });
        (0..n)
            .map(|_| KeptSpan {
                span: HeldSpan {
                    origin: origin.clone(),
                    bytes: Bytes::from_static(b"\x0a\x10aaaaaaaaaaaaaaaa"),
                    trace_state: None,
                    is_root: false,
                    extra: None,
                },
                threshold: Threshold::ALWAYS,
            })
            .collect()
    }

    #[tokio::test]
    async fn a_full_queue_counts_what_it_cannot_take_as_lost() {
        // Port 9 (discard) on loopback: nothing listens, so every attempt fails and retries
        // hold the admitted spans in the queue.
        let sink = Sink::OtlpGrpc(
            otlp::OtlpGrpcSink::new(&OtlpExporterConfig {
                endpoint: "http://127.0.0.1:9".into(),
                protocol: ExportProtocol::Grpc,
                timeout: Dur(Duration::from_secs(1)),
                compression: Compression::None,
                headers: Default::default(),
                tls: Default::default(),
            })
            .unwrap(),
        );
        let metrics = Metrics::new();
        let control = ExporterControl::default();
        let (queue, task) = start(
            "test",
            sink,
            ExporterSettings {
                batch: BatchConfig {
                    max_spans: 4,
                    timeout: crate::config::Dur(Duration::from_millis(10)),
                },
                retry: RetryConfig::default(),
                max_spans: 10,
                concurrency: 1,
                wal: None,
            },
            metrics.clone(),
            control.clone(),
        );
        queue.submit(kept(8));
        queue.submit(kept(5));
        assert_eq!(queue.queued(), 8);
        let lost = |reason| {
            metrics
                .spans_lost
                .with_label_values(&["test", reason])
                .get()
        };
        assert_eq!(lost(lost::QUEUE_FULL), 5);
        queue.submit(kept(2));
        assert_eq!(queue.queued(), 10);
        // Shutdown with the upstream still down: abort turns the held spans into losses.
        control.flush.cancel();
        control.abort.cancel();
        task.await.unwrap();
        assert_eq!(lost(lost::SHUTDOWN), 10);
        assert_eq!(queue.queued(), 0);
        assert_eq!(
            metrics
                .export_queue_spans
                .with_label_values(&["test"])
                .get(),
            0
        );
    }
}
