//! The pipeline every receiver feeds: split a request into spans, observe every LLM call,
//! hold spans in the trace buffer, and hand decided traces to the exporters.

pub mod limits;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use bytes::Bytes;

use crate::buffer::{Added, DecidedTrace, SpanSummary, TraceBuffer};
use crate::exporter::ExportQueue;
use crate::llm::observer::LlmObserver;
use crate::llm::{LlmField, Pricing};
use crate::otlp::redact::Redactor;
use crate::otlp::reframe::{HeldSpan, KeptSpan, Origin};
use crate::otlp::scan::{self, Reject};
use crate::otlp::wire::{Value, put_attribute};
use crate::otlp::{request, validate};
use crate::sampler::{DecidedBy, SpanStats, TraceSummary};
use crate::telemetry::{Loss, Metrics};

pub use crate::memory::{Budget, Reservation};

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
}

impl Protocol {
    pub fn label(self) -> &'static str {
        match self {
            Protocol::Grpc => "grpc",
            Protocol::HttpProtobuf => "http_protobuf",
            Protocol::HttpJson => "http_json",
            Protocol::Peer => "peer",
        }
    }
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

/// The service label of a resource: its `service.name`, as the SDKs default it when absent.
fn service_label(resource: &[u8]) -> Arc<str> {
    match scan::service_name(resource) {
        Ok(Some(name)) => Arc::from(String::from_utf8_lossy(name).as_ref()),
        _ => Arc::from(UNKNOWN_SERVICE),
    }
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
    pub observer: LlmObserver,
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
    /// Wire bytes of the spans held at the last decision tick: what deciding them would
    /// write to a durable queue.
    pub held_wire_bytes: AtomicUsize,
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
    /// A durable queue's log, with the traces held for it, would pass `max_disk_bytes`.
    DurableQueue,
    /// A queue of spans for a peer is nearly full (`cluster.forward_queue_spans`).
    Forwarding,
}

impl Overload {
    pub fn label(self) -> &'static str {
        match self {
            Overload::ExportQueue => "overloaded",
            Overload::Memory => "memory",
            Overload::DurableQueue => "durable_queue",
            Overload::Forwarding => "forwarding",
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Overload::ExportQueue => "llmtail is overloaded (export queue full); retry later",
            Overload::Memory => {
                "llmtail is holding as much as limits.max_buffer_bytes allows; retry later"
            }
            Overload::DurableQueue => {
                "llmtail's durable queue is full (exporter.queue.max_disk_bytes); retry later"
            }
            Overload::Forwarding => {
                "llmtail cannot forward to a peer fast enough (cluster.forward_queue_spans); retry later"
            }
        }
    }
}

impl Pipeline {
    /// Takes one encoded `ExportTraceServiceRequest`. Invalid spans are refused one by one;
    /// the request as a whole fails only when it cannot be split into spans at all, in which
    /// case nothing of it was taken.
    pub fn ingest(&self, request: Bytes, protocol: Protocol) -> Result<IngestOutcome, IngestError> {
        self.take(request, protocol, true)
    }

    /// Takes spans this replica accepted already and could not hand to a peer: never
    /// refused for memory (they are the budget's already; refusing would lose them).
    pub fn take_back(&self, request: Bytes) {
        let _ = self.take(request, Protocol::Peer, false);
    }

