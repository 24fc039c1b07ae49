//! The pipeline every receiver feeds: split a request into spans, read their LLM facts,
//! hold spans in the trace buffer, and hand decided traces to the exporters.

mod dispatch;
mod ingest;
mod regret;

pub mod limits;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use bytes::Bytes;

use crate::buffer::{Added, DecidedTrace, Held, SpanStats, TraceBuffer};
use crate::exporter::ExportQueue;
use crate::llm::observer::LlmObserver;
use crate::llm::{LlmField, Pricing};
use crate::otlp::redact::Redactor;
use crate::otlp::reframe::{HeldSpan, KeptSpan, Origin};
use crate::otlp::scan::{self, Reject};
use crate::otlp::wire::{Value, put_attribute};
use crate::otlp::{request, validate};
use crate::sampling::{DecidedBy, TraceSummary};
use crate::telemetry::{Loss, Metrics};

pub use crate::memory::{Budget, Reservation};
pub use regret::read_back;

/// Kept traces are handed to the exporters in groups of about this many spans (whole traces
/// only): one channel send per group instead of one per trace, while a full export queue
/// still refuses little more than what it cannot hold.
const SUBMIT_SPANS: usize = 1024;

/// Service label for spans whose resource has no `service.name` (the SDKs' own default).
const UNKNOWN_SERVICE: &str = "unknown_service";

/// The receiving protocol, the label of `llmtail_spans_received_total`.
#[derive(Debug, Clone, Copy)]
pub enum Protocol {
    Grpc,
    HttpProtobuf,
    HttpJson,
    /// Forwarded by another replica (gRPC with `x-llmtail-forwarded`): always taken here.
    Peer,
    /// Read back from the trace log at start (not counted as received again).
    Replay,
}

impl Protocol {
    pub fn label(self) -> &'static str {
        match self {
            Protocol::Grpc => "grpc",
            Protocol::HttpProtobuf => "http_protobuf",
            Protocol::HttpJson => "http_json",
            Protocol::Peer => "peer",
            Protocol::Replay => "replay",
        }
    }
}

/// Where a request's spans go in a cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// By the ring; forwards are marked final when the request was itself forwarded (a
    /// span is routed at most twice).
    Route { final_forwards: bool },
    /// Here: a forward marked final, or a hand-off.
    Here,
    /// Here if the trace is held or decided here, else on to the next member that may
    /// hold it (at most `ttl` more asked) and at last to its owner, final: this replica
    /// owned it before a ring change. (`Mode::Ask` from `from`.)
    Ask { ttl: u8 },
    /// Here, because no member took them (counted as split when another member owns
    /// their trace).
    HereAfterAll,
}

/// A request that is not an `ExportTraceServiceRequest` at all.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("the body is not a valid OTLP ExportTraceServiceRequest: at {0}")]
    Undecodable(#[from] request::BadFrame),
    /// Holding the request's spans could take the memory budget past its hard mark: it
    /// is refused whole, retryably (nothing of it was taken).
    #[error("{}", .0.message())]
    Full(Overload),
}

/// What became of one request: OTLP partial success when some spans were refused.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct IngestOutcome {
    pub accepted: u64,
    pub rejected: u64,
    /// Says why the first refused span was refused, and how many were.
    pub error_message: String,
}

pub struct Pipeline {
    pub buffer: TraceBuffer,
    pub pricing: Arc<Pricing>,
    pub metrics: Arc<Metrics>,
    pub observer: Arc<LlmObserver>,
    /// One queue per exporter; every kept span goes to each.
    pub exporters: Vec<Arc<ExportQueue>>,
    /// Privacy rewriting of kept spans, when configured.
    pub redactor: Option<Redactor>,
    /// Whether kept roots carry the trace's LLM totals.
    pub rollup: bool,
    /// Memory and size limits (`limits:`), changed live by a reload.
    pub limits: LiveLimits,
    /// Sharding across replicas, when `cluster:` is configured.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    /// The process's memory budget: every buffer of span bytes is charged to it.
    pub budget: Arc<Budget>,
    /// Memory reserved up front in the budget: the decision cache at its full size.
    pub reserved_memory: usize,
    /// The status page's list of recently kept traces, when it is served.
    pub recent_kept: Option<Arc<crate::telemetry::status::RecentKept>>,
    /// The trace log every accepted request is written to before it is acknowledged
    /// (`storage.directory`).
    pub log: Option<Arc<crate::storage::TraceLog>>,
    /// Dropped traces turned to keep, to be read back from the log (see [`read_back`]).
    pub redecided: Option<tokio::sync::mpsc::UnboundedSender<crate::buffer::Redecided>>,
}

