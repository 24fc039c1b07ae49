//! Anomaly detection per service and model: a robust rolling baseline of latency, cost and
//! tokens per call.
//!
//! The baseline is an exponentially weighted mean and mean absolute deviation whose window
//! is `window` calls (α = 2 / (window + 1); an exact running mean until then). A call is judged
//! once `min_samples` calls were seen: latency beyond `latency_sigmas` standard deviations
//! (σ ≈ 1.2533 × mean absolute deviation, floored at 5% of the mean), cost or tokens beyond
//! `*_factor` × the mean. A flagged call moves the baseline with a tenth of the normal weight:
//! a burst of outliers cannot poison its own baseline, yet a lasting change of level is
//! absorbed after about ten windows. Memory: three small accumulators per key.

use std::sync::Arc;

use dashmap::DashMap;
use serde::Deserialize;

/// σ / mean absolute deviation for a normal distribution (√(π/2)).
const SIGMA_PER_MAD: f64 = 1.2533;
/// Smallest σ as a share of the mean, so perfectly steady latencies do not make every small
/// wobble an anomaly.
const MIN_SIGMA_SHARE: f64 = 0.05;
/// Weight of a flagged call in the baseline, relative to a normal one.
const FLAGGED_WEIGHT: f64 = 0.1;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AnomalyConfig {
    /// Calls the baseline spans (the article's last 100 calls).
    pub window: u32,
    /// Calls seen before any is judged.
    pub min_samples: u32,
    pub latency_sigmas: f64,
    pub cost_factor: f64,
    pub tokens_factor: f64,
}

impl Default for AnomalyConfig {
    fn default() -> Self {
        AnomalyConfig {
            window: 100,
            min_samples: 10,
            latency_sigmas: 3.0,
            cost_factor: 5.0,
            tokens_factor: 5.0,
        }
    }
}

impl AnomalyConfig {
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut p = Vec::new();
        if self.window < 2 {
            p.push(("window".into(), "must be at least 2".into()));
        }
        for (k, v) in [
            ("latency_sigmas", self.latency_sigmas),
            ("cost_factor", self.cost_factor),
            ("tokens_factor", self.tokens_factor),
        ] {
            if !(v.is_finite() && v > 0.0) {
                p.push((k.into(), format!("must be a number > 0, got {v}")));
            }
        }
        p
    }
}

/// What was anomalous about a call; the `kind` label of `llmtail_llm_anomalies_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnomalyKind {
    Latency,
    Cost,
    Tokens,
}

