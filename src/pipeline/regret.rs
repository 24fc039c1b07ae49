//! Regret: a dropped trace turned to keep by a late span (within `storage.regret_window`)
//! is read back from the trace log, whole, and exported — off the receivers' workers.

use super::*;
use crate::buffer::{DecideReason, Redecided};

impl Pipeline {
    /// Counts a trace turned to keep, marks the new decision in the log (a restart then
    /// keeps it too), and hands it to [`read_back`].
    pub(super) fn redecided(&self, r: Redecided) {
        self.metrics
            .traces_redecided
            .with_label_values(&[r.decision.by.label()])
            .inc();
        if let (Some(log), Some(seq)) = (&self.log, r.records.iter().map(|p| p.seq()).max()) {
            let cached = crate::buffer::CachedDecision::new(
                &r.decision,
                DecideReason::Regret,
                Instant::now(),
            );
            log.mark(&[crate::storage::Mark::Decided {
                trace: r.trace_id.0,
                seq,
                bits: cached.bits(),
                reason: DecideReason::Regret as u8,
            }]);
        }
        if let Some(tx) = &self.redecided {
            let _ = tx.send(r);
        }
    }

    /// Reads every span of a redecided trace back from the log and exports them, its root
    /// saying why it was kept (blocking reads: on the blocking pool).
    fn export_redecided(&self, r: Redecided) {
        let Some(log) = &self.log else { return };
        let tests = self.buffer.sampler().span_tests().clone();
        let keys = tests.keys(crate::llm::Conventions);
        let mut spans: Vec<HeldSpan> = Vec::new();
        for pin in &r.records {
            let record = match log.read(pin) {
                Ok(record) => record,
                Err(e) => {
                    tracing::error!(trace_id = %r.trace_id, error = %e, "cannot read a redecided trace's spans back from the trace log; they are not exported");
                    continue;
                }
            };
            let request = record.payload;
            for rs in request::resource_spans(&request) {
                for ss in rs.scope_spans() {
                    let mut origin: Option<Arc<Origin>> = None;
                    for span in ss.spans() {
                        if scan::trace_id(&span) != Some(r.trace_id) {
                            continue;
                        }
                        let Ok(facts) = scan::scan_span(&span, &keys) else {
                            continue;
                        };
                        let origin = origin
                            .get_or_insert_with(|| {
                                Arc::new(Origin {
                                    data: request.clone(),
                                    resource: rs.resource.clone(),
                                    resource_schema_url: rs.schema_url.clone(),
                                    scope: ss.scope.clone(),
                                    scope_schema_url: ss.schema_url.clone(),
                                    service: ingest::service_label(&rs.resource),
                                    pin: Some(pin.clone()),
                                })
                            })
                            .clone();
                        spans.push(HeldSpan::new(
                            origin,
                            &span,
                            facts.trace_state,
                            facts.is_root,
                        ));
                    }
                }
            }
        }
        let threshold = r.decision.export_threshold();
        let mut kept: Vec<KeptSpan> = spans
            .into_iter()
            .filter_map(|span| self.redacted(span))
            .map(|span| KeptSpan::new(span, threshold))
            .collect();
        if let Some(root) = kept.iter_mut().find(|k| k.span.is_root) {
            let mut extra = Vec::with_capacity(256);
            dispatch::explain(&mut extra, &r.decision, DecideReason::Regret);
            if self.rollup {
                dispatch::rollup(&mut extra, &r.summary);
            }
            // Charged: a kept trace waiting out an outage holds it.
            root.extra = Some(Box::new(self.budget.charge(Bytes::from(extra))));
        }
        self.submit(kept);
    }
}

/// Exports redecided traces as they come, each read back on the blocking pool; ends when
/// the pipeline is gone.
pub async fn read_back(
    pipeline: Arc<Pipeline>,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Redecided>,
) {
    while let Some(r) = rx.recv().await {
        let p = pipeline.clone();
        let _ = tokio::task::spawn_blocking(move || p.export_redecided(r)).await;
    }
}
