//! Reloading: the config on SIGHUP (what can change live is applied to the running
//! pipeline, the rest is named in the log) and the pricing file when it changes.

use super::*;

/// Reloads the config file on every SIGHUP. A valid config's sampling policies, base
/// rate, limits and pricing take effect at once, without touching buffered traces; keys
/// that need a restart are named in the log. An invalid config is rejected with every
/// problem logged, and the running config stays.
pub(super) async fn reload_on_sighup(
    path: std::path::PathBuf,
    mut current: Config,
    pipeline: Arc<Pipeline>,
    stop: CancellationToken,
) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP; config reload is off");
            return;
        };
        loop {
            tokio::select! {
                biased;
                () = stop.cancelled() => return,
                received = hup.recv() => if received.is_none() { return },
            }
            let metrics = &pipeline.metrics;
            match Config::load(&path) {
                Ok(next) => {
                    apply_reload(&pipeline, &current, &next);
                    metrics.config_reloads.with_label_values(&["applied"]).inc();
                    current = next;
                }
                Err(errors) => {
                    for problem in &errors.0 {
                        tracing::error!(%problem, "config reload rejected");
                    }
                    tracing::error!(
                        path = %path.display(),
                        problems = errors.0.len(),
                        "config reload rejected; the running config stays"
                    );
                    metrics
                        .config_reloads
                        .with_label_values(&["rejected"])
                        .inc();
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (path, current, pipeline);
        stop.cancelled().await;
    }
}

/// Puts the live parts of a reloaded config in force.
fn apply_reload(pipeline: &Pipeline, old: &Config, next: &Config) {
    let s = &next.sampling;
    let buffer = &pipeline.buffer;
    buffer.set_sampler(buffer.sampler().reconfigured(s));
    if s.target().is_none() {
        buffer.sampler().base().set(s.base_rate);
    }
    buffer.set_limits(&super::buffer_limits(next, s.decision_cache_size));
    pipeline.limits.set(&next.limits);
    pipeline
        .metrics
        .buffer_limit_bytes
        .set(next.limits.buffer_bytes() as i64);
    pipeline
        .metrics
        .buffer_limit_traces
        .set(s.max_traces as i64);
    pipeline.pricing.set_config(&next.llm.pricing);
    pipeline.pricing.set_cost_source(next.llm.cost_source);
    if let Some(file) = &next.llm.pricing_file
        && let Err(e) = pipeline.pricing.load_file(file)
    {
        tracing::warn!(error = %e, "pricing file not reloaded; the previous one stays");
    }
    let mut restart = Vec::new();
    if next.receiver != old.receiver {
        restart.push("receiver");
    }
    if next.exporters != old.exporters {
        restart.push("exporter(s)");
    }
    if next.admin != old.admin {
        restart.push("admin");
    }
    if next.shutdown_timeout != old.shutdown_timeout {
        restart.push("shutdown_timeout");
    }
    restart.extend(old.cluster.needs_restart(&next.cluster));
    if let Some(cluster) = &pipeline.cluster
        && next.cluster.enabled()
        && next.cluster.peers != old.cluster.peers
    {
        // A ring change like a member joining or leaving: traces held stay with their
        // owner through the overlap.
        tracing::info!(peers = ?next.cluster.peers, "cluster peers reloaded");
        cluster.set_peers(&next.cluster.peers);
    }
    let live_llm = crate::config::LlmConfig {
        pricing: old.llm.pricing.clone(),
        pricing_file: old.llm.pricing_file.clone(),
        cost_source: old.llm.cost_source,
        ..next.llm.clone()
    };
    if live_llm != old.llm {
        restart.push("llm (other than pricing)");
    }
    if s.boost != old.sampling.boost
        || s.target() != old.sampling.target()
        || s.decision_cache_size != old.sampling.decision_cache_size
    {
        restart.push("sampling.boost/target/decision_cache_size");
    }
    if restart.is_empty() {
        tracing::info!("config reloaded: sampling, limits, pricing and cluster peers in force");
    } else {
        tracing::warn!(
            needs_restart = %restart.join(", "),
            "config reloaded: sampling, limits, pricing and cluster peers in force; other changes wait for a restart"
        );
    }
}

/// Re-reads the pricing file when it changes; a bad file leaves the last good one in force.
pub(super) async fn reload_pricing(
    pricing: Arc<Pricing>,
    file: std::path::PathBuf,
    every: Duration,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let modified = |f: &std::path::Path| std::fs::metadata(f).and_then(|m| m.modified()).ok();
    let mut last = modified(&file);
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = modified(&file);
        if now == last {
            continue;
        }
        last = now;
        match pricing.load_file(&file) {
            Ok(n) => {
                metrics.pricing_reloads.with_label_values(&["ok"]).inc();
                tracing::info!(file = %file.display(), entries = n, "pricing file reloaded");
            }
            Err(e) => {
                metrics.pricing_reloads.with_label_values(&["error"]).inc();
                tracing::warn!(error = %e, "pricing file not reloaded; the previous prices stay in force");
            }
        }
    }
}
