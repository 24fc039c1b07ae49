//! `llmtail explain`: replays OTLP/JSON traces (what the file exporter writes, or what a
//! backend exported) through a config's sampling rules and says, per trace, what would be
//! decided and by which policy — a policy set tried before it is deployed.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use bytes::Bytes;

use crate::buffer::{BufferLimits, DecidedTrace, TraceBuffer};
use crate::config::Config;
use crate::llm::Pricing;
use crate::llm::observer::LlmObserver;
use crate::memory::Budget;
use crate::otlp::redact::Redactor;
use crate::pipeline::{Pipeline, Protocol};
use crate::sampling::Sampler;
use crate::sampling::adaptive::{BaseRate, Boost};
use crate::telemetry::Metrics;

/// One replayed trace's decision.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Explained {
    pub trace_id: String,
    pub spans: usize,
    pub decision: &'static str,
    pub policy: &'static str,
    pub probability: f64,
    pub duration_ms: f64,
    pub error: bool,
    pub llm_calls: u32,
    pub cost_usd: f64,
}

/// The requests of an OTLP/JSON file: one `ExportTraceServiceRequest` per line (the file
/// exporter's format), or the whole file as one.
pub fn requests(text: &str) -> anyhow::Result<Vec<Vec<u8>>> {
    if let Ok(one) = crate::otlp::json::to_protobuf(text.trim().as_bytes()) {
        return Ok(vec![one]);
    }
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            crate::otlp::json::to_protobuf(l.as_bytes()).with_context(|| {
                format!("line {}: not an OTLP/JSON ExportTraceServiceRequest", i + 1)
            })
        })
        .collect()
}

/// Holds every span of `requests`, then decides every trace as complete, with `cfg`'s
/// policies, base rate and LLM pricing (nothing is exported, no metric is published).
pub fn explain(cfg: &Config, requests: Vec<Vec<u8>>) -> anyhow::Result<Vec<Explained>> {
    let metrics = Metrics::new();
    let s = &cfg.sampling;
    let base = Arc::new(BaseRate::new(s.base_rate));
    let pricing = Arc::new(Pricing::new(&cfg.llm.pricing));
    pricing.set_cost_source(cfg.llm.cost_source);
    if let Some(file) = &cfg.llm.pricing_file {
        pricing.load_file(file)?;
    }
    let observer = Arc::new(LlmObserver::new(
        &cfg.llm,
        metrics.clone(),
        s.boost.clone().map(Boost::new),
        base.clone(),
        pricing.clone(),
    ));
    let budget = Budget::new();
    let pipeline = Pipeline {
        buffer: TraceBuffer::new(
            BufferLimits {
                idle_timeout: s.idle_timeout(),
                max_trace_duration: s.max_trace_duration.0,
                root_grace: s.root_grace.0,
                max_traces: usize::MAX / 2,
                decision_cache_size: 0,
                max_spans_per_trace: cfg.limits.max_spans_per_trace,
                regret_window: std::time::Duration::ZERO,
                max_regret_traces: 0,
            },
            Sampler::new(s, base),
            budget.clone(),
            observer.clone(),
        ),
        pricing,
        observer,
        metrics,
        exporters: Vec::new(),
        redactor: Redactor::new(&cfg.llm.privacy).context("llm.privacy")?,
        rollup: false,
        recent_kept: None,
        log: None,
        redecided: None,
        limits: Default::default(),
        cluster: None,
        budget,
        reserved_memory: 0,
    };
    pipeline.limits.set(&cfg.limits);
    // A replay holds everything it reads.
    pipeline
        .limits
        .max_buffer_bytes
        .store(usize::MAX / 2, std::sync::atomic::Ordering::Relaxed);
    pipeline
        .limits
        .soft_buffer_bytes
        .store(usize::MAX / 2, std::sync::atomic::Ordering::Relaxed);
    for (i, request) in requests.into_iter().enumerate() {
        let outcome = pipeline
            .ingest(Bytes::from(request), Protocol::HttpJson)
            .map_err(|e| anyhow::anyhow!("request {}: {e}", i + 1))?;
        if outcome.rejected > 0 {
            eprintln!("request {}: {}", i + 1, outcome.error_message);
        }
    }
    let mut decided: Vec<DecidedTrace> = Vec::new();
    pipeline.buffer.decide_all(Instant::now(), &mut decided);
    let mut out: Vec<Explained> = decided
        .into_iter()
        .map(|t| Explained {
            trace_id: t.trace_id.0.iter().map(|b| format!("{b:02x}")).collect(),
            spans: t.spans.len(),
            decision: if t.decision.keep { "kept" } else { "dropped" },
            policy: t.decision.by.label(),
            probability: t.decision.probability(),
            duration_ms: t.summary.duration_ms(),
            error: t.summary.has_error,
            llm_calls: t.summary.calls,
            cost_usd: t.summary.cost_usd,
        })
        .collect();
    out.sort_by(|a, b| a.trace_id.cmp(&b.trace_id));
    Ok(out)
}
