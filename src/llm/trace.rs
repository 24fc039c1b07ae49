//! A trace's LLM spans resolved into calls, each counted once whatever the layering.
//!
//! Instrumentations layer spans on one call: a wrapper library's span around the SDK's own
//! span, an agent or workflow span repeating its children's usage, a log-type span that
//! records a streamed call's usage after the request span ended. The rules (docs/llm.md,
//! "Counting a call once"):
//!
//! 1. **Records pair with their request.** A [`Role::Record`] span (Logfire's
//!    `logfire.span_type=log`) gives its usage to the latest earlier call span of the same
//!    scope, parent and request model that has none; unpaired, it is a call itself.
//! 2. **Layers form a forest.** A call span's *wrapper* is its nearest ancestor that is an
//!    LLM span, or a sibling LLM span of another scope whose time span contains it (the
//!    Anthropic SDK's own span beside OpenInference's `messages.stream` span).
//! 3. **A call is a leaf.** Each LLM span that wraps no other is one call (an aggregate
//!    leaf only contributes usage). A chain of wrappers each around a single call is that
//!    call's layers: the call takes their model if it has none, their error if they are
//!    calls, and their usage if it has none.
//! 4. **Usage is counted once, at the most specific span carrying it**: a wrapper's usage
//!    counts only when no span below it carries usage; over several calls it counts as
//!    tokens and cost without a call.

use std::collections::HashMap;
use std::sync::Arc;

use std::time::Instant;

use super::call::{CallSpan, Role};
use super::{LlmCall, UNKNOWN_MODEL};
use crate::otlp::reframe::HeldSpan;
use crate::sampling::TraceSummary;

/// Counts a trace's LLM calls when it is decided, before the sampler sees its summary:
/// resolves its LLM spans into calls counted once ([`resolve`]), records them (metrics,
/// anomalies, boost) and completes the summary's LLM figures.
/// A held trace keeps which of its spans are LLM calls (`calls`, indexes into `spans`), not
/// their facts: they are read again from the spans' bytes here, with every span's id and
/// parent id.
pub trait Settle: Send + Sync {
    fn settle(&self, summary: &mut TraceSummary, spans: &[HeldSpan], calls: &[u32], now: Instant);

    /// The LLM call a held span is, read again from its bytes.
    fn recall(&self, span: &HeldSpan) -> Option<CallSpan>;
}

/// The calls `calls` names among `spans`, read again from their bytes.
pub fn recall_all(settle: &dyn Settle, spans: &[HeldSpan], calls: &[u32]) -> Vec<CallSpan> {
    calls
        .iter()
        .filter_map(|&i| spans.get(i as usize))
        .filter_map(|s| settle.recall(s))
        .collect()
}

/// Every span's (span id, parent span id), read from its bytes.
pub fn links(spans: &[HeldSpan]) -> Vec<([u8; 8], [u8; 8])> {
    spans
        .iter()
        .filter_map(|s| crate::otlp::scan::span_link(s.bytes()))
        .collect()
}

/// What a trace's LLM spans come to.
#[derive(Debug, Clone, PartialEq)]
pub enum Counted {
    /// One call, with its service.
    Call(LlmCall, Arc<str>),
    /// Usage of calls not seen as spans of their own (an aggregate's), without a call.
    Usage(LlmCall, Arc<str>),
}

/// Ancestor walks stop here (a parent chain that loops, or an absurdly deep trace).
const MAX_DEPTH: usize = 256;
/// Sibling layers are looked for among at most this many LLM spans of one parent.
const MAX_SIBLINGS: usize = 64;

/// Below this many entries, lookups scan a slice: cheaper than building a hash map for the
/// handful of spans most traces have.
const SCAN_BELOW: usize = 64;

/// Parent by span id over a trace's (span id, parent id) pairs.
enum Parents<'a> {
    Scan(&'a [([u8; 8], [u8; 8])]),
    Map(HashMap<[u8; 8], [u8; 8]>),
}

impl Parents<'_> {
    fn of(&self, id: &[u8; 8]) -> Option<[u8; 8]> {
        match self {
            Parents::Scan(links) => links.iter().find(|(s, _)| s == id).map(|(_, p)| *p),
            Parents::Map(map) => map.get(id).copied(),
        }
    }
}

