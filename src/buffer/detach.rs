//! Detaching: spans held long are copied out of the request they arrived in, so one slow
//! trace does not keep its whole request alive.

use std::sync::Arc;
use std::time::Duration;

use super::HashMap;
use crate::memory::Budget;
use crate::otlp::reframe::{HeldSpan, Origin};

/// Held spans are slices of the request they arrived in, so one trace held long would keep
/// its whole request alive after the request's other traces are decided. A trace held this
/// long gets its spans (and their resource and scope) copied out, once; the memory limit
/// then counts what is really held.
pub const COMPACT_AFTER: Duration = Duration::from_secs(2);

/// Origins copied during one detaching pass, by the original's address: spans of one
/// request detached together share one copy. The original is kept alive for the pass, so
/// its address cannot be reused meanwhile.
pub(super) type Copies = HashMap<*const Origin, (Arc<Origin>, Arc<Origin>)>;

/// Copies a span's bytes, and its origin (once per pass), out of the request buffer they
/// share; the copies are charged to the memory budget. A span in the trace log is left as
/// it is: its bytes are the log's (the page cache's), and the log frees what no span holds
/// by whole segments.
pub(super) fn detach(span: &mut HeldSpan, copies: &mut Copies, budget: &Arc<Budget>) {
    if span.origin.pin.is_some() {
        return;
    }
    span.bytes = budget.copy(&span.bytes);
    let original = span.origin.clone();
    let (_, copy) = copies.entry(Arc::as_ptr(&original)).or_insert_with(|| {
        let copy = Arc::new(Origin {
            resource: budget.copy(&original.resource),
            resource_schema_url: budget.copy(&original.resource_schema_url),
            scope: budget.copy(&original.scope),
            scope_schema_url: budget.copy(&original.scope_schema_url),
            service: original.service.clone(),
            pin: original.pin.clone(),
        });
        (original.clone(), copy)
    });
    span.origin = copy.clone();
}
