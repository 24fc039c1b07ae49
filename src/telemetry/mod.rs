//! llmtail's own telemetry: the Prometheus metrics and the admin server that serves them
//! with the health and readiness probes.

mod admin;
pub mod status;

pub use admin::{Admin, DebugTraces, TraceLookup, bind, serve_admin};

pub mod config;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use prometheus::{
    CounterVec, Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter,
    IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Buckets for the decision delay: from well under `root_grace` to agent runs of half an
/// hour (`max_trace_duration`).
const DECISION_DELAY_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0,
    1800.0,
];
/// Buckets for LLM call latency: fast completions to long reasoning calls.
const LLM_LATENCY_BUCKETS: &[f64] = &[0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0];

/// Every metric llmtail publishes; names and labels are part of the contract (docs/metrics.md).
pub struct Metrics {
    pub registry: Registry,
    /// The name of every metric registered, for checks of dashboards and alert rules.
    pub names: Vec<String>,
    pub spans_received: IntCounterVec,
    pub spans_rejected: IntCounterVec,
    pub traces: IntCounterVec,
    pub late_spans: IntCounterVec,
    pub spans_dropped: IntCounterVec,
    pub spans_exported: IntCounterVec,
    pub spans_lost: IntCounterVec,
    pub requests_refused: IntCounterVec,
    pub buffer_traces: IntGauge,
    pub buffer_spans: IntGauge,
    pub buffer_bytes: IntGauge,
    pub buffer_limit_traces: IntGauge,
    pub early_decisions: IntCounterVec,
    pub export_queue_spans: IntGaugeVec,
    pub export_retries: IntCounterVec,
    pub storage_bytes: IntGauge,
    pub storage_limit_bytes: IntGauge,
    pub storage_segments: IntGauge,
    pub storage_appended_bytes: IntCounter,
    pub storage_write_errors: IntCounter,
    pub storage_replayed_spans: IntCounterVec,
    pub storage_marks: IntCounterVec,
    pub traces_redecided: IntCounterVec,
    pub buffer_oldest_trace_seconds: prometheus::Gauge,
    pub auth_failures: IntCounterVec,
    pub config_reloads: IntCounterVec,
    pub buffer_limit_bytes: IntGauge,
    pub memory_bytes: IntGaugeVec,
    pub cluster_peers: IntGauge,
    pub cluster_forwarded: IntCounterVec,
    pub cluster_received: IntCounterVec,
    pub cluster_forward_failures: IntCounterVec,
    pub cluster_ring_changes: IntCounter,
    pub cluster_handed_off: IntCounterVec,
    pub cluster_taken_over: IntCounter,
    pub cluster_decisions_taken_over: IntCounter,
    pub cluster_split: IntCounterVec,
    pub cluster_duplicates: IntCounter,
    pub decision_delay: Histogram,
    pub early_decision_delay: HistogramVec,
    pub llm_requests: IntCounterVec,
    pub llm_tokens: IntCounterVec,
    pub llm_cost: CounterVec,
    pub llm_latency: HistogramVec,
    pub llm_unpriced: IntCounterVec,
    pub llm_anomalies: IntCounterVec,
    pub labels_folded: IntCounterVec,
    pub connections: IntGaugeVec,
    pub connections_closed: IntCounterVec,
    pub llm_values_ignored: IntCounterVec,
    pub user_cost: CounterVec,
    pub user_tokens: IntCounterVec,
    pub session_cost: CounterVec,
    pub sampling_probability: GaugeVec,
    pub dynamic_probability: GaugeVec,
    pub pricing_reloads: IntCounterVec,
    pub genai_token_usage: HistogramVec,
    pub genai_duration: HistogramVec,
}

/// Buckets the GenAI metrics specification recommends for `gen_ai.client.token.usage`.
const GENAI_TOKEN_BUCKETS: &[f64] = &[
    1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0,
    16777216.0, 67108864.0,
];
/// Buckets the GenAI metrics specification recommends for `gen_ai.client.operation.duration`.
const GENAI_DURATION_BUCKETS: &[f64] = &[
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
];
/// Labels of the GenAI semantic-convention metrics (attribute names with `_` for `.`).
const GENAI_LABELS: &[&str] = &[
    "gen_ai_operation_name",
    "gen_ai_provider_name",
    "gen_ai_request_model",
    "gen_ai_response_model",
];