/// Resolves a trace's LLM spans. `links` are every span's (span id, parent id), all spans
/// of the trace, not only LLM ones.
pub fn resolve(mut spans: Vec<CallSpan>, links: &[([u8; 8], [u8; 8])]) -> Vec<Counted> {
    if spans.len() <= 1 {
        return spans.into_iter().filter_map(alone).collect();
    }
    pair_records(&mut spans);
    let n = spans.len();
    let parents = if links.len() < SCAN_BELOW {
        Parents::Scan(links)
    } else {
        Parents::Map(links.iter().copied().collect())
    };
    let index: Option<HashMap<[u8; 8], usize>> = (n >= SCAN_BELOW).then(|| {
        spans
            .iter()
            .enumerate()
            .map(|(i, s)| (s.span_id, i))
            .collect()
    });
    let find = |id: &[u8; 8]| match &index {
        Some(map) => map.get(id).copied(),
        None => spans.iter().position(|s| &s.span_id == id),
    };
    // Rule 2: each span's wrapper.
    let mut wrapper: Vec<Option<usize>> = spans
        .iter()
        .map(|s| {
            let mut id = s.parent_id;
            for _ in 0..MAX_DEPTH {
                if id == [0; 8] {
                    return None;
                }
                if let Some(w) = find(&id) {
                    return Some(w);
                }
                id = parents.of(&id)?;
            }
            None
        })
        .collect();
    // Siblings: LLM spans grouped by parent.
    let mut by_parent: Vec<usize> = (0..n).collect();
    by_parent.sort_unstable_by_key(|&i| spans[i].parent_id);
    for siblings in by_parent
        .chunk_by(|&a, &b| spans[a].parent_id == spans[b].parent_id)
        .filter(|v| v.len() >= 2 && v.len() <= MAX_SIBLINGS)
    {
        for &inner in siblings {
            let best = siblings
                .iter()
                .copied()
                .filter(|&outer| layers_of_one_call(&spans[outer], &spans[inner], outer, inner))
                .min_by_key(|&outer| spans[outer].end_ns.saturating_sub(spans[outer].start_ns));
            if best.is_some() {
                wrapper[inner] = best;
            }
        }
    }
    // Leaves below each span, and whether usage is carried below it.
    let mut leaves = vec![0usize; n];
    let mut usage_below = vec![false; n];
    let mut is_leaf = vec![true; n];
    for w in wrapper.iter().flatten() {
        is_leaf[*w] = false;
    }
    for i in 0..n {
        let mut up = wrapper[i];
        for _ in 0..MAX_DEPTH {
            let Some(w) = up else { break };
            if is_leaf[i] {
                leaves[w] += 1;
            }
            if spans[i].has_usage {
                usage_below[w] = true;
            }
            up = wrapper[w];
        }
    }
    // Rules 3 and 4.
    let mut consumed = vec![false; n];
    let mut out = Vec::new();
    for i in (0..n).filter(|&i| is_leaf[i]) {
        if spans[i].role == Role::Aggregate {
            continue;
        }
        let mut call = spans[i].call.clone();
        let mut has_usage = spans[i].has_usage;
        let mut up = wrapper[i];
        for _ in 0..MAX_DEPTH {
            let Some(w) = up else { break };
            if leaves[w] != 1 {
                break;
            }
            let layer = &spans[w];
            if !has_usage && layer.has_usage {
                take_usage(&mut call, &layer.call);
                has_usage = true;
                consumed[w] = true;
            }
            if &*call.model == UNKNOWN_MODEL && &*layer.call.model != UNKNOWN_MODEL {
                call.model = layer.call.model.clone();
                call.request_model = layer.call.request_model.clone();
            }
            if layer.role == Role::Call && layer.call.error && !call.error {
                call.error = true;
                call.error_type = layer.call.error_type.clone();
            }
            up = wrapper[w];
        }
        out.push(Counted::Call(call, spans[i].service.clone()));
    }
    for i in 0..n {
        let s = &spans[i];
        let aggregate_leaf = is_leaf[i] && s.role == Role::Aggregate;
        if s.has_usage && !usage_below[i] && !consumed[i] && (!is_leaf[i] || aggregate_leaf) {
            out.push(Counted::Usage(s.call.clone(), s.service.clone()));
        }
    }
    out
}

/// One LLM span alone in its trace.
fn alone(s: CallSpan) -> Option<Counted> {
    match s.role {
        Role::Call | Role::Record => Some(Counted::Call(s.call, s.service)),
        Role::Aggregate => s.has_usage.then_some(Counted::Usage(s.call, s.service)),
    }
}

/// Whether sibling `outer` is another library's span of the same call as `inner`: both
/// calls, different scopes, compatible models, and `outer`'s time span contains `inner`'s
/// (ties broken by position, so two spans never wrap each other).
fn layers_of_one_call(outer: &CallSpan, inner: &CallSpan, oi: usize, ii: usize) -> bool {
    if oi == ii
        || outer.role != Role::Call
        || inner.role != Role::Call
        || outer.scope == inner.scope
    {
        return false;
    }
    let known = |m: &str| m != UNKNOWN_MODEL;
    let (a, b) = (&outer.call.request_model, &inner.call.request_model);
    if known(a) && known(b) && a != b && outer.call.model != inner.call.model {
        return false;
    }
    let contains = outer.start_ns <= inner.start_ns && inner.end_ns <= outer.end_ns;
    let same = outer.start_ns == inner.start_ns && outer.end_ns == inner.end_ns;
    contains && (!same || oi < ii)
}

