//! Exporting kept spans: batches bounded in spans and in bytes, a queue of encoded requests
//! (in memory, or in a write-ahead log that spills to disk), a fixed number of requests in
//! flight, retries with exponential backoff and jitter, and requests split in halves when
//! the upstream says they are too large.
//!
//! Decided traces always enter the queue: receivers refuse new data (see
//! `Pipeline::overloaded`) long before anything accepted would have to be dropped. A span
//! is lost only for a [`Loss`] reason.

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

/// Requests one refused request may become while its halves are searched for the spans at
/// fault: a poison span among thousands is found in ~2·log2(n) sends, and an upstream that
/// refuses everything costs no more than this many.
const MAX_SPLIT_SENDS: u32 = 64;

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
            if self.tx.send(Queued::Spans(spans)).is_err() {
                self.unencoded.fetch_sub(n, Ordering::AcqRel);
                self.stopped(n);
            }
            return;
        }
        let mut requests = Vec::new();
        encode_within(&spans, self.max_bytes, &mut requests);
        drop(spans);
        for (request, n) in requests {
            if let Some(encoded) = self.write_ahead(&request, n)
                && self.tx.send(Queued::Encoded(encoded)).is_err()
            {
                // Stays in the log for the next start.
                self.answered(n);
            }
        }
    }

    /// Spans submitted after the exporter stopped (only after shutdown has flushed).
    fn stopped(&self, n: usize) {
        self.count_lost(Loss::Shutdown, n);
        self.answered(n);
    }

    /// Appends a request to the log; `None` (counted as lost) when the log is full or
    /// cannot be written.
    fn write_ahead(&self, request: &[u8], spans: usize) -> Option<Encoded> {
        let wal = self.wal.as_ref()?;
        match wal.append(spans as u32, request) {
            Ok(Some(at)) => {
                self.wal_bytes.set(wal.bytes() as i64);
                // On disk now; read back for each attempt (from the page cache, usually),
                // so a long outage holds no memory for it.
                Some(Encoded {
                    spans,
                    payload: Payload::Disk(at),
                    record: Some(at.id),
                })
            }
            Ok(None) => {
                self.count_lost(Loss::WalFull, spans);
                self.answered(spans);
                self.log_wal_problem(
                    "the write-ahead log is full (queue.max_disk_bytes); kept spans are lost",
                );
                None
            }
            Err(e) => {
                self.count_lost(Loss::WalError, spans);
                self.answered(spans);
                self.log_wal_problem(&format!(
                    "cannot write the write-ahead log: {e}; kept spans are lost"
                ));
                None
            }
        }
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

    /// Whether kept spans survive a restart here (a write-ahead log).
    pub fn is_durable(&self) -> bool {
        self.wal.is_some()
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
    /// queue is bounded by its disk instead (see [`ExportQueue::disk_room`]).
    pub fn is_high(&self) -> bool {
        self.wal.is_none() && self.queued() as f64 >= self.max_spans as f64 * HIGH_WATER
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

/// What travels from the queue's handle to the batcher: kept spans to batch (memory-only
/// queue), or requests already in the log (durable queue).
enum Queued {
    Spans(Vec<KeptSpan>),
    Encoded(Encoded),
}

/// Spans gathering into the next request, with the estimated size of their encoding.
#[derive(Default)]
struct Pending {
    spans: Vec<KeptSpan>,
    bytes: usize,
    /// Resources and scopes already counted (by address: written once per request).
    origins: HashSet<usize>,
}

/// One export request: encoded, with its spans, and its record in the log if durable.
struct Encoded {
    spans: usize,
    payload: Payload,
    record: Option<u64>,
}

enum Payload {
    Memory(Bytes),
    /// In the log only; read back when it is sent.
    Disk(wal::Location),
}

/// Gathers kept spans into requests bounded by `batch.max_spans` and `batch.max_bytes`,
/// encodes them (and writes them to the log), and starts at most `queue.concurrency`
/// exports at a time, oldest first.
struct Batcher {
    settings: ExporterSettings,
    worker: Worker,
    in_flight: Arc<Semaphore>,
    pending: Pending,
    /// Encoded requests waiting for a free slot.
    ready: VecDeque<Encoded>,
}

impl Batcher {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Queued>, control: ExporterControl) {
        let timeout = self.settings.batch.timeout.0;
        let mut deadline = tokio::time::Instant::now();
        loop {
            let slot = {
                let in_flight = self.in_flight.clone();
                let waiting = !self.ready.is_empty();
                async move {
                    if waiting {
                        in_flight.acquire_owned().await.ok()
                    } else {
                        std::future::pending().await
                    }
                }
            };
            tokio::select! {
                biased;
                () = control.flush.cancelled() => break,
                Some(permit) = slot => self.start_one(permit),
                item = rx.recv() => match item {
                    None => break,
                    Some(Queued::Encoded(encoded)) => self.ready.push_back(encoded),
                    Some(Queued::Spans(spans)) => {
                        if self.pending.spans.is_empty() {
                            deadline = tokio::time::Instant::now() + timeout;
                        }
                        if self.add(spans) {
                            deadline = tokio::time::Instant::now() + timeout;
                        }
                    }
                },
                () = tokio::time::sleep_until(deadline), if !self.pending.spans.is_empty() => {
                    self.close();
                }
            }
        }
        // Flush: everything submitted before the flush signal is in the channel by now.
        while let Ok(item) = rx.try_recv() {
            match item {
                Queued::Encoded(encoded) => self.ready.push_back(encoded),
                Queued::Spans(spans) => {
                    self.add(spans);
                }
            }
        }
        self.close();
        while !self.ready.is_empty() {
            tokio::select! {
                biased;
                () = control.abort.cancelled() => break,
                permit = self.in_flight.clone().acquire_owned() => match permit {
                    Ok(permit) => self.start_one(permit),
                    Err(_) => break,
                },
            }
        }
        // The shutdown timeout ran out with requests still waiting: with a log they are
        // sent after the next start; without one they are lost.
        let queue = &self.worker.queue;
        for left in self.ready.drain(..) {
            if left.record.is_none() {
                queue.count_lost(Loss::Shutdown, left.spans);
            }
            queue.answered(left.spans);
        }
        // Wait for every request in flight to finish (each honours `abort`).
        let _all = self
            .in_flight
            .acquire_many(self.settings.concurrency as u32)
            .await;
    }

    /// Adds spans to the pending request, closing it whenever the next span would take it
    /// past `max_spans` or `max_bytes`; returns whether a request was closed.
    fn add(&mut self, spans: Vec<KeptSpan>) -> bool {
        let (max_spans, max_bytes) = (
            self.settings.batch.max_spans,
            self.settings.batch.max_bytes.0,
        );
        let mut closed = false;
        for k in spans {
            let own =
                k.span.bytes.len() + k.span.extra.as_ref().map_or(0, |e| e.len()) + SPAN_FRAMING;
            let key = Arc::as_ptr(&k.span.origin) as usize;
            let origin = &k.span.origin;
            let origin_bytes = origin.resource.len()
                + origin.scope.len()
                + origin.resource_schema_url.len()
                + origin.scope_schema_url.len()
                + 2 * SPAN_FRAMING;
            let mut bytes = own
                + if self.pending.origins.contains(&key) {
                    0
                } else {
                    origin_bytes
                };
            if !self.pending.spans.is_empty()
                && (self.pending.spans.len() >= max_spans || self.pending.bytes + bytes > max_bytes)
            {
                self.close();
                closed = true;
                bytes = own + origin_bytes;
            }
            self.pending.origins.insert(key);
            self.pending.bytes += bytes;
            self.pending.spans.push(k);
        }
        closed
    }

    /// Encodes the pending spans into requests of at most `max_bytes` (a single span may
    /// be larger: the upstream decides), writes them to the log when durable, and queues
    /// them.
    fn close(&mut self) {
        let pending = std::mem::take(&mut self.pending);
        if pending.spans.is_empty() {
            return;
        }
        let mut requests = Vec::new();
        encode_within(
            &pending.spans,
            self.settings.batch.max_bytes.0,
            &mut requests,
        );
        let queue = self.worker.queue.clone();
        queue
            .unencoded
            .fetch_sub(pending.spans.len(), Ordering::AcqRel);
        drop(pending);
        for (request, spans) in requests {
            let encoded = match &queue.wal {
                None => Some(Encoded {
                    spans,
                    payload: Payload::Memory(self.settings.budget.charge(request)),
                    record: None,
                }),
                Some(_) => queue.write_ahead(&request, spans),
            };
            self.ready.extend(encoded);
        }
    }

    /// Sends the oldest waiting request on its own task, holding `permit` until it is
    /// answered for.
    fn start_one(&mut self, permit: OwnedSemaphorePermit) {
        let Some(next) = self.ready.pop_front() else {
            return;
        };
        let worker = self.worker.clone();
        tokio::spawn(async move {
            worker.export(next).await;
            drop(permit);
        });
    }
}

/// Encodes `spans` as requests of at most `max` bytes each, halving where one is larger.
fn encode_within(spans: &[KeptSpan], max: usize, out: &mut Vec<(Bytes, usize)>) {
    let request = encode_request(spans);
    if request.len() > max && spans.len() > 1 {
        let (a, b) = spans.split_at(spans.len() / 2);
        encode_within(a, max, out);
        encode_within(b, max, out);
    } else {
        out.push((request, spans.len()));
    }
}

#[derive(Clone)]
struct Worker {
    sink: Arc<Sink>,
    retry: RetryConfig,
    queue: Arc<ExportQueue>,
    abort: CancellationToken,
    /// `llmtail_export_retries_total{exporter}`.
    retries: IntCounter,
    budget: Arc<Budget>,
}

/// How one request (or the halves it was split into) ended.
#[derive(Default)]
struct Tally {
    exported: usize,
    lost: Vec<(Loss, usize)>,
    /// Cut short by the shutdown timeout.
    interrupted: usize,
    /// Halves sent so far while searching a refused request (see [`MAX_SPLIT_SENDS`]).
    split_sends: u32,
}

/// Why sending one request ended without an answer for its spans.
enum Failed {
    Lost(Loss),
    /// Too large, or refused as bad data: its halves may go through.
    Split(Split, String),
    Interrupted,
}

#[derive(Clone, Copy)]
enum Split {
    TooLarge,
    BadData,
}

impl Worker {
    /// Sends one queued request and accounts for every span of it; acknowledges its
    /// record once the upstream answered for all.
    async fn export(&self, item: Encoded) {
        let Encoded {
            spans,
            payload,
            record,
        } = item;
        let mut tally = Tally::default();
        self.deliver(payload, spans, &mut tally).await;
        self.queue.exported.inc_by(tally.exported as u64);
        for (reason, n) in &tally.lost {
            self.queue.count_lost(*reason, *n);
        }
        if tally.interrupted > 0 && record.is_none() {
            self.queue.count_lost(Loss::Shutdown, tally.interrupted);
        }
        self.queue.answered(spans);
        // Answered for (accepted, or refused for good): the log need not keep it. A
        // request cut short stays in the log, to be sent after the next start.
        if let (Some(id), Some(wal)) = (record, &self.queue.wal)
            && tally.interrupted == 0
        {
            if let Err(e) = wal.ack(&[id]) {
                tracing::error!(exporter = self.queue.name(), error = %e, "cannot update the write-ahead log; records may be sent again after a restart");
            }
            self.queue.wal_bytes.set(wal.bytes() as i64);
        }
    }

    /// The request's bytes: in memory, or read back from the log (charged while held).
    async fn load(&self, payload: &Payload) -> Result<Bytes, Failed> {
        match payload {
            Payload::Memory(b) => Ok(b.clone()),
            Payload::Disk(at) => {
                let wal = self.queue.wal.clone().expect("records on disk have a log");
                let at = *at;
                let read = tokio::task::spawn_blocking(move || wal.read(&at))
                    .await
                    .map_err(std::io::Error::other)
                    .and_then(|read| read);
                read.map(|b| self.budget.charge(b)).map_err(|e| {
                    self.queue.log_wal_problem(&format!(
                        "cannot read a record back from the write-ahead log: {e}; its spans are lost"
                    ));
                    Failed::Lost(Loss::WalError)
                })
            }
        }
    }

    /// Sends a request with retries; when the upstream says it is too large, sends its
    /// halves instead (down to single spans, which are lost if still too large).
    fn deliver<'a>(
        &'a self,
        payload: Payload,
        spans: usize,
        tally: &'a mut Tally,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>> {
        Box::pin(async move {
            let (why, msg) = match self.send_with_retries(&payload, spans).await {
                Ok(rejected) => {
                    let refused = (rejected.spans as usize).min(spans);
                    tally.exported += spans - refused;
                    if refused > 0 || !rejected.message.is_empty() {
                        tracing::warn!(exporter = self.queue.name(), spans, rejected = refused, message = %rejected.message, "upstream accepted an export request in part");
                    }
                    if refused > 0 {
                        tally.lost.push((Loss::Partial, refused));
                    }
                    return;
                }
                Err(Failed::Lost(reason)) => return tally.lost.push((reason, spans)),
                Err(Failed::Interrupted) => return tally.interrupted += spans,
                Err(Failed::Split(why, msg)) => (why, msg),
            };
            let single = spans <= 1;
            let out_of_sends =
                matches!(why, Split::BadData) && tally.split_sends + 2 > MAX_SPLIT_SENDS;
            if single || out_of_sends {
                return self.refused_for_good(why, &msg, spans, tally);
            }
            let request = match self.load(&payload).await {
                Ok(request) => request,
                Err(_) => return tally.lost.push((Loss::WalError, spans)),
            };
            drop(payload);
            let Some([(a, na), (b, nb)]) = split_request(&request) else {
                return self.refused_for_good(why, &msg, spans, tally);
            };
            tracing::debug!(
                exporter = self.queue.name(),
                spans,
                bytes = request.len(),
                error = %msg,
                "upstream refused the request; sending it in halves"
            );
            drop(request);
            tally.split_sends += 2;
            let (a, b) = (self.budget.charge(a), self.budget.charge(b));
            self.deliver(Payload::Memory(a), na, tally).await;
            self.deliver(Payload::Memory(b), nb, tally).await;
        })
    }

    /// Counts spans the upstream will not take however they are sent, and says so once.
    fn refused_for_good(&self, why: Split, msg: &str, spans: usize, tally: &mut Tally) {
        match why {
            Split::TooLarge => {
                if !self.queue.too_large_logged.swap(true, Ordering::Relaxed) {
                    tracing::error!(
                        exporter = self.queue.name(),
                        spans,
                        error = %msg,
                        "a span alone is larger than the upstream accepts; it is lost (llmtail_spans_lost_total{{reason=\"span_too_large\"}}). Raise the upstream's message limit or lower limits.max_span_bytes. Reported once."
                    );
                }
                tally.lost.push((Loss::SpanTooLarge, spans));
            }
            Split::BadData => {
                self.queue.log_refusal(spans, msg);
                tally.lost.push((Loss::Rejected, spans));
            }
        }
    }

    /// Sends one request until the upstream answers for it. Without a log, retryable
    /// failures give up at `retry.max_elapsed`; with one, they never do (the log holds the
    /// spans until the upstream is back, however long that takes), and the request is
    /// read back from it for each attempt, so waiting holds no memory.
    async fn send_with_retries(&self, payload: &Payload, spans: usize) -> Result<Rejected, Failed> {
        let durable = self.queue.is_durable();
        let started = Instant::now();
        let mut backoff = self.retry.initial_interval.0;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let request = self.load(payload).await?;
            let sent = tokio::select! {
                biased;
                () = self.abort.cancelled() => return Err(Failed::Interrupted),
                sent = self.sink.send(request) => sent,
            };
            let (msg, hint) = match sent {
                Ok(rejected) => return Ok(rejected),
                Err(SendError::TooLarge(msg)) => return Err(Failed::Split(Split::TooLarge, msg)),
                Err(SendError::BadData(msg)) => return Err(Failed::Split(Split::BadData, msg)),
                Err(SendError::Permanent(msg)) => {
                    self.queue.log_refusal(spans, &msg);
                    return Err(Failed::Lost(Loss::Rejected));
                }
                Err(SendError::Retryable(msg, hint)) => (msg, hint),
            };
            self.retries.inc();
            // The upstream's own delay (RetryInfo, Retry-After) is the least wait.
            let wait = jittered(backoff).max(hint.unwrap_or_default());
            if !durable && started.elapsed() + wait > self.retry.max_elapsed.0 {
                tracing::warn!(exporter = self.queue.name(), spans, attempts = attempt, error = %msg, "export retries exhausted; spans lost (set exporter.queue.directory for a durable queue)");
                return Err(Failed::Lost(Loss::RetriesExhausted));
            }
            if attempt == 1 {
                tracing::warn!(exporter = self.queue.name(), spans, error = %msg, retry_in = ?wait, "export failed; retrying");
            } else {
                tracing::debug!(exporter = self.queue.name(), spans, attempt, error = %msg, retry_in = ?wait, "export failed again");
            }
            tokio::select! {
                biased;
                () = self.abort.cancelled() => return Err(Failed::Interrupted),
                () = tokio::time::sleep(wait) => {}
            }
            backoff = (backoff * 2).min(self.retry.max_interval.0);
        }
    }
}

/// Full backoff ± 50%, so replicas that failed together do not retry together.
fn jittered(d: Duration) -> Duration {
    d.mul_f64(rand::rng().random_range(0.5..1.5))
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
        let origin = Arc::new(Origin {
            resource: Bytes::from_static(b"\x0a\x00"),
            resource_schema_url: Bytes::new(),
            scope: Bytes::new(),
            scope_schema_url: Bytes::new(),
            service: Arc::from("svc"),
        });
        let mut span = b"\x0a\x10aaaaaaaaaaaaaaaa".to_vec();
        crate::otlp::wire::put_len_field(&mut span, 5, &vec![b'x'; size.saturating_sub(24)]);
        let span = Bytes::from(span);
        (0..n)
            .map(|_| KeptSpan {
                span: HeldSpan {
                    origin: origin.clone(),
                    bytes: span.clone(),
                    trace_state: None,
                    is_root: false,
                    extra: None,
                },
                threshold: Threshold::ALWAYS,
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
            },
            metrics.clone(),
            control.clone(),
        );
        (queue, task, control, metrics)
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