/// Why a span of a kept trace never reached an upstream: the `reason` label of
/// `llmtail_spans_lost_total`. These are the only ways an accepted span is lost; each is
/// documented in docs/operations.md ("Loss") with when it can happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loss {
    /// The upstream answered with a permanent error (not retried).
    Rejected,
    /// The upstream accepted the request but rejected some spans (partial success).
    Partial,
    /// Retries went on past `exporter.retry.max_elapsed` (memory-only queue).
    RetriesExhausted,
    /// Still queued when `shutdown_timeout` ran out (memory-only queue).
    Shutdown,
    /// One span alone is larger than the upstream accepts in a request.
    SpanTooLarge,
    /// Privacy rewriting could not parse the span; it is not exported unredacted.
    RedactionFailed,
}

impl Loss {
    pub fn label(self) -> &'static str {
        match self {
            Loss::Rejected => "upstream_rejected",
            Loss::Partial => "upstream_partial_rejection",
            Loss::RetriesExhausted => "retries_exhausted",
            Loss::Shutdown => "shutdown",
            Loss::SpanTooLarge => "span_too_large",
            Loss::RedactionFailed => "redaction_failed",
        }
    }
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let registry = Registry::new();
        let mut names = Vec::new();
        macro_rules! reg {
            ($m:expr) => {{
                let m = $m.expect("metric definitions are static and valid");
                names.extend(
                    prometheus::core::Collector::desc(&m)
                        .iter()
                        .map(|d| d.fq_name.clone()),
                );
                registry
                    .register(Box::new(m.clone()))
                    .expect("metric names are unique");
                m
            }};
        }
        let m = Metrics {
            spans_received: reg!(IntCounterVec::new(
                Opts::new(
                    "llmtail_spans_received_total",
                    "Spans accepted by a receiver."
                ),
                &["protocol"]
            )),
            spans_rejected: reg!(IntCounterVec::new(
                Opts::new("llmtail_spans_rejected_total", "Spans refused as invalid."),
                &["reason"]
            )),
            traces: reg!(IntCounterVec::new(
                Opts::new(
                    "llmtail_traces_total",
                    "Decided traces, by decision and the policy that set the probability."
                ),
                &["decision", "policy"]
            )),
            late_spans: reg!(IntCounterVec::new(
                Opts::new(
                    "llmtail_late_spans_total",
                    "Spans that arrived after their trace's decision."
                ),
                &["decision"]
            )),
            spans_dropped: reg!(IntCounterVec::new(
                Opts::new(
                    "llmtail_spans_dropped_total",
                    "Spans not exported because their trace was not sampled."
                ),
                &["reason"]
            )),
            spans_exported: reg!(IntCounterVec::new(
                Opts::new(
                    "llmtail_spans_exported_total",
                    "Spans acknowledged by the upstream."
                ),
                &["exporter"]
            )),
            spans_lost: reg!(IntCounterVec::new(
                Opts::new(
                    "llmtail_spans_lost_total",
                    "Spans of kept traces that never reached the upstream."
                ),
                &["exporter", "reason"]
            )),
            requests_refused: reg!(IntCounterVec::new(
                Opts::new(
                    "llmtail_requests_refused_total",
                    "Export requests refused before reading them, e.g. while overloaded."
                ),
                &["protocol", "reason"]
            )),
            buffer_traces: reg!(IntGauge::new(
                "llmtail_buffer_traces",
                "Traces held awaiting a decision."
            )),
            buffer_spans: reg!(IntGauge::new(
                "llmtail_buffer_spans",
                "Spans held awaiting a decision."
            )),
            buffer_bytes: reg!(IntGauge::new(
                "llmtail_buffer_bytes",
                "Wire bytes of the spans held."
            )),
            buffer_limit_traces: reg!(IntGauge::new(
                "llmtail_buffer_limit_traces",
                "sampling.max_traces: past it the oldest traces are decided early."
            )),
            early_decisions: reg!(IntCounterVec::new(
                Opts::new(
                    "llmtail_early_decisions_total",
                    "Traces decided before their deadline, by reason (pressure: the buffer was full)."
                ),
                &["reason"]
            )),
            export_queue_spans: reg!(IntGaugeVec::new(
                Opts::new(
                    "llmtail_export_queue_spans",
                    "Kept spans waiting for or retrying export."
                ),
                &["exporter"]
            )),
            export_retries: reg!(IntCounterVec::new(
                Opts::new(
                    "llmtail_export_retries_total",
                    "Export attempts that failed with a retryable error and were tried again."
                ),
                &["exporter"]
            )),
            storage_bytes: reg!(IntGauge::new(
                "llmtail_storage_bytes",
                "Bytes the trace log takes on disk (segments and marks, and room reserved for requests being written)."
            )),
            storage_limit_bytes: reg!(IntGauge::new(
                "llmtail_storage_limit_bytes",
                "The trace log's bound now: storage.max_disk_bytes, or less when the disk has less free."
            )),
            storage_segments: reg!(IntGauge::new(
                "llmtail_storage_segments",
                "Segment files of the trace log on disk."
            )),
            storage_appended_bytes: reg!(IntCounter::new(
                "llmtail_storage_appended_bytes_total",
                "Bytes appended to the trace log (accepted requests and their framing)."
            )),
            storage_write_errors: reg!(IntCounter::new(
                "llmtail_storage_write_errors_total",
                "Writes or syncs of the trace log that failed (a full disk, an I/O error): the requests they carried were refused retryably."
            )),
            storage_replayed_spans: reg!(IntCounterVec::new(
                Opts::new(
                    "llmtail_storage_replayed_spans_total",
                    "Spans read back from the trace log at start, by what became of them: held (their trace undecided), exported (kept, not yet delivered), skipped (dropped, or delivered already)."
                ),
                &["disposition"]
            )),
            traces_redecided: reg!(IntCounterVec::new(
                Opts::new(
                    "llmtail_traces_redecided_total",
                    "Dropped traces turned to keep by a late span within storage.regret_window (an error, a cost or latency over threshold, a condition), by the policy that keeps them; the whole trace is read back from the trace log and exported."
                ),
                &["policy"]
            )),
            storage_marks: reg!(IntCounterVec::new(
                Opts::new(
                    "llmtail_storage_marks_total",
                    "Marks written to the trace log beside its records, by kind: decided (a trace's decision), delivered (spans of a record the upstream answered for)."
                ),
                &["kind"]
            )),
            buffer_oldest_trace_seconds: reg!(prometheus::Gauge::new(
                "llmtail_buffer_oldest_trace_seconds",
                "Age of the oldest trace held (since its first span), as of the last decision tick."
            )),
            auth_failures: reg!(IntCounterVec::new(
                Opts::new(
                    "llmtail_auth_failures_total",
                    "Requests refused for a missing or wrong bearer token / API key."
                ),
                &["protocol"]
            )),
            config_reloads: reg!(IntCounterVec::new(
                Opts::new(
                    "llmtail_config_reloads_total",
                    "Configuration reloads (SIGHUP), by result (applied, rejected)."
                ),
                &["result"]
            )),
            buffer_limit_bytes: reg!(IntGauge::new(
                "llmtail_buffer_limit_bytes",
                "limits.max_buffer_bytes in effect: the hard mark of the memory budget."
            )),
            memory_bytes: reg!(IntGaugeVec::new(
                Opts::new(
                    "llmtail_memory_bytes",
                    "What the memory budget counts, by part: buffers (span bytes held anywhere), bookkeeping (per held trace and queued span), reserved (the decision cache)."
                ),
                &["part"]
            )),
            cluster_peers: reg!(IntGauge::new(
                "llmtail_cluster_peers",
                "Replicas in this replica's ring, itself included (1 without clustering)."
            )),
            cluster_forwarded: reg!(IntCounterVec::new(
                Opts::new(
                    "llmtail_cluster_spans_forwarded_total",
                    "Spans forwarded to the replica that owns their trace."
                ),
                &["peer"]
            )),
            cluster_received: reg!(IntCounterVec::new(
                Opts::new(
                    "llmtail_cluster_spans_received_total",
                    "Spans forwarded here by another replica."
                ),
                &["peer"]
            )),
            cluster_forward_failures: reg!(IntCounterVec::new(
                Opts::new(
                    "llmtail_cluster_forward_failures_total",
                    "Forwarded batches a peer did not take (their spans went to the trace's next owner, or were decided here)."
                ),
                &["peer"]
            )),
            cluster_ring_changes: reg!(IntCounter::new(
                "llmtail_cluster_ring_changes_total",
                "Times this replica's ring changed: a member joined, left, went down or came back."
            )),
            cluster_handed_off: reg!(IntCounterVec::new(
                Opts::new(
                    "llmtail_cluster_handed_off_traces_total",
                    "Held traces this replica handed to their new owner as it left the ring."
                ),
                &["peer"]
            )),
            cluster_taken_over: reg!(IntCounter::new(
                "llmtail_cluster_taken_over_traces_total",
                "Held traces a leaving replica handed to this one."
            )),
            cluster_decisions_taken_over: reg!(IntCounter::new(
                "llmtail_cluster_taken_over_decisions_total",
                "Recent decisions a leaving replica handed to this one, so that late spans of those traces follow them here."
            )),
            cluster_split: reg!(IntCounterVec::new(
                Opts::new(
                    "llmtail_cluster_split_traces_total",
                    "Traces decided in more than one place, as far as this replica can tell: decided_here (spans another member owned, decided here because no member took them), decided_before_handoff (handed-off spans of a trace already decided here), decided_elsewhere (a decision handed over for a trace also held or decided otherwise here), unknown_outcome (a forward whose outcome stayed unknown, taken here)."
                ),
                &["reason"]
            )),
            cluster_duplicates: reg!(IntCounter::new(
                "llmtail_cluster_duplicate_batches_total",
                "Forwarded batches received again (a retry after an unknown outcome) and not taken twice."
            )),
            decision_delay: reg!(Histogram::with_opts(
                HistogramOpts::new(
                    "llmtail_decision_delay_seconds",
                    "First span of a trace to its decision."
                )
                .buckets(DECISION_DELAY_BUCKETS.to_vec())
            )),
            early_decision_delay: reg!(HistogramVec::new(
                HistogramOpts::new(
                    "llmtail_early_decision_delay_seconds",
                    "First span to decision of traces decided early, by reason."
                )
                .buckets(DECISION_DELAY_BUCKETS.to_vec()),
                &["reason"]
            )),
            llm_requests: reg!(IntCounterVec::new(
                Opts::new(
                    "llmtail_llm_requests_total",
                    "Every LLM call seen, kept or not."
                ),
                &["service", "model", "status"]
            )),
            llm_tokens: reg!(IntCounterVec::new(
                Opts::new("llmtail_llm_tokens_total", "Tokens of every LLM call."),
                &["service", "model", "type"]
            )),
            llm_cost: reg!(CounterVec::new(
                Opts::new(
                    "llmtail_llm_cost_usd_total",
                    "Cost in USD of every LLM call."
                ),
                &["service", "model"]
            )),
            llm_latency: reg!(HistogramVec::new(
                HistogramOpts::new("llmtail_llm_latency_seconds", "LLM call latency.")
                    .buckets(LLM_LATENCY_BUCKETS.to_vec()),
                &["service", "model"]
            )),
            llm_unpriced: reg!(IntCounterVec::new(
                Opts::new(
                    "llmtail_llm_unpriced_calls_total",
                    "LLM calls with neither a cost attribute nor a price for their model."
                ),
                &["model"]
            )),
            connections: reg!(IntGaugeVec::new(
                Opts::new("llmtail_connections", "Connections open on each receiver."),
                &["receiver"]
            )),
            connections_closed: reg!(IntCounterVec::new(
                Opts::new(
                    "llmtail_connections_closed_total",
                    "Connections llmtail closed: silent (no request within header_read_timeout), idle (idle_timeout), pressure (idle while the receiver was nearly at max_connections), tls_handshake."
                ),
                &["receiver", "reason"]
            )),
            labels_folded: reg!(IntCounterVec::new(
                Opts::new(
                    "llmtail_label_values_folded_total",
                    "LLM calls whose label value (or combination of values) was folded into \"other\" by a series bound (llm.labels)."
                ),
                &["label"]
            )),
            llm_values_ignored: reg!(IntCounterVec::new(
                Opts::new(
                    "llmtail_llm_values_ignored_total",
                    "Token counts, costs and durations from spans that were negative, not finite or past their plausible maximum, and were not counted."
                ),
                &["field"]
            )),
            llm_anomalies: reg!(IntCounterVec::new(
                Opts::new(
                    "llmtail_llm_anomalies_total",
                    "LLM calls far outside their service and model's baseline."
                ),
                &["service", "model", "kind"]
            )),
            user_cost: reg!(CounterVec::new(
                Opts::new(
                    "llmtail_llm_user_cost_usd_total",
                    "Cost of LLM calls per user (top K by cost, the rest as other)."
                ),
                &["user"]
            )),
            user_tokens: reg!(IntCounterVec::new(
                Opts::new(
                    "llmtail_llm_user_tokens_total",
                    "Tokens of LLM calls per user (top K by cost, the rest as other)."
                ),
                &["user", "type"]
            )),
            session_cost: reg!(CounterVec::new(
                Opts::new(
                    "llmtail_llm_session_cost_usd_total",
                    "Cost of LLM calls per session (top K by cost, the rest as other)."
                ),
                &["session"]
            )),
            sampling_probability: reg!(GaugeVec::new(
                Opts::new(
                    "llmtail_sampling_probability",
                    "Base probability in force for traces no policy keeps (boost included)."
                ),
                &["service"]
            )),
            dynamic_probability: reg!(GaugeVec::new(
                Opts::new(
                    "llmtail_dynamic_sampling_probability",
                    "Probability the dynamic policy sets for each trace key (at most max_keys, the rest under `other`)."
                ),
                &["policy", "key"]
            )),
            pricing_reloads: reg!(IntCounterVec::new(
                Opts::new(
                    "llmtail_pricing_file_reloads_total",
                    "Pricing file reads, by result (ok/error)."
                ),
                &["result"]
            )),
            genai_token_usage: reg!(HistogramVec::new(
                HistogramOpts::new(
                    "gen_ai_client_token_usage",
                    "Tokens per LLM call (GenAI semantic conventions)."
                )
                .buckets(GENAI_TOKEN_BUCKETS.to_vec()),
                &[GENAI_LABELS, &["gen_ai_token_type"]].concat()
            )),
            genai_duration: reg!(HistogramVec::new(
                HistogramOpts::new(
                    "gen_ai_client_operation_duration_seconds",
                    "Duration of LLM calls (GenAI semantic conventions)."
                )
                .buckets(GENAI_DURATION_BUCKETS.to_vec()),
                &[GENAI_LABELS, &["error_type"]].concat()
            )),
            registry,
            names,
        };
        Arc::new(m)
    }

    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // Encoding our own registry into a Vec cannot fail.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

