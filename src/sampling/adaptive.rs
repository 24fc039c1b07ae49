//! Adaptive sampling: the base probability a trace is kept with when no policy keeps it.
//!
//! - **Boost**: when a service's share of failed or anomalous LLM calls rises past
//!   `trigger_rate`, its traces are kept with `rate` for `cooldown`, then the boost decays
//!   linearly back to the base over `decay`.
//! - **Target throughput**: every `interval` the base rate is set so that policy keeps plus
//!   base-rate keeps come to `target_kept_traces_per_second`, smoothed and bounded by
//!   `min_base_rate`/`max_base_rate`.
//!
//! Both only move the probability; decisions stay threshold decisions on the trace id, so a
//! trace kept at a lower probability is kept at every higher one. With neither configured
//! the base rate is exactly `sampling.base_rate`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use serde::Deserialize;

use crate::units::Dur;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BoostConfig {
    /// Share of a service's LLM calls that failed or were anomalous, over about the last
    /// `window` calls, that starts a boost.
    pub trigger_rate: f64,
    pub window: u32,
    /// Calls a service must have made before it can be boosted.
    pub min_calls: u32,
    /// Base probability while boosted.
    pub rate: f64,
    pub cooldown: Dur,
    pub decay: Dur,
}

impl Default for BoostConfig {
    fn default() -> Self {
        BoostConfig {
            trigger_rate: 0.10,
            window: 100,
            min_calls: 20,
            rate: 1.0,
            cooldown: Dur(Duration::from_secs(300)),
            decay: Dur(Duration::from_secs(300)),
        }
    }
}

impl BoostConfig {
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut p = Vec::new();
        for (k, v) in [("trigger_rate", self.trigger_rate), ("rate", self.rate)] {
            if !(0.0..=1.0).contains(&v) {
                p.push((k.into(), format!("must be between 0 and 1, got {v}")));
            }
        }
        if self.window < 2 {
            p.push(("window".into(), "must be at least 2".into()));
        }
        p
    }
}

#[derive(Debug, Default)]
struct ServiceHealth {
    problem_rate: f64,
    calls: u32,
    boosted_at: Option<Instant>,
}

/// Per-service boost state.
pub struct Boost {
    cfg: BoostConfig,
    services: DashMap<Arc<str>, ServiceHealth>,
}

impl Boost {
    pub fn new(cfg: BoostConfig) -> Self {
        Boost {
            cfg,
            services: DashMap::new(),
        }
    }

    /// Records one LLM call of `service`; `problem` when it failed or was anomalous.
    pub fn record(&self, service: &Arc<str>, problem: bool, now: Instant) {
        let mut h = self.services.entry(service.clone()).or_default();
        let alpha = if h.calls < self.cfg.window {
            1.0 / f64::from(h.calls + 1)
        } else {
            2.0 / (f64::from(self.cfg.window) + 1.0)
        };
        h.problem_rate += alpha * (f64::from(u8::from(problem)) - h.problem_rate);
        h.calls = h.calls.saturating_add(1);
        if h.calls >= self.cfg.min_calls && h.problem_rate >= self.cfg.trigger_rate {
            h.boosted_at = Some(now);
        }
    }

    /// The boosted probability of `service` now, if it is boosted above `base`.
    pub fn probability(&self, service: &str, base: f64, now: Instant) -> Option<f64> {
        let at = self.services.get(service)?.boosted_at?;
        let since = now.saturating_duration_since(at);
        let (cooldown, decay) = (self.cfg.cooldown.0, self.cfg.decay.0);
        let p = if since <= cooldown {
            self.cfg.rate
        } else if since < cooldown + decay {
            let left = 1.0 - (since - cooldown).as_secs_f64() / decay.as_secs_f64();
            base + (self.cfg.rate - base) * left
        } else {
            return None;
        };
        (p > base).then_some(p)
    }

    /// Every service seen, for the `llmtail_sampling_probability` gauge.
    pub fn services(&self) -> Vec<Arc<str>> {
        self.services.iter().map(|e| e.key().clone()).collect()
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TargetConfig {
    pub kept_traces_per_second: f64,
    pub min_base_rate: f64,
    pub max_base_rate: f64,
    /// How often the base rate is adjusted.
    pub interval: Dur,
}

impl Default for TargetConfig {
    fn default() -> Self {
        TargetConfig {
            kept_traces_per_second: 100.0,
            min_base_rate: 0.0001,
            max_base_rate: 1.0,
            interval: Dur(Duration::from_secs(5)),
        }
    }
}

impl TargetConfig {
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut p = Vec::new();
        if !(self.kept_traces_per_second.is_finite() && self.kept_traces_per_second > 0.0) {
            p.push((
                "kept_traces_per_second".into(),
                "must be a number > 0".into(),
            ));
        }
        if !(0.0 <= self.min_base_rate
            && self.min_base_rate <= self.max_base_rate
            && self.max_base_rate <= 1.0)
        {
            p.push((
                "min_base_rate".into(),
                "need 0 ≤ min_base_rate ≤ max_base_rate ≤ 1".into(),
            ));
        }
        if self.interval.0 < Duration::from_millis(100) {
            p.push(("interval".into(), "must be at least 100ms".into()));
        }
        p
    }
}

/// Weight of the newest interval in the smoothed rates and of the new target in the base
/// rate: damps oscillation while converging in a few intervals.
const SMOOTHING: f64 = 0.5;

/// Steers the base rate towards a kept-traces budget.
pub struct TargetController {
    cfg: TargetConfig,
    policy_rate: f64,
    eligible_rate: f64,
    warm: bool,
}

impl TargetController {
    pub fn new(cfg: TargetConfig) -> Self {
        TargetController {
            cfg,
            policy_rate: 0.0,
            eligible_rate: 0.0,
            warm: false,
        }
    }

