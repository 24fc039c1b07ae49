//! The decision cache: what was decided for recently decided traces, so their late spans
//! follow the decision. Bounded, O(1), in two generations.

use super::HashMap;
use crate::otlp::TraceId;
use crate::otlp::tracestate::Threshold;
use std::time::{Duration, Instant};

use super::DecideReason;
use crate::sampling::{DecidedBy, Decision};

/// A remembered decision, packed into 8 bytes: the threshold, and bit 63 for "kept".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CachedDecision {
    /// Threshold, kept and dry-run bits.
    bits: u64,
    /// What decided it ([`DecidedBy::from_id`]).
    by: u16,
    /// Why then ([`DecideReason`] as a byte).
    reason: u8,
    /// When: seconds since the process started.
    at: u32,
}

/// Seconds since the process's first decision (for the cache's 4-byte timestamps).
fn clock() -> &'static Instant {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now)
}

const KEPT_BIT: u64 = 1 << 63;
const DRY_RUN_BIT: u64 = 1 << 62;

impl CachedDecision {
    pub fn new(d: &Decision, reason: DecideReason, now: Instant) -> Self {
        CachedDecision {
            bits: d.threshold.value()
                | if d.keep { KEPT_BIT } else { 0 }
                | if d.dry_run { DRY_RUN_BIT } else { 0 },
            by: d.by_id,
            reason: reason as u8,
            at: now.saturating_duration_since(*clock()).as_secs() as u32,
        }
    }

    /// What travels to another replica (the policy as its label: ids are this process's).
    pub fn to_wire(self) -> (u64, &'static str, u8) {
        (self.bits, self.by().label(), self.reason)
    }

    /// A decision another replica made and handed here, remembered as made `age` ago.
    pub fn from_wire(bits: u64, by: &str, reason: u8, age: Duration, now: Instant) -> Self {
        CachedDecision {
            bits,
            by: DecidedBy::id_of_label(by),
            reason,
            at: now
                .saturating_duration_since(*clock())
                .saturating_sub(age)
                .as_secs() as u32,
        }
    }

    /// The bits of a decision to keep at `threshold` (as the trace log's marks keep them).
    pub fn kept_bits(threshold: Threshold) -> u64 {
        threshold.value() | KEPT_BIT
    }

    /// Its threshold, kept and dry-run bits (as the trace log's marks keep them).
    pub fn bits(self) -> u64 {
        self.bits
    }

    pub fn keep(self) -> bool {
        self.bits & KEPT_BIT != 0
    }

    pub fn dry_run(self) -> bool {
        self.bits & DRY_RUN_BIT != 0
    }

    pub fn threshold(self) -> Threshold {
        Threshold::from_value(self.bits & !(KEPT_BIT | DRY_RUN_BIT))
    }

    /// Whether the trace's spans are exported: kept, or decided in a dry run.
    pub fn exports(self) -> bool {
        self.bits & (KEPT_BIT | DRY_RUN_BIT) != 0
    }

    /// The threshold exported spans carry (p = 1 in a dry run).
    pub fn export_threshold(self) -> Threshold {
        if self.dry_run() {
            Threshold::ALWAYS
        } else {
            self.threshold()
        }
    }

    pub fn by(self) -> DecidedBy {
        DecidedBy::from_id(self.by)
    }

    pub fn reason(self) -> DecideReason {
        DecideReason::from_u8(self.reason)
    }

    /// How long ago it was decided (to the second).
    pub fn age(self, now: Instant) -> Duration {
        now.saturating_duration_since(*clock())
            .saturating_sub(Duration::from_secs(u64::from(self.at)))
    }
}

/// Two generations of decisions: when the current one fills, it becomes the previous one
/// and the old previous is forgotten. Bounded at `capacity` entries, O(1) per operation.
pub(super) struct DecisionCache {
    current: HashMap<TraceId, CachedDecision>,
    previous: HashMap<TraceId, CachedDecision>,
    generation_capacity: usize,
}

impl DecisionCache {
    pub(super) fn new(capacity: usize) -> Self {
        DecisionCache {
            current: HashMap::default(),
            previous: HashMap::default(),
            // A shard's share of a small cache is one or two: it still holds the newest.
            generation_capacity: capacity.div_ceil(2),
        }
    }

    pub(super) fn get(&self, id: &TraceId) -> Option<CachedDecision> {
        self.current
            .get(id)
            .or_else(|| self.previous.get(id))
            .copied()
    }

    /// Every remembered decision.
    pub(super) fn iter(&self) -> impl Iterator<Item = (TraceId, CachedDecision)> + '_ {
        self.current
            .iter()
            .chain(
                self.previous
                    .iter()
                    .filter(|(id, _)| !self.current.contains_key(*id)),
            )
            .map(|(id, d)| (*id, *d))
    }

    pub(super) fn insert(&mut self, id: TraceId, d: CachedDecision) {
        if self.generation_capacity == 0 {
            return;
        }
        if self.current.len() >= self.generation_capacity {
            self.previous = std::mem::take(&mut self.current);
        }
        self.current.insert(id, d);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decision_cache_is_bounded() {
        let mut c = DecisionCache::new(4);
        for i in 0..10u8 {
            c.insert(
                TraceId([i; 16]),
                CachedDecision {
                    bits: u64::from(i),
                    by: 0,
                    reason: 0,
                    at: 0,
                },
            );
        }
        assert!(c.current.len() + c.previous.len() <= 4);
        assert!(c.get(&TraceId([9; 16])).is_some());
        assert!(c.get(&TraceId([0; 16])).is_none());
    }

    #[test]
    fn a_shard_of_a_small_cache_still_remembers_its_newest_decision() {
        // `decision_cache_size: 100` over 64 shards is 2 a shard; 50 is 1.
        for capacity in [1, 2] {
            let mut c = DecisionCache::new(capacity);
            let d = CachedDecision {
                bits: 1,
                by: 0,
                reason: 0,
                at: 0,
            };
            c.insert(TraceId([1; 16]), d);
            assert_eq!(c.get(&TraceId([1; 16])), Some(d), "capacity {capacity}");
            c.insert(TraceId([2; 16]), d);
            assert!(c.get(&TraceId([2; 16])).is_some());
            assert!(c.current.len() + c.previous.len() <= 2);
        }
    }

    #[test]
    fn a_cached_decision_remembers_its_policy_reason_and_time() {
        let cfg = crate::config::Config::parse(
            "exporter:\n  file: {path: x}\nsampling:\n  policies:\n    - {name: cache-test-errors, type: error}\n",
        )
        .unwrap();
        let sampler = crate::sampling::Sampler::new(
            &cfg.sampling,
            std::sync::Arc::new(crate::sampling::adaptive::BaseRate::new(0.1)),
        );
        let summary = crate::sampling::TraceSummary {
            has_error: true,
            ..Default::default()
        };
        let now = Instant::now();
        let d = sampler.decide(&TraceId([3; 16]), &summary, now);
        let c = CachedDecision::new(&d, DecideReason::MaxSpans, now);
        assert!(c.keep() && !c.dry_run());
        assert_eq!(c.by().label(), "cache-test-errors");
        assert_eq!(c.reason(), DecideReason::MaxSpans);
        assert_eq!(c.threshold(), d.threshold);
        assert!(c.age(now + Duration::from_secs(5)) >= Duration::from_secs(4));
        let base = sampler.decide(&TraceId([3; 16]), &Default::default(), now);
        let c = CachedDecision::new(&base, DecideReason::Root, now);
        assert_eq!(
            (c.by().label(), c.reason()),
            ("base_rate", DecideReason::Root)
        );
    }
}
