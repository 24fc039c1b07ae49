//! Wiring and lifecycle: start every stage, then on SIGTERM/SIGINT shut down in order —
//! not ready, receivers stopped, every pending trace decided, the exporter flushed.

mod debug;
pub mod explain;
mod reload;

use reload::{reload_on_sighup, reload_pricing};

/// How often `llmtail_sampling_probability` is refreshed.
const PROBABILITY_TICK: Duration = Duration::from_secs(1);

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use std::sync::atomic::Ordering as AtomicOrdering;

use crate::buffer::{BufferLimits, TraceBuffer};
use crate::config::Config;
use crate::storage::TraceLog;

/// The policy label of decisions remembered from the trace log's marks (their policy is
/// not recorded).
const REPLAYED_POLICY: &str = "replayed";
use crate::exporter::{self, ExporterControl, ExporterSettings, Sink};
use crate::llm::Pricing;
use crate::llm::observer::LlmObserver;
use crate::memory::DECISION_CACHE_ENTRY;
use crate::otlp::redact::Redactor;
use crate::pipeline::{Budget, Pipeline};
use crate::sampling::Sampler;
use crate::sampling::adaptive::{BaseRate, Boost, TargetController};
use crate::telemetry::status::StatusPage;
use crate::telemetry::{self, Admin, Loss, Metrics};

/// How often the buffer is swept for traces whose deadline passed; bounds how late past
/// its deadline a trace is decided.
const DECISION_TICK: Duration = Duration::from_millis(10);

/// The decision cache takes at most this fraction of the memory budget.
const DECISION_CACHE_SHARE: usize = 4;