    fn take(
        &self,
        request: Bytes,
        protocol: Protocol,
        admit: bool,
    ) -> Result<IngestOutcome, IngestError> {
        // Charged while any span of it is held or queued.
        let request = self.budget.charge(request);
        // The framing is read first, so a request that is not one is refused whole.
        let shape = request::check(&request)?;
        // What holding its spans could cost in bookkeeping (each span a new trace, at
        // worst) is charged now, not at the next decision tick: a request of 500,000 tiny
        // spans must not take the budget past its mark by the 300 MB its bookkeeping costs.
        let bookkeeping =
            shape.spans * (crate::memory::TRACE_OVERHEAD + crate::memory::SPAN_OVERHEAD);
        if admit
            && self.memory() + bookkeeping > self.limits.max_buffer_bytes.load(Ordering::Relaxed)
        {
            return Err(IngestError::Full(Overload::Memory));
        }
        self.limits
            .ingested_bookkeeping
            .fetch_add(bookkeeping, Ordering::Relaxed);

        let now = Instant::now();
        let mut outcome = IngestOutcome::default();
        let mut first_reject: Option<(Reject, String)> = None;
        let mut evicted = Vec::new();
        let mut strings = crate::llm::Strings::default();
        let max_span_bytes = self.limits.max_span_bytes.load(Ordering::Relaxed);
        let max_attribute_bytes = self.limits.max_attribute_bytes.load(Ordering::Relaxed);
        // Spans of traces another replica owns are forwarded to it, unless they were
        // forwarded here already.
        let ring = match (&self.cluster, protocol) {
            (Some(c), p) if !matches!(p, Protocol::Peer) => Some(c.ring()),
            _ => None,
        };
        let mut forwards: Vec<(Arc<str>, Vec<HeldSpan>)> = Vec::new();
        let mut refuse =
            |outcome: &mut IngestOutcome, reject: Reject, place: &dyn Fn() -> String| {
                outcome.rejected += 1;
                self.metrics
                    .spans_rejected
                    .with_label_values(&[reject.label()])
                    .inc();
                if first_reject.is_none() {
                    first_reject = Some((reject, place()));
                }
            };
        for (ri, rs) in request::resource_spans(&request).enumerate() {
            // A resource is checked once for all its spans; the service name and the
            // shared origin are made only when a span is taken.
            let resource_ok = validate::resource(&rs.resource)
                .and_then(|()| validate::utf8(&rs.schema_url, "resource_spans.schema_url"))
                .map_err(Reject::InvalidResource);
            let mut service: Option<Arc<str>> = None;
            for (si, ss) in rs.scope_spans().enumerate() {
                let scope_ok = resource_ok.and_then(|()| {
                    validate::scope(&ss.scope)
                        .and_then(|()| validate::utf8(&ss.schema_url, "scope_spans.schema_url"))
                        .map_err(Reject::InvalidScope)
                });
                let mut origin: Option<Arc<Origin>> = None;
                for (pi, span) in ss.spans().enumerate() {
                    let checked = scope_ok.and_then(|()| {
                        if span.len() > max_span_bytes {
                            return Err(Reject::SpanTooLarge);
                        }
                        let facts = scan::scan_span(&span, &crate::llm::Conventions)?;
                        if facts.largest_attribute as usize > max_attribute_bytes {
                            return Err(Reject::AttributeTooLarge);
                        }
                        validate::span(&span).map_err(Reject::InvalidSpan)?;
                        Ok(facts)
                    });
                    let facts = match checked {
                        Ok(facts) => facts,
                        Err(reject) => {
                            refuse(&mut outcome, reject, &|| {
                                format!("resource_spans[{ri}].scope_spans[{si}].spans[{pi}]")
                            });
                            continue;
                        }
                    };
                    let origin = origin
                        .get_or_insert_with(|| {
                            let service = service
                                .get_or_insert_with(|| service_label(&rs.resource))
                                .clone();
                            Arc::new(Origin {
                                resource: rs.resource.clone(),
                                resource_schema_url: rs.schema_url.clone(),
                                scope: ss.scope.clone(),
                                scope_schema_url: ss.schema_url.clone(),
                                service,
                            })
                        })
                        .clone();
                    outcome.accepted += 1;
                    if let Some(peer) = ring.as_ref().and_then(|r| r.elsewhere(&facts.trace_id)) {
                        let held = HeldSpan {
                            origin: origin.clone(),
                            bytes: span,
                            trace_state: facts.trace_state,
                            is_root: facts.is_root,
                            extra: None,
                        };
                        match forwards.iter_mut().find(|(p, _)| p == peer) {
                            Some((_, spans)) => spans.push(held),
                            None => forwards.push((peer.clone(), vec![held])),
                        }
                        continue;
                    }
                    let call =
                        crate::llm::call_from_span(&span, &facts, &self.pricing, &mut strings);
                    let stats = SpanStats {
                        start_ns: facts.start_ns,
                        end_ns: facts.end_ns,
                        error: facts.is_error() || call.as_ref().is_some_and(|c| c.error),
                        call: call
                            .as_ref()
                            .map(|c| self.observer.observe(&origin.service, c, now)),
                        user: crate::llm::text(&span, &facts, LlmField::UserId, &mut strings),
                        session: crate::llm::text(&span, &facts, LlmField::SessionId, &mut strings),
                    };
                    let summary = SpanSummary {
                        trace_id: facts.trace_id,
                        is_root: facts.is_root,
                        stats,
                    };
                    let held = HeldSpan {
                        origin: origin.clone(),
                        bytes: span,
                        trace_state: facts.trace_state,
                        is_root: facts.is_root,
                        extra: None,
                    };
                    if let Added::Late(decision, span) =
                        self.buffer.add(summary, held, now, &mut evicted)
                    {
                        let label = if decision.keep() { "kept" } else { "dropped" };
                        self.metrics.late_spans.with_label_values(&[label]).inc();
                        if decision.keep() {
                            if let Some(span) = self.redacted(span) {
                                self.submit(vec![KeptSpan {
                                    span,
                                    threshold: decision.threshold(),
                                }]);
                            }
                        } else {
                            self.metrics
                                .spans_dropped
                                .with_label_values(&["late"])
                                .inc();
                        }
                    }
                }
            }
        }
        self.metrics
            .spans_received
            .with_label_values(&[protocol.label()])
            .inc_by(outcome.accepted);
        if let Some(cluster) = &self.cluster {
            for (peer, spans) in forwards {
                if let Err(spans) = cluster.forward(&peer, spans) {
                    // The peer's queue is full: decided here instead.
                    self.take_back(crate::otlp::reframe::encode_verbatim(&spans));
                }
            }
        }
        if let Some((reject, place)) = first_reject {
            outcome.error_message = format!(
                "{} of {} spans rejected; first at {place}: {reject}",
                outcome.rejected,
                outcome.rejected + outcome.accepted
            );
        }
        self.dispatch(evicted);
        Ok(outcome)
    }

