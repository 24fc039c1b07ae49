//! Relief: under pressure (a full shard, memory past the soft mark) the oldest traces are
//! decided early, with the spans they have.

use super::*;

impl TraceBuffer {
    pub(super) fn evict_oldest(&self, shard: &mut Shard, now: Instant) -> Option<DecidedTrace> {
        self.evict_oldest_before(shard, now, now, DecideReason::Pressure)
    }

    /// Decides the shard's oldest held trace, for `reason`, if it arrived before `cutoff`.
    fn evict_oldest_before(
        &self,
        shard: &mut Shard,
        cutoff: Instant,
        now: Instant,
        reason: DecideReason,
    ) -> Option<DecidedTrace> {
        while let Some((first_seen, id)) = shard.arrivals.front().copied() {
            let held = shard
                .traces
                .get(&id)
                .is_some_and(|e| e.first_seen == first_seen);
            if !held {
                // A record of a trace decided since: skip it.
                shard.pop_arrival();
                continue;
            }
            if first_seen > cutoff {
                return None;
            }
            shard.pop_arrival();
            return Some(self.decide(shard, id, now, reason));
        }
        None
    }

    /// Decides the oldest traces early, a shard at a time in turn (trace ids spread evenly
    /// over shards, so each shard's oldest are close to the oldest overall), until the
    /// held memory is at most `target`. Traces younger than [`MIN_HOLD`] are left alone:
    /// their spans may still be arriving (a request is added span by span while this runs),
    /// and past the hard mark receivers refuse instead. Returns what is held afterwards.
    pub fn relieve(
        &self,
        mut held: Held,
        target: usize,
        now: Instant,
        out: &mut Vec<DecidedTrace>,
    ) -> Held {
        let cutoff = now.checked_sub(MIN_HOLD).unwrap_or(now);
        while held.memory() > target && held.traces > 0 {
            let before = held;
            for shard in self.shards.iter() {
                let mut shard = shard.lock();
                if let Some(t) =
                    self.evict_oldest_before(&mut shard, cutoff, now, DecideReason::Memory)
                {
                    // `held` is a snapshot from before this pass; the trace may have grown
                    // since (spans keep arriving), so its current size can exceed it.
                    held.traces = held.traces.saturating_sub(1);
                    held.spans = held.spans.saturating_sub(t.spans.len());
                    held.calls = held.calls.saturating_sub(t.llm_spans);
                    held.bytes = held.bytes.saturating_sub(t.bytes);
                    out.push(t);
                }
                if held.memory() <= target {
                    break;
                }
            }
            if held == before {
                break;
            }
        }
        held
    }
}