/// `sampling.decision_cache_size`, lowered (and said so) where the cache at its fullest
/// would take more than its share of the memory budget: a small pod keeps room for data.
fn decision_cache_size(configured: usize, budget: usize) -> usize {
    let fits = budget / DECISION_CACHE_SHARE / DECISION_CACHE_ENTRY;
    if configured > fits {
        tracing::info!(
            configured,
            used = fits,
            "sampling.decision_cache_size lowered to fit a quarter of limits.max_buffer_bytes"
        );
    }
    configured.min(fits)
}

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
/// Runs the daemon until `shutdown` resolves. With `config_path`, SIGHUP reloads the
/// config from it.
pub async fn run(
    cfg: Config,
    config_path: Option<std::path::PathBuf>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<Ended> {
    let metrics = Metrics::new();
    let ready = Arc::new(AtomicBool::new(false));
    let healthy = Arc::new(AtomicBool::new(true));

    let admin_addr = parse_addr(&cfg.admin.endpoint, "admin.endpoint")?;
    let admin_listener = telemetry::bind(admin_addr)
        .await
        .with_context(|| format!("cannot listen on admin.endpoint {admin_addr}"))?;
    // The bound address, which differs from the configured one for port 0.
    let admin_addr = admin_listener.local_addr()?;
    let stop_admin = CancellationToken::new();
    let debug = cfg.admin.debug_traces.then(|| {
        Arc::new(telemetry::DebugTraces {
            lookup: std::sync::OnceLock::new(),
        })
    });
    let status = cfg.admin.status_page.then(|| {
        Arc::new(StatusPage::new(
            cfg.admin.trace_url.clone(),
            cfg.admin.debug_traces,
            crate::pipeline::limits::cgroup_memory_limit(),
        ))
    });
    let storage_failing = Arc::new(std::sync::OnceLock::new());
    let admin_task = tokio::spawn(telemetry::serve_admin(
        admin_listener,
        Admin {
            metrics: metrics.clone(),
            ready: ready.clone(),
            healthy: healthy.clone(),
            debug: debug.clone(),
            status: status.clone(),
            allows: debug::admin_auth(&cfg.admin.bearer_tokens),
            storage_failing: storage_failing.clone(),
        },
        stop_admin.clone(),
    ));

    // The trace log, opened (and the directory locked) before anything is taken; what it
    // holds from before is replayed once the pipeline stands.
    let (log, replay) = match cfg.storage.enabled() {
        true => {
            let storage = cfg.storage.clone();
            let m = crate::storage::StorageMetrics {
                bytes: metrics.storage_bytes.clone(),
                limit_bytes: metrics.storage_limit_bytes.clone(),
                segments: metrics.storage_segments.clone(),
                appended_bytes: metrics.storage_appended_bytes.clone(),
                write_errors: metrics.storage_write_errors.clone(),
                decided_marks: metrics.storage_marks.with_label_values(&["decided"]),
                delivered_marks: metrics.storage_marks.with_label_values(&["delivered"]),
                dropped_marks: metrics.storage_marks.with_label_values(&["dropped"]),
            };
            let (log, replay) = tokio::task::spawn_blocking(move || TraceLog::open(&storage, m))
                .await?
                .with_context(|| match &cfg.storage.directory {
                    Some(dir) => format!("storage.directory {}", dir.display()),
                    None => "storage.memory".to_owned(),
                })?;
            let _ = storage_failing.set(log.failing_flag());
            (Some(Arc::new(log)), Some(replay))
        }
        false => (None, None),
    };
    let budget = Budget::new();
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
                budget: budget.clone(),
                log: log.clone(),
            },
            metrics.clone(),
            control.clone(),
        );
        exporters.push(queue);
        export_tasks.push(task);
    }

    let s = &cfg.sampling;
    metrics.buffer_limit_traces.set(s.max_traces as i64);
    let decision_cache_size = decision_cache_size(s.decision_cache_size, cfg.limits.buffer_bytes());
    let base = Arc::new(BaseRate::new(s.base_rate));
    let pricing = Arc::new(Pricing::new(&cfg.llm.pricing));
    pricing.set_cost_source(cfg.llm.cost_source);
    if let Some(file) = &cfg.llm.pricing_file {
        pricing.load_file(file)?;
    }
    let cluster = cfg.cluster.enabled().then(|| {
        crate::cluster::Cluster::new(
            &cfg.cluster,
            cfg.cluster.overlap(s.max_trace_duration.0),
            cfg.receiver.auth.bearer_tokens.first().map(String::as_str),
            metrics.clone(),
        )
    });
    if cluster.is_none() {
        metrics.cluster_peers.set(1);
    }
    let (cluster, fallback) = match cluster {
        Some((c, rx)) => (Some(c), Some(rx)),
        None => (None, None),
    };
    let observer = Arc::new(LlmObserver::new(
        &cfg.llm,
        metrics.clone(),
        s.boost.clone().map(Boost::new),
        base.clone(),
        pricing.clone(),
    ));
    let (redecided, to_read_back) = tokio::sync::mpsc::unbounded_channel();
    let pipeline = Arc::new(Pipeline {
        buffer: TraceBuffer::new(
            buffer_limits(&cfg, decision_cache_size),
            Sampler::new(s, base.clone()),
            budget.clone(),
            observer.clone(),
        ),
        pricing: pricing.clone(),
        observer,
        metrics: metrics.clone(),
        exporters: exporters.clone(),
        redactor: Redactor::new(&cfg.llm.privacy).context("llm.privacy")?,
        rollup: cfg.llm.trace_rollup,
        limits: Default::default(),
        cluster: cluster.clone(),
        budget,
        reserved_memory: decision_cache_size * DECISION_CACHE_ENTRY,
        recent_kept: status.as_ref().map(|s| s.recent.clone()),
        log: log.clone(),
        redecided: log.as_ref().map(|_| redecided),
    });
    if log.is_some() {
        tokio::spawn(crate::pipeline::read_back(pipeline.clone(), to_read_back));
    }
    if let Some(status) = &status {
        let pipeline = pipeline.clone();
        let _ = status
            .live
            .set(Box::new(move || debug::live_status(&pipeline)));
        let (status, metrics) = (status.clone(), metrics.clone());
        tokio::spawn(async move {
            let mut every = tokio::time::interval(telemetry::status::SAMPLE_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                status.sample(&metrics);
            }
        });
    }
    if let Some(debug) = &debug {
        let pipeline = pipeline.clone();
        let _ = debug
            .lookup
            .set(Box::new(move |id: &str| debug::lookup(&pipeline, id)));
    }
    let stop_fallback = CancellationToken::new();
    let fallback_task =
        fallback.map(|rx| tokio::spawn(take_fallback(rx, pipeline.clone(), stop_fallback.clone())));
    pipeline.limits.set(&cfg.limits);
    metrics
        .buffer_limit_bytes
        .set(cfg.limits.buffer_bytes() as i64);
    tracing::info!(
        max_buffer_bytes = cfg.limits.buffer_bytes(),
        cgroup_memory_limit = ?crate::config::cgroup_memory_limit(),
        "held traces are bounded"
    );
    let stop_background = CancellationToken::new();
    let mut background = vec![tokio::spawn(adapt(
        pipeline.clone(),
        s.target().map(TargetController::new),
        s.target_interval.0,
        stop_background.clone(),
    ))];
    if let Some(file) = cfg.llm.pricing_file.clone() {
        background.push(tokio::spawn(reload_pricing(
            pricing,
            file,
            cfg.llm.pricing_reload_interval.0,
            metrics.clone(),
            stop_background.clone(),
        )));
    }

    if let Some(log) = &log {
        // Upgrading from the separate write-ahead log: its kept spans move into the trace
        // log, once.
        for (ec, queue) in cfg.exporters.iter().zip(&exporters) {
            if let Some(dir) = &ec.queue.directory {
                tokio::spawn(import_queue(dir.join(&ec.name), log.clone(), queue.clone()));
            }
        }
    }
    if let Some(path) = config_path {
        background.push(tokio::spawn(reload_on_sighup(
            path,
            cfg.clone(),
            pipeline.clone(),
            stop_background.clone(),
        )));
    }

    if let Some(cluster) = &cluster {
        // Before taking spans: peers that ran without this replica say so, and traces they
        // hold stay with them (see `cluster.overlap`).
        let _ = tokio::time::timeout(Duration::from_secs(3), cluster.refresh_once()).await;
    }
    let refresh_task = cluster.clone().map(|c| tokio::spawn(c.refresh()));
    // Receivers take new requests while the log's older ones are read back (the limits
    // and the sampler are in force by now).
    let replay_task = replay.map(|replay| {
        let pipeline = pipeline.clone();
        tokio::task::spawn_blocking(move || replay_log(&pipeline, replay))
    });
    let stop_receivers = CancellationToken::new();
    let (receivers, bound) =
        crate::receiver::start(&cfg.receiver, pipeline.clone(), &stop_receivers).await?;

    let stop_ticker = CancellationToken::new();
    let ticker_task = {
        let stop = stop_ticker.clone();
        let pipeline = pipeline.clone();
        watch_vital(
            "decision",
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(DECISION_TICK);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                // One decision thread per core: deciding (LLM accounting, sampling) and
                // re-framing kept spans for export is most of the work per span.
                let parts = std::thread::available_parallelism().map_or(1, |n| n.get());
                loop {
                    tokio::select! {
                        biased;
                        () = stop.cancelled() => break,
                        _ = tick.tick() => pipeline.decide_due_parallel(parts).await,
                    }
                }
            }),
            healthy.clone(),
        )
    };

    ready.store(true, Ordering::SeqCst);
    tracing::info!(
        "llmtail is ready: {} admin={admin_addr} exporters={}",
        bound.join(" "),
        cfg.exporters.len()
    );

    shutdown.await;
    tracing::info!(timeout = ?cfg.shutdown_timeout, "shutting down: deciding pending traces and flushing");
    if let Some(log) = &log {
        // What is not delivered by the end is dropped with its pins: its segments stay.
        log.keep_all();
    }
    let started = tokio::time::Instant::now();
    let deadline = started + cfg.shutdown_timeout;
    ready.store(false, Ordering::SeqCst);
    let mut ticker_task = Some(ticker_task);
    if let Some(cluster) = &cluster {
        // This replica stops deciding (what it holds is handed off below), hands its
        // recent decisions to their traces' new owners, and leaves the ring with every peer
        // told: from now on spans of every trace go to their new owners. A quarter of the
        // shutdown timeout is the decisions'.
        stop_ticker.cancel();
        if let Some(task) = ticker_task.take() {
            let _ = task.await;
        }
        let decisions = pipeline
            .buffer
            .recent_decisions(cluster.overlap(), std::time::Instant::now());
        let until = started + cfg.shutdown_timeout / 4;
        let _ = tokio::time::timeout_at(deadline, cluster.leave(decisions, until)).await;
    }
    stop_receivers.cancel();
    for receiver in receivers {
        if tokio::time::timeout_at(deadline, receiver).await.is_err() {
            tracing::warn!("a receiver did not stop before the shutdown timeout");
        }
    }
    if let Some(cluster) = &cluster {
        // What is queued for peers goes to them (or, failing that, is decided here), within
        // half the shutdown timeout, as the hand-off below: a peer that hangs must not
        // take the time this replica's own traces need to be exported. What that cuts
        // short is counted lost.
        let cut = cluster.flush(started + cfg.shutdown_timeout / 2).await;
        if cut > 0 {
            tracing::warn!(
                spans = cut,
                "forwarding to peers did not finish before the shutdown timeout; the spans still queued are counted lost (reason shutdown)"
            );
            pipeline.count_lost_everywhere(Loss::Shutdown, cut as u64);
        }
    }
    // Spans no peer took are taken here (and handed off with the rest, in a cluster).
    stop_fallback.cancel();
    if let Some(task) = fallback_task {
        let _ = task.await;
    }
    if let Some(cluster) = &cluster {
        // Held traces go to their new owners; half the shutdown timeout is theirs, the
        // rest is for exporting what no peer took.
        let held = pipeline.buffer.take_held(std::time::Instant::now());
        let traces = held.len();
        let until = started + cfg.shutdown_timeout / 2;
        let rest = cluster.hand_off(held, until).await;
        tracing::info!(
            traces,
            spans_kept_here = rest.len(),
            "handed held traces to their new owners"
        );
        if !rest.is_empty() {
            // (With no other member left, deciding here splits nothing.)
            if !cluster.ring().current.is_empty() {
                cluster.count_split(&rest, "decided_here", cluster.me());
            }
            pipeline.take_back(crate::otlp::reframe::encode_verbatim(&rest), false);
        }
    }
    if let Some(task) = refresh_task {
        let _ = task.await;
    }
    stop_ticker.cancel();
    if let Some(task) = ticker_task {
        let _ = task.await;
    }
    stop_background.cancel();
    for task in background {
        let _ = task.await;
    }
    if let Some(task) = replay_task {
        let _ = task.await;
    }
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
                .with_label_values(&[e.name.as_str(), Loss::Shutdown.label()])
                .get()
        })
        .sum();
    if let Some(log) = log.clone() {
        // What was not delivered stays in the log, synced, for the next start.
        let _ = tokio::task::spawn_blocking(move || log.close()).await;
    }
    stop_admin.cancel();
    let _ = admin_task.await;
    let ended =
        if lost_at_shutdown == 0 && exporters.iter().all(|q| q.queued() == 0 || q.is_durable()) {
            Ended::Flushed
        } else {
            Ended::TimedOut {
                lost_spans: lost_at_shutdown,
            }
        };
    match ended {
        Ended::Flushed => tracing::info!(ended = %"flushed", "llmtail stopped"),
        Ended::TimedOut { lost_spans } => {
            tracing::warn!(ended = %"timed_out", lost_spans, "llmtail stopped")
        }
    }
    Ok(ended)
}

