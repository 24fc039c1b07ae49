//! Deadlines: traces decided when they are finished (`root_grace` after the root, else
//! `idle_timeout` after the last span, at most `max_trace_duration` after the first), held
//! ones old enough detached from their request.

use super::*;

impl TraceBuffer {
    /// Decides every trace whose deadline has passed; returns what is still held.
    pub fn decide_due(&self, now: Instant, out: &mut Vec<DecidedTrace>) -> Held {
        self.decide_due_part(0, 1, now, out)
    }

    /// [`decide_due`](Self::decide_due) for one of `parts` disjoint sets of shards (every
    /// `parts`-th, from `part`), so that several threads decide at once; returns what those
    /// shards still hold.
    pub fn decide_due_part(
        &self,
        part: usize,
        parts: usize,
        now: Instant,
        out: &mut Vec<DecidedTrace>,
    ) -> Held {
        let mut held = Held::default();
        for shard in self.shards.iter().skip(part).step_by(parts.max(1)) {
            let mut shard = shard.lock();
            while let Some(Reverse((deadline, id))) = shard.deadlines.peek().copied() {
                if deadline > now {
                    break;
                }
                shard.deadlines.pop();
                match shard.traces.get(&id).map(|e| e.deadline) {
                    Some(due) if due == deadline => {
                        out.push(self.decide(&mut shard, id, now, DecideReason::Idle));
                    }
                    // Spans came since: its deadline moved on, and comes up again then.
                    Some(due) if due > deadline => shard.deadlines.push(Reverse((due, id))),
                    _ => {}
                }
            }
            // Drop arrival records of traces decided by deadline, so the queue stays small.
            while let Some((first_seen, id)) = shard.arrivals.front().copied() {
                if shard
                    .traces
                    .get(&id)
                    .is_some_and(|e| e.first_seen == first_seen)
                {
                    break;
                }
                shard.pop_arrival();
            }
            if let Some(cutoff) = now.checked_sub(self.limits.regret_window()) {
                shard.regrets.expire(cutoff);
            }
            if let Some(cutoff) = now.checked_sub(COMPACT_AFTER) {
                shard.detach_old(cutoff, &self.budget);
            }
            held.add(&shard);
        }
        held
    }
}
