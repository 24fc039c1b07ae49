//! Bounded label values: metric labels taken from span data (services, models, users,
//! sessions) must not let one sender create a million time series.

use std::collections::{BTreeSet, HashMap, HashSet};
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
    /// The candidates ordered by weight, smallest first: Space-Saving's victim is found at
    /// the front, not by scanning every candidate (which cost a hash lookup per candidate on
    /// every record of a new value: 35–45% of the daemon's CPU with tens of thousands of
    /// users), and re-ranking reads the top from the back without sorting.
    order: BTreeSet<(Weight, Arc<str>)>,
    promoted: HashSet<Arc<str>, Fast>,
    last_rank: Instant,
}

/// A weight ordered by `f64::total_cmp`.
#[derive(Debug, Clone, Copy)]
struct Weight(f64);

impl PartialEq for Weight {
    fn eq(&self, other: &Self) -> bool {
        self.0.total_cmp(&other.0).is_eq()
    }
}

impl Eq for Weight {}

impl PartialOrd for Weight {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Weight {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
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
                order: BTreeSet::new(),
                promoted: HashSet::default(),
                last_rank: Instant::now(),
            }),
            other: Arc::from(OTHER),
        }
    }

    pub fn record(&self, value: &str, weight: f64, now: Instant) -> Ranked {
        let mut guard = self.state.lock();
        let s = &mut *guard;
        let capacity = self.k * CANDIDATES_PER_SLOT;
        let key: Arc<str> = if let Some((k, w)) = s.weights.get_key_value(value) {
            let (k, old) = (k.clone(), *w);
            s.order.remove(&(Weight(old), k.clone()));
            s.order.insert((Weight(old + weight), k.clone()));
            s.weights.insert(k.clone(), old + weight);
            k
        } else {
            let key: Arc<str> = Arc::from(value);
            let mut start = 0.0;
            if s.weights.len() >= capacity {
                // Space-Saving: the newcomer replaces the smallest counter not holding a
                // label and inherits its count, so a heavy hitter cannot be kept out by an
                // early crowd.
                if let Some((w, victim)) = s
                    .order
                    .iter()
                    .find(|(_, k)| !s.promoted.contains(k))
                    .cloned()
                {
                    s.order.remove(&(w, victim.clone()));
                    s.weights.remove(&victim);
                    start = w.0;
                }
            }
            s.weights.insert(key.clone(), start + weight);
            s.order.insert((Weight(start + weight), key.clone()));
            key
        };
        let mut demoted = Vec::new();
        if now.duration_since(s.last_rank) >= RERANK_EVERY {
            s.last_rank = now;
            let top: HashSet<Arc<str>, Fast> = s
                .order
                .iter()
                .rev()
                .take(self.k)
                .map(|(_, k)| k.clone())
                .collect();
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