/// Rule 1: each record's usage goes to the call span it records.
fn pair_records(spans: &mut Vec<CallSpan>) {
    let mut i = 0;
    while i < spans.len() {
        if spans[i].role != Role::Record {
            i += 1;
            continue;
        }
        let r = &spans[i];
        let request = spans
            .iter()
            .enumerate()
            .filter(|(_, q)| {
                q.role == Role::Call
                    && !q.has_usage
                    && q.scope == r.scope
                    && q.parent_id == r.parent_id
                    && q.start_ns <= r.start_ns
                    && q.call.request_model == r.call.request_model
            })
            .max_by_key(|(_, q)| q.start_ns)
            .map(|(j, _)| j);
        match request {
            Some(j) => {
                let record = spans.swap_remove(i);
                let j = if j == spans.len() { i } else { j };
                let q = &mut spans[j];
                take_usage(&mut q.call, &record.call);
                q.has_usage = true;
                q.call.response_model = record.call.response_model.or(q.call.response_model.take());
                q.call.model = q
                    .call
                    .response_model
                    .clone()
                    .unwrap_or(q.call.model.clone());
                // The call lasted until the record was written.
                if q.call.latency_attr_ms.is_none() && record.end_ns > q.start_ns && q.start_ns > 0
                {
                    q.call.latency_seconds = Some((record.end_ns - q.start_ns) as f64 / 1e9);
                }
                q.end_ns = q.end_ns.max(record.end_ns);
            }
            None => {
                spans[i].role = Role::Call;
                i += 1;
            }
        }
    }
}

