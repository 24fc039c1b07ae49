//! Ingest: a request's framing checked, its resources, scopes and spans validated and
//! scanned, LLM spans read (counted when their trace is decided), spans held (or forwarded
//! to their trace's owner).

use super::*;
use crate::cluster::{Mode, Route};
use crate::llm::call::{may_be_call, scope_label};
use crate::llm::{SpanOrigin, call_from_span, text};
use crate::otlp::TraceId;
use crate::otlp::tracestate::randomness_value;
use crate::storage::{LogPin, ReplayMarks};

/// What a request comes with besides its bytes: where its spans go, who sent it, its
/// record in the trace log and, read back at start, what the log's marks say of it.
struct Intake<'a> {
    protocol: Protocol,
    placement: Placement,
    peer: Option<&'a crate::cluster::PeerRequest>,
    pin: Option<LogPin>,
    replay: Option<Replaying<'a>>,
}

impl<'a> Intake<'a> {
    fn new(protocol: Protocol, placement: Placement) -> Intake<'a> {
        Intake {
            protocol,
            placement,
            peer: None,
            pin: None,
            replay: None,
        }
    }
}

/// A record read back from the trace log at start.
struct Replaying<'a> {
    marks: &'a ReplayMarks,
    /// Since the record was accepted: its traces are held again with their ages.
    age: std::time::Duration,
    /// Spans of each trace in the record, for the traces of which some were delivered.
    counts: std::collections::HashMap<TraceId, u32>,
}

impl Pipeline {
    /// Takes one encoded `ExportTraceServiceRequest`, writing it to the trace log (when
    /// there is one) before its spans are taken: once this returns Ok, nothing of it is
    /// lost to a crash. Invalid spans are refused one by one; the request as a whole fails
    /// only when it cannot be split into spans at all, or there is no room for it (memory,
    /// the log): then nothing of it was taken.
    pub async fn accept(
        &self,
        request: Bytes,
        protocol: Protocol,
    ) -> Result<IngestOutcome, IngestError> {
        let placement = Placement::Route {
            final_forwards: false,
        };
        self.accept_with(request, Intake::new(protocol, placement))
            .await
    }

    /// Takes a request without writing it to the log (`llmtail explain`, which has none).
    pub fn ingest(&self, request: Bytes, protocol: Protocol) -> Result<IngestOutcome, IngestError> {
        let placement = Placement::Route {
            final_forwards: false,
        };
        let request = self.admit(request, true)?;
        Ok(self.take(request, Intake::new(protocol, placement)))
    }

    async fn accept_with(
        &self,
        request: Bytes,
        mut intake: Intake<'_>,
    ) -> Result<IngestOutcome, IngestError> {
        let mut request = self.admit(request, true)?;
        if let Some(log) = &self.log {
            match log.append(request.bytes.clone()).await {
                Ok(pin) => {
                    // Its spans are taken from the log's copy, in the page cache: the
                    // request's own buffer goes now, and with it its charge.
                    request.bytes = pin.payload();
                    intake.pin = Some(pin);
                }
                Err(_) => {
                    self.unadmit(request);
                    return Err(IngestError::Full(Overload::Storage));
                }
            }
        }
        Ok(self.take(request, intake))
    }

    /// Takes a request another member forwarded or handed off: routed once more by this
    /// replica's ring unless it is final.
    pub async fn accept_peer(
        &self,
        request: Bytes,
        peer: &crate::cluster::PeerRequest,
    ) -> Result<IngestOutcome, IngestError> {
        let placement = match peer.mode {
            crate::cluster::Mode::Final => Placement::Here,
            crate::cluster::Mode::Ask { ttl } => Placement::Ask { ttl },
            crate::cluster::Mode::Route => Placement::Route {
                final_forwards: true,
            },
        };
        if !peer.decisions.is_empty() {
            let (follow, split) = self.buffer.adopt_decisions(&peer.decisions);
            let now = Instant::now();
            for (decision, spans, calls) in follow {
                for call in &calls {
                    self.observer.observe_alone(call, now);
                }
                for span in spans {
                    self.late_span(decision, span);
                }
            }
            self.metrics
                .cluster_decisions_taken_over
                .inc_by(peer.decisions.len() as u64);
            if let Some(example) = split.first() {
                self.metrics.count_split(
                    "decided_elsewhere",
                    split.len() as u64,
                    example,
                    &peer.from,
                );
            }
        }
        let intake = Intake {
            peer: Some(peer),
            ..Intake::new(Protocol::Peer, placement)
        };
        let outcome = self.accept_with(request, intake).await?;
        if !peer.handoff.is_empty() {
            // Only now, with every span of the request held: a trace due at once is
            // decided on all it was handed with.
            self.buffer.settle_handed(&peer.handoff, Instant::now());
            self.metrics
                .cluster_taken_over
                .inc_by(peer.handoff.len() as u64);
        }
        Ok(outcome)
    }