/// `limits:` as the hot path reads it: relaxed atomics, set at start and on reload.
#[derive(Debug, Default)]
pub struct LiveLimits {
    /// Hard mark: held memory at which receivers refuse with retryable errors.
    pub max_buffer_bytes: AtomicUsize,
    /// Soft mark: held memory past which the oldest traces are decided early.
    pub soft_buffer_bytes: AtomicUsize,
    pub max_span_bytes: AtomicUsize,
    pub max_attribute_bytes: AtomicUsize,
    /// Bookkeeping of the traces held at the last decision tick (their buffers are
    /// charged to the budget).
    pub held_bookkeeping: AtomicUsize,
    /// Bookkeeping charged for requests taken since the last decision tick (estimated
    /// from their span counts; the tick replaces it with what is really held).
    pub ingested_bookkeeping: AtomicUsize,
}

impl LiveLimits {
    pub fn set(&self, l: &limits::LimitsConfig) {
        let max = l.buffer_bytes();
        self.max_buffer_bytes.store(max, Ordering::Relaxed);
        self.soft_buffer_bytes
            .store((max as f64 * l.soft_mark) as usize, Ordering::Relaxed);
        self.max_span_bytes
            .store(l.max_span_bytes, Ordering::Relaxed);
        self.max_attribute_bytes
            .store(l.max_attribute_bytes, Ordering::Relaxed);
    }
}

/// Why a request is refused unread, the `reason` of `llmtail_requests_refused_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overload {
    /// Every export queue is nearly full (`queue.max_spans`).
    ExportQueue,
    /// The memory budget reached `limits.max_buffer_bytes`.
    Memory,
    /// A queue of spans for a peer is nearly full (`cluster.forward_queue_spans`).
    Forwarding,
    /// The trace log is at its bound, or cannot be written.
    Storage,
}

impl Overload {
    pub fn label(self) -> &'static str {
        match self {
            Overload::ExportQueue => "overloaded",
            Overload::Memory => "memory",
            Overload::Forwarding => "forwarding",
            Overload::Storage => "storage",
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Overload::ExportQueue => "llmtail is overloaded (export queue full); retry later",
            Overload::Memory => {
                "llmtail is holding as much as limits.max_buffer_bytes allows; retry later"
            }
            Overload::Forwarding => {
                "llmtail cannot forward to a peer fast enough (cluster.forward_queue_spans); retry later"
            }
            Overload::Storage => {
                "llmtail's trace log is full (storage.max_disk_bytes, or the disk's free space) or cannot be written; retry later"
            }
        }
    }
}

impl Pipeline {
    /// Why receivers should refuse new data now, if they should: the memory budget is at
    /// its hard mark, the trace log is full or failing, a peer's forward queue is nearly
    /// full, or (without a trace log) every export queue is. Decided traces always enter the queues, so refusing here is what
    /// keeps accepted data from ever being dropped: it waits, and senders retry.
    pub fn overloaded(&self) -> Option<Overload> {
        if self.memory() >= self.limits.max_buffer_bytes.load(Ordering::Relaxed) {
            return Some(Overload::Memory);
        }
        if self.log.as_ref().is_some_and(|log| log.refusal().is_some()) {
            return Some(Overload::Storage);
        }
        if self.cluster.as_ref().is_some_and(|c| c.is_high()) {
            return Some(Overload::Forwarding);
        }
        (!self.exporters.is_empty() && self.exporters.iter().all(|q| q.is_high()))
            .then_some(Overload::ExportQueue)
    }

    /// Charges `n` more bytes to `reservation` (a request being read or decompressed)
    /// unless that would take the budget past its hard mark: then the request is refused
    /// before the memory is allocated.
    pub fn reserve(&self, reservation: &mut Option<Reservation>, n: usize) -> Result<(), Overload> {
        if self.memory() + n > self.limits.max_buffer_bytes.load(Ordering::Relaxed) {
            return Err(Overload::Memory);
        }
        match reservation {
            Some(r) => r.grow(n),
            None => *reservation = Some(self.budget.reserve(n)),
        }
        Ok(())
    }

    /// What the memory budget counts now: charged buffers, the bookkeeping of held traces
    /// (as of the last decision tick), of spans queued for export or for peers, and the
    /// decision cache.
    pub fn memory(&self) -> usize {
        self.budget.charged() + self.bookkeeping() + self.reserved_memory
    }

    fn bookkeeping(&self) -> usize {
        self.limits.held_bookkeeping.load(Ordering::Relaxed)
            + self.limits.ingested_bookkeeping.load(Ordering::Relaxed)
            + self
                .exporters
                .iter()
                .map(|q| q.bookkeeping())
                .sum::<usize>()
            + self.cluster.as_ref().map_or(0, |c| c.bookkeeping())
    }

    /// Publishes `llmtail_memory_bytes{part}`.
    fn publish_memory(&self) {
        for (part, bytes) in [
            ("buffers", self.budget.charged()),
            ("bookkeeping", self.bookkeeping()),
            ("reserved", self.reserved_memory),
        ] {
            self.metrics
                .memory_bytes
                .with_label_values(&[part])
                .set(bytes as i64);
        }
    }

    /// Counts a request refused before it was read.
    pub fn refuse(&self, protocol: Protocol, why: Overload) {
        self.metrics
            .requests_refused
            .with_label_values(&[protocol.label(), why.label()])
            .inc();
    }
}
