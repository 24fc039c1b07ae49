//! The admin server: `/metrics`, `/healthz`, `/readyz`, and (when enabled)
//! `/debug/traces/{trace_id}`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use super::Metrics;

/// Shared state of the admin endpoints.
#[derive(Clone)]
pub struct Admin {
    pub metrics: Arc<Metrics>,
    /// True once receivers are bound, false again when shutdown begins.
    pub ready: Arc<AtomicBool>,
    /// False once a task the daemon cannot do without (the decision task) has died:
    /// `/healthz` then fails, so the orchestrator restarts the process.
    pub healthy: Arc<AtomicBool>,
    /// `/debug/traces`, when `admin.debug_traces` is on.
    pub debug: Option<Arc<DebugTraces>>,
}

/// Answers `/debug/traces/{trace_id}`: the status code and JSON body for a trace id (as
/// given in the path).
pub type TraceLookup = Box<dyn Fn(&str) -> (StatusCode, serde_json::Value) + Send + Sync>;

/// The debug endpoints: who may call them, and the lookup (set once the pipeline exists).
pub struct DebugTraces {
    pub allows: Box<dyn Fn(&HeaderMap) -> bool + Send + Sync>,
    pub lookup: std::sync::OnceLock<TraceLookup>,
}

async fn debug_trace(
    State(admin): State<Admin>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> impl IntoResponse {
    let Some(debug) = &admin.debug else {
        return (StatusCode::NOT_FOUND, axum::Json(serde_json::json!({})));
    };
    if !(debug.allows)(&headers) {
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(serde_json::json!({
                "error": "missing or invalid credentials: send \"authorization: Bearer <token>\" with one of admin.bearer_tokens"
            })),
        );
    }
    match debug.lookup.get() {
        Some(lookup) => {
            let (status, body) = lookup(&id);
            (status, axum::Json(body))
        }
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(serde_json::json!({"error": "llmtail is starting"})),
        ),
    }
}

/// Rendered off the async workers: a scrape never holds up a receiver or the decision task.
async fn metrics(State(admin): State<Admin>) -> impl IntoResponse {
    let body = tokio::task::spawn_blocking(move || admin.metrics.render())
        .await
        .unwrap_or_default();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
}

async fn healthz(State(admin): State<Admin>) -> impl IntoResponse {
    if admin.healthy.load(Ordering::SeqCst) {
        (StatusCode::OK, "ok\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "the decision task has stopped; restart llmtail\n",
        )
    }
}

async fn readyz(State(admin): State<Admin>) -> impl IntoResponse {
    if admin.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` until `stop` is cancelled.
pub async fn serve_admin(
    listener: tokio::net::TcpListener,
    admin: Admin,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let mut app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz));
    if admin.debug.is_some() {
        app = app.route("/debug/traces/{id}", get(debug_trace));
    }
    let app = app.with_state(admin);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
}

/// Binds the admin listener (done early so `/healthz` answers during startup).
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}
