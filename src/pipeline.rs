//! The pipeline every receiver feeds: split a request into spans, record LLM metrics for
//! every span, hold spans in the trace buffer, and hand decided traces to the exporter.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use prost::Message;

use crate::buffer::{Added, DecidedTrace, SpanSummary, TraceBuffer};
use crate::exporter::ExportQueue;
use crate::llm::{LlmCall, Pricing};
use crate::otlp::reframe::{HeldSpan, KeptSpan, Origin};
use crate::otlp::scan::{self, Reject};
use crate::otlp::view;
use crate::telemetry::Metrics;

/// Service label for spans whose resource has no `service.name` (the SDKs' own default).
const UNKNOWN_SERVICE: &str = "unknown_service";

/// The receiving protocol, the label of `llmtail_spans_received_total`.
#[derive(Debug, Clone, Copy)]
pub enum Protocol {
    Grpc,
    HttpProtobuf,
    HttpJson,
}

impl Protocol {
    pub fn label(self) -> &'static str {
        match self {
            Protocol::Grpc => "grpc",
            Protocol::HttpProtobuf => "http_protobuf",
            Protocol::HttpJson => "http_json",
        }
    }
}

/// A request that is not an `ExportTraceServiceRequest` at all.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("the body is not a valid OTLP ExportTraceServiceRequest: {0}")]
    Undecodable(#[from] prost::DecodeError),
    #[error("resource_spans[{index}].resource is not a valid OTLP Resource")]
    BadResource { index: usize },
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
    pub pricing: Pricing,
    pub metrics: Arc<Metrics>,
    /// One queue per exporter; every kept span goes to each.
    pub exporters: Vec<Arc<ExportQueue>>,
}

