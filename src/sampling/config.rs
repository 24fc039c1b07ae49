//! `sampling:` — decision timing, policies, base rate and adaptive rates.

use std::time::Duration;

use serde::Deserialize;

use crate::sampling::adaptive::{BoostConfig, TargetConfig};
use crate::units::Dur;

/// Default bound on traces held at once; past it the oldest are decided early.
pub const DEFAULT_MAX_TRACES: usize = 100_000;
/// Default for `idle_timeout`: longer than the gap between an agent's steps (a step a
/// minute, exported up to 5 s after it ends by the SDKs' batch span processor).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Default for `max_trace_duration`: agent runs of ten minutes and more are decided whole.
pub const DEFAULT_MAX_TRACE_DURATION: Duration = Duration::from_secs(30 * 60);
/// Default number of remembered decisions (about 69 bytes each with hash-map overhead).
pub const DEFAULT_DECISION_CACHE_SIZE: usize = 1_000_000;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamplingConfig {
    /// Deprecated: read as `idle_timeout` when that is not set (with a warning).
    pub decision_wait: Option<Dur>,
    /// A trace without a root is decided once no span came for this long.
    pub idle_timeout: Option<Dur>,
    /// No trace is held longer than this after its first span.
    pub max_trace_duration: Dur,
    pub root_grace: Dur,
    pub base_rate: f64,
    pub policies: Vec<PolicyConfig>,
    pub max_traces: usize,
    pub decision_cache_size: usize,
    /// Opt-in: keep a service's traces at a higher rate while its calls fail or misbehave.
    pub boost: Option<BoostConfig>,
    /// Opt-in: steer the base rate so kept traces come to this many per second.
    pub target_kept_traces_per_second: Option<f64>,
    pub min_base_rate: f64,
    pub max_base_rate: f64,
    /// How often the target controller adjusts the base rate.
    pub target_interval: Dur,
    /// Export every trace; tag each root with what the decision would have been.
    pub dry_run: bool,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        let target = TargetConfig::default();
        SamplingConfig {
            decision_wait: None,
            idle_timeout: None,
            max_trace_duration: Dur(DEFAULT_MAX_TRACE_DURATION),
            root_grace: Dur(Duration::from_secs(1)),
            base_rate: 0.1,
            policies: Vec::new(),
            max_traces: DEFAULT_MAX_TRACES,
            decision_cache_size: DEFAULT_DECISION_CACHE_SIZE,
            boost: None,
            target_kept_traces_per_second: None,
            min_base_rate: target.min_base_rate,
            max_base_rate: target.max_base_rate,
            target_interval: target.interval,
            dry_run: false,
        }
    }
}

impl SamplingConfig {
    /// How long a trace without a root waits for its next span before it is decided.
    pub fn idle_timeout(&self) -> Duration {
        self.idle_timeout
            .or(self.decision_wait)
            .map_or(DEFAULT_IDLE_TIMEOUT, |d| d.0)
    }

    /// What a config still says in words this release reads but the next will not.
    pub fn deprecations(&self) -> Vec<(String, String)> {
        match (self.decision_wait, self.idle_timeout) {
            (Some(_), None) => vec![(
                "decision_wait".into(),
                "deprecated: traces are decided when they are finished; read as \
                 sampling.idle_timeout (time without a new span), rename it so; \
                 sampling.max_trace_duration bounds the whole hold"
                    .into(),
            )],
            (Some(_), Some(_)) => vec![(
                "decision_wait".into(),
                "deprecated and ignored: sampling.idle_timeout is set; remove it".into(),
            )],
            _ => Vec::new(),
        }
    }

    /// The target controller's settings, when a target is set.
    pub fn target(&self) -> Option<TargetConfig> {
        self.target_kept_traces_per_second.map(|t| TargetConfig {
            kept_traces_per_second: t,
            min_base_rate: self.min_base_rate,
            max_base_rate: self.max_base_rate,
            interval: self.target_interval,
        })
    }

