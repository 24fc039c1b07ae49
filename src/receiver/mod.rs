//! Receivers: the protocols spans arrive by. Each hands raw request bytes to the pipeline.

pub mod config;

pub mod auth;
pub mod conn;
pub mod grpc;
pub mod http;
pub mod tls;

use std::sync::Arc;

use anyhow::Context;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::pipeline::Pipeline;
use auth::Authenticator;
use config::ReceiverConfig;
use conn::ConnConfig;

/// Binds and serves the enabled receivers until `stop`; returns their tasks and what each
/// bound (`grpc=127.0.0.1:4317`, `http=…/v1/traces`), for the ready line.
pub async fn start(
    cfg: &ReceiverConfig,
    pipeline: Arc<Pipeline>,
    stop: &CancellationToken,
) -> anyhow::Result<(Vec<JoinHandle<()>>, Vec<String>)> {
    let auth = Authenticator::new(&cfg.auth).map(Arc::new);
    let room = connection_room(cfg);
    let mut tasks = Vec::new();
    let mut bound = Vec::new();
    if cfg.grpc.enabled {
        let grpc = &cfg.grpc;
        let service = grpc::TraceService::new(pipeline.clone(), grpc, auth.clone());
        let tls = match &grpc.tls {
            Some(t) => Some(tls::server_config(t, &[b"h2"]).context("receiver.grpc.tls")?),
            None => None,
        };
        let conn = ConnConfig {
            receiver: "grpc",
            max_connections: grpc.max_connections.min(room),
            header_read_timeout: grpc.header_read_timeout.0,
            idle_timeout: grpc.idle_timeout.0,
            http2_only: true,
            max_concurrent_streams: Some(grpc.max_concurrent_streams),
        };
        let app = axum::Router::new().fallback_service(service);
        let (task, addr) = listen(&grpc.endpoint, app, tls, conn, &pipeline, stop).await?;
        tasks.push(task);
        bound.push(format!("grpc={addr}"));
    }
    if cfg.http.enabled {
        let http = &cfg.http;
        let tls = match &http.tls {
            Some(t) => {
                Some(tls::server_config(t, &[b"h2", b"http/1.1"]).context("receiver.http.tls")?)
            }
            None => None,
        };
        let conn = ConnConfig {
            receiver: "http",
            max_connections: http.max_connections.min(room),
            header_read_timeout: http.header_read_timeout.0,
            idle_timeout: http.idle_timeout.0,
            http2_only: false,
            max_concurrent_streams: None,
        };
        let app = http::router(pipeline.clone(), http, auth.clone());
        let (task, addr) = listen(&http.endpoint, app, tls, conn, &pipeline, stop).await?;
        tasks.push(task);
        bound.push(format!("http={addr}{}", http.path));
    }
    Ok((tasks, bound))
}

/// Binds `endpoint` and serves `app` on it.
async fn listen(
    endpoint: &str,
    app: axum::Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    conn: ConnConfig,
    pipeline: &Pipeline,
    stop: &CancellationToken,
) -> anyhow::Result<(JoinHandle<()>, std::net::SocketAddr)> {
    let key = format!("receiver.{}.endpoint", conn.receiver);
    let addr: std::net::SocketAddr = endpoint
        .parse()
        .with_context(|| format!("{key}: {endpoint:?} is not host:port"))?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {key} {addr}"))?;
    let local = listener.local_addr()?;
    let (metrics, stop) = (pipeline.metrics.clone(), stop.clone());
    let task = tokio::spawn(conn::serve(listener, app, tls, conn, metrics, stop));
    Ok((task, local))
}

/// Descriptors kept for everything but receiver connections: exporters, the log, peers,
/// the admin server, files.
const RESERVED_FILES: u64 = 256;

/// The most connections each receiver may hold within the open-file limit (raised to its
/// hard limit first). When the configured `max_connections` would not fit, they are
/// lowered, with a warning: past the limit, accepts fail and /healthz with them.
fn connection_room(r: &ReceiverConfig) -> usize {
    let Some(room) = conn::fit_file_limit(RESERVED_FILES) else {
        return usize::MAX;
    };
    let receivers = u64::from(r.grpc.enabled) + u64::from(r.http.enabled);
    let wanted = [
        (r.grpc.enabled, r.grpc.max_connections),
        (r.http.enabled, r.http.max_connections),
    ]
    .iter()
    .filter(|(on, _)| *on)
    .map(|(_, n)| *n as u64)
    .sum::<u64>();
    if wanted <= room {
        return usize::MAX;
    }
    let each = (room / receivers.max(1)).max(1) as usize;
    tracing::warn!(
        open_file_limit = room + RESERVED_FILES,
        max_connections = each,
        "the open-file limit cannot hold every receiver's max_connections; lowered to fit (raise the limit: ulimit -n, or the container runtime's nofile)"
    );
    each
}