fn take_usage(call: &mut LlmCall, from: &LlmCall) {
    call.usage = from.usage;
    call.reasoning_tokens = from.reasoning_tokens;
    call.cost_usd = from.cost_usd;
    call.cost_from = from.cost_from;
    call.ignored.extend(from.ignored.iter().copied());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::{CostFrom, Usage};

    /// An LLM span: `id` under `parent`, of `scope`, over [start, end] ms, with `tokens`
    /// input tokens (none: no usage).
    fn span(
        id: u8,
        parent: u8,
        scope: &str,
        (start, end): (u64, u64),
        tokens: Option<u64>,
    ) -> CallSpan {
        CallSpan {
            call: LlmCall {
                model: Arc::from("gpt-4o"),
                request_model: Arc::from("gpt-4o"),
                response_model: None,
                provider: None,
                operation: None,
                usage: Usage {
                    input: tokens.unwrap_or(0),
                    ..Default::default()
                },
                reasoning_tokens: 0,
                cost_usd: tokens.map(|t| t as f64),
                cost_from: CostFrom::Attribute,
                latency_seconds: Some((end - start) as f64 / 1e3),
                ignored: Vec::new(),
                latency_attr_ms: None,
                error: false,
                error_type: None,
            },
            role: Role::Call,
            has_usage: tokens.is_some(),
            span_id: [id; 8],
            parent_id: [parent; 8],
            start_ns: start * 1_000_000,
            end_ns: end * 1_000_000,
            scope: Arc::from(scope),
            service: Arc::from("svc"),
        }
    }

    const NO_LINKS: &[([u8; 8], [u8; 8])] = &[];

    /// (calls, failed calls, input tokens, usage records).
    fn totals(counted: &[Counted]) -> (usize, usize, u64, usize) {
        let mut t = (0, 0, 0, 0);
        for c in counted {
            match c {
                Counted::Call(call, _) => {
                    t.0 += 1;
                    t.1 += usize::from(call.error);
                    t.2 += call.usage.input;
                }
                Counted::Usage(call, _) => {
                    t.2 += call.usage.input;
                    t.3 += 1;
                }
            }
        }
        t
    }

    #[test]
    fn an_sdk_span_under_a_wrapper_is_one_call_at_the_sdk_span() {
        // OpenInference's messages.create (1) around the Anthropic client's own span (2).
        let outer = span(1, 9, "openinference", (0, 100), Some(999));
        let inner = span(2, 1, "com.anthropic.sdk.python", (5, 95), Some(1700));
        let counted = resolve(vec![outer, inner], NO_LINKS);
        assert_eq!(totals(&counted), (1, 0, 1700, 0));
    }

    #[test]
    fn a_sibling_layer_of_another_library_containing_the_call_is_the_same_call() {
        // OpenInference's messages.stream beside the SDK's span, both under the app's.
        let stream = span(1, 9, "openinference", (0, 100), Some(2250));
        let sdk = span(2, 9, "com.anthropic.sdk.python", (1, 99), Some(2100));
        assert_eq!(
            totals(&resolve(vec![stream, sdk], NO_LINKS)),
            (1, 0, 2100, 0)
        );
        // Two concurrent calls of one library under one parent stay two calls.
        let a = span(1, 9, "openinference", (0, 100), Some(10));
        let b = span(2, 9, "openinference", (10, 90), Some(20));
        assert_eq!(totals(&resolve(vec![a, b], NO_LINKS)), (2, 0, 30, 0));
        // Another library's span that does not contain it is another call.
        let a = span(1, 9, "openinference", (0, 50), Some(10));
        let b = span(2, 9, "com.anthropic.sdk.python", (40, 90), Some(20));
        assert_eq!(totals(&resolve(vec![a, b], NO_LINKS)), (2, 0, 30, 0));
    }

    #[test]
    fn a_failed_call_in_two_layers_is_one_failed_call() {
        let mut outer = span(1, 9, "openinference", (0, 100), None);
        outer.call.error = true;
        let mut inner = span(2, 1, "com.anthropic.sdk.python", (5, 95), None);
        inner.call.error = true;
        assert_eq!(totals(&resolve(vec![outer, inner], NO_LINKS)), (1, 1, 0, 0));
        // The wrapper's error is the call's when only it saw the failure.
        let mut outer = span(1, 9, "openinference", (0, 100), None);
        outer.call.error = true;
        let inner = span(2, 1, "sdk", (5, 95), None);
        assert_eq!(totals(&resolve(vec![outer, inner], NO_LINKS)), (1, 1, 0, 0));
    }

    #[test]
    fn a_log_record_gives_its_usage_to_the_streamed_request() {
        let request = span(1, 9, "logfire.openai", (1000, 1010), None);
        let mut record = span(2, 9, "logfire.openai", (1250, 1250), Some(800));
        record.role = Role::Record;
        let other = span(3, 9, "logfire.openai", (1300, 1400), Some(1200));
        let counted = resolve(vec![record, request, other], NO_LINKS);
        assert_eq!(totals(&counted), (2, 0, 2000, 0));
        let Counted::Call(streamed, _) = counted
            .iter()
            .find(|c| matches!(c, Counted::Call(c, _) if c.usage.input == 800))
            .unwrap()
        else {
            unreachable!()
        };
        assert_eq!(
            streamed.latency_seconds,
            Some(0.25),
            "the call lasted until the record"
        );
        // A record with no request to pair with is a call of its own.
        let mut alone = span(2, 9, "logfire.openai", (250, 250), Some(800));
        alone.role = Role::Record;
        let unrelated = span(1, 9, "logfire.openai", (0, 10), Some(5));
        assert_eq!(
            totals(&resolve(vec![alone, unrelated], NO_LINKS)),
            (2, 0, 805, 0)
        );
    }

    #[test]
    fn an_agent_repeating_its_calls_usage_is_not_counted_again() {
        // invoke_agent (1) → chain without LLM facts (5) → two chat calls (2, 3).
        let mut agent = span(1, 9, "agents", (0, 1000), Some(300));
        agent.role = Role::Aggregate;
        let a = span(2, 5, "agents", (10, 400), Some(100));
        let b = span(3, 5, "agents", (500, 900), Some(200));
        let links = &[([5; 8], [1; 8]), ([1; 8], [9; 8])][..];
        assert_eq!(
            totals(&resolve(vec![agent.clone(), a.clone(), b.clone()], links)),
            (2, 0, 300, 0)
        );
        // Its calls without usage: the agent's usage counts once, as usage without a call.
        let a = span(2, 5, "agents", (10, 400), None);
        let b = span(3, 5, "agents", (500, 900), None);
        assert_eq!(
            totals(&resolve(vec![agent.clone(), a, b], links)),
            (2, 0, 300, 1)
        );
        // One call inside: the call takes the agent's usage (no call counted twice).
        let a = span(2, 5, "agents", (10, 400), None);
        assert_eq!(
            totals(&resolve(vec![agent.clone(), a], links)),
            (1, 0, 300, 0)
        );
        // An agent alone only has usage.
        assert_eq!(totals(&resolve(vec![agent], links)), (0, 0, 300, 1));
    }

    #[test]
    fn a_looping_parent_chain_ends() {
        let a = span(1, 7, "x", (0, 10), Some(1));
        let b = span(2, 8, "x", (20, 30), Some(2));
        let links = &[([7; 8], [8; 8]), ([8; 8], [7; 8])][..];
        assert_eq!(totals(&resolve(vec![a, b], links)), (2, 0, 3, 0));
    }
}
