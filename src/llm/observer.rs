//! Every LLM call, kept or not: its metrics (ours and the GenAI semantic-convention ones),
//! anomaly detection and service health for the boost; and per trace, who spent what.

use std::sync::Arc;
use std::time::Instant;

use super::LlmCall;
use super::anomaly::{AnomalyDetector, CallSample};
use super::labels::{FirstSeen, TopK};
use crate::adaptive::{BaseRate, Boost};
use crate::config::LlmConfig;
use crate::sampler::{CallStats, TraceSummary};
use crate::telemetry::Metrics;

pub struct LlmObserver {
    metrics: Arc<Metrics>,
    services: FirstSeen,
    models: FirstSeen,
    /// Providers and operation names (small, stable sets).
    kinds: FirstSeen,
    users: TopK,
    sessions: TopK,
    detector: AnomalyDetector,
    boost: Option<Boost>,
    base: Arc<BaseRate>,
}

impl LlmObserver {
    pub fn new(
        cfg: &LlmConfig,
        metrics: Arc<Metrics>,
        boost: Option<Boost>,
        base: Arc<BaseRate>,
    ) -> Self {
        LlmObserver {
            metrics,
            services: FirstSeen::new(cfg.labels.max_services),
            models: FirstSeen::new(cfg.labels.max_models),
            kinds: FirstSeen::new(cfg.labels.max_models),
            users: TopK::new(cfg.labels.top_users),
            sessions: TopK::new(cfg.labels.top_sessions),
            detector: AnomalyDetector::new(cfg.anomaly.clone()),
            boost,
            base,
        }
    }

    /// Records one call of `service`; returns what it adds to its trace.
    pub fn observe(&self, service: &Arc<str>, call: &LlmCall, now: Instant) -> CallStats {
        let m = &self.metrics;
        let service = self.services.bound(service);
        let model = self.models.bound(&call.model);
        let (svc, mdl): (&str, &str) = (&service, &model);
        let status = if call.error { "error" } else { "ok" };
        m.llm_requests.with_label_values(&[svc, mdl, status]).inc();
        m.llm_tokens
            .with_label_values(&[svc, mdl, "input"])
            .inc_by(call.usage.input);
        m.llm_tokens
            .with_label_values(&[svc, mdl, "output"])
            .inc_by(call.usage.output);
        match call.cost_usd {
            Some(cost) => m.llm_cost.with_label_values(&[svc, mdl]).inc_by(cost),
            None => m.llm_unpriced.with_label_values(&[mdl]).inc(),
        }
        m.llm_latency
            .with_label_values(&[svc, mdl])
            .observe(call.latency_seconds);
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
            m.llm_anomalies
                .with_label_values(&[svc, mdl, kind.label()])
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

    /// `gen_ai.client.token.usage` and `gen_ai.client.operation.duration`.
    fn genai_metrics(&self, call: &LlmCall) {
        let bound = |v: &Option<Arc<str>>| v.as_ref().map(|v| self.kinds.bound(v));
        let operation = bound(&call.operation);
        let provider = bound(&call.provider);
        let request = self.models.bound(&call.request_model);
        let response = call.response_model.as_ref().map(|r| self.models.bound(r));
        let labels = [
            operation.as_deref().unwrap_or(""),
            provider.as_deref().unwrap_or(""),
            &request,
            response.as_deref().unwrap_or(""),
        ];
        let m = &self.metrics;
        for (ty, n) in [("input", call.usage.input), ("output", call.usage.output)] {
            m.genai_token_usage
                .with_label_values(&[labels[0], labels[1], labels[2], labels[3], ty])
                .observe(n as f64);
        }
        let error = call.error_type.as_ref().map(|e| self.kinds.bound(e));
        m.genai_duration
            .with_label_values(&[
                labels[0],
                labels[1],
                labels[2],
                labels[3],
                error.as_deref().unwrap_or(""),
            ])
            .observe(call.latency_seconds);
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