/// The buffer's timing and bounds as a config sets them (at start and on reload).
/// (`decision_cache_size` is fixed at start.)
pub(crate) fn buffer_limits(cfg: &Config, decision_cache_size: usize) -> BufferLimits {
    let s = &cfg.sampling;
    BufferLimits {
        idle_timeout: s.idle_timeout(),
        max_trace_duration: s.max_trace_duration.0,
        root_grace: s.root_grace.0,
        max_traces: s.max_traces,
        decision_cache_size,
        max_spans_per_trace: cfg.limits.max_spans_per_trace,
        // Only spans in the log can be read back.
        regret_window: if cfg.storage.enabled() {
            cfg.storage.regret_window.0
        } else {
            Duration::ZERO
        },
        max_regret_traces: cfg.storage.max_regret_traces,
    }
}

/// Reads the trace log back into the pipeline: decisions its marks remember first (so the
/// spans of those traces follow them), then every record, oldest first.
fn replay_log(pipeline: &Pipeline, replay: crate::storage::Replay) {
    if replay.is_empty() {
        return;
    }
    let now = std::time::Instant::now();
    let decisions: Vec<_> = replay
        .marks
        .decided
        .iter()
        .map(|(id, (bits, reason, _))| {
            (
                crate::otlp::TraceId(*id),
                crate::buffer::CachedDecision::from_wire(
                    *bits,
                    REPLAYED_POLICY,
                    *reason,
                    Duration::ZERO,
                    now,
                ),
            )
        })
        .collect();
    let _ = pipeline.buffer.adopt_decisions(&decisions);
    tracing::info!(
        decisions = decisions.len(),
        "reading the trace log back: traces held before are held again, kept ones not yet delivered are sent"
    );
    let started = std::time::Instant::now();
    let mut records = 0u64;
    let segments = replay.segments();
    replay.run(|record, pin, marks| {
        records += 1;
        pipeline.replay(record, pin, marks);
    });
    tracing::info!(
        records,
        segments,
        took = ?started.elapsed(),
        "the trace log is read back"
    );
}