    /// One interval: `policy_kept` traces were kept by policies and `eligible` traces were
    /// left to the base rate, over `elapsed`. Returns the new base rate.
    pub fn update(
        &mut self,
        current: f64,
        policy_kept: u64,
        eligible: u64,
        elapsed: Duration,
    ) -> f64 {
        let secs = elapsed.as_secs_f64().max(1e-3);
        let (p, e) = (policy_kept as f64 / secs, eligible as f64 / secs);
        if self.warm {
            self.policy_rate += SMOOTHING * (p - self.policy_rate);
            self.eligible_rate += SMOOTHING * (e - self.eligible_rate);
        } else {
            (self.policy_rate, self.eligible_rate, self.warm) = (p, e, true);
        }
        let budget = (self.cfg.kept_traces_per_second - self.policy_rate).max(0.0);
        let wanted = if self.eligible_rate > 0.0 {
            budget / self.eligible_rate
        } else {
            self.cfg.max_base_rate
        };
        let next = current + SMOOTHING * (wanted - current);
        next.clamp(self.cfg.min_base_rate, self.cfg.max_base_rate)
    }
}

/// The base probability now in force, shared by the sampler and the controller.
#[derive(Debug)]
pub struct BaseRate(AtomicU64);

impl BaseRate {
    pub fn new(p: f64) -> Self {
        BaseRate(AtomicU64::new(p.to_bits()))
    }

    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }

    pub fn set(&self, p: f64) {
        self.0.store(p.to_bits(), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boost_starts_on_problems_holds_for_the_cooldown_then_decays() {
        let boost = Boost::new(BoostConfig {
            trigger_rate: 0.2,
            min_calls: 10,
            rate: 0.9,
            cooldown: Dur(Duration::from_secs(60)),
            decay: Dur(Duration::from_secs(60)),
            ..BoostConfig::default()
        });
        let svc: Arc<str> = Arc::from("chat");
        let t0 = Instant::now();
        for _ in 0..50 {
            boost.record(&svc, false, t0);
        }
        assert_eq!(
            boost.probability("chat", 0.1, t0),
            None,
            "healthy: no boost"
        );
        for _ in 0..20 {
            boost.record(&svc, true, t0);
        }
        let at = |s: u64| boost.probability("chat", 0.1, t0 + Duration::from_secs(s));
        assert_eq!(at(0), Some(0.9));
        assert_eq!(at(60), Some(0.9));
        let mid = at(90).unwrap();
        assert!(
            (mid - 0.5).abs() < 1e-9,
            "half-way through the decay: {mid}"
        );
        assert_eq!(at(121), None, "back to the base rate");
        assert_eq!(boost.probability("other-service", 0.1, t0), None);
    }

    /// A synthetic stream: `eligible` traces/s left to the base rate, `policy` kept by
    /// policies; kept = policy + p × eligible.
    fn run(
        ctl: &mut TargetController,
        p: &mut f64,
        eligible: f64,
        policy: f64,
        intervals: usize,
    ) -> f64 {
        let dt = Duration::from_secs(5);
        let mut kept = 0.0;
        for _ in 0..intervals {
            let secs = dt.as_secs_f64();
            kept = policy + *p * eligible;
            *p = ctl.update(*p, (policy * secs) as u64, (eligible * secs) as u64, dt);
        }
        kept
    }

    #[test]
    fn target_throughput_converges_within_20_percent() {
        let mut ctl = TargetController::new(TargetConfig {
            kept_traces_per_second: 100.0,
            ..TargetConfig::default()
        });
        let mut p = 0.5;
        let kept = run(&mut ctl, &mut p, 2000.0, 20.0, 20);
        assert!((kept - 100.0).abs() <= 20.0, "kept {kept}/s at p = {p}");
        // Traffic triples: the rate follows.
        let kept = run(&mut ctl, &mut p, 6000.0, 20.0, 20);
        assert!((kept - 100.0).abs() <= 20.0, "kept {kept}/s at p = {p}");
        // Policies alone exceed the budget: the base rate goes to its floor, and policy
        // keeps are never sampled away.
        let kept = run(&mut ctl, &mut p, 6000.0, 150.0, 20);
        assert!((p - 0.0001).abs() < 1e-12 && kept >= 150.0, "p = {p}");
    }
}
