//! Every LLM call, kept or not: its metrics (ours and the GenAI semantic-convention ones),
//! anomaly detection and service health for the boost; and per trace, who spent what.

use std::sync::Arc;
use std::time::Instant;

use dashmap::DashMap;
use prometheus::{Counter, Histogram, IntCounter};

use super::anomaly::{AnomalyDetector, CallSample};
use super::config::LlmConfig;
use super::labels::{FirstSeen, TopK};
use super::trace::{Counted, Settle, resolve};
use super::{CallSpan, LlmCall, Role};
use crate::otlp::reframe::HeldSpan;
use crate::sampling::adaptive::{BaseRate, Boost};
use crate::sampling::{CallStats, TraceSummary};
use crate::telemetry::Metrics;

/// The metrics of one (service, model), resolved once: label lookups are the costly part of
/// a metric update.
struct CallHandles {
    ok: IntCounter,
    error: IntCounter,
    tokens_in: IntCounter,
    tokens_out: IntCounter,
    tokens_cache_read: IntCounter,
    tokens_cache_write: IntCounter,
    tokens_reasoning: IntCounter,
    cost: Counter,
    unpriced: IntCounter,
    latency: Histogram,
}

/// The GenAI semantic-convention metrics of one label set.
struct GenAiHandles {
    tokens_in: Histogram,
    tokens_out: Histogram,
    duration: Histogram,
}

/// (operation, provider, request model, response model, error type), all bounded values.
type GenAiKey = [Arc<str>; 5];
type Fast = foldhash::fast::RandomState;

pub struct LlmObserver {
    metrics: Arc<Metrics>,
    handles: DashMap<(Arc<str>, Arc<str>), Arc<CallHandles>, Fast>,
    genai: DashMap<GenAiKey, Arc<GenAiHandles>, Fast>,
    services: FirstSeen,
    models: FirstSeen,
    /// Providers and operation names (small, stable sets).
    kinds: FirstSeen,
    users: TopK,
    sessions: TopK,
    detector: AnomalyDetector,
    boost: Option<Boost>,
    base: Arc<BaseRate>,
    /// Series bounds on label combinations (`llm.labels.max_service_models`,
    /// `max_genai_label_sets`): past them, new combinations share the all-`other` one.
    max_pairs: usize,
    max_genai: usize,
    /// Held while a new label combination is admitted, so that deciding threads running at
    /// once cannot both take the last place under a bound (misses only: rare).
    admit: parking_lot::Mutex<()>,
    other: Arc<str>,
    /// Prices, for calls read again from held spans at their trace's decision.
    pricing: Arc<super::Pricing>,
}

impl LlmObserver {
    pub fn new(
        cfg: &LlmConfig,
        metrics: Arc<Metrics>,
        boost: Option<Boost>,
        base: Arc<BaseRate>,
        pricing: Arc<super::Pricing>,
    ) -> Self {
        let folded = |label: &str| metrics.labels_folded.with_label_values(&[label]);
        LlmObserver {
            handles: DashMap::default(),
            genai: DashMap::default(),
            services: FirstSeen::new(cfg.labels.max_services).counting(folded("service")),
            models: FirstSeen::new(cfg.labels.max_models).counting(folded("model")),
            kinds: FirstSeen::new(cfg.labels.max_models).counting(folded("provider_or_operation")),
            users: TopK::new(cfg.labels.top_users),
            sessions: TopK::new(cfg.labels.top_sessions),
            detector: AnomalyDetector::new(cfg.anomaly.clone()),
            boost,
            base,
            max_pairs: cfg.labels.max_service_models,
            max_genai: cfg.labels.max_genai_label_sets,
            admit: parking_lot::Mutex::new(()),
            other: Arc::from(super::labels::OTHER),
            pricing,
            metrics,
        }
    }

    /// Records one call of `service`; returns what it adds to its trace.
    pub fn observe(&self, service: &Arc<str>, call: &LlmCall, now: Instant) -> CallStats {
        let (service, model, h) = self.spend(service, call);
        if call.error { &h.error } else { &h.ok }.inc();
        if let Some(latency) = call.latency_seconds {
            h.latency.observe(latency);
        }
        self.genai_metrics(call);

        let kinds = self.detector.observe(
            &service,
            &model,
            CallSample {
                latency_seconds: call.latency_seconds,
                cost_usd: call.cost_usd,
                tokens: call.usage.input + call.usage.output,
            },
        );
        for kind in &kinds {
            self.metrics
                .llm_anomalies
                .with_label_values(&[&service, &model, kind.label()])
                .inc();
        }
        let anomalous = !kinds.is_empty();
        let boost = self.boost.as_ref().and_then(|b| {
            b.record(&service, call.error || anomalous, now);
            b.probability(&service, self.base.get(), now)
        });
        CallStats {
            latency_attr_ms: call.latency_attr_ms,
            cost_usd: call.cost_usd,
            input_tokens: call.usage.input,
            output_tokens: call.usage.output,
            anomalous,
            boost,
        }
    }

