//! Wiring and lifecycle: start every stage, then on SIGTERM/SIGINT shut down in order —
//! not ready, receivers stopped, every pending trace decided, the exporter flushed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::buffer::{BufferLimits, TraceBuffer};
use crate::config::Config;
use crate::exporter::{self, ExporterControl, ExporterSettings, Sink};
use crate::llm::Pricing;
use crate::pipeline::Pipeline;
use crate::receiver::grpc::TraceService;
use crate::sampler::Sampler;
use crate::telemetry::{self, Admin, Metrics, lost};

/// How often the buffer is swept for traces whose deadline passed; bounds how late past
/// its deadline a trace is decided.
const DECISION_TICK: Duration = Duration::from_millis(10);

/// How the daemon ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// Everything pending was decided and flushed.
    Flushed,
    /// The shutdown timeout ran out with this many kept spans still unexported.
    TimedOut { lost_spans: u64 },
}

fn parse_addr(s: &str, key: &str) -> anyhow::Result<SocketAddr> {
    s.parse()
        .with_context(|| format!("{key}: {s:?} is not host:port"))
}

/// Runs the daemon until `shutdown` completes (a signal in production, a token in tests).
pub async fn run(
    cfg: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<Ended> {
    let metrics = Metrics::new();
    let ready = Arc::new(AtomicBool::new(false));

    let admin_addr = parse_addr(&cfg.admin.endpoint, "admin.endpoint")?;
    let admin_listener = telemetry::bind(admin_addr)
        .await
        .with_context(|| format!("cannot listen on admin.endpoint {admin_addr}"))?;
    // The bound address, which differs from the configured one for port 0.
    let admin_addr = admin_listener.local_addr()?;
    let stop_admin = CancellationToken::new();
    let admin_task = tokio::spawn(telemetry::serve_admin(
        admin_listener,
        Admin {
            metrics: metrics.clone(),
            ready: ready.clone(),
        },
        stop_admin.clone(),
    ));

    let control = ExporterControl::default();
    let mut exporters = Vec::new();
    let mut export_tasks = Vec::new();
    for ec in &cfg.exporters {
        let sink = Sink::from_config(ec)
            .await
            .with_context(|| format!("exporter {:?}", ec.name))?;
        let (queue, task) = exporter::start(
            &ec.name,
            sink,
            ExporterSettings {
                batch: ec.batch.clone(),
                retry: ec.retry.clone(),
                max_spans: ec.queue.max_spans,
                concurrency: ec.queue.concurrency,
            },
            metrics.clone(),
            control.clone(),
        );
        exporters.push(queue);
        export_tasks.push(task);
    }

    let s = &cfg.sampling;
    let pipeline = Arc::new(Pipeline {
        buffer: TraceBuffer::new(
            BufferLimits {
                decision_wait: s.decision_wait.0,
                root_grace: s.root_grace.0,
                max_traces: s.max_traces,
                decision_cache_size: s.decision_cache_size,
            },
            Sampler::new(s),
        ),
        pricing: Pricing::new(&cfg.llm.pricing),
        metrics: metrics.clone(),
        exporters: exporters.clone(),
    });

    let stop_receivers = CancellationToken::new();
    let mut receivers: Vec<tokio::task::JoinHandle<()>> = Vec::new();
    let mut bound = Vec::new();
    if cfg.receiver.grpc.enabled {
        let addr = parse_addr(&cfg.receiver.grpc.endpoint, "receiver.grpc.endpoint")?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on receiver.grpc.endpoint {addr}"))?;
        bound.push(format!("grpc={}", listener.local_addr()?));
        let stop = stop_receivers.clone();
        let service = TraceService::new(pipeline.clone(), cfg.receiver.grpc.max_request_bytes);
        receivers.push(tokio::spawn(async move {
            let served = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(listener),
                    async move { stop.cancelled().await },
                )
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "gRPC receiver failed");
            }
        }));
    }
    if cfg.receiver.http.enabled {
        let addr = parse_addr(&cfg.receiver.http.endpoint, "receiver.http.endpoint")?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on receiver.http.endpoint {addr}"))?;
        bound.push(format!(
            "http={}{}",
            listener.local_addr()?,
            cfg.receiver.http.path
        ));
        let stop = stop_receivers.clone();
        let app = crate::receiver::http::router(pipeline.clone(), &cfg.receiver.http);
        receivers.push(tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "HTTP receiver failed");
            }
        }));
    }

    let stop_ticker = CancellationToken::new();
    let ticker_task = {
        let stop = stop_ticker.clone();
        let pipeline = pipeline.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(DECISION_TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    biased;
                    () = stop.cancelled() => break,
                    _ = tick.tick() => pipeline.decide_due(),
                }
            }
        })
    };

    ready.store(true, Ordering::SeqCst);
    tracing::info!(
        "llmtail is ready: {} admin={admin_addr} exporters={}",
        bound.join(" "),
        cfg.exporters.len()
    );

    shutdown.await;
    tracing::info!(timeout = ?cfg.shutdown_timeout, "shutting down: deciding pending traces and flushing");
    let deadline = tokio::time::Instant::now() + cfg.shutdown_timeout;
    ready.store(false, Ordering::SeqCst);
    stop_receivers.cancel();
    for receiver in receivers {
        if tokio::time::timeout_at(deadline, receiver).await.is_err() {
            tracing::warn!("a receiver did not stop before the shutdown timeout");
        }
    }
    stop_ticker.cancel();
    let _ = ticker_task.await;
    pipeline.decide_all();
    control.flush.cancel();
    let mut flushed = join_all(export_tasks);
    if tokio::time::timeout_at(deadline, &mut flushed)
        .await
        .is_err()
    {
        control.abort.cancel();
        flushed.await;
    }
    let lost_at_shutdown: u64 = cfg
        .exporters
        .iter()
        .map(|e| {
            metrics
                .spans_lost
                .with_label_values(&[e.name.as_str(), lost::SHUTDOWN])
                .get()
        })
        .sum();
    stop_admin.cancel();
    let _ = admin_task.await;
    let ended = if lost_at_shutdown == 0 && exporters.iter().all(|q| q.queued() == 0) {
        Ended::Flushed
    } else {
        Ended::TimedOut {
            lost_spans: lost_at_shutdown,
        }
    };
    tracing::info!(?ended, "llmtail stopped");
    Ok(ended)
}

/// Waits for every task, in a future that can be polled again after a timeout.
fn join_all(
    tasks: Vec<tokio::task::JoinHandle<()>>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    Box::pin(async move {
        for task in tasks {
            let _ = task.await;
        }
    })
}

/// Completes on the first SIGTERM or SIGINT.
pub async fn termination_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {},
                    _ = int.recv() => {},
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