/// Split traces are reported in the log at most this often (the counter has them all).
static SPLIT: Throttle = Throttle::new(std::time::Duration::from_secs(10));

impl Metrics {
    /// Counts `traces` traces as decided in more than one place for `reason`, and says so
    /// in the log, naming one of them (at most every 10 s): a split is what an operator
    /// looks up in the trace backend.
    pub fn count_split(
        &self,
        reason: &str,
        traces: u64,
        example: &dyn std::fmt::Display,
        peer: &str,
    ) {
        if traces == 0 {
            return;
        }
        self.cluster_split
            .with_label_values(&[reason])
            .inc_by(traces);
        if let Some(held_back) = SPLIT.allow() {
            tracing::warn!(
                reason,
                traces,
                trace_id = %example,
                peer,
                similar_reports_held_back = held_back,
                "traces decided in more than one place (llmtail_cluster_split_traces_total)"
            );
        }
    }
}

/// Lets a repeated warning through at most once per interval, and says how many were held
/// back since: log volume must not be something a sender controls.
pub struct Throttle {
    every: std::time::Duration,
    last: parking_lot::Mutex<Option<std::time::Instant>>,
    held_back: std::sync::atomic::AtomicU64,
}

impl Throttle {
    pub const fn new(every: std::time::Duration) -> Self {
        Throttle {
            every,
            last: parking_lot::Mutex::new(None),
            held_back: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// `Some(n)` when this occurrence may be logged (`n` were held back before it).
    pub fn allow(&self) -> Option<u64> {
        let mut last = self.last.lock();
        if last.is_some_and(|t| t.elapsed() < self.every) {
            self.held_back.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *last = Some(std::time::Instant::now());
        Some(self.held_back.swap(0, Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    /// docs/metrics.md lists every metric llmtail registers, and nothing else.
    #[test]
    fn docs_metrics_lists_every_metric_and_only_those() {
        let docs = include_str!("../../docs/metrics.md");
        let metrics = super::Metrics::new();
        for name in &metrics.names {
            assert!(
                docs.contains(&format!("`{name}`")),
                "docs/metrics.md does not list {name}"
            );
        }
        let documented = docs
            .lines()
            .filter(|l| l.starts_with("| `"))
            .flat_map(|l| l.split('|').nth(1).unwrap_or_default().split(','))
            .map(|cell| cell.trim().trim_matches('`'));
        for name in documented {
            assert!(
                metrics.names.iter().any(|n| n == name),
                "docs/metrics.md lists {name}, which llmtail does not publish"
            );
        }
    }
}