    /// Records the usage of calls not seen as spans of their own (an agent's or workflow's
    /// aggregate): tokens and cost, no call.
    pub fn observe_usage(&self, service: &Arc<str>, call: &LlmCall) -> CallStats {
        self.spend(service, call);
        CallStats {
            latency_attr_ms: None,
            cost_usd: call.cost_usd,
            input_tokens: call.usage.input,
            output_tokens: call.usage.output,
            anomalous: false,
            boost: None,
        }
    }

    /// Counts a call's tokens and cost under its (service, model); returns the labels used.
    fn spend(&self, service: &Arc<str>, call: &LlmCall) -> (Arc<str>, Arc<str>, Arc<CallHandles>) {
        let service = self.services.bound(service);
        let model = self.models.bound(&call.model);
        let (service, model, h) = self.call_handles(service, model);
        h.tokens_in.inc_by(call.usage.input);
        h.tokens_out.inc_by(call.usage.output);
        h.tokens_cache_read.inc_by(call.usage.cache_read);
        h.tokens_cache_write.inc_by(call.usage.cache_write);
        h.tokens_reasoning.inc_by(call.reasoning_tokens);
        match call.cost_usd {
            Some(cost) => h.cost.inc_by(cost),
            None => h.unpriced.inc(),
        }
        for field in &call.ignored {
            self.metrics
                .llm_values_ignored
                .with_label_values(&[field])
                .inc();
        }
        (service, model, h)
    }

    /// The metrics of (service, model), or of (other, other) once `max_service_models`
    /// pairs have their own; returns the labels used.
    fn call_handles(
        &self,
        service: Arc<str>,
        model: Arc<str>,
    ) -> (Arc<str>, Arc<str>, Arc<CallHandles>) {
        let mut key = (service, model);
        if let Some(h) = self.handles.get(&key) {
            let h = h.clone();
            return (key.0, key.1, h);
        }
        let _admitting = self.admit.lock();
        if let Some(h) = self.handles.get(&key) {
            let h = h.clone();
            return (key.0, key.1, h);
        }
        if self.handles.len() >= self.max_pairs {
            self.metrics
                .labels_folded
                .with_label_values(&["service_model"])
                .inc();
            key = (self.other.clone(), self.other.clone());
            if let Some(h) = self.handles.get(&key) {
                let h = h.clone();
                return (key.0, key.1, h);
            }
        }
        let m = &self.metrics;
        let (s, md): (&str, &str) = (&key.0, &key.1);
        let h = Arc::new(CallHandles {
            ok: m.llm_requests.with_label_values(&[s, md, "ok"]),
            error: m.llm_requests.with_label_values(&[s, md, "error"]),
            tokens_in: m.llm_tokens.with_label_values(&[s, md, "input"]),
            tokens_out: m.llm_tokens.with_label_values(&[s, md, "output"]),
            tokens_cache_read: m.llm_tokens.with_label_values(&[s, md, "cache_read"]),
            tokens_cache_write: m.llm_tokens.with_label_values(&[s, md, "cache_write"]),
            tokens_reasoning: m.llm_tokens.with_label_values(&[s, md, "reasoning"]),
            cost: m.llm_cost.with_label_values(&[s, md]),
            unpriced: m.llm_unpriced.with_label_values(&[md]),
            latency: m.llm_latency.with_label_values(&[s, md]),
        });
        self.handles.insert(key.clone(), h.clone());
        (key.0, key.1, h)
    }

    /// `gen_ai.client.token.usage` and `gen_ai.client.operation.duration`.
    fn genai_metrics(&self, call: &LlmCall) {
        let empty: Arc<str> = Arc::from("");
        let bound =
            |v: &Option<Arc<str>>| v.as_ref().map_or(empty.clone(), |v| self.kinds.bound(v));
        let key: GenAiKey = [
            bound(&call.operation),
            bound(&call.provider),
            self.models.bound(&call.request_model),
            call.response_model
                .as_ref()
                .map_or(empty.clone(), |r| self.models.bound(r)),
            bound(&call.error_type),
        ];
        let h = match self.genai.get(&key) {
            Some(h) => h.clone(),
            None => self.new_genai_handles(key),
        };
        h.tokens_in.observe(call.usage.input as f64);
        h.tokens_out.observe(call.usage.output as f64);
        if let Some(latency) = call.latency_seconds {
            h.duration.observe(latency);
        }
    }