/// Waits for a task the daemon cannot run without; if it panics, says so loudly and turns
/// `/healthz` red, so that the process is restarted instead of silently deciding nothing.
fn watch_vital(
    name: &'static str,
    task: tokio::task::JoinHandle<()>,
    healthy: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if let Err(e) = task.await
            && e.is_panic()
        {
            healthy.store(false, Ordering::SeqCst);
            tracing::error!(
                task = name,
                "a vital task panicked; llmtail cannot work on and /healthz now fails so that it is restarted"
            );
        }
    })
}

/// Takes spans a peer could not take: they are decided here, with whatever else of their
/// traces arrives here. On `stop`, takes what is left and ends.
async fn take_fallback(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<(bytes::Bytes, bool)>,
    pipeline: Arc<Pipeline>,
    stop: CancellationToken,
) {
    loop {
        let (request, reroute) = tokio::select! {
            biased;
            r = rx.recv() => match r { Some(r) => r, None => return },
            () = stop.cancelled() => break,
        };
        pipeline.take_back(request, reroute);
    }
    // Shutting down: no more forwards.
    while let Ok((request, _)) = rx.try_recv() {
        pipeline.take_back(request, false);
    }
}

/// Moves what an older release's write-ahead log in `dir` holds into the trace log, as
/// kept traces for `queue`'s exporter, and says what it did.
async fn import_queue(
    dir: std::path::PathBuf,
    log: Arc<TraceLog>,
    queue: Arc<exporter::ExportQueue>,
) {
    let decided = (
        crate::buffer::CachedDecision::kept_bits(crate::otlp::tracestate::Threshold::ALWAYS),
        crate::buffer::DecideReason::Shutdown as u8,
    );
    match exporter::legacy::import(&dir, &log, &queue, decided).await {
        Ok(0) => {}
        Ok(spans) => {
            tracing::info!(exporter = queue.name(), spans, directory = %dir.display(), "moved the old write-ahead log's kept spans into the trace log; they are being sent")
        }
        Err(e) => {
            tracing::error!(exporter = queue.name(), directory = %dir.display(), error = %format!("{e:#}"), "cannot move the old write-ahead log into the trace log; it is left as it is, for the next start")
        }
    }
}

