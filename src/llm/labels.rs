//! Bounded label values: metric labels taken from span data (services, models, users,
//! sessions) must not let one sender create a million time series.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};

/// The label value that stands for everything not tracked on its own.
pub const OTHER: &str = "other";

/// Admits the first `max` distinct values; later new values are labelled [`OTHER`].
/// For labels with few, stable values (services, models, providers).
pub struct FirstSeen {
    max: usize,
    seen: RwLock<HashSet<Arc<str>, Fast>>,
    other: Arc<str>,
    /// Counts values folded into `other`.
    folded: Option<prometheus::IntCounter>,
}

impl FirstSeen {
    pub fn new(max: usize) -> Self {
        FirstSeen {
            max,
            seen: RwLock::new(HashSet::default()),
            other: Arc::from(OTHER),
            folded: None,
        }
    }

    /// Counts every value folded into `other` on `counter`.
    pub fn counting(mut self, counter: prometheus::IntCounter) -> Self {
        self.folded = Some(counter);
        self
    }

    pub fn bound(&self, value: &Arc<str>) -> Arc<str> {
        if self.seen.read().contains(value) {
            return value.clone();
        }
        let mut seen = self.seen.write();
        if seen.contains(value) || seen.len() < self.max {
            seen.insert(value.clone());
            value.clone()
        } else {
            if let Some(c) = &self.folded {
                c.inc();
            }
            self.other.clone()
        }
    }
}

/// How often the top K are re-ranked.
const RERANK_EVERY: Duration = Duration::from_secs(10);
/// Candidates tracked per label slot (Space-Saving counters).
const CANDIDATES_PER_SLOT: usize = 4;

/// Tracks the top `k` values by accumulated weight (e.g. cost) with the Space-Saving
/// algorithm over `4k` candidates; values in the top k get their own label, the rest
/// [`OTHER`]. Re-ranked every 10 s: a value that drops out is returned once as demoted, so
/// its series can be removed. For labels with many, churning values (users, sessions).
pub struct TopK {
    k: usize,
    state: Mutex<TopKState>,
    other: Arc<str>,
}

type Fast = foldhash::fast::RandomState;

struct TopKState {
    weights: HashMap<Arc<str>, f64, Fast>,
    promoted: HashSet<Arc<str>, Fast>,
    last_rank: Instant,
}

/// The label to use for a value, and values that just lost their own label.
pub struct Ranked {
    pub label: Arc<str>,
    pub demoted: Vec<Arc<str>>,
}

impl TopK {
    pub fn new(k: usize) -> Self {
        TopK {
            k,
            state: Mutex::new(TopKState {
                weights: HashMap::default(),
                promoted: HashSet::default(),
                last_rank: Instant::now(),
            }),
            other: Arc::from(OTHER),
        }
    }

    pub fn record(&self, value: &str, weight: f64, now: Instant) -> Ranked {
        let mut s = self.state.lock();
        let key: Arc<str> = match s.weights.get_key_value(value) {
            Some((k, _)) => k.clone(),
            None => Arc::from(value),
        };
        let capacity = self.k * CANDIDATES_PER_SLOT;
        if let Some(w) = s.weights.get_mut(&key) {
            *w += weight;
        } else if s.weights.len() < capacity {
            s.weights.insert(key.clone(), weight);
        } else {
            // Space-Saving: the newcomer replaces the smallest counter and inherits its
            // count, so a heavy hitter cannot be kept out by an early crowd.
            let (min_key, min_w) = s
                .weights
                .iter()
                .filter(|(k, _)| !s.promoted.contains(*k))
                .min_by(|a, b| a.1.total_cmp(b.1))
                .map(|(k, w)| (k.clone(), *w))
                .unwrap_or((key.clone(), 0.0));
            s.weights.remove(&min_key);
            s.weights.insert(key.clone(), min_w + weight);
        }
        let mut demoted = Vec::new();
        if now.duration_since(s.last_rank) >= RERANK_EVERY {
            s.last_rank = now;
            let mut ranked: Vec<(Arc<str>, f64)> =
                s.weights.iter().map(|(k, w)| (k.clone(), *w)).collect();
            ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
            let top: HashSet<Arc<str>, Fast> =
                ranked.into_iter().take(self.k).map(|(k, _)| k).collect();
            demoted = s.promoted.difference(&top).cloned().collect();
            s.promoted = top;
        } else if !s.promoted.contains(&key) && s.promoted.len() < self.k {
            s.promoted.insert(key.clone());
        }
        let label = if s.promoted.contains(&key) {
            key
        } else {
            self.other.clone()
        };
        Ranked { label, demoted }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_seen_admits_max_values() {
        let b = FirstSeen::new(2);
        let (a, c, d) = (Arc::from("a"), Arc::from("c"), Arc::from("d"));
        assert_eq!(&*b.bound(&a), "a");
        assert_eq!(&*b.bound(&c), "c");
        assert_eq!(&*b.bound(&d), OTHER);
        assert_eq!(&*b.bound(&a), "a");
    }

    #[test]
    fn top_k_bounds_a_million_users_and_finds_the_big_spenders() {
        let top = TopK::new(10);
        let t0 = Instant::now();
        let mut labels = HashSet::new();
        // 100,000 small users, and 5 big spenders who show up late and keep spending.
        for i in 0..100_000u32 {
            let now = t0 + Duration::from_millis(u64::from(i));
            labels.insert(top.record(&format!("user-{i}"), 0.001, now).label);
            if i > 50_000 {
                for big in 0..5 {
                    labels.insert(top.record(&format!("whale-{big}"), 0.05, now).label);
                }
            }
        }
        let now = t0 + Duration::from_secs(200);
        let ranked = top.record("whale-0", 0.05, now);
        assert_eq!(&*ranked.label, "whale-0");
        assert!(
            !ranked.demoted.is_empty(),
            "early small users lose their labels"
        );
        for big in 1..5 {
            assert_eq!(
                &*top.record(&format!("whale-{big}"), 0.05, now).label,
                format!("whale-{big}")
            );
        }
        assert_eq!(&*top.record("user-3", 0.001, now).label, OTHER);
        // Labels ever used: the first k, those promoted at each re-rank, and `other` —
        // bounded by k per re-rank, never by the number of users.
        assert!(labels.len() <= 10 + 10 * 11 + 1, "{}", labels.len());
        assert!(top.state.lock().weights.len() <= 40);
    }
}
