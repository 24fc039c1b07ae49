//! The admin server: `/metrics`, `/healthz`, `/readyz`, the status page (`/` and
//! `/api/status`) and, when enabled, `/debug/traces/{trace_id}`. With
//! `admin.bearer_tokens`, the status page and the debug endpoints need one of them (as a
//! bearer token, or as the password of HTTP basic authentication, which browsers ask for);
//! `/metrics` and the probes stay open for Prometheus and the kubelet.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use super::Metrics;
use super::status::{self, StatusPage};

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
    /// The status page, unless `admin.status_page` is off.
    pub status: Option<Arc<StatusPage>>,
    /// Whether a request may see the status page and the debug endpoints.
    pub allows: Arc<dyn Fn(&HeaderMap) -> bool + Send + Sync>,
    /// Set once the trace log is open: true while it cannot be written (not ready then).
    pub storage_failing: Arc<std::sync::OnceLock<Arc<AtomicBool>>>,
}

/// Answers `/debug/traces/{trace_id}`: the status code and JSON body for a trace id (as
/// given in the path).
pub type TraceLookup = Box<dyn Fn(&str) -> (StatusCode, serde_json::Value) + Send + Sync>;

/// The debug endpoints' lookup (set once the pipeline exists).
pub struct DebugTraces {
    pub lookup: std::sync::OnceLock<TraceLookup>,
}

/// The answer to a request without valid credentials: browsers ask for them (basic
/// authentication, the token as password), scripts read how to send them.
fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(
            header::WWW_AUTHENTICATE,
            "Basic realm=\"llmtail admin\", charset=\"UTF-8\"",
        )],
        axum::Json(serde_json::json!({
            "error": "missing or invalid credentials: send \"authorization: Bearer <token>\" with one of admin.bearer_tokens (or the token as the password of basic authentication)"
        })),
    )
        .into_response()
}

async fn status_page(State(admin): State<Admin>, headers: HeaderMap) -> Response {
    if !(admin.allows)(&headers) {
        return unauthorized();
    }
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            // The page's own script and style only; nothing from elsewhere.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self'",
            ),
        ],
        status::PAGE,
    )
        .into_response()
}

async fn api_status(State(admin): State<Admin>, headers: HeaderMap) -> Response {
    if !(admin.allows)(&headers) {
        return unauthorized();
    }
    let Some(page) = admin.status.clone() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let ready = admin.ready.load(Ordering::SeqCst);
    let healthy = admin.healthy.load(Ordering::SeqCst);
    let metrics = admin.metrics.clone();
    let body = tokio::task::spawn_blocking(move || page.to_json(&metrics, ready, healthy))
        .await
        .unwrap_or_default();
    ([(header::CACHE_CONTROL, "no-store")], axum::Json(body)).into_response()
}

async fn debug_trace(
    State(admin): State<Admin>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let Some(debug) = &admin.debug else {
        return StatusCode::NOT_FOUND.into_response();
    };
    if !(admin.allows)(&headers) {
        return unauthorized();
    }
    match debug.lookup.get() {
        Some(lookup) => {
            let (status, body) = lookup(&id);
            (status, axum::Json(body)).into_response()
        }
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(serde_json::json!({"error": "llmtail is starting"})),
        )
            .into_response(),
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
    let storage_failing = admin
        .storage_failing
        .get()
        .is_some_and(|f| f.load(Ordering::Acquire));
    if storage_failing {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the trace log cannot be written\n",
        )
    } else if admin.ready.load(Ordering::SeqCst) {
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
    if admin.status.is_some() {
        app = app
            .route("/", get(status_page))
            .route("/api/status", get(api_status));
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
