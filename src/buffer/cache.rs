//! The decision cache: what was decided for recently decided traces, so their late spans
//! follow the decision. Bounded, O(1), in two generations.

use super::HashMap;
use crate::otlp::TraceId;
use crate::otlp::tracestate::Threshold;
use crate::sampling::Decision;

/// A remembered decision, packed into 8 bytes: the threshold, and bit 63 for "kept".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CachedDecision(u64);

const KEPT_BIT: u64 = 1 << 63;
const DRY_RUN_BIT: u64 = 1 << 62;

impl CachedDecision {
    pub(super) fn new(d: &Decision) -> Self {
        CachedDecision(
            d.threshold.value()
                | if d.keep { KEPT_BIT } else { 0 }
                | if d.dry_run { DRY_RUN_BIT } else { 0 },
        )
    }

    pub fn keep(self) -> bool {
        self.0 & KEPT_BIT != 0
    }

    pub fn threshold(self) -> Threshold {
        Threshold::from_value(self.0 & !(KEPT_BIT | DRY_RUN_BIT))
    }

    /// Whether the trace's spans are exported: kept, or decided in a dry run.
    pub fn exports(self) -> bool {
        self.0 & (KEPT_BIT | DRY_RUN_BIT) != 0
    }

    /// The threshold exported spans carry (p = 1 in a dry run).
    pub fn export_threshold(self) -> Threshold {
        if self.0 & DRY_RUN_BIT != 0 {
            Threshold::ALWAYS
        } else {
            self.threshold()
        }
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
            generation_capacity: capacity / 2,
        }
    }

    pub(super) fn get(&self, id: &TraceId) -> Option<CachedDecision> {
        self.current
            .get(id)
            .or_else(|| self.previous.get(id))
            .copied()
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
            c.insert(TraceId([i; 16]), CachedDecision(u64::from(i)));
        }
        assert!(c.current.len() + c.previous.len() <= 4);
        assert!(c.get(&TraceId([9; 16])).is_some());
        assert!(c.get(&TraceId([0; 16])).is_none());
    }
}
