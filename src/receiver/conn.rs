//! Connections for both receivers: one accept loop with a connection cap, timeouts for
//! connections that say nothing, backoff on accept errors, and graceful shutdown.
//!
//! A connection holds a slot (of `max_connections`) from accept to close. It must start a
//! request within `header_read_timeout` of opening (TLS handshake and HTTP/2 preface
//! included), and is closed gracefully (HTTP/2 GOAWAY, HTTP/1 after the response) once no
//! request has been in progress for `idle_timeout` — or for `header_read_timeout` while
//! nine in ten slots are taken, so idle connections make room for new ones. Silent or
//! idle connections therefore cannot hold every slot, and the cap keeps the receivers
//! under the process's file-descriptor limit (see [`fit_file_limit`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use hyper::body::Incoming;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::telemetry::{Metrics, Throttle};

/// The address a request's connection came from, as a request extension.
#[derive(Debug, Clone, Copy)]
pub struct RemoteAddr(pub SocketAddr);

/// How one receiver's connections are served.
#[derive(Debug, Clone)]
pub struct ConnConfig {
    /// The label of the connection metrics: `grpc` or `http`.
    pub receiver: &'static str,
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    /// gRPC: HTTP/2 only.
    pub http2_only: bool,
    pub max_concurrent_streams: Option<u32>,
}

/// Longest a connection asked to close may take to finish what it has in progress.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// Longest wait between two failed accepts.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// Requests in progress on one connection, and when it last did anything.
struct Activity {
    opened: Instant,
    in_flight: AtomicUsize,
    requests: AtomicU64,
    /// Milliseconds after `opened` when the last request ended.
    last_ms: AtomicU64,
}

impl Activity {
    fn idle_for(&self, now: Instant) -> Option<Duration> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let since = now.duration_since(self.opened);
        Some(since.saturating_sub(Duration::from_millis(self.last_ms.load(Ordering::Relaxed))))
    }
}

/// Marks a request in progress until dropped.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn begin(a: &Arc<Activity>) -> InFlight {
        a.in_flight.fetch_add(1, Ordering::AcqRel);
        a.requests.fetch_add(1, Ordering::Relaxed);
        InFlight(a.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let ms = self.0.opened.elapsed().as_millis() as u64;
        self.0.last_ms.store(ms, Ordering::Relaxed);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Why a connection was closed by llmtail, the `reason` of
/// `llmtail_connections_closed_total`.
#[derive(Clone, Copy)]
enum Closed {
    /// No request within `header_read_timeout` of opening.
    Silent,
    /// No request in progress for `idle_timeout`.
    Idle,
    /// Idle while nine in ten slots were taken.
    Pressure,
    /// The TLS handshake failed or took longer than `header_read_timeout`.
    Handshake,
}

impl Closed {
    fn label(self) -> &'static str {
        match self {
            Closed::Silent => "silent",
            Closed::Idle => "idle",
            Closed::Pressure => "pressure",
            Closed::Handshake => "tls_handshake",
        }
    }
}

