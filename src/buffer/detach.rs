//! Detaching: spans held long are copied out of the request they arrived in, so one slow
//! trace does not keep its whole request alive. Spans in the trace log are left alone:
//! their bytes are the log's (the page cache's), and the log frees whole segments.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::HashMap;
use crate::memory::Budget;
use crate::otlp::reframe::{HeldSpan, Origin};

/// Held spans are slices of the request they arrived in, so one trace held long would keep
/// its whole request alive after the request's other traces are decided. A trace held this
/// long gets its spans (and their resource and scope) copied out, once; the memory limit
/// then counts what is really held.
pub const COMPACT_AFTER: Duration = Duration::from_secs(2);

/// One detaching pass: the spans it copies, gathered by the origin they share, go into one
/// buffer per origin, under one copy of that origin. Spans are gathered first (`gather`),
/// then moved (`place`) in the same order.
#[derive(Default)]
pub(super) struct Copies {
    /// By the original's address (kept alive by the entry, so it cannot be reused
    /// meanwhile): the original, its spans' bytes, then the copy and the next span's place.
    groups: HashMap<*const Origin, Group>,
}

struct Group {
    original: Arc<Origin>,
    bytes: Vec<u8>,
    copy: Option<Arc<Origin>>,
    next: usize,
}

impl Copies {
    /// Adds a span's bytes to its origin's copy (not a span in the trace log).
    pub(super) fn gather(&mut self, span: &HeldSpan) {
        if span.origin.pin.is_some() {
            return;
        }
        let group = self
            .groups
            .entry(Arc::as_ptr(&span.origin))
            .or_insert_with(|| Group {
                original: span.origin.clone(),
                bytes: Vec::new(),
                copy: None,
                next: 0,
            });
        group.bytes.extend_from_slice(span.bytes());
    }

    /// Makes each origin's copy, charged to the budget.
    pub(super) fn copy(&mut self, budget: &Arc<Budget>) {
        for group in self.groups.values_mut() {
            let data = budget.charge(Bytes::from(std::mem::take(&mut group.bytes)));
            group.copy = Some(copy_origin(&group.original, data, budget));
        }
    }

    /// Points a gathered span at its copy (spans in the order they were gathered).
    pub(super) fn place(&mut self, span: &mut HeldSpan) {
        let Some(group) = self.groups.get_mut(&Arc::as_ptr(&span.origin)) else {
            return;
        };
        let Some(copy) = &group.copy else {
            return;
        };
        let at = group.next;
        group.next += span.len();
        *span = HeldSpan::new(
            copy.clone(),
            &copy.data.slice(at..group.next),
            span.trace_state,
            span.is_root,
        );
    }
}

/// A copy of `original`'s resource and scope, charged to the budget, its spans in `data`.
fn copy_origin(original: &Origin, data: Bytes, budget: &Arc<Budget>) -> Arc<Origin> {
    Arc::new(Origin {
        data,
        resource: budget.copy(&original.resource),
        resource_schema_url: budget.copy(&original.resource_schema_url),
        scope: budget.copy(&original.scope),
        scope_schema_url: budget.copy(&original.scope_schema_url),
        service: original.service.clone(),
        pin: original.pin.clone(),
    })
}

/// Copies one span, and its origin, out of the request buffer they share (a span arriving
/// for a trace detached already); the copies are charged to the memory budget.
pub(super) fn detach(span: &mut HeldSpan, budget: &Arc<Budget>) {
    if span.origin.pin.is_some() {
        return;
    }
    let data = budget.copy(span.bytes());
    let copy = copy_origin(&span.origin, data.clone(), budget);
    *span = HeldSpan::new(copy, &data, span.trace_state, span.is_root);
}
