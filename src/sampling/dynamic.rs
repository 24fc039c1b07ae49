//! Keyed dynamic sampling (Honeycomb Refinery's dynamic sampler, made consistent): each
//! trace gets a key from its fields (service, root route, model, status…); per window, the
//! keys' counts (a moving average over windows) set each key's probability so that about 1
//! in `goal_rate` traces is kept overall, rare keys more often than common ones. Each
//! probability is rounded to a power of two, so replicas that see a similar mix compute the
//! same thresholds and `ot=th` gives downstream the right adjusted count.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::Deserialize;

/// Keys and their probabilities.
pub type KeyProbabilities = Vec<(Arc<str>, f64)>;

/// The key every trace beyond `max_keys` distinct keys shares.
pub const OTHER_KEY: &str = "other";

/// One part of a dynamic policy's key, as written: `attribute` (span attribute; `root: true`
/// for the root span's only), `resource_attribute`, or `field` (`span_name`, `kind`,
/// `scope`, `model`: a span's; `status`: `error` if any span failed, else `ok`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyPartConfig {
    pub attribute: Option<String>,
    pub resource_attribute: Option<String>,
    pub field: Option<String>,
    #[serde(default)]
    pub root: bool,
}

/// Defaults of a dynamic policy.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(30);
pub const DEFAULT_MAX_KEYS: usize = 100;
/// Weight of the newest window in the moving average of a key's count.
const EMA_WEIGHT: f64 = 0.5;

struct State {
    /// Traces per key in the current window.
    counts: HashMap<Arc<str>, u64>,
    /// Moving average of each key's count per window.
    averages: HashMap<Arc<str>, f64>,
    /// Probability per key, from the last window; keys not in it are kept (p = 1) until
    /// they have a rate.
    probabilities: HashMap<Arc<str>, f64>,
    window_start: Option<Instant>,
}

/// A dynamic policy's state.
pub struct Dynamic {
    goal_rate: f64,
    window: Duration,
    max_keys: usize,
    state: Mutex<State>,
}

impl Dynamic {
    pub fn new(goal_rate: f64, window: Duration, max_keys: usize) -> Dynamic {
        Dynamic {
            goal_rate: goal_rate.max(1.0),
            window,
            max_keys: max_keys.max(1),
            state: Mutex::new(State {
                counts: HashMap::new(),
                averages: HashMap::new(),
                probabilities: HashMap::new(),
                window_start: None,
            }),
        }
    }

    /// Whether `other` has the same goal, window and key bound.
    pub fn same_settings(&self, other: &Dynamic) -> bool {
        self.goal_rate == other.goal_rate
            && self.window == other.window
            && self.max_keys == other.max_keys
    }

    /// Counts a trace of `key` and returns the probability to keep it with (its key's, as
    /// the last window set it).
    pub fn probability(&self, key: &str, now: Instant) -> f64 {
        let mut s = self.state.lock();
        let start = *s.window_start.get_or_insert(now);
        if now.saturating_duration_since(start) >= self.window {
            self.roll(&mut s);
            s.window_start = Some(now);
        }
        let key: Arc<str> = match s.counts.get_key_value(key) {
            Some((k, _)) => k.clone(),
            None if s.counts.len() < self.max_keys => Arc::from(key),
            None => Arc::from(OTHER_KEY),
        };
        *s.counts.entry(key.clone()).or_default() += 1;
        s.probabilities.get(&key).copied().unwrap_or(1.0)
    }

    /// Ends a window: folds its counts into the moving averages and sets each key's
    /// probability from them (Refinery's logarithmic share: a key's kept traces grow with
    /// the log of its count, so rare keys are kept far more often than common ones, and a
    /// key seen a handful of times per window whole).
    fn roll(&self, s: &mut State) {
        let counts = std::mem::take(&mut s.counts);
        for avg in s.averages.values_mut() {
            *avg *= 1.0 - EMA_WEIGHT;
        }
        for (k, n) in counts {
            let avg = s.averages.entry(k).or_insert(0.0);
            *avg += EMA_WEIGHT * n as f64;
        }
        s.averages.retain(|_, avg| *avg >= 0.5);
        if s.averages.len() > self.max_keys {
            // The least frequent keys are forgotten first.
            let mut v: Vec<(Arc<str>, f64)> = s.averages.drain().collect();
            v.sort_by(|a, b| b.1.total_cmp(&a.1));
            v.truncate(self.max_keys);
            s.averages = v.into_iter().collect();
        }
        s.probabilities = probabilities(&s.averages, self.goal_rate);
    }