/// Serves `app` on `listener` until `stop`; then accepts no more connections, asks open
/// ones to close, and returns when they have.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    cfg: ConnConfig,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    use hyper_util::rt::{TokioExecutor, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.header_read_timeout);
    // Windows sized by bandwidth-delay estimation (as grpc-go does), not the fixed 1 MiB: a
    // Collector in front sends requests of 8,192 spans, megabytes each, and a fixed window
    // holds each one to a round trip per window's worth.
    builder
        .http2()
        .timer(TokioTimer::new())
        .adaptive_window(true);
    if let Some(n) = cfg.max_concurrent_streams {
        builder.http2().max_concurrent_streams(n);
    }
    let builder = Arc::new(if cfg.http2_only {
        builder.http2_only()
    } else {
        builder
    });
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let slots = Arc::new(Semaphore::new(cfg.max_connections));
    let tracker = TaskTracker::new();
    let open = metrics.connections.with_label_values(&[cfg.receiver]);
    let accept_failures = Throttle::new(Duration::from_secs(10));
    let mut backoff = Duration::from_millis(10);
    loop {
        let permit = tokio::select! {
            () = stop.cancelled() => break,
            permit = slots.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (tcp, remote) = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning,
                    // and say so at most every 10 s.
                    if let Some(held_back) = accept_failures.allow() {
                        tracing::warn!(receiver = cfg.receiver, error = %e, similar_reports_held_back = held_back, "cannot accept a connection; backing off");
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_ACCEPT_BACKOFF);
                    continue;
                }
            },
        };
        backoff = Duration::from_millis(10);
        let _ = tcp.set_nodelay(true);
        let conn = Conn {
            builder: builder.clone(),
            app: app.clone(),
            remote,
            cfg: cfg.clone(),
            slots: slots.clone(),
            metrics: metrics.clone(),
            stop: stop.clone(),
        };
        let acceptor = acceptor.clone();
        let open = open.clone();
        open.inc();
        tracker.spawn(async move {
            match acceptor {
                None => conn.serve(tcp).await,
                Some(acceptor) => {
                    let deadline = conn.cfg.header_read_timeout;
                    match tokio::time::timeout(deadline, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => conn.serve(stream).await,
                        _ => conn.count(Closed::Handshake),
                    }
                }
            }
            open.dec();
            drop(permit);
        });
    }
    tracker.close();
    tracker.wait().await;
}

/// One accepted connection.
struct Conn {
    builder: Arc<hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor>>,
    app: Router,
    remote: SocketAddr,
    cfg: ConnConfig,
    slots: Arc<Semaphore>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
}

impl Conn {
    fn count(&self, why: Closed) {
        self.metrics
            .connections_closed
            .with_label_values(&[self.cfg.receiver, why.label()])
            .inc();
    }

    /// Why this connection should be closed now, if it should.
    fn expired(&self, activity: &Activity, now: Instant) -> Option<Closed> {
        let idle = activity.idle_for(now)?;
        if activity.requests.load(Ordering::Relaxed) == 0 {
            return (idle >= self.cfg.header_read_timeout).then_some(Closed::Silent);
        }
        if idle >= self.cfg.idle_timeout {
            return Some(Closed::Idle);
        }
        let crowded = self.slots.available_permits() < self.cfg.max_connections.div_ceil(10);
        (crowded && idle >= self.cfg.header_read_timeout).then_some(Closed::Pressure)
    }

    async fn serve<IO>(self, io: IO)
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        use tower::ServiceExt;
        let activity = Arc::new(Activity {
            opened: Instant::now(),
            in_flight: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            last_ms: AtomicU64::new(0),
        });
        let service = {
            let (app, activity, remote) = (self.app.clone(), activity.clone(), self.remote);
            hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
                req.extensions_mut().insert(RemoteAddr(remote));
                let in_flight = InFlight::begin(&activity);
                let app = app.clone();
                async move {
                    let response = app.oneshot(req).await;
                    drop(in_flight);
                    response
                }
            })
        };
        let conn = self
            .builder
            .serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(io), service);
        tokio::pin!(conn);
        let tick = (self.cfg.header_read_timeout / 4)
            .clamp(Duration::from_millis(50), Duration::from_secs(1));
        let mut watch = tokio::time::interval(tick);
        watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let closing = loop {
            tokio::select! {
                _ = conn.as_mut() => return,
                () = self.stop.cancelled() => break None,
                _ = watch.tick() => {
                    if let Some(why) = self.expired(&activity, Instant::now()) {
                        break Some(why);
                    }
                }
            }
        };
        if let Some(why) = closing {
            self.count(why);
        }
        conn.as_mut().graceful_shutdown();
        let _ = tokio::time::timeout(CLOSE_GRACE, conn).await;
    }
}

/// Raises the soft limit on open files to the hard limit (as Go and the JVM do at start),
/// and returns how many connections the receivers may hold: what the limit leaves after
/// `reserve` descriptors for everything else (exporters, the log, peers, the admin server).
pub fn fit_file_limit(reserve: u64) -> Option<u64> {
    let (soft, hard) = rlimit::Resource::NOFILE.get().ok()?;
    let raised = rlimit::increase_nofile_limit(hard).unwrap_or(soft);
    Some(raised.saturating_sub(reserve))
}