impl Pipeline {
    /// Takes one encoded `ExportTraceServiceRequest`. Invalid spans are refused one by one;
    /// the request as a whole fails only when it cannot be split into spans at all, in which
    /// case nothing of it was taken.
    pub fn ingest(&self, request: Bytes, protocol: Protocol) -> Result<IngestOutcome, IngestError> {
        let request = view::ExportTraceServiceRequest::decode(request)?;
        let services = request
            .resource_spans
            .iter()
            .enumerate()
            .map(|(index, rs)| match scan::service_name(&rs.resource) {
                Ok(name) => Ok(Arc::<str>::from(
                    name.map(String::from_utf8_lossy)
                        .unwrap_or(UNKNOWN_SERVICE.into())
                        .as_ref(),
                )),
                Err(_) => Err(IngestError::BadResource { index }),
            })
            .collect::<Result<Vec<_>, _>>()?;

        let now = Instant::now();
        let mut outcome = IngestOutcome::default();
        let mut first_reject: Option<(Reject, String)> = None;
        let mut evicted = Vec::new();
        for ((ri, rs), service) in request.resource_spans.into_iter().enumerate().zip(services) {
            for (si, ss) in rs.scope_spans.into_iter().enumerate() {
                let origin = Arc::new(Origin {
                    resource: rs.resource.clone(),
                    resource_schema_url: rs.schema_url.clone(),
                    scope: ss.scope,
                    scope_schema_url: ss.schema_url,
                    service: service.clone(),
                });
                for (pi, span) in ss.spans.into_iter().enumerate() {
                    let facts = match scan::scan_span(&span) {
                        Ok(facts) => facts,
                        Err(reject) => {
                            outcome.rejected += 1;
                            self.metrics
                                .spans_rejected
                                .with_label_values(&[reject.label()])
                                .inc();
                            first_reject.get_or_insert_with(|| {
                                (
                                    reject,
                                    format!("resource_spans[{ri}].scope_spans[{si}].spans[{pi}]"),
                                )
                            });
                            continue;
                        }
                    };
                    outcome.accepted += 1;
                    let call = crate::llm::call_from_span(&span, &facts, &self.pricing);
                    if let Some(call) = &call {
                        self.record_llm_call(&origin.service, call);
                    }
                    let summary = SpanSummary {
                        trace_id: facts.trace_id,
                        is_root: facts.is_root,
                        start_ns: facts.start_ns,
                        end_ns: facts.end_ns,
                        error: facts.is_error(),
                        llm_latency_ms: call.as_ref().and_then(|c| c.latency_attr_ms),
                        cost_usd: call.as_ref().and_then(|c| c.cost_usd),
                    };
                    let held = HeldSpan {
                        origin: origin.clone(),
                        bytes: span,
                        trace_state: facts.trace_state,
                    };
                    if let Added::Late(decision, span) =
                        self.buffer.add(summary, held, now, &mut evicted)
                    {
                        let label = if decision.keep() { "kept" } else { "dropped" };
                        self.metrics.late_spans.with_label_values(&[label]).inc();
                        if decision.keep() {
                            self.submit(vec![KeptSpan {
                                span,
                                threshold: decision.threshold(),
                            }]);
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

    fn record_llm_call(&self, service: &str, call: &LlmCall) {
        let m = &self.metrics;
        let model: &str = &call.model;
        let status = if call.error { "error" } else { "ok" };
        m.llm_requests
            .with_label_values(&[service, model, status])
            .inc();
        m.llm_tokens
            .with_label_values(&[service, model, "input"])
            .inc_by(call.input_tokens);
        m.llm_tokens
            .with_label_values(&[service, model, "output"])
            .inc_by(call.output_tokens);
        match call.cost_usd {
            Some(cost) => m.llm_cost.with_label_values(&[service, model]).inc_by(cost),
            None => m.llm_unpriced.with_label_values(&[model]).inc(),
        }
        m.llm_latency
            .with_label_values(&[service, model])
            .observe(call.latency_seconds);
    }

    /// Counts decisions and sends kept traces to the exporter.
    pub fn dispatch(&self, decided: Vec<DecidedTrace>) {
        let sampler = self.buffer.sampler();
        for trace in decided {
            let decision = trace.decision;
            let label = if decision.keep { "kept" } else { "dropped" };
            self.metrics
                .traces
                .with_label_values(&[label, sampler.label(decision.by)])
                .inc();
            self.metrics
                .decision_delay
                .observe(trace.delay.as_secs_f64());
            if decision.keep {
                self.submit(
                    trace
                        .spans
                        .into_iter()
                        .map(|span| KeptSpan {
                            span,
                            threshold: decision.threshold,
                        })
                        .collect(),
                );
            } else {
                self.metrics
                    .spans_dropped
                    .with_label_values(&["sampled_out"])
                    .inc_by(trace.spans.len() as u64);
            }
        }
        self.update_gauges();
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

    /// True when no exporter can take more: every export queue is nearly full, so
    /// receivers push back on senders with a retryable error instead of taking data that
    /// would be lost. One stalled exporter among several does not stop the others.
    pub fn overloaded(&self) -> bool {
        !self.exporters.is_empty() && self.exporters.iter().all(|q| q.is_high())
    }

    /// Counts a request refused before it was read.
    pub fn refuse(&self, protocol: Protocol, reason: &str) {
        self.metrics
            .requests_refused
            .with_label_values(&[protocol.label(), reason])
            .inc();
    }

    /// Decides every trace whose deadline has passed.
    pub fn decide_due(&self) {
        let mut decided = Vec::new();
        self.buffer.decide_due(Instant::now(), &mut decided);
        self.dispatch(decided);
    }

    /// Decides everything still held (shutdown).
    pub fn decide_all(&self) {
        let mut decided = Vec::new();
        self.buffer.decide_all(Instant::now(), &mut decided);
        self.dispatch(decided);
    }

    fn update_gauges(&self) {
        let (traces, spans, bytes) = self.buffer.held();
        self.metrics.buffer_traces.set(traces as i64);
        self.metrics.buffer_spans.set(spans as i64);
        self.metrics.buffer_bytes.set(bytes as i64);
    }
}