    /// The span with its content redacted (privacy), ready to export. Fails closed: a
    /// span that cannot be redacted is not exported (counted as lost, `redaction_failed`).
    fn redacted(&self, span: HeldSpan) -> Option<HeldSpan> {
        let Some(redactor) = &self.redactor else {
            return Some(span);
        };
        let rewritten = match redactor.rewrite(&span.bytes) {
            Ok(None) => return Some(span),
            Ok(Some(bytes)) => scan::trace_state_field(&bytes)
                .map(|trace_state| (bytes, trace_state))
                .map_err(|_| Reject::Malformed),
            Err(_) => Err(Reject::Malformed),
        };
        match rewritten {
            Ok((bytes, trace_state)) => Some(HeldSpan {
                bytes: self.budget.charge(Bytes::from(bytes)),
                trace_state,
                ..span
            }),
            Err(_) => {
                self.count_lost_everywhere(Loss::RedactionFailed, 1);
                None
            }
        }
    }

    /// Counts spans that no exporter will send.
    fn count_lost_everywhere(&self, reason: Loss, n: u64) {
        for queue in &self.exporters {
            self.metrics
                .spans_lost
                .with_label_values(&[queue.name(), reason.label()])
                .inc_by(n);
        }
    }

    /// Counts decisions, attributes spend, and sends kept traces to the exporters.
    pub fn dispatch(&self, decided: Vec<DecidedTrace>) {
        if decided.is_empty() {
            return;
        }
        let now = Instant::now();
        // Decisions are counted per batch: a handful of label sets, looked up once each.
        let mut counts: Vec<(bool, DecidedBy, u64)> = Vec::new();
        let mut dropped_spans = 0u64;
        let mut early: Vec<(&'static str, u64)> = Vec::new();
        let mut kept: Vec<KeptSpan> = Vec::new();
        for trace in decided {
            let decision = trace.decision;
            match counts
                .iter_mut()
                .find(|(k, b, _)| *k == decision.keep && *b == decision.by)
            {
                Some((_, _, n)) => *n += 1,
                None => counts.push((decision.keep, decision.by, 1)),
            }
            self.metrics
                .decision_delay
                .observe(trace.delay.as_secs_f64());
            self.observer.record_spend(&trace.summary, now);
            if let Some(reason) = trace.reason.early_label() {
                match early.iter_mut().find(|(r, _)| *r == reason) {
                    Some((_, n)) => *n += 1,
                    None => early.push((reason, 1)),
                }
                self.metrics
                    .early_decision_delay
                    .with_label_values(&[reason])
                    .observe(trace.delay.as_secs_f64());
            }
            if !decision.keep {
                dropped_spans += trace.spans.len() as u64;
                continue;
            }
            let mut spans = trace.spans;
            if self.rollup
                && let Some(root) = spans.iter_mut().find(|s| s.is_root)
            {
                root.extra = Some(Box::new(rollup(&trace.summary, decision.by.label())));
            }
            kept.extend(
                spans
                    .into_iter()
                    .filter_map(|span| self.redacted(span))
                    .map(|span| KeptSpan {
                        span,
                        threshold: decision.threshold,
                    }),
            );
            if kept.len() >= SUBMIT_SPANS {
                self.submit(std::mem::take(&mut kept));
            }
        }
        self.submit(kept);
        for (keep, by, n) in counts {
            let label = if keep { "kept" } else { "dropped" };
            self.metrics
                .traces
                .with_label_values(&[label, by.label()])
                .inc_by(n);
        }
        if dropped_spans > 0 {
            self.metrics
                .spans_dropped
                .with_label_values(&["sampled_out"])
                .inc_by(dropped_spans);
        }
        for (reason, n) in early {
            self.metrics
                .early_decisions
                .with_label_values(&[reason])
                .inc_by(n);
        }
    }

    /// Hands kept spans to every exporter (the last one takes them without a copy).
    fn submit(&self, spans: Vec<KeptSpan>) {
        if let Some((last, others)) = self.exporters.split_last() {
            for queue in others {
                queue.submit(spans.clone());
            }
            last.submit(spans);
        }
    }

    /// Why receivers should refuse new data now, if they should: the memory budget is at
    /// its hard mark, a durable queue has no room for what is held, or every export queue
    /// is nearly full. Decided traces always enter the queues, so refusing here is what
    /// keeps accepted data from ever being dropped: it waits, and senders retry.
    pub fn overloaded(&self) -> Option<Overload> {
        if self.memory() >= self.limits.max_buffer_bytes.load(Ordering::Relaxed) {
            return Some(Overload::Memory);
        }
        let held = self.limits.held_wire_bytes.load(Ordering::Relaxed);
        if self
            .exporters
            .iter()
            .any(|q| q.disk_room().is_some_and(|room| room <= held))
        {
            return Some(Overload::DurableQueue);
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

    /// Decides every trace whose deadline has passed, and refreshes the buffer gauges.
    pub fn decide_due(&self) {
        let mut decided = Vec::new();
        let now = Instant::now();
        let mut held = self.buffer.decide_due(now, &mut decided);
        // Past the soft mark, held traces are decided early, oldest first, until what
        // they are estimated to free brings the budget a little under the mark (so relief
        // is not paid on every tick). Kept ones then wait in the export queues; the hard
        // mark refuses new data until the upstream takes them.
        let soft = self.limits.soft_buffer_bytes.load(Ordering::Relaxed);
        let excess = self.memory().saturating_sub(soft - soft / 20);
        if excess > 0 {
            let target = held.memory().saturating_sub(excess);
            held = self.buffer.relieve(held, target, now, &mut decided);
        }
        // Counted before the decided traces move to the queues; the next tick sees them.
        // What requests were charged since the last tick is in `held` now.
        self.limits
            .held_bookkeeping
            .store(held.bookkeeping(), Ordering::Relaxed);
        self.limits.ingested_bookkeeping.store(0, Ordering::Relaxed);
        self.limits
            .held_wire_bytes
            .store(held.bytes, Ordering::Relaxed);
        self.dispatch(decided);
        self.metrics.buffer_traces.set(held.traces as i64);
        self.metrics.buffer_spans.set(held.spans as i64);
        self.metrics.buffer_bytes.set(held.bytes as i64);
        self.publish_memory();
    }

    /// Decides everything still held (shutdown).
    pub fn decide_all(&self) {
        let mut decided = Vec::new();
        self.buffer.decide_all(Instant::now(), &mut decided);
        self.dispatch(decided);
        for gauge in [
            &self.metrics.buffer_traces,
            &self.metrics.buffer_spans,
            &self.metrics.buffer_bytes,
        ] {
            gauge.set(0);
        }
    }
}

/// The roll-up attributes appended to a kept trace's root span: its LLM totals and the
/// policy that kept it.
fn rollup(s: &TraceSummary, policy: &str) -> Bytes {
    let mut out = Vec::with_capacity(192);
    put_attribute(&mut out, "llm.trace.cost_usd", Value::Double(s.cost_usd));
    put_attribute(
        &mut out,
        "llm.trace.input_tokens",
        Value::Int(s.input_tokens as i64),
    );
    put_attribute(
        &mut out,
        "llm.trace.output_tokens",
        Value::Int(s.output_tokens as i64),
    );
    put_attribute(&mut out, "llm.trace.calls", Value::Int(i64::from(s.calls)));
    put_attribute(&mut out, "sampling.policy", Value::Str(policy));
    Bytes::from(out)
}