    pub fn validate(&self) -> Vec<(String, String)> {
        let mut p = Vec::new();
        for (key, d) in [
            ("decision_wait", self.decision_wait),
            ("idle_timeout", self.idle_timeout),
            ("max_trace_duration", Some(self.max_trace_duration)),
        ] {
            if d.is_some_and(|d| d.0.is_zero()) {
                p.push((key.into(), "must be greater than 0".into()));
            }
        }
        if self.root_grace.0 > self.max_trace_duration.0 {
            p.push((
                "root_grace".into(),
                "must not be longer than max_trace_duration".into(),
            ));
        }
        if !(0.0..=1.0).contains(&self.base_rate) {
            p.push((
                "base_rate".into(),
                format!("must be between 0 and 1, got {}", self.base_rate),
            ));
        }
        if self.max_traces == 0 {
            p.push(("max_traces".into(), "must be at least 1".into()));
        }
        if let Some(target) = self.target() {
            for (key, msg) in target.validate() {
                let key = match key.as_str() {
                    "kept_traces_per_second" => "target_kept_traces_per_second".to_owned(),
                    "interval" => "target_interval".to_owned(),
                    other => other.to_owned(),
                };
                p.push((key, msg));
            }
        }
        if let Some(boost) = &self.boost {
            p.extend(
                boost
                    .validate()
                    .into_iter()
                    .map(|(k, m)| (format!("boost.{k}"), m)),
            );
        }
        // All conditions share one compiler: together they hold at most 64 span-level
        // tests and 10 span attribute keys.
        let mut compiler = super::condition::Compiler::default();
        for (i, policy) in self.policies.iter().enumerate() {
            for (key, msg) in policy.validate() {
                p.push((format!("policies[{i}].{key}"), msg));
            }
            if let Some(c) = &policy.condition
                && let Err(problems) = compiler.compile(c)
            {
                for (key, msg) in problems {
                    let key = if key == "condition" {
                        key
                    } else {
                        format!("condition.{key}")
                    };
                    p.push((format!("policies[{i}].{key}"), msg));
                }
            }
            if let Some(key) = &policy.key
                && let Err(problems) = compiler.compile_key(key)
            {
                for (key, msg) in problems {
                    p.push((format!("policies[{i}].{key}"), msg));
                }
            }
            if policy.kind == PolicyType::Drop && policy.rate != 1.0 {
                p.push((
                    format!("policies[{i}].rate"),
                    "does not apply to a drop policy (it drops every trace it matches)".into(),
                ));
            }
            if policy.kind == PolicyType::Dynamic {
                if policy.rate != 1.0 {
                    p.push((
                        format!("policies[{i}].rate"),
                        "does not apply to a dynamic policy (goal_rate sets its rates)".into(),
                    ));
                }
                if let Some(g) = policy.goal_rate
                    && !(g.is_finite() && g >= 1.0)
                {
                    p.push((
                        format!("policies[{i}].goal_rate"),
                        format!("must be a number ≥ 1 (keep 1 in goal_rate), got {g}"),
                    ));
                }
                if policy.max_keys == Some(0) {
                    p.push((
                        format!("policies[{i}].max_keys"),
                        "must be at least 1".into(),
                    ));
                }
                if self.policies[..i]
                    .iter()
                    .any(|q| q.kind == PolicyType::Dynamic)
                {
                    p.push((
                        format!("policies[{i}].type"),
                        "only one dynamic policy may be configured".into(),
                    ));
                }
            }
            if self.policies[..i]
                .iter()
                .any(|other| other.name == policy.name)
            {
                p.push((
                    format!("policies[{i}].name"),
                    format!("duplicate policy name {:?}", policy.name),
                ));
            }
            for trigger in policy.triggers.iter().flatten() {
                let known = self.policies.iter().find(|q| &q.name == trigger);
                if !known.is_some_and(|q| q.kind.can_trigger_session()) {
                    p.push((
                        format!("policies[{i}].triggers"),
                        format!("{trigger:?} is not an error, anomaly, latency, cost or condition policy of this list"),
                    ));
                }
            }
        }
        p
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyType {
    /// Any span with status ERROR or an `exception` event.
    Error,
    /// Trace duration, or any span's `llm.latency_ms`, at or above `threshold_ms`.
    Latency,
    /// Sum of the trace's LLM call costs at or above `threshold_usd`.
    Cost,
    /// An LLM call of the trace was anomalous (latency, cost or tokens).
    Anomaly,
    /// Another trace of the same session was kept by a trigger policy within `window`.
    Session,
    /// `condition` matches the trace (attributes, resource, scope, name, kind, status,
    /// duration, span count, LLM totals).
    Condition,
    /// `condition` matches: the trace is dropped, whatever else matches.
    Drop,
    /// Sets p per trace key for traces no other policy keeps (about 1 in `goal_rate`).
    Dynamic,
}

impl PolicyType {
    fn can_trigger_session(self) -> bool {
        !matches!(
            self,
            PolicyType::Session | PolicyType::Drop | PolicyType::Dynamic
        )
    }

    /// The optional keys this type takes, and whether each is required.
    fn keys(self) -> &'static [(&'static str, bool)] {
        match self {
            PolicyType::Error | PolicyType::Anomaly => &[],
            PolicyType::Latency => &[("threshold_ms", true)],
            PolicyType::Cost => &[("threshold_usd", true)],
            PolicyType::Session => &[
                ("window", false),
                ("triggers", false),
                ("max_sessions", false),
            ],
            PolicyType::Condition | PolicyType::Drop => &[("condition", true)],
            PolicyType::Dynamic => &[
                ("key", true),
                ("goal_rate", true),
                ("window", false),
                ("max_keys", false),
            ],
        }
    }
}

