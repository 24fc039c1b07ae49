//! The regret window: a dropped trace's summary and its records in the trace log are kept
//! for `storage.regret_window`, so that a late span which makes it must-keep (an error, a
//! cost or latency over its threshold, a condition) turns the decision to keep — and the
//! whole trace, read back from the log, is exported. An agent run whose failure comes after
//! it was decided is not lost.

use std::collections::VecDeque;
use std::time::Instant;

use super::HashMap;
use crate::otlp::TraceId;
use crate::sampling::TraceSummary;
use crate::storage::LogPin;

/// A dropped trace that may still be kept.
pub(super) struct Regret {
    pub(super) summary: TraceSummary,
    /// One pin per record of the log holding spans of it: they stay on disk meanwhile.
    pub(super) records: Vec<LogPin>,
    pub(super) dropped_at: Instant,
}

impl Regret {
    /// Adds a record holding another span of the trace (once per record).
    pub(super) fn add_record(&mut self, pin: &LogPin) {
        if !self.records.iter().any(|r| r.seq() == pin.seq()) {
            self.records.push(pin.clone());
        }
    }
}

/// A shard's dropped traces in their regret window, oldest first.
#[derive(Default)]
pub(super) struct Regrets {
    traces: HashMap<TraceId, Regret>,
    /// When each was dropped; entries of traces since kept or expired are skipped lazily.
    order: VecDeque<(Instant, TraceId)>,
}

impl Regrets {
    /// Remembers a dropped trace; past `max`, the oldest are forgotten (their records
    /// freed: the window is a chance, never a reason to refuse new data).
    pub(super) fn insert(&mut self, id: TraceId, regret: Regret, max: usize) {
        self.order.push_back((regret.dropped_at, id));
        self.traces.insert(id, regret);
        while self.traces.len() > max && self.pop_oldest() {}
    }

    pub(super) fn get_mut(&mut self, id: &TraceId) -> Option<&mut Regret> {
        self.traces.get_mut(id)
    }

    pub(super) fn remove(&mut self, id: &TraceId) -> Option<Regret> {
        self.traces.remove(id)
    }

    /// Forgets the traces dropped before `cutoff`.
    pub(super) fn expire(&mut self, cutoff: Instant) {
        while self.order.front().is_some_and(|(t, _)| *t < cutoff) {
            self.pop_oldest();
        }
    }

    /// Forgets the oldest `n` (the disk is nearly at its bound).
    pub(super) fn shed(&mut self, n: usize) {
        for _ in 0..n {
            if !self.pop_oldest() {
                break;
            }
        }
    }

    pub(super) fn len(&self) -> usize {
        self.traces.len()
    }

    /// Forgets the oldest trace still remembered; false when there is none.
    fn pop_oldest(&mut self) -> bool {
        while let Some((t, id)) = self.order.pop_front() {
            if self.traces.get(&id).is_some_and(|r| r.dropped_at == t) {
                self.traces.remove(&id);
                return true;
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn regret(at: Instant) -> Regret {
        Regret {
            summary: TraceSummary::default(),
            records: vec![LogPin::detached(1)],
            dropped_at: at,
        }
    }

    #[test]
    fn the_oldest_are_forgotten_past_the_bound_the_window_or_when_shed() {
        let t0 = Instant::now();
        let mut r = Regrets::default();
        for i in 0..5u8 {
            r.insert(
                TraceId([i; 16]),
                regret(t0 + Duration::from_secs(i.into())),
                3,
            );
        }
        assert_eq!(r.len(), 3, "bounded");
        assert!(
            r.get_mut(&TraceId([1; 16])).is_none(),
            "the oldest went first"
        );
        assert!(r.get_mut(&TraceId([4; 16])).is_some());
        // A trace taken out (kept) leaves a stale queue entry that is skipped.
        assert!(r.remove(&TraceId([2; 16])).is_some());
        r.expire(t0 + Duration::from_secs(4));
        assert_eq!(r.len(), 1);
        r.shed(1);
        assert_eq!(r.len(), 0);
        r.shed(1);
    }
}
