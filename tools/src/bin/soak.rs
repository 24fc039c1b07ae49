//! `llmtail-soak`: the fault and soak run (not in CI). Starts the release daemon with a
//! durable queue and a 64 MiB memory limit, an in-process OTLP sink that can be healthy,
//! down or slow, and senders that retry refused requests like an SDK. Each minute:
//!
//! | seconds | upstream | load |
//! |---|---|---|
//! | 0–15 | healthy | normal |
//! | 15–25 | down (UNAVAILABLE) | normal |
//! | 25–35 | slow (400 ms per request) | normal |
//! | 35–45 | down | burst, unthrottled: past the memory limit |
//! | 45–50 | healthy | normal |
//! | 50 | — | SIGTERM, restart (the log replays) |
//!
//! Every 10 s it prints spans accepted, refused requests, spans the consistent rule keeps,
//! spans at the sink, duplicates, spans counted lost, and the daemon's RSS. At the end it
//! drains and checks that every kept span arrived and none was lost.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use llmtail::otlp::TraceId;
use llmtail::otlp::tracestate::Threshold;
use llmtail_tools::loadgen::{self, Kind};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use parking_lot::Mutex;
use rand::SeedableRng;
use rand::rngs::StdRng;

#[derive(Parser)]
#[command(about = "Fault and soak run of llmtail: outages, slow upstream, memory burst, restarts")]
struct Args {
    /// Length of the run in minutes (each minute runs every phase once).
    #[arg(long, default_value_t = 10)]
    minutes: u64,
    /// The daemon binary.
    #[arg(long, default_value = "target/release/llmtail")]
    binary: PathBuf,
}

const BASE_RATE: f64 = 0.1;
const HEALTHY: u8 = 0;
const DOWN: u8 = 1;
const SLOW: u8 = 2;

#[derive(Default)]
struct SinkState {
    mode: AtomicU8,
    seen: Mutex<HashSet<[u8; 24]>>,
    duplicates: AtomicU64,
}

#[derive(Clone)]
struct SoakSink(Arc<SinkState>);

