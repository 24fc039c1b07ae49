//! Ingest: a request's framing checked, its resources, scopes and spans validated and
//! scanned, LLM spans read (counted when their trace is decided), spans held (or forwarded
//! to their trace's owner).

use super::*;
use crate::cluster::{Mode, Route};
use crate::llm::{SpanOrigin, call_from_span, text};
use crate::otlp::TraceId;
use crate::otlp::tracestate::randomness_value;

impl Pipeline {
    /// Takes one encoded `ExportTraceServiceRequest`. Invalid spans are refused one by one;
    /// the request as a whole fails only when it cannot be split into spans at all, in which
    /// case nothing of it was taken.
    pub fn ingest(&self, request: Bytes, protocol: Protocol) -> Result<IngestOutcome, IngestError> {
        let placement = Placement::Route {
            final_forwards: false,
        };
        self.take(request, protocol, true, placement, None)
    }

    /// Takes a request another member forwarded or handed off: routed once more by this
    /// replica's ring unless it is final.
    pub fn ingest_peer(
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
        let outcome = self.take(request, Protocol::Peer, true, placement, Some(peer))?;
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
        let _ = self.take(request, Protocol::Peer, false, placement, None);
    }

    fn take(
        &self,
        request: Bytes,
        protocol: Protocol,
        admit: bool,
        placement: Placement,
        peer: Option<&crate::cluster::PeerRequest>,
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
                                resource: rs.resource.clone(),
                                resource_schema_url: rs.schema_url.clone(),
                                scope: ss.scope.clone(),
                                scope_schema_url: ss.schema_url.clone(),
                                service,
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
                        let held = HeldSpan {
                            origin: origin.clone(),
                            bytes: span,
                            trace_state: facts.trace_state,
                            is_root: facts.is_root,
                            extra: None,
                        };
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
                        let all = crate::llm::quirks::lookup(&name, None).every_span_is_a_call;
                        (name, all)
                    });
                    // A span without LLM attributes is an LLM call only in a scope whose
                    // every span is one.
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
                        link: (facts.span_id, facts.parent_id),
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
                    let held = HeldSpan {
                        origin: origin.clone(),
                        bytes: span,
                        trace_state: facts.trace_state,
                        is_root: facts.is_root,
                        extra: None,
                    };
                    if let Added::Late(decision, span, call) =
                        self.buffer.add(stats, held, now, &mut evicted)
                    {
                        if handed {
                            split.insert((facts.trace_id, "decided_before_handoff"));
                        }
                        if let Some(call) = &call {
                            self.observer.observe_alone(call, now);
                        }
                        self.late_span(decision, span);
                    }
                }
            }
        }
        self.metrics
            .spans_received
            .with_label_values(&[protocol.label()])
            .inc_by(outcome.accepted);
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
        Ok(outcome)
    }
}

impl Pipeline {
    /// A span of a trace decided already follows the decision.
    fn late_span(&self, decision: crate::buffer::CachedDecision, span: HeldSpan) {
        let label = if decision.keep() { "kept" } else { "dropped" };
        self.metrics.late_spans.with_label_values(&[label]).inc();
        if decision.exports() {
            if let Some(span) = self.redacted(span) {
                self.submit(vec![KeptSpan {
                    span,
                    threshold: decision.export_threshold(),
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

/// Where a request's forwarded spans go: a peer, and how it is to take them.
type Forward = (Arc<str>, Mode);

/// The name of an instrumentation scope, as the LLM quirks table is keyed.
fn scope_label(scope: &[u8]) -> Arc<str> {
    match scan::scope_name(scope) {
        Ok(Some(name)) => Arc::from(String::from_utf8_lossy(name).as_ref()),
        _ => Arc::from(""),
    }
}

/// The service label of a resource: its `service.name`, as the SDKs default it when absent.
fn service_label(resource: &[u8]) -> Arc<str> {
    match scan::service_name(resource) {
        Ok(Some(name)) => Arc::from(String::from_utf8_lossy(name).as_ref()),
        _ => Arc::from(UNKNOWN_SERVICE),
    }
}