    /// Takes spans this replica accepted already and no peer took: routed again when
    /// `reroute` (the ring changed since: their traces have a new owner), else taken here.
    /// Never refused for memory (they are the budget's already; refusing would lose them).
    pub fn take_back(&self, request: Bytes, reroute: bool) {
        let placement = if reroute {
            Placement::Route {
                final_forwards: false,
            }
        } else {
            Placement::HereAfterAll
        };
        if let Ok(request) = self.admit(request, false) {
            self.take(request, Intake::new(Protocol::Peer, placement));
        }
    }

    /// Takes a record of the trace log read back at start: its spans are held again (their
    /// traces with the age the record has), follow the decision the marks remember, or are
    /// skipped when the upstream answered for them already. Counted in
    /// `llmtail_storage_replayed_spans_total`, not as received again.
    pub fn replay(&self, record: crate::storage::Record, pin: LogPin, marks: &ReplayMarks) {
        let age = crate::storage::age_of(record.time_ns, std::time::SystemTime::now());
        let request = record.payload;
        let record_payload = request.clone();
        let mut counts = std::collections::HashMap::new();
        if marks.has_deliveries(pin.seq()) {
            for rs in request::resource_spans(&request) {
                for ss in rs.scope_spans() {
                    for span in ss.spans() {
                        if let Some(id) = scan::trace_id(&span) {
                            *counts.entry(id).or_insert(0u32) += 1;
                        }
                    }
                }
            }
        }
        let Ok(mut request) = self.admit(request, false) else {
            return;
        };
        // Taken from the mapped segment, not charged as memory (the record is the log's).
        request.bytes = record_payload;
        let intake = Intake {
            pin: Some(pin),
            replay: Some(Replaying { marks, age, counts }),
            ..Intake::new(Protocol::Replay, Placement::Here)
        };
        self.take(request, intake);
    }

    /// Checks a request's framing and charges it to the memory budget, with the
    /// bookkeeping its spans could cost; refused when that would pass the hard mark
    /// (`admit`), before anything of it is taken.
    fn admit(&self, request: Bytes, admit: bool) -> Result<Admitted, IngestError> {
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
        Ok(Admitted {
            bytes: request,
            bookkeeping,
        })
    }

    /// Gives back what [`admit`](Self::admit) charged for a request not taken after all.
    fn unadmit(&self, request: Admitted) {
        self.limits
            .ingested_bookkeeping
            .fetch_sub(request.bookkeeping, Ordering::Relaxed);
    }

