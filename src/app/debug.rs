//! `GET /debug/traces/{trace_id}`: where a trace is — held (what it looks like so far) or
//! decided (kept or dropped, by which policy, at which probability, why then and when) —
//! from the buffer and the decision cache.

use std::sync::Arc;
use std::time::Instant;

use axum::http::{HeaderMap, StatusCode};
use serde_json::{Value, json};

use crate::buffer::Lookup;
use crate::otlp::TraceId;
use crate::pipeline::Pipeline;
use crate::receiver::auth::Authenticator;
use crate::receiver::config::AuthConfig;

/// Who may see the status page and the debug endpoints: anyone without
/// `admin.bearer_tokens`, else a request with one of them (bearer, or basic's password).
pub fn admin_auth(bearer_tokens: &[String]) -> Arc<dyn Fn(&HeaderMap) -> bool + Send + Sync> {
    let auth = Authenticator::new(&AuthConfig {
        bearer_tokens: bearer_tokens.to_vec(),
        ..AuthConfig::default()
    });
    Arc::new(move |headers: &HeaderMap| auth.as_ref().is_none_or(|a| a.allows_person(headers)))
}

fn parse(id: &str) -> Option<TraceId> {
    if id.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(id.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(TraceId(out))
}

fn ms(d: std::time::Duration) -> u64 {
    d.as_millis() as u64
}

/// The answer for one trace id.
pub fn lookup(pipeline: &Pipeline, id: &str) -> (StatusCode, Value) {
    let Some(trace_id) = parse(id) else {
        return (
            StatusCode::BAD_REQUEST,
            json!({"error": format!("trace_id: expected 32 hex digits, got {id:?}")}),
        );
    };
    let id = id.to_ascii_lowercase();
    let now = Instant::now();
    match pipeline.buffer.lookup(&trace_id, now) {
        Some(Lookup::Held {
            spans,
            bytes,
            llm_spans,
            root_seen,
            age,
            due_in,
            summary,
        }) => (
            StatusCode::OK,
            json!({
                "trace_id": id,
                "state": "held",
                "spans": spans,
                "bytes": bytes,
                "llm_spans": llm_spans,
                "root_seen": root_seen,
                "age_ms": ms(age),
                "decided_in_ms": ms(due_in),
                "summary": {
                    "duration_ms": summary.duration_ms(),
                    "error": summary.has_error,
                    "user": summary.user.as_deref(),
                    "session": summary.session.as_deref(),
                    "note": "LLM calls, tokens and cost are counted when the trace is decided",
                },
            }),
        ),
        Some(Lookup::Decided(d)) => (
            StatusCode::OK,
            json!({
                "trace_id": id,
                "state": "decided",
                "decision": if d.keep() { "kept" } else { "dropped" },
                "policy": d.by().label(),
                "probability": d.threshold().probability(),
                "reason": d.reason().label(),
                "decided_s_ago": d.age(now).as_secs(),
                "dry_run": d.dry_run(),
            }),
        ),
        None => {
            let owner = pipeline
                .cluster
                .as_ref()
                .and_then(|c| c.ring().current.elsewhere(&trace_id).map(|p| p.to_string()));
            match owner {
                Some(owner) => (
                    StatusCode::NOT_FOUND,
                    json!({
                        "trace_id": id,
                        "state": "elsewhere",
                        "owner": owner,
                        "message": "another replica owns this trace: ask it",
                    }),
                ),
                None => (
                    StatusCode::NOT_FOUND,
                    json!({
                        "trace_id": id,
                        "state": "unknown",
                        "message": "not held, and not among the decisions remembered (sampling.decision_cache_size): never seen here, or decided too long ago",
                    }),
                ),
            }
        }
    }
}

/// What the status page shows beyond the metrics: the cluster's members.
pub fn live_status(pipeline: &Pipeline) -> Value {
    let cluster = pipeline.cluster.as_ref().map(|c| {
        let routing = c.ring();
        json!({
            "self": c.me(),
            "members": routing.current.addrs().map(|a| a.to_string()).collect::<Vec<_>>(),
            "overlapping": routing.overlapping(Instant::now()),
            "leaving": c.is_leaving(),
        })
    });
    json!({ "cluster": cluster })
}
