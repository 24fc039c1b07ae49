//! Dispatch: decided traces counted, their spend attributed, kept ones redacted, rolled up
//! and handed to every exporter.

use super::*;
use crate::buffer::DecideReason;
use crate::sampling::Decision;
use crate::telemetry::status::KeptTrace;

/// Share of the trace log's bound past which dropped traces leave the regret window early.
const REGRET_YIELDS_AT: f64 = 0.9;
/// Share of the regret window's traces forgotten per decision tick while past it.
const REGRET_SHED_SHARE: f64 = 0.1;

impl Pipeline {
    /// The span with its content redacted (privacy), ready to export. Fails closed: a
    /// span that cannot be redacted is not exported (counted as lost, `redaction_failed`).
    pub(super) fn redacted(&self, span: HeldSpan) -> Option<HeldSpan> {
        let Some(redactor) = &self.redactor else {
            return Some(span);
        };
        let rewritten = match redactor.rewrite(span.bytes()) {
            Ok(None) => return Some(span),
            Ok(Some(bytes)) => scan::trace_state_field(&bytes)
                .map(|trace_state| (bytes, trace_state))
                .map_err(|_| Reject::Malformed),
            Err(_) => Err(Reject::Malformed),
        };
        match rewritten {
            Ok((bytes, trace_state)) => {
                Some(span.with_bytes(self.budget.charge(Bytes::from(bytes)), trace_state))
            }
            Err(_) => {
                self.count_lost_everywhere(Loss::RedactionFailed, 1);
                None
            }
        }
    }