    fn take(&self, request: Admitted, intake: Intake<'_>) -> IngestOutcome {
        let Intake {
            protocol,
            placement,
            peer,
            pin,
            replay,
        } = intake;
        let request = request.bytes;
        // A replayed record's traces are as old as the record.
        let now = Instant::now();
        let now = replay
            .as_ref()
            .and_then(|r| now.checked_sub(r.age))
            .unwrap_or(now);
        let replaying = replay.is_some();
        let mut outcome = IngestOutcome::default();
        let mut first_reject: Option<(Reject, String)> = None;
        let mut evicted = Vec::new();
        let mut strings = crate::llm::Strings::default();
        // The sampling conditions' span-level tests, run on every span as it is scanned.
        let tests = self.buffer.sampler().span_tests().clone();
        let keys = tests.keys(crate::llm::Conventions);
        let max_span_bytes = self.limits.max_span_bytes.load(Ordering::Relaxed);
        let max_attribute_bytes = self.limits.max_attribute_bytes.load(Ordering::Relaxed);
        // Spans of traces another replica owns are forwarded to it.
        let (routing, owner_mode) = match (&self.cluster, placement) {
            (Some(c), Placement::Route { final_forwards }) => (
                Some(c.ring()),
                if final_forwards {
                    Mode::Final
                } else {
                    Mode::Route
                },
            ),
            (Some(c), Placement::Ask { .. }) => (Some(c.ring()), Mode::Final),
            _ => (None, Mode::Final),
        };
        // Traces another member owns taken here after all, and handed-off traces decided
        // here already: each is counted once as split.
        let mut split: std::collections::HashSet<(TraceId, &'static str)> = Default::default();
        let mut forwards: Vec<(Forward, Vec<HeldSpan>)> = Vec::new();
        // A replayed record's spans of kept traces not yet delivered, queued together.
        let mut replayed_kept: Vec<KeptSpan> = Vec::new();
        let mut refuse =
            |outcome: &mut IngestOutcome, reject: Reject, place: &dyn Fn() -> String| {
                outcome.rejected += 1;
                if !replaying {
                    self.metrics
                        .spans_rejected
                        .with_label_values(&[reject.label()])
                        .inc();
                }
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
                // The scope's name and whether its every span is an LLM call, read once.
                let mut scope_name: Option<(Arc<str>, bool)> = None;
                // Tests on the resource and the scope, run once for all its spans.
                let mut origin_bits: Option<(u64, u64)> = None;
                for (pi, span) in ss.spans().enumerate() {
                    let checked = scope_ok.and_then(|()| {
                        if span.len() > max_span_bytes {
                            return Err(Reject::SpanTooLarge);
                        }
                        let facts = scan::scan_span(&span, &keys)?;
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
                                data: request.clone(),
                                resource: rs.resource.clone(),
                                resource_schema_url: rs.schema_url.clone(),
                                scope: ss.scope.clone(),
                                scope_schema_url: ss.schema_url.clone(),
                                service,
                                pin: pin.clone(),
                            })
                        })
                        .clone();
                    outcome.accepted += 1;
                    let to = routing.as_ref().and_then(|r| {
                        let id = &facts.trace_id;
                        if let Placement::Ask { ttl } = placement {
                            // Asked as an owner before a ring change: kept if held or
                            // decided here, else on to the next that may hold it, and at
                            // last to its owner, final.
                            if self.buffer.knows(id) {
                                return None;
                            }
                            let from = peer.map_or("", |p| p.from.as_str());
                            return r
                                .after_ask(id, now, from, ttl)
                                .map(|(p, mode)| (p.clone(), mode));
                        }
                        match r.route(id, now) {
                            Route::Here => None,
                            Route::To(p) => Some((p.clone(), owner_mode)),
                            Route::Ask(p, ttl) => Some((p.clone(), Mode::Ask { ttl })),
                            // What is held here stays here; the rest goes on (the owner
                            // must take it, final, not send it back here).
                            Route::HereIfKnown(next, mode) => {
                                (!self.buffer.knows(id)).then(|| (next.clone(), mode))
                            }
                        }
                    });
                    if let Some(key) = to {
                        let held =
                            HeldSpan::new(origin.clone(), &span, facts.trace_state, facts.is_root);
                        match forwards.iter_mut().find(|(k, _)| *k == key) {
                            Some((_, spans)) => spans.push(held),
                            None => forwards.push((key, vec![held])),
                        }
                        continue;
                    }
                    // (A leaving replica hands what it holds off afterwards.)
                    if placement == Placement::HereAfterAll
                        && let Some(c) = &self.cluster
                        && !c.is_leaving()
                        && c.ring().current.elsewhere(&facts.trace_id).is_some()
                    {
                        split.insert((facts.trace_id, "decided_here"));
                    }
                    let (scope, all_calls) = scope_name.get_or_insert_with(|| {
                        let name = scope_label(&ss.scope);
                        let all = may_be_call(false, &name);
                        (name, all)
                    });
                    let call = if facts.attrs.is_empty() && !*all_calls {
                        None
                    } else {
                        let from = SpanOrigin {
                            scope,
                            service: &origin.service,
                        };
                        call_from_span(&span, &facts, &from, &self.pricing, &mut strings)
                            .map(Box::new)
                    };
                    let key = if tests.has_key() {
                        let model = call
                            .as_ref()
                            .map(|c| &*c.call.model)
                            .filter(|m| *m != crate::llm::UNKNOWN_MODEL);
                        tests.key_values(&span, &facts, (&rs.resource, &ss.scope), model, |v| {
                            strings.get(v)
                        })
                    } else {
                        None
                    };
                    let matched = if tests.is_empty() {
                        0
                    } else {
                        let origin = *origin_bits
                            .get_or_insert_with(|| tests.origin_bits(&rs.resource, &ss.scope));
                        let model = call
                            .as_ref()
                            .map(|c| &*c.call.model)
                            .filter(|m| *m != crate::llm::UNKNOWN_MODEL);
                        tests.span_bits(&span, &facts, origin, model)
                    };
                    let stats = SpanStats {
                        trace_id: facts.trace_id,
                        is_root: facts.is_root,
                        start_ns: facts.start_ns,
                        end_ns: facts.end_ns,
                        error: facts.is_error() || call.as_ref().is_some_and(|c| c.call.error),
                        user: text(&span, &facts, LlmField::UserId, &mut strings),
                        session: text(&span, &facts, LlmField::SessionId, &mut strings),
                        call,
                        matched,
                        tests_generation: tests.generation(),
                        rv: facts
                            .trace_state
                            .as_ref()
                            .and_then(|ts| randomness_value(&span[ts.value()])),
                        key,
                        handed: peer.and_then(|p| p.handoff.get(&facts.trace_id).copied()),
                    };
                    let handed = stats.handed.is_some();
                    let held =
                        HeldSpan::new(origin.clone(), &span, facts.trace_state, facts.is_root);
                    match self.buffer.add(stats, held, now, &mut evicted) {
                        Added::Late(decision, span, _) if replaying => {
                            let replay = replay.as_ref().expect("replaying");
                            replayed_kept.extend(self.replayed_late(
                                decision,
                                span,
                                facts.trace_id,
                                replay,
                            ));
                        }
                        Added::Late(decision, span, call) => {
                            if handed {
                                split.insert((facts.trace_id, "decided_before_handoff"));
                            }
                            if let Some(call) = &call {
                                self.observer.observe_alone(call, now);
                            }
                            self.late_span(decision, span);
                        }
                        Added::Redecided(redecided) => self.redecided(redecided),
                        Added::Held if replaying => self
                            .metrics
                            .storage_replayed_spans
                            .with_label_values(&["held"])
                            .inc(),
                        Added::Held => {}
                    }
                }
            }
        }
        if !replayed_kept.is_empty() {
            self.submit(replayed_kept);
        }
        if !replaying {
            self.metrics
                .spans_received
                .with_label_values(&[protocol.label()])
                .inc_by(outcome.accepted);
        }
        if let Some(cluster) = &self.cluster {
            for ((peer, mode), spans) in forwards {
                if let Err(spans) = cluster.forward(&peer, mode, spans) {
                    // The peer's queue is full: decided here instead.
                    self.take_back(crate::otlp::reframe::encode_verbatim(&spans), false);
                }
            }
        }
        for reason in ["decided_here", "decided_before_handoff"] {
            let traces: Vec<&TraceId> = split
                .iter()
                .filter(|(_, r)| *r == reason)
                .map(|(id, _)| id)
                .collect();
            if let Some(example) = traces.first() {
                // The member that handed the trace over, or this one.
                let peer = match (reason, peer, &self.cluster) {
                    ("decided_before_handoff", Some(p), _) => p.from.as_str(),
                    (_, _, Some(c)) => c.me(),
                    _ => "",
                };
                self.metrics
                    .count_split(reason, traces.len() as u64, example, peer);
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
        outcome
    }
}

