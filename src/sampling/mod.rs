//! The sampling decision: policies over a whole trace, then OpenTelemetry consistent
//! probability sampling on the trace id.

pub mod adaptive;
pub mod condition;
pub mod config;
pub mod dynamic;

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::otlp::TraceId;
use crate::otlp::tracestate::Threshold;
use crate::sampling::adaptive::BaseRate;
use config::{
    DEFAULT_MAX_SESSIONS, DEFAULT_SESSION_WINDOW, PolicyConfig, PolicyType, SamplingConfig,
};

/// What one LLM call adds to its trace, once counted.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CallStats {
    pub latency_attr_ms: Option<f64>,
    pub cost_usd: Option<f64>,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub anomalous: bool,
    /// The boosted base probability of the call's service, if boosted.
    pub boost: Option<f64>,
}

/// What a trace looked like, accumulated span by span as it arrives.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceSummary {
    pub min_start_ns: u64,
    pub max_end_ns: u64,
    pub has_error: bool,
    pub has_anomaly: bool,
    /// The largest `llm.latency_ms` attribute seen on any span.
    pub max_llm_latency_ms: f64,
    /// Sum of the trace's known LLM call costs.
    pub cost_usd: f64,
    pub calls: u32,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// The highest boosted base probability among the trace's LLM calls (0: none).
    pub boost: f64,
    /// The first user and session id any span named.
    pub user: Option<Arc<str>>,
    pub session: Option<Arc<str>>,
    /// Spans added.
    pub spans: u32,
    /// Span-level condition tests some span passed (bits of [`condition::SpanTests`]).
    pub matched: u64,
    /// The generation of the tests `matched` comes from (0: none yet).
    pub tests_generation: u64,
    /// The explicit randomness value (`ot=rv:`) the first span carrying one gave: the
    /// trace's R instead of its trace id's bits.
    pub rv: Option<u64>,
    /// The dynamic policy's key parts its spans supplied.
    pub key: Option<condition::KeyValues>,
}

impl Default for TraceSummary {
    fn default() -> Self {
        TraceSummary {
            min_start_ns: u64::MAX,
            max_end_ns: 0,
            has_error: false,
            has_anomaly: false,
            max_llm_latency_ms: 0.0,
            cost_usd: 0.0,
            calls: 0,
            input_tokens: 0,
            output_tokens: 0,
            boost: 0.0,
            user: None,
            session: None,
            spans: 0,
            matched: 0,
            tests_generation: 0,
            rv: None,
            key: None,
        }
    }
}

impl TraceSummary {
    /// Adds one span's times, error, user and session (its LLM call is counted when the
    /// trace is decided, through [`TraceSummary::count`]).
    pub fn add_span(
        &mut self,
        (start_ns, end_ns): (u64, u64),
        error: bool,
        user: Option<Arc<str>>,
        session: Option<Arc<str>>,
    ) {
        self.spans = self.spans.saturating_add(1);
        self.min_start_ns = self.min_start_ns.min(start_ns);
        self.max_end_ns = self.max_end_ns.max(end_ns);
        self.has_error |= error;
        if self.user.is_none() {
            self.user = user;
        }
        if self.session.is_none() {
            self.session = session;
        }
    }