    /// Each key's probability in force, for the per-key gauge.
    pub fn snapshot(&self) -> KeyProbabilities {
        let s = self.state.lock();
        let mut v: Vec<(Arc<str>, f64)> = s
            .probabilities
            .iter()
            .map(|(k, p)| (k.clone(), *p))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
}

/// Probabilities for keys seen `counts` times (per window, averaged) so that about
/// Σcounts / goal_rate traces are kept: key k's share of that goal is proportional to
/// log10(count_k) (at least 1 trace), its rate count_k / share, its probability 1 / rate
/// rounded to the nearest power of two.
pub fn probabilities(counts: &HashMap<Arc<str>, f64>, goal_rate: f64) -> HashMap<Arc<str>, f64> {
    let total: f64 = counts.values().sum();
    let goal = total / goal_rate;
    let log_sum: f64 = counts.values().map(|c| (c.max(1.0)).log10().max(0.0)).sum();
    counts
        .iter()
        .map(|(k, &c)| {
            let share = if log_sum > 0.0 {
                (c.max(1.0).log10() / log_sum * goal).max(1.0)
            } else {
                c.max(1.0)
            };
            let rate = (c / share).max(1.0);
            (k.clone(), round_to_power_of_two(1.0 / rate))
        })
        .collect()
}

/// The power of two nearest to `p` in log space (p ≤ 1): 1, ½, ¼, … — thresholds replicas
/// with similar counts agree on, and short in the tracestate (`th:8`, `th:c`, …).
pub fn round_to_power_of_two(p: f64) -> f64 {
    if p >= 1.0 || !p.is_finite() {
        return 1.0;
    }
    let exp = (-p.log2()).round().min(56.0);
    0.5f64.powf(exp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::otlp::TraceId;
    use crate::otlp::tracestate::Threshold;
    use rand::{Rng, SeedableRng};

    /// A skewed mix: key i drawn with weight 1 / (i + 1)^1.5 over 30 keys.
    fn mix(rng: &mut rand::rngs::StdRng) -> String {
        let weights: Vec<f64> = (0..30).map(|i| 1.0 / ((i + 1) as f64).powf(1.5)).collect();
        let total: f64 = weights.iter().sum();
        let mut x = rng.random::<f64>() * total;
        for (i, w) in weights.iter().enumerate() {
            x -= w;
            if x <= 0.0 {
                return format!("svc-{i}");
            }
        }
        "svc-29".into()
    }

    #[test]
    fn kept_share_converges_on_the_goal_and_rare_keys_are_kept_more() {
        let d = Dynamic::new(20.0, Duration::from_secs(10), 100);
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let start = Instant::now();
        // 2,000 traces per 10 s window; measure over windows 4–12 (after the average
        // settles).
        let (mut seen, mut kept) = (0u64, 0u64);
        let mut per_key: HashMap<String, (u64, u64)> = HashMap::new();
        for i in 0..24_000u64 {
            let now = start + Duration::from_millis(i * 5);
            let key = mix(&mut rng);
            let p = d.probability(&key, now);
            let id: [u8; 16] = rng.random();
            let keep = Threshold::from_probability(p).keeps(TraceId(id).randomness());
            if i >= 8_000 {
                seen += 1;
                kept += u64::from(keep);
                let e = per_key.entry(key).or_default();
                e.0 += 1;
                e.1 += u64::from(keep);
            }
        }
        let share = kept as f64 / seen as f64;
        // Goal 1 in 20 = 5%; rounding to powers of two and the log shares put it within
        // ±35% of that.
        assert!(
            (0.05 * 0.65..=0.05 * 1.35).contains(&share),
            "kept share {share}"
        );
        let p = |k: &str| per_key[k].1 as f64 / per_key[k].0 as f64;
        assert!(
            p("svc-0") < 0.05,
            "the commonest key is sampled hardest: {}",
            p("svc-0")
        );
        // svc-0 is ~25% of traces (~500 a window), svc-25 ~0.4% (~8 a window).
        assert!(
            p("svc-25") > 0.15 && p("svc-25") > 8.0 * p("svc-0"),
            "rare keys are kept more: {} vs {}",
            p("svc-25"),
            p("svc-0")
        );
        let snapshot = d.snapshot();
        assert!(
            snapshot.iter().all(|(_, p)| (-p.log2()).fract() == 0.0),
            "powers of two"
        );
    }

    #[test]
    fn two_replicas_with_the_same_mix_agree() {
        // Two replicas, each seeing its own draw of the same mix, compute the same
        // probability for every key the mix holds in quantity.
        let a = Dynamic::new(10.0, Duration::from_secs(10), 100);
        let b = Dynamic::new(10.0, Duration::from_secs(10), 100);
        let (mut ra, mut rb) = (
            rand::rngs::StdRng::seed_from_u64(1),
            rand::rngs::StdRng::seed_from_u64(2),
        );
        let start = Instant::now();
        for i in 0..20_000u64 {
            let now = start + Duration::from_millis(i * 5);
            a.probability(&mix(&mut ra), now);
            b.probability(&mix(&mut rb), now);
        }
        let (sa, sb): (HashMap<_, _>, HashMap<_, _>) = (
            a.snapshot().into_iter().collect(),
            b.snapshot().into_iter().collect(),
        );
        let common = ["svc-0", "svc-1", "svc-2", "svc-3", "svc-4", "svc-5"];
        for k in common {
            assert_eq!(sa.get(k), sb.get(k), "{k}: {sa:?} / {sb:?}");
        }
        let agree = sa.iter().filter(|(k, p)| sb.get(*k) == Some(p)).count();
        assert!(
            agree * 10 >= sa.len() * 8,
            "{agree} of {} keys agree",
            sa.len()
        );
    }

    #[test]
    fn keys_are_bounded() {
        let d = Dynamic::new(10.0, Duration::from_secs(1), 5);
        let now = Instant::now();
        for i in 0..50 {
            d.probability(&format!("k{i}"), now);
        }
        d.probability("k0", now + Duration::from_secs(2));
        let keys: Vec<String> = d.snapshot().iter().map(|(k, _)| k.to_string()).collect();
        assert!(keys.len() <= 5, "{keys:?}");
        assert!(keys.iter().any(|k| k == OTHER_KEY), "{keys:?}");
    }
}