/// Publishes the sampling probabilities and, with a target, steers the base rate.
async fn adapt(
    pipeline: Arc<Pipeline>,
    mut target: Option<TargetController>,
    interval: Duration,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(PROBABILITY_TICK);
    let mut last_adjust = tokio::time::Instant::now();
    // The dynamic policy's keys on the gauge.
    let mut shown: Vec<(&'static str, Arc<str>)> = Vec::new();
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = tokio::time::Instant::now();
        if let Some(ctl) = &mut target
            && now - last_adjust >= interval
        {
            let sampler = pipeline.buffer.sampler();
            let kept = sampler.counts.policy_kept.swap(0, AtomicOrdering::Relaxed);
            let eligible = sampler.counts.eligible.swap(0, AtomicOrdering::Relaxed);
            let p = ctl.update(sampler.base().get(), kept, eligible, now - last_adjust);
            sampler.base().set(p);
            last_adjust = now;
        }
        pipeline.observer.publish_probabilities(now.into_std());
        let dynamic = pipeline.buffer.sampler().dynamic_snapshot();
        let mut now_shown = Vec::new();
        if let Some((policy, keys)) = dynamic {
            for (key, p) in keys {
                pipeline
                    .metrics
                    .dynamic_probability
                    .with_label_values(&[policy, &key])
                    .set(p);
                now_shown.push((policy, key));
            }
        }
        // Keys that left the set (or a reload) are not shown stale; the others are never
        // missing from a scrape.
        for (policy, key) in &shown {
            if !now_shown.contains(&(*policy, key.clone())) {
                let _ = pipeline
                    .metrics
                    .dynamic_probability
                    .remove_label_values(&[policy, &**key]);
            }
        }
        shown = now_shown;
    }
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

/// tonic's TLS settings for the gRPC receiver (mutual TLS with a client CA).
#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_vital_task_turns_health_red() {
        let healthy = Arc::new(AtomicBool::new(true));
        let ok = watch_vital("ok", tokio::spawn(async {}), healthy.clone());
        ok.await.unwrap();
        assert!(healthy.load(Ordering::SeqCst));
        let panicking = watch_vital(
            "decision",
            tokio::spawn(async { panic!("a bug in a policy") }),
            healthy.clone(),
        );
        panicking.await.unwrap();
        assert!(!healthy.load(Ordering::SeqCst));
    }
}