#[tonic::async_trait]
impl TraceService for SoakSink {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        match self.0.mode.load(Ordering::Relaxed) {
            DOWN => return Err(tonic::Status::unavailable("soak: upstream down")),
            SLOW => tokio::time::sleep(Duration::from_millis(400)).await,
            _ => {}
        }
        let mut seen = self.0.seen.lock();
        for span in request
            .into_inner()
            .resource_spans
            .iter()
            .flat_map(|rs| &rs.scope_spans)
            .flat_map(|ss| &ss.spans)
        {
            let mut key = [0u8; 24];
            key[..16].copy_from_slice(&span.trace_id);
            key[16..].copy_from_slice(&span.span_id);
            if !seen.insert(key) {
                self.0.duplicates.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[derive(Default)]
struct LoadStats {
    accepted_spans: AtomicU64,
    refused_requests: AtomicU64,
    kept_spans: AtomicU64,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

struct Daemon {
    child: Child,
    admin: u16,
}

fn start_daemon(binary: &Path, dir: &Path, grpc: u16, admin: u16, sink: u16) -> Daemon {
    let config = format!(
        "receiver:\n  grpc:\n    endpoint: 127.0.0.1:{grpc}\n  http:\n    enabled: false\nadmin:\n  endpoint: 127.0.0.1:{admin}\nsampling:\n  decision_wait: 3s\n  root_grace: 500ms\n  base_rate: {BASE_RATE}\n  policies:\n    - {{name: errors, type: error}}\n    - {{name: slow, type: latency, threshold_ms: 5000}}\n    - {{name: expensive, type: cost, threshold_usd: 0.10}}\nlimits:\n  max_buffer_bytes: 64MiB\nexporter:\n  otlp:\n    endpoint: http://127.0.0.1:{sink}\n    timeout: 2s\n    compression: none\n  batch:\n    timeout: 100ms\n  retry:\n    initial_interval: 100ms\n    max_interval: 1s\n    max_elapsed: 30m\nstorage:\n  directory: {}\nshutdown_timeout: 5s\n",
        dir.join("log").display()
    );
    let path = dir.join("config.yaml");
    std::fs::write(&path, config).expect("config written");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("llmtail.log"))
        .expect("log file");
    let child = Command::new(binary)
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("llmtail starts (build it first: cargo build --release)");
    let end = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", grpc)).is_err() {
        assert!(Instant::now() < end, "llmtail did not start listening");
        std::thread::sleep(Duration::from_millis(50));
    }
    Daemon { child, admin }
}

fn rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Sum of a metric's samples in the daemon's /metrics.
fn metric(admin: u16, name: &str) -> f64 {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", admin)) else {
        return 0.0;
    };
    let _ = s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n");
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// One sender: batches of 25 traces, retried until accepted, like an SDK's exporter.
async fn sender(
    seed: u64,
    grpc: u16,
    burst: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    stats: Arc<LoadStats>,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let threshold = Threshold::from_probability(BASE_RATE);
    let endpoint = format!("http://127.0.0.1:{grpc}");
    let mut client: Option<TraceServiceClient<tonic::transport::Channel>> = None;
    let mut n = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after 1970")
            .as_nanos() as u64;
        let traces: Vec<_> = (0..25)
            .map(|_| {
                n += 1;
                let kind = loadgen::pick_kind(&mut rng, 0.05, 0.03, 0.02);
                loadgen::trace(&mut rng, kind, loadgen::convention_for(n), now)
            })
            .collect();
        let spans: Vec<_> = traces.iter().flat_map(|t| t.spans.clone()).collect();
        let count = spans.len() as u64;
        let kept: u64 = traces
            .iter()
            .filter(|t| t.kind != Kind::Normal || threshold.keeps(TraceId(t.trace_id).randomness()))
            .map(|t| t.spans.len() as u64)
            .sum();
        let request = loadgen::request(spans);
        loop {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            if client.is_none() {
                client = TraceServiceClient::connect(endpoint.clone()).await.ok();
            }
            let sent = match client.as_mut() {
                Some(c) => c.export(request.clone()).await,
                None => Err(tonic::Status::unavailable("not connected")),
            };
            match sent {
                Ok(_) => {
                    stats.accepted_spans.fetch_add(count, Ordering::Relaxed);
                    stats.kept_spans.fetch_add(kept, Ordering::Relaxed);
                    break;
                }
                Err(status) => {
                    stats.refused_requests.fetch_add(1, Ordering::Relaxed);
                    if status.code() != tonic::Code::Unavailable {
                        client = None;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        if !burst.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let state = Arc::new(SinkState::default());
    let sink_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("sink port");
    let sink_port = sink_listener.local_addr().expect("sink address").port();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(
                TraceServiceServer::new(SoakSink(state.clone()))
                    .max_decoding_message_size(256 << 20),
            )
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(sink_listener)),
    );
    let (grpc, admin) = (free_port(), free_port());
    let mut daemon = start_daemon(&args.binary, dir.path(), grpc, admin, sink_port);
    let stats = Arc::new(LoadStats::default());
    let burst = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let senders: Vec<_> = (0..2)
        .map(|i| tokio::spawn(sender(i, grpc, burst.clone(), stop.clone(), stats.clone())))
        .collect();

    println!(
        "minute:second phase | accepted spans | refused requests | kept (rule) | at sink | duplicates | lost | RSS MB | exit codes"
    );
    let started = Instant::now();
    let total = Duration::from_secs(args.minutes * 60);
    let mut lost_before = 0.0;
    let mut exits = Vec::new();
    let mut rss_samples = Vec::new();
    let mut restarted_this_minute = false;
    while started.elapsed() < total {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let t = started.elapsed().as_secs();
        let second = t % 60;
        let (mode, bursting, phase) = match second {
            0..15 => (HEALTHY, false, "healthy"),
            15..25 => (DOWN, false, "upstream down"),
            25..35 => (SLOW, false, "upstream slow"),
            35..45 => (DOWN, true, "burst, upstream down"),
            _ => (HEALTHY, false, "healthy"),
        };
        state.mode.store(mode, Ordering::Relaxed);
        burst.store(bursting, Ordering::Relaxed);
        if second == 0 {
            restarted_this_minute = false;
        }
        if second >= 50 && !restarted_this_minute {
            restarted_this_minute = true;
            lost_before += metric(daemon.admin, "llmtail_spans_lost_total");
            let _ = Command::new("kill")
                .args(["-TERM", &daemon.child.id().to_string()])
                .status();
            let code = daemon.child.wait().map_or(-1, |s| s.code().unwrap_or(-1));
            exits.push(code);
            daemon = start_daemon(&args.binary, dir.path(), grpc, admin, sink_port);
        }
        if t.is_multiple_of(10) {
            let rss = rss_mb(daemon.child.id());
            rss_samples.push(rss);
            println!(
                "{:02}:{:02} {phase:<20} | {:>10} | {:>6} | {:>9} | {:>9} | {} | {} | {rss:.0} | {exits:?}",
                t / 60,
                second,
                stats.accepted_spans.load(Ordering::Relaxed),
                stats.refused_requests.load(Ordering::Relaxed),
                stats.kept_spans.load(Ordering::Relaxed),
                state.seen.lock().len(),
                state.duplicates.load(Ordering::Relaxed),
                lost_before + metric(daemon.admin, "llmtail_spans_lost_total"),
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    for s in senders {
        let _ = s.await;
    }
    state.mode.store(HEALTHY, Ordering::Relaxed);
    // Drain: everything kept reaches the sink once traces are decided and retries succeed.
    let expected = stats.kept_spans.load(Ordering::Relaxed) as usize;
    let end = Instant::now() + Duration::from_secs(120);
    while state.seen.lock().len() < expected && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let lost = lost_before + metric(daemon.admin, "llmtail_spans_lost_total");
    let _ = Command::new("kill")
        .args(["-TERM", &daemon.child.id().to_string()])
        .status();
    exits.push(daemon.child.wait().map_or(-1, |s| s.code().unwrap_or(-1)));
    let at_sink = state.seen.lock().len();
    let (lo, hi) = rss_samples
        .iter()
        .skip(1)
        .fold((f64::MAX, 0.0f64), |(lo, hi), r| (lo.min(*r), hi.max(*r)));
    println!();
    println!(
        "accepted spans {}, refused requests {} (retried), kept by the rule {expected}, at the sink {at_sink} ({} duplicates), lost {lost}, exit codes {exits:?}, RSS {lo:.0}–{hi:.0} MB",
        stats.accepted_spans.load(Ordering::Relaxed),
        stats.refused_requests.load(Ordering::Relaxed),
        state.duplicates.load(Ordering::Relaxed),
    );
    let ok = at_sink == expected && lost == 0.0 && exits.iter().all(|c| *c == 0);
    println!(
        "{}",
        if ok {
            "PASS: every kept span arrived, none lost"
        } else {
            "FAIL"
        }
    );
    std::process::exit(if ok { 0 } else { 1 });
}