/// A request charged to the memory budget, with the bookkeeping charged for its spans.
struct Admitted {
    bytes: Bytes,
    bookkeeping: usize,
}

impl Pipeline {
    /// A replayed span of a trace decided before the restart: to be sent when kept and the
    /// upstream had not answered for all of the trace's spans in its record, else skipped.
    fn replayed_late(
        &self,
        decision: crate::buffer::CachedDecision,
        span: HeldSpan,
        trace: TraceId,
        replay: &Replaying<'_>,
    ) -> Option<KeptSpan> {
        let seq = span.origin.pin.as_ref().map_or(0, LogPin::seq);
        let delivered = replay.marks.delivered(&trace.0, seq);
        let in_record = replay.counts.get(&trace).copied().unwrap_or(u32::MAX);
        let send = decision.exports() && delivered < in_record;
        let disposition = if send { "exported" } else { "skipped" };
        self.metrics
            .storage_replayed_spans
            .with_label_values(&[disposition])
            .inc();
        if !send {
            return None;
        }
        let span = self.redacted(span)?;
        Some(KeptSpan::new(span, decision.export_threshold()))
    }

    /// A span of a trace decided already follows the decision.
    fn late_span(&self, decision: crate::buffer::CachedDecision, span: HeldSpan) {
        let label = if decision.keep() { "kept" } else { "dropped" };
        self.metrics.late_spans.with_label_values(&[label]).inc();
        if decision.exports() {
            if let Some(span) = self.redacted(span) {
                self.submit(vec![KeptSpan::new(span, decision.export_threshold())]);
            }
        } else {
            self.metrics
                .spans_dropped
                .with_label_values(&["late"])
                .inc();
        }
    }
}

/// Where a request's forwarded spans go: a peer, and how it is to take them.
type Forward = (Arc<str>, Mode);

/// The service label of a resource: its `service.name`, as the SDKs default it when absent.
pub(super) fn service_label(resource: &[u8]) -> Arc<str> {
    match scan::service_name(resource) {
        Ok(Some(name)) => Arc::from(String::from_utf8_lossy(name).as_ref()),
        _ => Arc::from(UNKNOWN_SERVICE),
    }
}
