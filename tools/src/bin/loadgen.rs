//! `llmtail-loadgen`: sends realistic LLM application traces over OTLP/gRPC and reports what
//! it sent.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use llmtail_tools::loadgen::{self, Kind};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::sync::Mutex;

/// Send realistic LLM application traces to an OTLP/gRPC endpoint.
#[derive(Parser, Clone)]
#[command(version)]
struct Args {
    /// OTLP/gRPC endpoint.
    #[arg(long, default_value = "http://127.0.0.1:4317")]
    endpoint: String,
    /// Number of traces to send (ignored when --duration is set).
    #[arg(long, default_value_t = 1000)]
    traces: u64,
    /// Send for this long instead, e.g. 30s.
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Traces per second across all streams; 0 sends as fast as they are accepted.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Concurrent gRPC streams.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Traces per export request.
    #[arg(long, default_value_t = 25)]
    batch: u64,
    /// Share of traces with an error.
    #[arg(long, default_value_t = 0.05)]
    error_share: f64,
    /// Share of slow traces (half by duration, half by llm.latency_ms).
    #[arg(long, default_value_t = 0.03)]
    slow_share: f64,
    /// Share of expensive traces (half by cost attribute, half by tokens × price).
    #[arg(long, default_value_t = 0.02)]
    expensive_share: f64,
    /// Gzip-compress requests.
    #[arg(long)]
    gzip: bool,
    /// Seed for reproducible traces (random ids still differ per seed).
    #[arg(long)]
    seed: Option<u64>,
}

#[derive(Default)]
struct Totals {
    requests: u64,
    failed_requests: u64,
    spans: u64,
    rejected_spans: u64,
    by_kind: HashMap<&'static str, u64>,
}

fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::Normal => "normal",
        Kind::Error => "error",
        Kind::SlowDuration => "slow (duration)",
        Kind::SlowLatencyAttr => "slow (llm.latency_ms)",
        Kind::ExpensiveAttr => "expensive (cost attribute)",
        Kind::ExpensiveTokens => "expensive (tokens x price)",
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let channel = tonic::transport::Endpoint::from_shared(args.endpoint.clone())?
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect to {}: {e}", args.endpoint))?;
    let totals = Arc::new(Mutex::new(Totals::default()));
    let started = Instant::now();
    let deadline = args.duration.map(|d| started + d);
    let next_trace = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for worker in 0..args.concurrency.max(1) {
        let args = args.clone();
        let mut client = TraceServiceClient::new(channel.clone());
        if args.gzip {
            client = client.send_compressed(tonic::codec::CompressionEncoding::Gzip);
        }
        let totals = totals.clone();
        let next_trace = next_trace.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = match args.seed {
                Some(seed) => StdRng::seed_from_u64(seed.wrapping_add(worker as u64)),
                None => StdRng::from_os_rng(),
            };
            loop {
                let first = next_trace.fetch_add(args.batch, std::sync::atomic::Ordering::Relaxed);
                if deadline.is_none() && first >= args.traces {
                    break;
                }
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
                let count = match deadline {
                    Some(_) => args.batch,
                    None => args.batch.min(args.traces - first),
                };
                if args.rate > 0.0 {
                    let due = started + Duration::from_secs_f64(first as f64 / args.rate);
                    tokio::time::sleep_until(due.into()).await;
                }
                let now_ns = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64);
                let mut spans = Vec::new();
                let mut kinds = Vec::new();
                for n in 0..count {
                    let kind = loadgen::pick_kind(
                        &mut rng,
                        args.error_share,
                        args.slow_share,
                        args.expensive_share,
                    );
                    let t = loadgen::trace(
                        &mut rng,
                        kind,
                        loadgen::convention_for((first + n) as usize),
                        now_ns,
                    );
                    kinds.push(kind);
                    spans.extend(t.spans);
                }
                let n_spans = spans.len() as u64;
                let result = client.export(loadgen::request(spans)).await;
                let mut t = totals.lock().await;
                t.requests += 1;
                match result {
                    Ok(resp) => {
                        t.spans += n_spans;
                        if let Some(p) = resp.into_inner().partial_success {
                            t.rejected_spans += p.rejected_spans.max(0) as u64;
                        }
                        for k in kinds {
                            *t.by_kind.entry(kind_name(k)).or_default() += 1;
                        }
                    }
                    Err(status) => {
                        t.failed_requests += 1;
                        if t.failed_requests <= 3 {
                            eprintln!("export failed: {:?}: {}", status.code(), status.message());
                        }
                    }
                }
            }
        }));
    }
    for task in tasks {
        task.await?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let t = totals.lock().await;
    let traces: u64 = t.by_kind.values().sum();
    let mut report = format!(
        "sent {traces} traces ({} spans) in {} requests over {elapsed:.2}s\n",
        t.spans, t.requests
    );
    report.push_str(&format!(
        "rate: {:.0} traces/s, {:.0} spans/s; failed requests: {}; rejected spans: {}\n",
        traces as f64 / elapsed,
        t.spans as f64 / elapsed,
        t.failed_requests,
        t.rejected_spans
    ));
    let mut kinds: Vec<_> = t.by_kind.iter().collect();
    kinds.sort();
    for (kind, n) in kinds {
        report.push_str(&format!("  {kind:<28} {n}\n"));
    }
    // A reader that stops early (`| head`) is not an error.
    use std::io::Write;
    match std::io::stdout().lock().write_all(report.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        written => written?,
    }
    if t.failed_requests > 0 {
        anyhow::bail!("{} requests failed", t.failed_requests);
    }
    Ok(())
}