    /// Counts spans that no exporter will send.
    pub fn count_lost_everywhere(&self, reason: Loss, n: u64) {
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
        let mut listed = Vec::new();
        let mut marks = Vec::new();
        for trace in decided {
            let decision = trace.decision;
            if self.log.is_some() {
                marks.extend(decided_mark(&trace, now));
            }
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
            if !decision.exports() {
                dropped_spans += trace.spans.len() as u64;
                continue;
            }
            let spans = trace.spans;
            if self.recent_kept.is_some() {
                listed.push(kept_trace(
                    &trace.trace_id,
                    &decision,
                    trace.reason,
                    &trace.summary,
                    &spans,
                ));
            }
            let from = kept.len();
            kept.extend(
                spans
                    .into_iter()
                    .filter_map(|span| self.redacted(span))
                    .map(|span| KeptSpan::new(span, decision.export_threshold())),
            );
            if let Some(root) = kept[from..].iter_mut().find(|k| k.span.is_root) {
                let mut extra = Vec::with_capacity(256);
                explain(&mut extra, &decision, trace.reason);
                if self.rollup {
                    rollup(&mut extra, &trace.summary);
                }
                // Charged: a kept trace waiting out an outage holds it.
                root.extra = Some(Box::new(self.budget.charge(Bytes::from(extra))));
            }
            if kept.len() >= SUBMIT_SPANS {
                self.submit(std::mem::take(&mut kept));
            }
        }
        self.submit(kept);
        if let Some(log) = &self.log {
            log.mark(&marks);
        }
        if let Some(recent) = &self.recent_kept {
            recent.add(listed);
        }
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
    pub(super) fn submit(&self, spans: Vec<KeptSpan>) {
        if let Some((last, others)) = self.exporters.split_last() {
            for queue in others {
                queue.submit(spans.clone());
            }
            last.submit(spans);
        }
    }

    /// Decides every trace whose deadline has passed, and refreshes the buffer gauges.
    pub fn decide_due(&self) {
        let now = Instant::now();
        let mut decided = Vec::new();
        let held = self.buffer.decide_due(now, &mut decided);
        self.dispatch(decided);
        self.after_decisions(held, now);
    }

    /// [`decide_due`](Self::decide_due) on `parts` threads of the blocking pool at once, each
    /// deciding and dispatching its share of the buffer's shards: the decision path (LLM
    /// accounting, sampling, re-framing for export) is not capped at one core.
    pub async fn decide_due_parallel(self: &Arc<Self>, parts: usize) {
        if parts <= 1 {
            return self.decide_due();
        }
        let now = Instant::now();
        let tasks: Vec<_> = (0..parts)
            .map(|part| {
                let pipeline = self.clone();
                tokio::task::spawn_blocking(move || {
                    let mut decided = Vec::new();
                    let held = pipeline
                        .buffer
                        .decide_due_part(part, parts, now, &mut decided);
                    pipeline.dispatch(decided);
                    held
                })
            })
            .collect();
        let mut held = Held::default();
        for task in tasks {
            if let Ok(part) = task.await {
                held.merge(&part);
            }
        }
        self.after_decisions(held, now);
    }

    /// Memory relief past the soft mark, then the bookkeeping and gauges of what is held.
    fn after_decisions(&self, mut held: Held, now: Instant) {
        // Past the soft mark, held traces are decided early, oldest first, until what
        // they are estimated to free brings the budget a little under the mark (so relief
        // is not paid on every tick). Kept ones then wait in the export queues; the hard
        // mark refuses new data until the upstream takes them.
        let soft = self.limits.soft_buffer_bytes.load(Ordering::Relaxed);
        let mut excess = self.memory().saturating_sub(soft - soft / 20);
        // The regret window yields first, to memory and to the log's bound: the oldest
        // dropped traces it remembers are forgotten (their records freed) before any held
        // trace is decided early, and before the log refuses new data.
        let regret_bytes = self.buffer.regrets() * crate::buffer::REGRET_OVERHEAD;
        if excess > 0 && regret_bytes > 0 {
            self.buffer
                .shed_regrets((excess as f64 / regret_bytes as f64).min(1.0));
            excess = excess.saturating_sub(regret_bytes);
        }
        if let Some(log) = &self.log {
            let (used, limit) = log.usage();
            if used as f64 > limit as f64 * REGRET_YIELDS_AT {
                self.buffer.shed_regrets(REGRET_SHED_SHARE);
            }
        }
        if excess > 0 {
            let mut decided = Vec::new();
            // With the trace log, held spans' bytes are its pages, not the budget's:
            // deciding a trace early frees only its bookkeeping.
            let wire = held.bytes;
            let mut counted = held;
            if self.log.is_some() {
                counted.bytes = 0;
            }
            let target = counted.memory().saturating_sub(excess);
            held = self.buffer.relieve(counted, target, now, &mut decided);
            if self.log.is_some() {
                held.bytes = wire.saturating_sub(decided.iter().map(|t| t.bytes).sum());
            }
            self.dispatch(decided);
        }
        // Counted before the decided traces move to the queues; the next tick sees them.
        // What requests were charged since the last tick is in `held` now.
        // The regret window's summaries are the budget's too.
        let regret_bytes = self.buffer.regrets() * crate::buffer::REGRET_OVERHEAD;
        self.limits
            .held_bookkeeping
            .store(held.bookkeeping() + regret_bytes, Ordering::Relaxed);
        self.limits.ingested_bookkeeping.store(0, Ordering::Relaxed);
        self.metrics.buffer_traces.set(held.traces as i64);
        self.metrics.buffer_spans.set(held.spans as i64);
        self.metrics.buffer_bytes.set(held.bytes as i64);
        let oldest = self.buffer.oldest_held();
        self.metrics
            .buffer_oldest_trace_seconds
            .set(oldest.map_or(0.0, |t| now.saturating_duration_since(t).as_secs_f64()));
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

/// What the trace log remembers of a decision, so a restart does not decide the trace
/// again: the decision, on the spans of records up to the newest one it held (none for a
/// trace none of whose spans is in the log).
fn decided_mark(trace: &DecidedTrace, now: Instant) -> Option<crate::storage::Mark> {
    let seq = trace
        .spans
        .iter()
        .filter_map(|s| s.origin.pin.as_ref().map(crate::storage::LogPin::seq))
        .max()?;
    let cached = crate::buffer::CachedDecision::new(&trace.decision, trace.reason, now);
    Some(crate::storage::Mark::Decided {
        trace: trace.trace_id.0,
        seq,
        bits: cached.bits(),
        reason: trace.reason as u8,
    })
}

/// The roll-up attributes appended to a kept trace's root span: its LLM totals and the
/// policy that kept it.
pub(super) fn rollup(out: &mut Vec<u8>, s: &TraceSummary) {
    put_attribute(out, "llm.trace.cost_usd", Value::Double(s.cost_usd));
    put_attribute(
        out,
        "llm.trace.input_tokens",
        Value::Int(s.input_tokens as i64),
    );
    put_attribute(
        out,
        "llm.trace.output_tokens",
        Value::Int(s.output_tokens as i64),
    );
    put_attribute(out, "llm.trace.calls", Value::Int(i64::from(s.calls)));
}

/// Why the trace was kept, on its root: the policy that set p (or `base_rate` / `boost`),
/// p, and what made the decision happen then; in a dry run, whether it would have been kept.
pub(super) fn explain(out: &mut Vec<u8>, d: &Decision, reason: DecideReason) {
    put_attribute(out, "sampling.policy", Value::Str(d.by.label()));
    put_attribute(out, "sampling.probability", Value::Double(d.probability()));
    put_attribute(out, "sampling.reason", Value::Str(reason.label()));
    if d.dry_run {
        put_attribute(out, "sampling.dry_run.kept", Value::Bool(d.keep));
    }
}

/// A kept trace as the status page lists it: its root's service (or its first span's).
fn kept_trace(
    trace_id: &crate::otlp::TraceId,
    decision: &Decision,
    reason: DecideReason,
    summary: &crate::sampling::TraceSummary,
    spans: &[HeldSpan],
) -> KeptTrace {
    let service = spans
        .iter()
        .find(|s| s.is_root)
        .or(spans.first())
        .map_or_else(|| Arc::from(""), |s| s.origin.service.clone());
    KeptTrace {
        trace_id: *trace_id,
        policy: decision.by.label(),
        reason: reason.label(),
        service,
        spans: spans.len(),
        duration_ms: summary.duration_ms(),
        error: summary.has_error,
        calls: summary.calls,
        cost_usd: summary.cost_usd,
        user: summary.user.clone(),
        dry_run: decision.dry_run,
    }
}
