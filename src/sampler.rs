//! The sampling decision: policies over a whole trace, then OpenTelemetry consistent
//! probability sampling on the trace id.

use crate::config::{PolicyConfig, PolicyType, SamplingConfig};
use crate::otlp::TraceId;
use crate::otlp::tracestate::Threshold;

/// What a trace looked like, accumulated span by span as it arrives.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TraceSummary {
    pub min_start_ns: u64,
    pub max_end_ns: u64,
    pub has_error: bool,
    /// The largest `llm.latency_ms` attribute seen on any span.
    pub max_llm_latency_ms: f64,
    /// Sum of the trace's known LLM call costs.
    pub cost_usd: f64,
}

impl Default for TraceSummary {
    fn default() -> Self {
        TraceSummary {
            min_start_ns: u64::MAX,
            max_end_ns: 0,
            has_error: false,
            max_llm_latency_ms: 0.0,
            cost_usd: 0.0,
        }
    }
}

impl TraceSummary {
    pub fn add_span(
        &mut self,
        start_ns: u64,
        end_ns: u64,
        error: bool,
        llm_latency_ms: Option<f64>,
        cost_usd: Option<f64>,
    ) {
        self.min_start_ns = self.min_start_ns.min(start_ns);
        self.max_end_ns = self.max_end_ns.max(end_ns);
        self.has_error |= error;
        if let Some(ms) = llm_latency_ms {
            self.max_llm_latency_ms = self.max_llm_latency_ms.max(ms);
        }
        self.cost_usd += cost_usd.unwrap_or(0.0);
    }

    /// Max end − min start over the trace.
    pub fn duration_ms(&self) -> f64 {
        self.max_end_ns.saturating_sub(self.min_start_ns) as f64 / 1e6
    }
}

/// A policy's test on a trace summary.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rule {
    Error,
    Latency { threshold_ms: f64 },
    Cost { threshold_usd: f64 },
}

impl Rule {
    fn matches(&self, s: &TraceSummary) -> bool {
        match *self {
            Rule::Error => s.has_error,
            Rule::Latency { threshold_ms } => {
                s.duration_ms() >= threshold_ms || s.max_llm_latency_ms >= threshold_ms
            }
            Rule::Cost { threshold_usd } => s.cost_usd >= threshold_usd,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Policy {
    pub name: String,
    pub rule: Rule,
    pub threshold: Threshold,
}

impl Policy {
    pub fn from_config(cfg: &PolicyConfig) -> Policy {
        let rule = match cfg.kind {
            PolicyType::Error => Rule::Error,
            PolicyType::Latency => Rule::Latency {
                threshold_ms: cfg.threshold_ms.unwrap_or(f64::INFINITY),
            },
            PolicyType::Cost => Rule::Cost {
                threshold_usd: cfg.threshold_usd.unwrap_or(f64::INFINITY),
            },
        };
        Policy {
            name: cfg.name.clone(),
            rule,
            threshold: Threshold::from_probability(cfg.rate),
        }
    }
}

/// Which rule set the probability of a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecidedBy {
    /// Index into the sampler's policies.
    Policy(usize),
    BaseRate,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub keep: bool,
    pub by: DecidedBy,
    /// The threshold the decision used; kept spans carry it as `ot=th:`.
    pub threshold: Threshold,
}

#[derive(Debug, Clone)]
pub struct Sampler {
    policies: Vec<Policy>,
    base: Threshold,
}

impl Sampler {
    pub fn new(cfg: &SamplingConfig) -> Sampler {
        Sampler {
            policies: cfg.policies.iter().map(Policy::from_config).collect(),
            base: Threshold::from_probability(cfg.base_rate),
        }
    }

    /// Keep with p = the highest rate among the matching policies (the first such policy
    /// names the decision), or p = base_rate when none matches; keep iff R ≥ T(p).
    pub fn decide(&self, trace_id: &TraceId, summary: &TraceSummary) -> Decision {
        let mut best: Option<(usize, Threshold)> = None;
        for (i, p) in self.policies.iter().enumerate() {
            if p.rule.matches(summary) && best.is_none_or(|(_, t)| p.threshold < t) {
                best = Some((i, p.threshold));
            }
        }
        let (by, threshold) = match best {
            Some((i, t)) => (DecidedBy::Policy(i), t),
            None => (DecidedBy::BaseRate, self.base),
        };
        Decision {
            keep: threshold.keeps(trace_id.randomness()),
            by,
            threshold,
        }
    }

    /// The `policy` label of `llmtail_traces_total`.
    pub fn label(&self, by: DecidedBy) -> &str {
        match by {
            DecidedBy::Policy(i) => &self.policies[i].name,
            DecidedBy::BaseRate => "base_rate",
        }
    }

    pub fn policy_names(&self) -> impl Iterator<Item = &str> {
        self.policies
            .iter()
            .map(|p| p.name.as_str())
            .chain(std::iter::once("base_rate"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn sampler(yaml: &str) -> Sampler {
        let cfg = Config::parse(&format!(
            "exporter:\n  file:\n    path: x\nsampling:\n{yaml}"
        ))
        .unwrap();
        Sampler::new(&cfg.sampling)
    }

    fn trace_with_r(r: u64) -> TraceId {
        let mut id = [0xabu8; 16];
        id[9..].copy_from_slice(&r.to_be_bytes()[1..]);
        TraceId(id)
    }

    const POLICIES: &str = "  base_rate: 0.25
  policies:
    - {name: errors, type: error}
    - {name: slow, type: latency, threshold_ms: 5000}
    - {name: expensive, type: cost, threshold_usd: 0.1, rate: 0.5}
";

    #[test]
    fn base_rate_is_consistent_on_trace_randomness() {
        let s = sampler(POLICIES);
        let t = Threshold::from_probability(0.25).value();
        let normal = TraceSummary::default();
        let kept = s.decide(&trace_with_r(t), &normal);
        assert!(kept.keep);
        assert_eq!(kept.by, DecidedBy::BaseRate);
        assert!(!s.decide(&trace_with_r(t - 1), &normal).keep);
    }

    #[test]
    fn policies_keep_and_highest_rate_wins() {
        let s = sampler(POLICIES);
        let low_r = trace_with_r(1);
        let mut err = TraceSummary::default();
        err.add_span(0, 1, true, None, None);
        let d = s.decide(&low_r, &err);
        assert!(d.keep);
        assert_eq!(s.label(d.by), "errors");
        assert_eq!(d.threshold, Threshold::ALWAYS);

        let mut slow = TraceSummary::default();
        slow.add_span(0, 1, false, Some(6000.0), None);
        assert_eq!(s.label(s.decide(&low_r, &slow).by), "slow");
        let mut slow_by_duration = TraceSummary::default();
        slow_by_duration.add_span(1_000, 5_000_001_000, false, None, None);
        assert_eq!(s.label(s.decide(&low_r, &slow_by_duration).by), "slow");

        // expensive has rate 0.5: kept only when R ≥ 2^55.
        let mut pricey = TraceSummary::default();
        pricey.add_span(0, 1, false, None, Some(0.2));
        let d = s.decide(&low_r, &pricey);
        assert_eq!((d.keep, s.label(d.by)), (false, "expensive"));
        assert!(s.decide(&trace_with_r(1 << 55), &pricey).keep);

        // Matching both expensive (0.5) and errors (1.0): errors sets p.
        pricey.add_span(0, 1, true, None, None);
        assert_eq!(s.label(s.decide(&low_r, &pricey).by), "errors");
    }
}