    /// The handles of a label set not seen yet, or of the all-`other` one once
    /// `max_genai_label_sets` have their own.
    fn new_genai_handles(&self, mut key: GenAiKey) -> Arc<GenAiHandles> {
        let _admitting = self.admit.lock();
        if let Some(h) = self.genai.get(&key) {
            return h.clone();
        }
        if self.genai.len() >= self.max_genai {
            self.metrics
                .labels_folded
                .with_label_values(&["genai_label_set"])
                .inc();
            key = std::array::from_fn(|_| self.other.clone());
            if let Some(h) = self.genai.get(&key) {
                return h.clone();
            }
        }
        let m = &self.metrics;
        let [op, provider, request, response, error] = &key;
        let l = |last: &str| {
            [
                op.as_ref(),
                provider.as_ref(),
                request.as_ref(),
                response.as_ref(),
                last,
            ]
            .map(str::to_owned)
        };
        let h = Arc::new(GenAiHandles {
            tokens_in: m.genai_token_usage.with_label_values(&l("input")),
            tokens_out: m.genai_token_usage.with_label_values(&l("output")),
            duration: m.genai_duration.with_label_values(&l(error)),
        });
        self.genai.insert(key, h.clone());
        h
    }

    /// Attributes a decided trace's LLM spend to its user and session (every trace is
    /// decided once, kept or not, so every call is counted once).
    pub fn record_spend(&self, s: &TraceSummary, now: Instant) {
        if s.calls == 0 {
            return;
        }
        let m = &self.metrics;
        if let Some(user) = &s.user {
            let ranked = self.users.record(user, s.cost_usd, now);
            for gone in &ranked.demoted {
                let _ = m.user_cost.remove_label_values(&[gone]);
                let _ = m.user_tokens.remove_label_values(&[gone, "input"]);
                let _ = m.user_tokens.remove_label_values(&[gone, "output"]);
            }
            let label: &str = &ranked.label;
            m.user_cost.with_label_values(&[label]).inc_by(s.cost_usd);
            m.user_tokens
                .with_label_values(&[label, "input"])
                .inc_by(s.input_tokens);
            m.user_tokens
                .with_label_values(&[label, "output"])
                .inc_by(s.output_tokens);
        }
        if let Some(session) = &s.session {
            let ranked = self.sessions.record(session, s.cost_usd, now);
            for gone in &ranked.demoted {
                let _ = m.session_cost.remove_label_values(&[gone]);
            }
            m.session_cost
                .with_label_values(&[&ranked.label])
                .inc_by(s.cost_usd);
        }
    }

    /// Counts one LLM span alone: a late span of a trace already decided.
    pub fn observe_alone(&self, span: &CallSpan, now: Instant) {
        match span.role {
            Role::Call | Role::Record => {
                self.observe(&span.service, &span.call, now);
            }
            Role::Aggregate if span.has_usage => {
                self.observe_usage(&span.service, &span.call);
            }
            Role::Aggregate => {}
        }
    }

    /// Refreshes `llmtail_sampling_probability{service}` for every service seen.
    pub fn publish_probabilities(&self, now: Instant) {
        let base = self.base.get();
        let services = self
            .boost
            .as_ref()
            .map(|b| b.services())
            .unwrap_or_default();
        self.metrics
            .sampling_probability
            .with_label_values(&["*"])
            .set(base);
        if let Some(b) = &self.boost {
            for s in services {
                let p = b.probability(&s, base, now).unwrap_or(base);
                self.metrics
                    .sampling_probability
                    .with_label_values(&[&s])
                    .set(p);
            }
        }
    }
}

impl Settle for LlmObserver {
    fn settle(&self, summary: &mut TraceSummary, spans: &[HeldSpan], calls: &[u32], now: Instant) {
        if calls.is_empty() {
            return;
        }
        let calls = super::trace::recall_all(self, spans, calls);
        // The trace's shape matters only to tell layers of several LLM spans apart.
        let links = if calls.len() > 1 {
            super::trace::links(spans)
        } else {
            Vec::new()
        };
        for counted in resolve(calls, &links) {
            match counted {
                Counted::Call(call, service) => {
                    summary.count(&self.observe(&service, &call, now), true);
                }
                Counted::Usage(call, service) => {
                    summary.count(&self.observe_usage(&service, &call), false);
                }
            }
        }
    }

    fn recall(&self, span: &HeldSpan) -> Option<CallSpan> {
        let mut strings = super::Strings::default();
        super::call::recall(
            span.bytes(),
            &span.origin.scope,
            &span.origin.service,
            &self.pricing,
            &mut strings,
        )
    }
}
