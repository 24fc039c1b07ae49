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
    let stop_admin = CancellationToken::new();
    let admin_task = tokio::spawn(telemetry::serve_admin(
        admin_listener,
        Admin {
            metrics: metrics.clone(),
            ready: ready.clone(),
        },
        stop_admin.clone(),
    ));

    let sink = match (&cfg.exporter.otlp, &cfg.exporter.file) {
        (Some(otlp), _) => Sink::Otlp(exporter::otlp::OtlpSink::new(otlp)?),
        (None, Some(file)) => Sink::File(
            exporter::file::FileSink::open(&file.path)
                .await
                .with_context(|| {
                    format!("cannot open exporter.file.path {}", file.path.display())
                })?,
        ),
        (None, None) => anyhow::bail!("no exporter configured"),
    };
    let control = ExporterControl::default();
    let (export, export_task) = exporter::start(
        sink,
        ExporterSettings {
            batch: cfg.exporter.batch.clone(),
            retry: cfg.exporter.retry.clone(),
            max_spans: cfg.exporter.queue.max_spans,
            concurrency: cfg.exporter.queue.concurrency,
        },
        metrics.clone(),
        control.clone(),
    );

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
        export: export.clone(),
    });

    let grpc_addr = parse_addr(&cfg.receiver.grpc.endpoint, "receiver.grpc.endpoint")?;
    let grpc_listener = tokio::net::TcpListener::bind(grpc_addr)
        .await
        .with_context(|| format!("cannot listen on receiver.grpc.endpoint {grpc_addr}"))?;
    if let Some(http) = &cfg.receiver.http {
        tracing::warn!(endpoint = %http.endpoint, "receiver.http is configured but OTLP/HTTP is not served by this version; only OTLP/gRPC is");
    }
    let stop_receivers = CancellationToken::new();
    let grpc_task = {
        let stop = stop_receivers.clone();
        let service = TraceService::new(pipeline.clone(), cfg.receiver.grpc.max_request_bytes);
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(grpc_listener),
                    async move { stop.cancelled().await },
                ),
        )
    };

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
    tracing::info!(grpc = %grpc_addr, admin = %admin_addr, "llmtail is ready");

    shutdown.await;
    tracing::info!(timeout = ?cfg.shutdown_timeout, "shutting down: deciding pending traces and flushing");
    let deadline = tokio::time::Instant::now() + cfg.shutdown_timeout;
    ready.store(false, Ordering::SeqCst);
    stop_receivers.cancel();
    match tokio::time::timeout_at(deadline, grpc_task).await {
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "gRPC receiver ended with an error"),
        Err(_) => tracing::warn!("gRPC receiver did not stop before the shutdown timeout"),
        _ => {}
    }
    stop_ticker.cancel();
    let _ = ticker_task.await;
    pipeline.decide_all();
    control.flush.cancel();
    let mut export_task = export_task;
    if tokio::time::timeout_at(deadline, &mut export_task)
        .await
        .is_err()
    {
        control.abort.cancel();
        let _ = export_task.await;
    }
    let lost_at_shutdown = metrics
        .spans_lost
        .with_label_values(&[lost::SHUTDOWN])
        .get();
    stop_admin.cancel();
    let _ = admin_task.await;
    let ended = if lost_at_shutdown == 0 && export.queued() == 0 {
        Ended::Flushed
    } else {
        Ended::TimedOut {
            lost_spans: lost_at_shutdown,
        }
    };
    tracing::info!(
        ?ended,
        exported = metrics.spans_exported.get(),
        "llmtail stopped"
    );
    Ok(ended)
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
