//! One memory budget for the whole process: every buffer that holds span bytes is charged
//! to it while it lives, so what receivers admit is measured against what is really held.
//!
//! A request body is charged when it enters the pipeline and released when its last slice
//! is gone: while a held trace, a late span, an export or forward queue still refers to
//! any part of it, all of it counts (that is the memory it pins). Copies made later (spans
//! detached from their request, redacted spans, encoded export requests, records read back
//! from the durable queue) are charged the same way. Bookkeeping without a buffer of its
//! own (per held trace and span, per queued span) is added by the pipeline from counts.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;

/// Bookkeeping memory per held trace beyond its spans' wire bytes (map entry, summary,
/// deadline and arrival records), and per held span (its slice, origin and tracestate
/// position). Measured by `llmtail-bench`: ~955 bytes per 4-span trace in all.
pub const TRACE_OVERHEAD: usize = 512;
pub const SPAN_OVERHEAD: usize = 128;
/// Memory per entry of the decision cache at its fullest (two generations of hash maps of
/// 16-byte ids and 16-byte decisions, at the maps' load factor): reserved in the memory
/// budget at start for `decision_cache_size` entries.
pub const DECISION_CACHE_ENTRY: usize = 69;

/// Bytes of live buffers charged to the budget.
#[derive(Debug, Default)]
pub struct Budget {
    charged: AtomicUsize,
}

/// A charged buffer: releases its charge when the last slice of it is dropped.
struct Charged {
    bytes: Bytes,
    budget: Arc<Budget>,
}

impl AsRef<[u8]> for Charged {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

impl Drop for Charged {
    fn drop(&mut self) {
        self.budget
            .charged
            .fetch_sub(self.bytes.len(), Ordering::Relaxed);
    }
}

impl Budget {
    pub fn new() -> Arc<Budget> {
        Arc::new(Budget::default())
    }

    /// `bytes`, charged until it and every slice of it are dropped. No copy is made.
    pub fn charge(self: &Arc<Self>, bytes: Bytes) -> Bytes {
        if bytes.is_empty() {
            return bytes;
        }
        self.charged.fetch_add(bytes.len(), Ordering::Relaxed);
        Bytes::from_owner(Charged {
            bytes,
            budget: self.clone(),
        })
    }

    /// A charged copy of `data`.
    pub fn copy(self: &Arc<Self>, data: &[u8]) -> Bytes {
        self.charge(Bytes::copy_from_slice(data))
    }

    /// Charges `n` bytes for memory about to be allocated (a request body being read or
    /// decompressed); the charge grows with [`Reservation::grow`] and ends when dropped.
    pub fn reserve(self: &Arc<Self>, n: usize) -> Reservation {
        self.charged.fetch_add(n, Ordering::Relaxed);
        Reservation {
            bytes: n,
            budget: self.clone(),
        }
    }

    /// Bytes of live charged buffers.
    pub fn charged(&self) -> usize {
        self.charged.load(Ordering::Relaxed)
    }
}

/// Memory charged before it is allocated; released when dropped.
#[derive(Debug)]
pub struct Reservation {
    bytes: usize,
    budget: Arc<Budget>,
}

impl Reservation {
    pub fn grow(&mut self, n: usize) {
        self.budget.charged.fetch_add(n, Ordering::Relaxed);
        self.bytes += n;
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.charged.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_is_charged_until_its_last_slice_is_dropped() {
        let budget = Budget::new();
        let request = budget.charge(Bytes::from(vec![7u8; 1000]));
        assert_eq!(budget.charged(), 1000);
        let span = request.slice(100..200);
        drop(request);
        assert_eq!(budget.charged(), 1000, "a slice pins the whole request");
        assert_eq!(&span[..], &[7u8; 100][..]);
        let copy = budget.copy(&span);
        drop(span);
        assert_eq!(
            budget.charged(),
            100,
            "the request is released, the copy counts"
        );
        drop(copy);
        assert_eq!(budget.charged(), 0);
        assert!(budget.charge(Bytes::new()).is_empty());
        assert_eq!(budget.charged(), 0);
        let mut r = budget.reserve(10);
        r.grow(5);
        assert_eq!((budget.charged(), r.bytes()), (15, 15));
        drop(r);
        assert_eq!(budget.charged(), 0);
    }
}