impl AnomalyKind {
    pub fn label(self) -> &'static str {
        match self {
            AnomalyKind::Latency => "latency",
            AnomalyKind::Cost => "cost",
            AnomalyKind::Tokens => "tokens",
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Stat {
    mean: f64,
    mad: f64,
    n: u32,
}

impl Stat {
    /// Judges `x` with `is_outlier(x, mean, σ)` once warm, then folds it into the baseline.
    fn observe(
        &mut self,
        x: f64,
        cfg: &AnomalyConfig,
        is_outlier: impl Fn(f64, f64, f64) -> bool,
    ) -> bool {
        let sigma = (SIGMA_PER_MAD * self.mad).max(MIN_SIGMA_SHARE * self.mean);
        let flagged = self.n >= cfg.min_samples && is_outlier(x, self.mean, sigma);
        let alpha = if self.n < cfg.window {
            1.0 / f64::from(self.n + 1)
        } else {
            2.0 / (f64::from(cfg.window) + 1.0)
        };
        let a = if flagged {
            alpha * FLAGGED_WEIGHT
        } else {
            alpha
        };
        let dev = (x - self.mean).abs();
        self.mean += a * (x - self.mean);
        if self.n > 0 {
            self.mad += a * (dev - self.mad);
        }
        self.n = self.n.saturating_add(1);
        flagged
    }
}

#[derive(Debug, Default)]
struct Baseline {
    latency: Stat,
    cost: Stat,
    tokens: Stat,
}

/// One call's measurements.
#[derive(Debug, Clone, Copy)]
pub struct CallSample {
    pub latency_seconds: Option<f64>,
    pub cost_usd: Option<f64>,
    pub tokens: u64,
}

pub struct AnomalyDetector {
    cfg: AnomalyConfig,
    baselines: DashMap<(Arc<str>, Arc<str>), Baseline>,
}

impl AnomalyDetector {
    pub fn new(cfg: AnomalyConfig) -> Self {
        AnomalyDetector {
            cfg,
            baselines: DashMap::new(),
        }
    }

    /// Judges a call of `service`/`model` against their baseline (keys are bounded labels,
    /// so the number of baselines is bounded too) and learns from it.
    pub fn observe(&self, service: &Arc<str>, model: &Arc<str>, s: CallSample) -> Vec<AnomalyKind> {
        let cfg = &self.cfg;
        let mut b = self
            .baselines
            .entry((service.clone(), model.clone()))
            .or_default();
        let mut kinds = Vec::new();
        if let Some(latency) = s.latency_seconds
            && b.latency
                .observe(latency, cfg, |x, m, sd| x > m + cfg.latency_sigmas * sd)
        {
            kinds.push(AnomalyKind::Latency);
        }
        if let Some(cost) = s.cost_usd
            && b.cost
                .observe(cost, cfg, |x, m, _| m > 0.0 && x > cfg.cost_factor * m)
        {
            kinds.push(AnomalyKind::Cost);
        }
        if s.tokens > 0
            && b.tokens.observe(s.tokens as f64, cfg, |x, m, _| {
                m > 0.0 && x > cfg.tokens_factor * m
            })
        {
            kinds.push(AnomalyKind::Tokens);
        }
        kinds
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic noise in [-1, 1].
    fn noise(i: u32) -> f64 {
        let x = (i.wrapping_mul(2654435761) >> 8) as f64 / (1u64 << 24) as f64;
        2.0 * x - 1.0
    }

    fn sample(latency: f64) -> CallSample {
        CallSample {
            latency_seconds: Some(latency),
            cost_usd: Some(0.01),
            tokens: 1000,
        }
    }

    fn detector() -> (AnomalyDetector, Arc<str>, Arc<str>) {
        (
            AnomalyDetector::new(AnomalyConfig::default()),
            Arc::from("svc"),
            Arc::from("gpt-4o"),
        )
    }

    #[test]
    fn a_planted_latency_spike_is_caught() {
        let (d, s, m) = detector();
        for i in 0..200 {
            assert!(
                d.observe(&s, &m, sample(1.0 + 0.1 * noise(i))).is_empty(),
                "call {i}"
            );
        }
        assert_eq!(d.observe(&s, &m, sample(5.0)), vec![AnomalyKind::Latency]);
        assert!(d.observe(&s, &m, sample(1.05)).is_empty());
    }

    #[test]
    fn nothing_is_judged_before_min_samples() {
        let (d, s, m) = detector();
        for _ in 0..9 {
            d.observe(&s, &m, sample(1.0));
        }
        assert!(d.observe(&s, &m, sample(100.0)).is_empty());
    }

    #[test]
    fn a_slow_drift_is_not_flagged() {
        let (d, s, m) = detector();
        // Latency doubles over 3,000 calls: 1 s → 2 s, ±10% noise.
        for i in 0..3000u32 {
            let level = 1.0 + f64::from(i) / 3000.0;
            let flagged = d.observe(&s, &m, sample(level * (1.0 + 0.1 * noise(i))));
            assert!(flagged.is_empty(), "call {i} at {level} flagged");
        }
    }

    #[test]
    fn the_baseline_survives_a_burst_of_outliers() {
        let (d, s, m) = detector();
        for i in 0..200 {
            d.observe(&s, &m, sample(1.0 + 0.1 * noise(i)));
        }
        // 50 outliers in a row: every one is caught...
        for i in 0..50 {
            assert_eq!(
                d.observe(&s, &m, sample(8.0)),
                vec![AnomalyKind::Latency],
                "outlier {i}"
            );
        }
        // ...and afterwards normal calls are normal and outliers still outliers.
        assert!(d.observe(&s, &m, sample(1.1)).is_empty());
        assert_eq!(d.observe(&s, &m, sample(8.0)), vec![AnomalyKind::Latency]);
    }

    #[test]
    fn cost_and_tokens_beyond_five_times_the_mean() {
        let (d, s, m) = detector();
        for _ in 0..50 {
            d.observe(&s, &m, sample(1.0));
        }
        let pricey = CallSample {
            latency_seconds: Some(1.0),
            cost_usd: Some(0.06),
            tokens: 6000,
        };
        assert_eq!(
            d.observe(&s, &m, pricey),
            vec![AnomalyKind::Cost, AnomalyKind::Tokens]
        );
        let fine = CallSample {
            latency_seconds: Some(1.0),
            cost_usd: Some(0.04),
            tokens: 4000,
        };
        assert!(d.observe(&s, &m, fine).is_empty());
    }

    #[test]
    fn keys_are_independent() {
        let (d, s, m) = detector();
        let other: Arc<str> = Arc::from("claude-opus-4");
        for _ in 0..50 {
            d.observe(&s, &m, sample(1.0));
            d.observe(&s, &other, sample(20.0));
        }
        assert!(d.observe(&s, &other, sample(21.0)).is_empty());
        assert_eq!(d.observe(&s, &m, sample(21.0)), vec![AnomalyKind::Latency]);
    }
}