/// Default `window` of a session policy.
pub const DEFAULT_SESSION_WINDOW: Duration = Duration::from_secs(300);
/// Default `max_sessions` of a session policy.
pub const DEFAULT_MAX_SESSIONS: usize = 100_000;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: PolicyType,
    pub threshold_ms: Option<f64>,
    pub threshold_usd: Option<f64>,
    #[serde(default = "full_rate")]
    pub rate: f64,
    /// Session policy: how long after a trigger the session's traces are kept.
    pub window: Option<Dur>,
    /// Session policy: the policies whose keeps mark a session (default: all others).
    pub triggers: Option<Vec<String>>,
    /// Session policy: sessions remembered at once.
    pub max_sessions: Option<usize>,
    /// Condition and drop policies: what a trace must match.
    pub condition: Option<super::condition::ConditionConfig>,
    /// Dynamic policy: the trace fields its key is made of.
    pub key: Option<Vec<super::dynamic::KeyPartConfig>>,
    /// Dynamic policy: keep about 1 in this many traces.
    pub goal_rate: Option<f64>,
    /// Dynamic policy: keys given their own probability (the rest share `other`).
    pub max_keys: Option<usize>,
}

fn full_rate() -> f64 {
    1.0
}

impl PolicyConfig {
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut p = Vec::new();
        if self.name.trim().is_empty() {
            p.push(("name".into(), "must not be empty".into()));
        }
        if !(0.0..=1.0).contains(&self.rate) {
            p.push((
                "rate".into(),
                format!("must be between 0 and 1, got {}", self.rate),
            ));
        }
        let kind = format!("{:?}", self.kind).to_lowercase();
        let present = [
            ("threshold_ms", self.threshold_ms.is_some()),
            ("threshold_usd", self.threshold_usd.is_some()),
            ("window", self.window.is_some()),
            ("triggers", self.triggers.is_some()),
            ("max_sessions", self.max_sessions.is_some()),
            ("condition", self.condition.is_some()),
            ("key", self.key.is_some()),
            ("goal_rate", self.goal_rate.is_some()),
            ("max_keys", self.max_keys.is_some()),
        ];
        let takes = self.kind.keys();
        for (key, is_set) in present {
            match takes.iter().find(|(k, _)| *k == key) {
                None if is_set => {
                    p.push((key.into(), format!("does not apply to a {kind} policy")))
                }
                Some((_, true)) if !is_set => {
                    p.push((key.into(), format!("required for a {kind} policy")))
                }
                _ => {}
            }
        }
        for (key, v) in [
            ("threshold_ms", self.threshold_ms),
            ("threshold_usd", self.threshold_usd),
        ] {
            if let Some(v) = v
                && !(v.is_finite() && v >= 0.0)
            {
                p.push((key.into(), format!("must be a number ≥ 0, got {v}")));
            }
        }
        p
    }
}