    /// Adds one counted LLM call (`call`: whether it is a call, or usage alone).
    pub fn count(&mut self, c: &CallStats, call: bool) {
        if call {
            self.calls = self.calls.saturating_add(1);
        }
        self.input_tokens = self.input_tokens.saturating_add(c.input_tokens);
        self.output_tokens = self.output_tokens.saturating_add(c.output_tokens);
        self.cost_usd += c.cost_usd.unwrap_or(0.0);
        self.has_anomaly |= c.anomalous;
        if let Some(ms) = c.latency_attr_ms {
            self.max_llm_latency_ms = self.max_llm_latency_ms.max(ms);
        }
        self.boost = self.boost.max(c.boost.unwrap_or(0.0));
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
    Latency {
        threshold_ms: f64,
    },
    Cost {
        threshold_usd: f64,
    },
    Anomaly,
    /// Matched through the session keeper, not the summary alone.
    Session,
    /// The sampler's condition of this index.
    Condition(usize),
    /// A drop policy's condition of this index: a trace it matches is dropped.
    Drop(usize),
    /// The dynamic policy: sets p for traces no other policy keeps.
    Dynamic,
}

impl Rule {
    fn matches(&self, s: &TraceSummary) -> bool {
        match *self {
            Rule::Error => s.has_error,
            Rule::Latency { threshold_ms } => {
                s.duration_ms() >= threshold_ms || s.max_llm_latency_ms >= threshold_ms
            }
            Rule::Cost { threshold_usd } => s.cost_usd >= threshold_usd,
            Rule::Anomaly => s.has_anomaly,
            Rule::Session | Rule::Condition(_) | Rule::Drop(_) | Rule::Dynamic => false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Policy {
    pub name: &'static str,
    /// The name's process-wide id.
    pub id: u16,
    pub rule: Rule,
    pub threshold: Threshold,
}

impl Policy {
    /// The policy; a condition is compiled into `conditions` (its rule names the index).
    pub fn from_config(
        cfg: &PolicyConfig,
        compiler: &mut condition::Compiler,
        conditions: &mut Vec<condition::Condition>,
    ) -> Policy {
        let mut compiled = || {
            // Validated before a sampler is built; a condition that does not compile
            // matches nothing.
            let c = cfg
                .condition
                .as_ref()
                .and_then(|c| compiler.compile(c).ok())
                .unwrap_or(condition::Condition::Any(Vec::new()));
            conditions.push(c);
            conditions.len() - 1
        };
        let rule = match cfg.kind {
            PolicyType::Condition => Rule::Condition(compiled()),
            PolicyType::Dynamic => {
                if let Some(key) = &cfg.key {
                    // Validated before a sampler is built.
                    let _ = compiler.compile_key(key);
                }
                Rule::Dynamic
            }
            PolicyType::Drop => Rule::Drop(compiled()),
            PolicyType::Error => Rule::Error,
            PolicyType::Latency => Rule::Latency {
                threshold_ms: cfg.threshold_ms.unwrap_or(f64::INFINITY),
            },
            PolicyType::Cost => Rule::Cost {
                threshold_usd: cfg.threshold_usd.unwrap_or(f64::INFINITY),
            },
            PolicyType::Anomaly => Rule::Anomaly,
            PolicyType::Session => Rule::Session,
        };
        let (name, id) = intern(&cfg.name);
        Policy {
            name,
            id,
            rule,
            threshold: Threshold::from_probability(cfg.rate),
        }
    }
}

/// Which rule set the probability of a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecidedBy {
    /// The policy's name (interned: a decision keeps its label across config reloads).
    Policy(&'static str),
    /// A service of the trace was boosted above the base rate.
    Boost,
    BaseRate,
}

impl DecidedBy {
    /// The `policy` label of `llmtail_traces_total`.
    pub fn label(self) -> &'static str {
        match self {
            DecidedBy::Policy(name) => name,
            DecidedBy::Boost => "boost",
            DecidedBy::BaseRate => "base_rate",
        }
    }
}

/// Policy names live for the whole process, each distinct name stored once with an id, so
/// decisions made before a config reload keep a valid label after it, and the decision
/// cache remembers a policy in two bytes.
#[derive(Default)]
struct Names {
    ids: HashMap<&'static str, u16>,
    names: Vec<&'static str>,
}

static NAMES: std::sync::OnceLock<Mutex<Names>> = std::sync::OnceLock::new();

/// Ids below this are [`DecidedBy::BaseRate`] and [`DecidedBy::Boost`].
const FIRST_POLICY_ID: u16 = 2;

fn intern(name: &str) -> (&'static str, u16) {
    let mut names = NAMES.get_or_init(Default::default).lock();
    if let Some((n, id)) = names.ids.get_key_value(name) {
        return (n, *id);
    }
    let n: &'static str = Box::leak(name.to_owned().into_boxed_str());
    // Past 65,533 distinct names over a process's life (reload after reload), later ones
    // share the last id: their cached decisions show that name.
    let id = (names.names.len() as u16).saturating_add(FIRST_POLICY_ID);
    names.names.push(n);
    names.ids.insert(n, id);
    (n, id)
}

impl DecidedBy {
    /// A small id for the decision cache.
    pub fn id(self, policies: &[Policy]) -> u16 {
        match self {
            DecidedBy::BaseRate => 0,
            DecidedBy::Boost => 1,
            DecidedBy::Policy(name) => policies
                .iter()
                .find(|p| std::ptr::eq(p.name, name))
                .map_or(FIRST_POLICY_ID, |p| p.id),
        }
    }

    /// The id of a decision by its label (a decision handed over by another replica).
    pub fn id_of_label(label: &str) -> u16 {
        match label {
            "base_rate" => 0,
            "boost" => 1,
            name => intern(name).1,
        }
    }

    /// The decision an id stands for.
    pub fn from_id(id: u16) -> DecidedBy {
        match id {
            0 => DecidedBy::BaseRate,
            1 => DecidedBy::Boost,
            id => {
                let names = NAMES.get_or_init(Default::default).lock();
                let i = usize::from(id - FIRST_POLICY_ID).min(names.names.len().saturating_sub(1));
                names
                    .names
                    .get(i)
                    .map_or(DecidedBy::BaseRate, |n| DecidedBy::Policy(n))
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub keep: bool,
    pub by: DecidedBy,
    /// The threshold the decision used; kept spans carry it as `ot=th:`.
    pub threshold: Threshold,
    /// `sampling.dry_run`: the trace is exported whatever `keep` says.
    pub dry_run: bool,
    /// `by`'s id ([`DecidedBy::from_id`]).
    pub by_id: u16,
}

impl Decision {
    /// Whether its spans are exported: kept, or in a dry run.
    pub fn exports(&self) -> bool {
        self.keep || self.dry_run
    }

    /// The threshold exported spans carry: in a dry run every trace is exported, so p = 1.
    pub fn export_threshold(&self) -> Threshold {
        if self.dry_run {
            Threshold::ALWAYS
        } else {
            self.threshold
        }
    }

    /// The probability it kept (or would have kept) the trace with.
    pub fn probability(&self) -> f64 {
        self.threshold.probability()
    }
}

/// Sessions marked by a trigger policy's keep, each until its window ends. Bounded: when
/// full, expired sessions are forgotten first, then the one closest to expiry.
struct SessionKeeper {
    policy: usize,
    triggers: Vec<usize>,
    window: Duration,
    max: usize,
    hot: Mutex<HashMap<u64, Instant>>,
}

fn session_key(session: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    session.hash(&mut h);
    h.finish()
}

impl SessionKeeper {
    fn mark(&self, session: &str, now: Instant) {
        let mut hot = self.hot.lock();
        if hot.len() >= self.max {
            hot.retain(|_, until| *until > now);
            if hot.len() >= self.max
                && let Some(soonest) = hot.iter().min_by_key(|(_, until)| **until).map(|(k, _)| *k)
            {
                hot.remove(&soonest);
            }
        }
        hot.insert(session_key(session), now + self.window);
    }

    fn is_hot(&self, session: &str, now: Instant) -> bool {
        self.hot
            .lock()
            .get(&session_key(session))
            .is_some_and(|until| *until > now)
    }
}

/// Decisions since the last look, for the target-throughput controller.
#[derive(Debug, Default)]
pub struct DecisionCounts {
    /// Traces kept by a policy (which the base rate does not control).
    pub policy_kept: AtomicU64,
    /// Traces left to the base rate (or a boost).
    pub eligible: AtomicU64,
}

pub struct Sampler {
    policies: Vec<Policy>,
    conditions: Vec<condition::Condition>,
    span_tests: Arc<condition::SpanTests>,
    dry_run: bool,
    /// The dynamic policy (its index in `policies`), if there is one.
    dynamic: Option<(usize, Arc<dynamic::Dynamic>)>,
    base: Arc<BaseRate>,
    sessions: Option<SessionKeeper>,
    pub counts: Arc<DecisionCounts>,
}

impl Sampler {
    pub fn new(cfg: &SamplingConfig, base: Arc<BaseRate>) -> Sampler {
        let mut compiler = condition::Compiler::default();
        let mut conditions = Vec::new();
        let policies: Vec<Policy> = cfg
            .policies
            .iter()
            .map(|p| Policy::from_config(p, &mut compiler, &mut conditions))
            .collect();
        let span_tests = compiler.finish();
        let dynamic = cfg
            .policies
            .iter()
            .position(|p| p.kind == PolicyType::Dynamic)
            .map(|i| {
                let p = &cfg.policies[i];
                (
                    i,
                    Arc::new(dynamic::Dynamic::new(
                        p.goal_rate.unwrap_or(10.0),
                        p.window.map_or(dynamic::DEFAULT_WINDOW, |w| w.0),
                        p.max_keys.unwrap_or(dynamic::DEFAULT_MAX_KEYS),
                    )),
                )
            });
        let sessions = cfg
            .policies
            .iter()
            .position(|p| p.kind == PolicyType::Session)
            .map(|i| {
                let p = &cfg.policies[i];
                let triggers = match &p.triggers {
                    Some(names) => names
                        .iter()
                        .filter_map(|n| policies.iter().position(|q| q.name == n))
                        .collect(),
                    None => (0..policies.len())
                        .filter(|j| policies[*j].rule != Rule::Session)
                        .collect(),
                };
                SessionKeeper {
                    policy: i,
                    triggers,
                    window: p.window.map_or(DEFAULT_SESSION_WINDOW, |w| w.0),
                    max: p.max_sessions.unwrap_or(DEFAULT_MAX_SESSIONS),
                    hot: Mutex::new(HashMap::new()),
                }
            });
        Sampler {
            policies,
            conditions,
            span_tests,
            dry_run: cfg.dry_run,
            dynamic,
            base,
            sessions,
            counts: Arc::default(),
        }
    }

    /// The dynamic policy's name and per-key probabilities in force, for its gauge.
    pub fn dynamic_snapshot(&self) -> Option<(&'static str, dynamic::KeyProbabilities)> {
        self.dynamic
            .as_ref()
            .map(|(i, d)| (self.policies[*i].name, d.snapshot()))
    }

    /// The span-level tests of the conditions, which ingest runs on every span.
    pub fn span_tests(&self) -> &Arc<condition::SpanTests> {
        &self.span_tests
    }

    fn matches(&self, rule: &Rule, s: &TraceSummary) -> bool {
        match *rule {
            Rule::Condition(i) | Rule::Drop(i) => self.conditions[i].matches(s),
            ref other => other.matches(s),
        }
    }

    /// Keep with p = the highest rate among the matching policies (the first such policy
    /// names the decision), or — none matching — p = the base rate (raised by a boost of a
    /// service in the trace); keep iff R ≥ T(p). A keep by a session trigger marks the
    /// trace's session, so its other traces decided within the window are kept too.
    pub fn decide(&self, trace_id: &TraceId, summary: &TraceSummary, now: Instant) -> Decision {
        // A drop policy wins over everything else.
        if let Some(p) = self
            .policies
            .iter()
            .find(|p| matches!(p.rule, Rule::Drop(_)) && self.matches(&p.rule, summary))
        {
            return Decision {
                keep: false,
                by: DecidedBy::Policy(p.name),
                threshold: Threshold::NEVER,
                dry_run: self.dry_run,
                by_id: p.id,
            };
        }
        let mut best: Option<(usize, Threshold)> = None;
        for (i, p) in self.policies.iter().enumerate() {
            if matches!(p.rule, Rule::Drop(_) | Rule::Dynamic) {
                continue;
            }
            if self.matches(&p.rule, summary) && best.is_none_or(|(_, t)| p.threshold < t) {
                best = Some((i, p.threshold));
            }
        }
        if best.is_none()
            && let (Some(keeper), Some(session)) = (&self.sessions, &summary.session)
            && keeper.is_hot(session, now)
        {
            best = Some((keeper.policy, self.policies[keeper.policy].threshold));
        }
        let (by, threshold) = match best {
            Some((i, t)) => (DecidedBy::Policy(self.policies[i].name), t),
            None if let Some((i, d)) = &self.dynamic => {
                let key = self.span_tests.key(summary.key.as_ref(), summary.has_error);
                let p = d.probability(&key, now);
                if summary.boost > p {
                    (DecidedBy::Boost, Threshold::from_probability(summary.boost))
                } else {
                    (
                        DecidedBy::Policy(self.policies[*i].name),
                        Threshold::from_probability(p),
                    )
                }
            }
            None => {
                let base = self.base.get();
                if summary.boost > base {
                    (DecidedBy::Boost, Threshold::from_probability(summary.boost))
                } else {
                    (DecidedBy::BaseRate, Threshold::from_probability(base))
                }
            }
        };
        let keep = threshold.keeps(summary.rv.unwrap_or_else(|| trace_id.randomness()));
        match (by, best) {
            (DecidedBy::Policy(_), Some((i, _))) => {
                if keep {
                    self.counts.policy_kept.fetch_add(1, Ordering::Relaxed);
                }
                if keep
                    && let (Some(keeper), Some(session)) = (&self.sessions, &summary.session)
                    && keeper.triggers.contains(&i)
                {
                    keeper.mark(session, now);
                }
            }
            _ => {
                self.counts.eligible.fetch_add(1, Ordering::Relaxed);
            }
        }
        Decision {
            keep,
            by,
            threshold,
            dry_run: self.dry_run,
            by_id: by.id(&self.policies),
        }
    }

    /// A sampler for a reloaded config that carries on from this one: the same base rate
    /// and decision counts, and the sessions marked hot so far.
    pub fn reconfigured(&self, cfg: &SamplingConfig) -> Sampler {
        let mut next = Sampler::new(cfg, self.base.clone());
        next.counts = self.counts.clone();
        if let (Some(old), Some(new)) = (&self.sessions, &mut next.sessions) {
            *new.hot.get_mut() = old.hot.lock().clone();
        }
        // The dynamic policy carries on with its counts and rates when its settings are
        // unchanged (a reload would otherwise keep every key at p = 1 for a window).
        if let (Some((_, old)), Some((_, new))) = (&self.dynamic, &mut next.dynamic)
            && old.same_settings(new)
        {
            *new = old.clone();
        }
        next
    }

    pub fn base(&self) -> &Arc<BaseRate> {
        &self.base
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
        Sampler::new(
            &cfg.sampling,
            Arc::new(BaseRate::new(cfg.sampling.base_rate)),
        )
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
    - {name: odd, type: anomaly}
    - {name: session, type: session, window: 1m, triggers: [errors, odd]}
";

    fn with(f: impl FnOnce(&mut TraceSummary)) -> TraceSummary {
        let mut s = TraceSummary::default();
        s.add_span((0, 1), false, None, None);
        f(&mut s);
        s
    }

    /// A summary with one counted LLM call.
    fn call(f: impl FnOnce(&mut CallStats)) -> TraceSummary {
        let mut c = CallStats::default();
        f(&mut c);
        with(|s| s.count(&c, true))
    }

    #[test]
    fn base_rate_is_consistent_on_trace_randomness() {
        let s = sampler(POLICIES);
        let t = Threshold::from_probability(0.25).value();
        let now = Instant::now();
        let normal = TraceSummary::default();
        let kept = s.decide(&trace_with_r(t), &normal, now);
        assert!(kept.keep);
        assert_eq!(kept.by, DecidedBy::BaseRate);
        assert!(!s.decide(&trace_with_r(t - 1), &normal, now).keep);
    }

    #[test]
    fn policies_keep_and_highest_rate_wins() {
        let s = sampler(POLICIES);
        let now = Instant::now();
        let low_r = trace_with_r(1);
        let d = s.decide(&low_r, &with(|x| x.has_error = true), now);
        assert!(d.keep);
        assert_eq!((d.by).label(), "errors");
        assert_eq!(d.threshold, Threshold::ALWAYS);
        let slow = call(|c| c.latency_attr_ms = Some(6000.0));
        assert_eq!((s.decide(&low_r, &slow, now).by).label(), "slow");
        let slow_by_duration = with(|x| x.add_span((1_000, 5_000_001_000), false, None, None));
        assert_eq!(
            (s.decide(&low_r, &slow_by_duration, now).by).label(),
            "slow"
        );
        let odd = call(|c| c.anomalous = true);
        assert_eq!((s.decide(&low_r, &odd, now).by).label(), "odd");

        // expensive has rate 0.5: kept only when R ≥ 2^55.
        let mut pricey = call(|c| c.cost_usd = Some(0.2));
        let d = s.decide(&low_r, &pricey, now);
        assert_eq!((d.keep, (d.by).label()), (false, "expensive"));
        assert!(s.decide(&trace_with_r(1 << 55), &pricey, now).keep);
        // Matching both expensive (0.5) and errors (1.0): errors sets p.
        pricey.add_span((0, 1), true, None, None);
        assert_eq!((s.decide(&low_r, &pricey, now).by).label(), "errors");
    }

    #[test]
    fn a_trigger_keep_keeps_the_sessions_other_traces_within_the_window() {
        let s = sampler(POLICIES);
        let t0 = Instant::now();
        let low_r = trace_with_r(1);
        let in_session =
            |id: &str, error: bool| with(|x| x.add_span((0, 1), error, None, Some(Arc::from(id))));
        assert!(
            !s.decide(&low_r, &in_session("s1", false), t0).keep,
            "not hot yet"
        );
        assert!(s.decide(&low_r, &in_session("s1", true), t0).keep);
        let d = s.decide(
            &low_r,
            &in_session("s1", false),
            t0 + Duration::from_secs(30),
        );
        assert_eq!((d.keep, (d.by).label()), (true, "session"));
        assert!(
            !s.decide(&low_r, &in_session("s2", false), t0).keep,
            "another session"
        );
        assert!(
            !s.decide(
                &low_r,
                &in_session("s1", false),
                t0 + Duration::from_secs(61)
            )
            .keep,
            "window over"
        );
        // `expensive` is not a trigger of this session policy.
        let mut pricey = call(|c| c.cost_usd = Some(1.0));
        pricey.add_span((0, 1), false, None, Some(Arc::from("s3")));
        s.decide(&trace_with_r(u64::MAX >> 8), &pricey, t0);
        assert!(!s.decide(&low_r, &in_session("s3", false), t0).keep);
    }

    #[test]
    fn a_boost_raises_only_the_base_rate_and_stays_threshold_based() {
        let s = sampler(POLICIES);
        let now = Instant::now();
        let r = Threshold::from_probability(0.5).value();
        let boosted = call(|c| c.boost = Some(0.5));
        let d = s.decide(&trace_with_r(r), &boosted, now);
        assert_eq!((d.keep, d.by), (true, DecidedBy::Boost));
        assert!(!s.decide(&trace_with_r(r - 1), &boosted, now).keep);
        s.base().set(0.75);
        assert_eq!(
            s.decide(&trace_with_r(r), &boosted, now).by,
            DecidedBy::BaseRate,
            "a boost below the base does nothing"
        );
    }
}
