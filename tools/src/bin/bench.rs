//! `llmtail-bench`: the side-by-side benchmark. On this machine it starts a counting OTLP
//! sink, then in turn llmtail (base_rate 1.0 and 0.1) and rotel (a pass-through collector),
//! drives each with the same pre-encoded LLM traces over several gRPC streams, and prints
//! accepted spans/s, the processor's CPU per span, peak RSS, what reached the sink and the
//! delay from a root's send to its arrival upstream — once with export compression off on
//! every processor, once with each one's default (gzip); then a memory run holding
//! 1,000,000 spans.
//!
//! `--mix realistic` (the default) sends production-shaped traffic (`llmtail_tools::mix`:
//! 20 services, 30 models, Zipf users and sessions, agent traces, prompt-carrying spans) in
//! requests of `--request-spans` spans; `--mix legacy` the old shape (4-span traces, one
//! user and session, `--traces-per-request` traces per request), so old figures compare.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use llmtail::otlp::codec::{Prost, RawCodec};
use llmtail::otlp::scan::scan_span;
use llmtail::otlp::tracestate::Threshold;
use llmtail::otlp::view;
use llmtail_tools::loadgen::{self, Kind};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use parking_lot::Mutex;
use prost::Message;
use rand::{Rng, SeedableRng};
use tonic::codegen::http::uri::PathAndQuery;

#[derive(Parser)]
#[command(version)]
struct Args {
    /// Load duration per processor.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "15s")]
    duration: Duration,
    /// Concurrent gRPC streams (one connection each).
    #[arg(long, default_value_t = 4)]
    streams: usize,
    /// Traces per request (4 spans each), for `--mix legacy`.
    #[arg(long, default_value_t = 25)]
    traces_per_request: usize,
    /// `realistic` or `legacy`.
    #[arg(long, default_value = "realistic")]
    mix: String,
    /// Spans per request, for `--mix realistic` (512: the SDKs' default batch; 8192: a
    /// Collector's batch processor in front).
    #[arg(long, default_value_t = 512)]
    request_spans: usize,
    /// Export compression: `none`, `default` (each processor's own: gzip) or `both`.
    #[arg(long, default_value = "both")]
    compression: String,
    /// The rotel-agent binary (`pip install rotel==0.0.1a15` ships it); `auto` asks python3.
    #[arg(long, default_value = "auto")]
    rotel: String,
    /// Skip the memory run.
    #[arg(long)]
    no_memory: bool,
    /// Only the memory run.
    #[arg(long)]
    memory_only: bool,
    /// Only the latency run, at this many spans/s (llmtail, base_rate 1.0, each
    /// `--compression` mode): to study the root → upstream delay alone.
    #[arg(long)]
    latency_at: Option<f64>,
    /// Write one request of the load to this file (encoded protobuf) and exit.
    #[arg(long)]
    dump_request: Option<PathBuf>,
    /// Run llmtail with its trace log (`storage.directory`) in this directory: what the
    /// log costs per span, and its write rate.
    #[arg(long)]
    storage: Option<PathBuf>,
}

const EXPORT: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";
/// Traces sent this soon after a processor starts are left out of the steady-state delay
/// percentile (reported beside the whole run's).
const WARM_UP: Duration = Duration::from_secs(2);
/// Traces whose id starts with this byte are timed from send to arrival at the sink.
const TIMED: u8 = 0;
/// Share of errors, slow and expensive traces in the load.
const SHARES: (f64, f64, f64) = (0.05, 0.03, 0.02);
/// Distinct pre-encoded request templates (of 512 spans; fewer of larger requests).
const TEMPLATES: usize = 32;

/// A pre-encoded request and where its trace ids sit, so each send gets fresh ids with a
/// copy and a few 16-byte writes.
struct Template {
    bytes: Vec<u8>,
    /// Per trace: its kind and the offsets of its id in `bytes`.
    traces: Vec<(Kind, Vec<usize>)>,
}

/// Where each trace's id sits in an encoded request.
fn with_offsets(bytes: Vec<u8>, traces: impl Iterator<Item = (Kind, [u8; 16])>) -> Template {
    let traces = traces
        .map(|(kind, id)| {
            let offsets = bytes
                .windows(16)
                .enumerate()
                .filter(|(_, w)| *w == id)
                .map(|(i, _)| i)
                .collect();
            (kind, offsets)
        })
        .collect();
    Template { bytes, traces }
}

fn templates(args: &Args) -> Vec<Template> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    if args.mix == "legacy" {
        return (0..TEMPLATES)
            .map(|_| {
                let traces: Vec<_> = (0..args.traces_per_request)
                    .map(|i| {
                        let kind = loadgen::pick_kind(&mut rng, SHARES.0, SHARES.1, SHARES.2);
                        loadgen::trace(
                            &mut rng,
                            kind,
                            loadgen::convention_for(i),
                            1_700_000_000_000_000_000,
                        )
                    })
                    .collect();
                let bytes = loadgen::request(traces.iter().flat_map(|t| t.spans.clone()).collect())
                    .encode_to_vec();
                with_offsets(bytes, traces.iter().map(|t| (t.kind, t.trace_id)))
            })
            .collect();
    }
    let mix = llmtail_tools::mix::Mix::default();
    let n = (TEMPLATES * 512 / args.request_spans.max(1)).clamp(4, TEMPLATES);
    (0..n)
        .map(|_| {
            let (request, traces) =
                mix.request(&mut rng, args.request_spans, 1_700_000_000_000_000_000);
            with_offsets(
                request.encode_to_vec(),
                traces.iter().map(|t| (t.kind, t.trace_id)),
            )
        })
        .collect()
}

/// What the sink saw.
#[derive(Default)]
struct SinkStats {
    spans: AtomicU64,
    /// Send instants of timed traces, and their measured delays (with the send instant).
    sent: Mutex<HashMap<[u8; 16], Instant>>,
    delays: Mutex<Vec<(Instant, f64)>>,
}

#[derive(Clone)]
struct SinkService(Arc<SinkStats>);

impl tonic::server::UnaryService<Bytes> for SinkService {
    type Response = Prost<ExportTraceServiceResponse>;
    type Future = tonic::codegen::BoxFuture<tonic::Response<Self::Response>, tonic::Status>;

    fn call(&mut self, req: tonic::Request<Bytes>) -> Self::Future {
        let stats = self.0.clone();
        Box::pin(async move {
            let now = Instant::now();
            let req = view::ExportTraceServiceRequest::decode(req.into_inner())
                .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
            let mut n = 0;
            for span in req
                .resource_spans
                .iter()
                .flat_map(|r| &r.scope_spans)
                .flat_map(|s| &s.spans)
            {
                n += 1;
                if let Ok(f) = scan_span(span, &llmtail::llm::Conventions)
                    && f.trace_id.0[0] == TIMED
                    && f.is_root
                    && let Some(sent) = stats.sent.lock().remove(&f.trace_id.0)
                {
                    stats
                        .delays
                        .lock()
                        .push((sent, now.duration_since(sent).as_secs_f64()));
                }
            }
            stats.spans.fetch_add(n, Ordering::Relaxed);
            Ok(tonic::Response::new(Prost(
                ExportTraceServiceResponse::default(),
            )))
        })
    }
}

#[derive(Clone)]
struct SinkServer(Arc<SinkStats>);

impl tonic::server::NamedService for SinkServer {
    const NAME: &'static str = "opentelemetry.proto.collector.trace.v1.TraceService";
}

impl<B> tonic::codegen::Service<tonic::codegen::http::Request<B>> for SinkServer
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = tonic::codegen::http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = tonic::codegen::BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: tonic::codegen::http::Request<B>) -> Self::Future {
        let svc = SinkService(self.0.clone());
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(RawCodec::<
                Prost<ExportTraceServiceResponse>,
                Bytes,
            >::default())
            .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
            .max_decoding_message_size(256 << 20);
            Ok(grpc.unary(svc, req).await)
        })
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// (CPU seconds, peak RSS bytes) of a process.
fn usage(pid: u32) -> (f64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: f64 = fields
        .get(11)
        .and_then(|u| u.parse::<f64>().ok())
        .unwrap_or(0.0)
        + fields
            .get(12)
            .and_then(|s| s.parse::<f64>().ok())
            .unwrap_or(0.0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (ticks / 100.0, kb("VmHWM:") * 1024)
}

/// The admin server's `/metrics` text (empty if it does not answer).
fn scrape(port: u16) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

fn rss(pid: u32) -> u64 {
    status_bytes(pid, "VmRSS:")
}

/// A size line of `/proc/<pid>/status` (`VmRSS:`, `RssAnon:`, `RssFile:`), in bytes.
fn status_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

struct Processor {
    name: String,
    child: Child,
    grpc: u16,
    admin: Option<u16>,
}

impl Drop for Processor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn llmtail(
    sink: u16,
    base_rate: f64,
    (wait, grace): (&str, &str),
    gzip: bool,
    dir: &std::path::Path,
    storage: Option<&std::path::Path>,
) -> Processor {
    let (grpc, admin) = (free_port(), free_port());
    let config = format!(
        "receiver:\n  grpc: {{endpoint: 127.0.0.1:{grpc}, max_request_bytes: 67108864}}\n  http: {{enabled: false}}\n\
         sampling:\n  idle_timeout: {wait}\n  root_grace: {grace}\n  base_rate: {base_rate}\n  max_traces: 2000000\n  policies:\n\
         \x20   - {{name: errors, type: error}}\n    - {{name: slow, type: latency, threshold_ms: 5000}}\n    - {{name: expensive, type: cost, threshold_usd: 0.10}}\n\
         exporter:\n  otlp: {{endpoint: \"http://127.0.0.1:{sink}\"{compression}}}\n  batch: {{timeout: 20ms}}\n  queue: {{max_spans: 4000000}}\n\
         admin:\n  endpoint: 127.0.0.1:{admin}\n{limits}{storage}",
        compression = if gzip { "" } else { ", compression: none" },
        // The memory run holds everything: no early decision may free what it measures.
        limits = if wait == "120s" {
            "limits:\n  max_buffer_bytes: 8GiB\n"
        } else {
            ""
        },
        // A fresh log per run (the last run's segments are gone with it).
        storage = storage.map_or_else(String::new, |d| {
            let log = d.join(format!("log-{base_rate}-{wait}-{gzip}-{grpc}"));
            format!("storage:\n  directory: {}\n", log.display())
        })
    );
    let path = dir.join(format!("llmtail-{base_rate}-{wait}-{gzip}.yaml"));
    std::fs::write(&path, config).expect("write the config");
    let exe = std::env::current_exe()
        .expect("own path")
        .with_file_name("llmtail");
    let child = Command::new(exe)
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("start llmtail (build it with `cargo build --release`)");
    Processor {
        name: format!(
            "llmtail, base_rate {base_rate}, {}",
            if gzip {
                "gzip (default)"
            } else {
                "compression off"
            }
        ),
        child,
        grpc,
        admin: Some(admin),
    }
}

fn rotel(bin: &str, sink: u16, gzip: bool) -> Processor {
    let grpc = free_port();
    let mut cmd = Command::new(bin);
    cmd.args(["start", "--exporter", "otlp"]);
    if !gzip {
        cmd.args([
            "--otlp-exporter-compression",
            "none",
            "--otlp-exporter-traces-compression",
            "none",
        ]);
    }
    let child = cmd
        .args([
            "--otlp-exporter-endpoint",
            &format!("http://127.0.0.1:{sink}"),
        ])
        .args(["--otlp-grpc-endpoint", &format!("127.0.0.1:{grpc}")])
        .args([
            "--otlp-http-endpoint",
            &format!("127.0.0.1:{}", free_port()),
        ])
        .stdout(Stdio::null())
        .stderr(
            std::fs::File::create(std::env::temp_dir().join("llmtail-bench-rotel.log"))
                .map_or(Stdio::null(), Stdio::from),
        )
        .spawn()
        .expect("start rotel-agent");
    Processor {
        name: format!(
            "rotel (pass-through), {}",
            if gzip {
                "gzip (default)"
            } else {
                "compression off"
            }
        ),
        child,
        grpc,
        admin: None,
    }
}

async fn wait_listening(port: u16) {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("nothing listens on {port}");
}

struct Load {
    spans: u64,
    expected_kept: u64,
    bytes: u64,
    elapsed: f64,
}

/// Sends as fast as accepted — or, with `rate`, at that many spans/s in all — for `duration`
/// (or until `max_spans`) over `streams` streams.
#[allow(clippy::too_many_arguments)]
async fn drive(
    port: u16,
    args: &Args,
    tpl: Arc<Vec<Template>>,
    stats: Arc<SinkStats>,
    keep_p: Option<f64>,
    duration: Duration,
    max_spans: u64,
    rate: Option<f64>,
) -> Load {
    let spans = Arc::new(AtomicU64::new(0));
    let expected = Arc::new(AtomicU64::new(0));
    let bytes = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let end = started + duration;
    let mut tasks = Vec::new();
    let streams = args.streams;
    for s in 0..args.streams {
        let (tpl, stats, spans, expected, bytes) = (
            tpl.clone(),
            stats.clone(),
            spans.clone(),
            expected.clone(),
            bytes.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let channel =
                tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
                    .unwrap()
                    .connect()
                    .await
                    .expect("connect");
            let mut grpc = tonic::client::Grpc::new(channel);
            let mut rng = rand::rngs::StdRng::seed_from_u64(s as u64 + 99);
            let mut i = s;
            let per_stream = rate.map(|r| r / streams as f64);
            let mut sent_here = 0u64;
            while Instant::now() < end && spans.load(Ordering::Relaxed) < max_spans {
                if let Some(r) = per_stream {
                    let due = started + Duration::from_secs_f64(sent_here as f64 / r);
                    tokio::time::sleep_until(due.into()).await;
                }
                let t = &tpl[i % tpl.len()];
                i += 1;
                let mut body = t.bytes.clone();
                let now = Instant::now();
                let mut kept = 0;
                for (kind, offsets) in &t.traces {
                    let id: [u8; 16] = rng.random();
                    for &o in offsets {
                        body[o..o + 16].copy_from_slice(&id);
                    }
                    let keep = match keep_p {
                        None => true,
                        Some(p) => {
                            *kind != Kind::Normal
                                || Threshold::from_probability(p)
                                    .keeps(llmtail::otlp::TraceId(id).randomness())
                        }
                    };
                    if keep {
                        kept += offsets.len() as u64;
                        if id[0] == TIMED {
                            stats.sent.lock().insert(id, now);
                        }
                    }
                }
                let n: u64 = t.traces.iter().map(|(_, o)| o.len() as u64).sum();
                sent_here += n;
                let len = body.len() as u64;
                grpc.ready().await.expect("ready");
                let r = grpc
                    .unary(
                        tonic::Request::new(Bytes::from(body)),
                        PathAndQuery::from_static(EXPORT),
                        RawCodec::<Bytes, Prost<ExportTraceServiceResponse>>::default(),
                    )
                    .await;
                if r.is_ok() {
                    spans.fetch_add(n, Ordering::Relaxed);
                    expected.fetch_add(kept, Ordering::Relaxed);
                    bytes.fetch_add(len, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    Load {
        spans: spans.load(Ordering::Relaxed),
        expected_kept: expected.load(Ordering::Relaxed),
        bytes: bytes.load(Ordering::Relaxed),
        elapsed: started.elapsed().as_secs_f64(),
    }
}

/// Waits until the sink count has not moved for `quiet`.
async fn settle(stats: &SinkStats, quiet: Duration) {
    let mut last = stats.spans.load(Ordering::Relaxed);
    let mut since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = stats.spans.load(Ordering::Relaxed);
        if now != last {
            (last, since) = (now, Instant::now());
        } else if since.elapsed() >= quiet {
            return;
        }
    }
}

fn percentile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * q).round() as usize]
}

struct Row {
    name: String,
    spans_per_s: f64,
    cpu_us: f64,
    peak_rss_mb: f64,
    at_sink: u64,
    expected: u64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// p99 of the traces sent after [`WARM_UP`].
    steady_p99_ms: f64,
    /// What llmtail appended to its trace log per second (MB), when it has one.
    log_mb_per_s: Option<f64>,
}

async fn run(
    p: Processor,
    args: &Args,
    tpl: Arc<Vec<Template>>,
    keep_p: Option<f64>,
    stats: Arc<SinkStats>,
    rate: Option<f64>,
) -> Row {
    wait_listening(p.grpc).await;
    stats.spans.store(0, Ordering::Relaxed);
    stats.delays.lock().clear();
    stats.sent.lock().clear();
    let pid = p.child.id();
    let (cpu0, _) = usage(pid);
    let started = Instant::now();
    let load = drive(
        p.grpc,
        args,
        tpl,
        stats.clone(),
        keep_p,
        args.duration,
        u64::MAX,
        rate,
    )
    .await;
    settle(&stats, Duration::from_secs(2)).await;
    let (cpu1, peak) = usage(pid);
    let timed = stats.delays.lock().clone();
    let mut delays: Vec<f64> = timed.iter().map(|&(_, d)| d).collect();
    // The processor's first second: its upstream connection's HTTP/2 windows and TCP
    // window still growing (an upstream's grpc-go server sizes them by BDP estimation).
    let mut steady: Vec<f64> = timed
        .iter()
        .filter(|&&(sent, _)| sent >= started + WARM_UP)
        .map(|&(_, d)| d)
        .collect();
    let log_mb_per_s = p
        .admin
        .map(scrape)
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("llmtail_storage_appended_bytes_total "))
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
        .filter(|b| *b > 0.0)
        .map(|b| b / 1e6 / started.elapsed().as_secs_f64());
    Row {
        log_mb_per_s,
        name: p.name.clone(),
        spans_per_s: load.spans as f64 / load.elapsed,
        cpu_us: (cpu1 - cpu0) * 1e6 / load.spans as f64,
        peak_rss_mb: peak as f64 / 1e6,
        at_sink: stats.spans.load(Ordering::Relaxed),
        expected: load.expected_kept,
        p50_ms: percentile(&mut delays, 0.5) * 1e3,
        p99_ms: percentile(&mut delays, 0.99) * 1e3,
        max_ms: percentile(&mut delays, 1.0) * 1e3,
        steady_p99_ms: percentile(&mut steady, 0.99) * 1e3,
    }
}

fn rotel_path(arg: &str) -> Option<String> {
    if arg != "auto" {
        return Some(arg.to_owned());
    }
    let out = Command::new("python3")
        .args([
            "-c",
            "import rotel, os; print(os.path.join(os.path.dirname(rotel.__file__), 'rotel-agent'))",
        ])
        .output()
        .ok()?;
    let path = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    PathBuf::from(&path).exists().then_some(path)
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let tpl = Arc::new(templates(&args));
    if let Some(path) = &args.dump_request {
        std::fs::write(path, &tpl[0].bytes).expect("write the request");
        return;
    }
    let wire: usize = tpl.iter().map(|t| t.bytes.len()).sum();
    let spans: usize = tpl
        .iter()
        .flat_map(|t| &t.traces)
        .map(|(_, o)| o.len())
        .sum();
    println!(
        "load: {} mix, {} streams, {:.0} spans per request, {:.0} bytes/span on the wire, {:?} per processor",
        args.mix,
        args.streams,
        spans as f64 / tpl.len() as f64,
        wire as f64 / spans as f64,
        args.duration
    );
    let stats = Arc::new(SinkStats::default());
    let sink_port = free_port();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", sink_port))
        .await
        .unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            // As an OpenTelemetry Collector's grpc-go server grows them (BDP estimation).
            .http2_adaptive_window(Some(true))
            .add_service(SinkServer(stats.clone()))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let dir = tempfile::tempdir().expect("a temp dir");
    let modes: &[bool] = match args.compression.as_str() {
        "none" => &[false],
        "default" => &[true],
        _ => &[false, true],
    };
    let rotel_bin = rotel_path(&args.rotel);
    if args.memory_only {
        return memory(&args, tpl, stats, sink_port, dir.path()).await;
    }
    if let Some(rate) = args.latency_at {
        for &gzip in modes {
            latency(&args, &tpl, &stats, sink_port, dir.path(), gzip, rate).await;
        }
        return;
    }
    for &gzip in modes {
        let mut rows = Vec::new();
        for p in [1.0, 0.1]
            .into_iter()
            .filter(|_| std::env::var("BENCH_ROTEL_ONLY").is_err())
        {
            let proc_ = llmtail(
                sink_port,
                p,
                ("10s", "1s"),
                gzip,
                dir.path(),
                args.storage.as_deref(),
            );
            rows.push(run(proc_, &args, tpl.clone(), Some(p), stats.clone(), None).await);
        }
        match &rotel_bin {
            Some(bin) => rows.push(
                run(
                    rotel(bin, sink_port, gzip),
                    &args,
                    tpl.clone(),
                    None,
                    stats.clone(),
                    None,
                )
                .await,
            ),
            None => println!("rotel-agent not found (pip install rotel==0.0.1a15): skipped"),
        }
        println!();
        println!(
            "| processor | accepted spans/s | CPU µs/span | peak RSS MB | spans at sink / expected | root → upstream p50 / p99 ms |"
        );
        println!("|---|---|---|---|---|---|");
        for r in &rows {
            println!(
                "| {} | {:.0} | {:.3} | {:.0} | {} / {} | {:.0} / {:.0} |",
                r.name,
                r.spans_per_s,
                r.cpu_us,
                r.peak_rss_mb,
                r.at_sink,
                r.expected,
                r.p50_ms,
                r.p99_ms
            );
        }
        for r in &rows {
            if let Some(mb) = r.log_mb_per_s {
                println!("{}: trace log written at {mb:.1} MB/s", r.name);
            }
        }
        if let Some(rotel) = rows.iter().find(|r| r.name.starts_with("rotel")) {
            for r in rows.iter().filter(|r| r.name.starts_with("llmtail")) {
                println!(
                    "{}: {:.2}x rotel's CPU per span, {:.2}x its accepted spans/s",
                    r.name,
                    r.cpu_us / rotel.cpu_us,
                    r.spans_per_s / rotel.spans_per_s
                );
            }
        }
        // Latency: base_rate 1.0 at half the load it saturates at.
        if let Some(full) = rows.first() {
            let half = full.spans_per_s / 2.0;
            latency(&args, &tpl, &stats, sink_port, dir.path(), gzip, half).await;
        }
    }
    if args.no_memory {
        return;
    }
    memory(&args, tpl, stats, sink_port, dir.path()).await;
}

/// Runs llmtail (base_rate 1.0) at `rate` spans/s and prints the root → upstream delay.
async fn latency(
    args: &Args,
    tpl: &Arc<Vec<Template>>,
    stats: &Arc<SinkStats>,
    sink_port: u16,
    dir: &std::path::Path,
    gzip: bool,
    rate: f64,
) {
    let proc_ = llmtail(
        sink_port,
        1.0,
        ("10s", "1s"),
        gzip,
        dir,
        args.storage.as_deref(),
    );
    let r = run(
        proc_,
        args,
        tpl.clone(),
        Some(1.0),
        stats.clone(),
        Some(rate),
    )
    .await;
    println!(
        "{} at {:.0} spans/s: root → upstream p50 {:.0} ms, p99 {:.0} ms after the first {:?} ({:.0} ms over the whole run, max {:.0} ms; root_grace 1000 ms, target p99 ≤ 1050 ms at half load); {} / {} spans at the sink",
        r.name,
        r.spans_per_s,
        r.p50_ms,
        r.steady_p99_ms,
        WARM_UP,
        r.p99_ms,
        r.max_ms,
        r.at_sink,
        r.expected
    );
}

/// Memory: hold 1,000,000 spans (decision_wait and root_grace 120 s) and compare RSS growth
/// with the wire bytes held.
async fn memory(
    args: &Args,
    tpl: Arc<Vec<Template>>,
    stats: Arc<SinkStats>,
    sink_port: u16,
    dir: &std::path::Path,
) {
    let p = llmtail(
        sink_port,
        1.0,
        ("120s", "120s"),
        false,
        dir,
        args.storage.as_deref(),
    );
    wait_listening(p.grpc).await;
    stats.spans.store(0, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = p.child.id();
    let before = rss(pid);
    let anon_before = status_bytes(pid, "RssAnon:");
    let load = drive(
        p.grpc,
        args,
        tpl.clone(),
        stats.clone(),
        None,
        Duration::from_secs(120),
        1_000_000,
        None,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss(pid);
    let anon_after = status_bytes(pid, "RssAnon:");
    let file_after = status_bytes(pid, "RssFile:");
    // What llmtail's memory budget counts, beside what the kernel says.
    let metrics = p.admin.map(scrape).unwrap_or_default();
    let part = |name: &str| {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&format!("llmtail_memory_bytes{{part=\"{name}\"}} ")))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(f64::NAN)
            / 1e6
    };
    let exported = stats.spans.load(Ordering::Relaxed);
    assert_eq!(
        exported, 0,
        "the memory run decided spans early: what it measures is no longer held"
    );
    let growth = after.saturating_sub(before) as f64;
    let per_trace = tpl
        .iter()
        .flat_map(|t| &t.traces)
        .map(|(_, o)| o.len())
        .sum::<usize>() as f64
        / tpl.iter().map(|t| t.traces.len()).sum::<usize>() as f64;
    let traces = (load.spans as f64 / per_trace) as u64;
    println!();
    println!(
        "memory: {} spans ({} traces, {:.1} MB on the wire) held; RSS {:.1} → {:.1} MB; growth = {:.2} × wire bytes; {:.0} bytes per trace beyond the wire bytes",
        load.spans,
        traces,
        load.bytes as f64 / 1e6,
        before as f64 / 1e6,
        after as f64 / 1e6,
        growth / load.bytes as f64,
        (growth - load.bytes as f64) / traces as f64
    );
    // With the trace log, held span bytes are mapped pages of its segments (RssFile: the
    // page cache, which the kernel may evict); the process's own memory is RssAnon.
    let anon_growth = anon_after.saturating_sub(anon_before) as f64;
    println!(
        "anonymous memory (RssAnon) {:.1} → {:.1} MB; growth = {:.2} × wire bytes, {:.0} bytes per span; mapped file pages (RssFile) {:.1} MB",
        anon_before as f64 / 1e6,
        anon_after as f64 / 1e6,
        anon_growth / load.bytes as f64,
        anon_growth / load.spans as f64,
        file_after as f64 / 1e6,
    );
    println!(
        "memory budget: buffers {:.1} MB, bookkeeping {:.1} MB (estimated per trace, span and LLM span), reserved {:.1} MB; RSS beyond the budget {:.1} MB",
        part("buffers"),
        part("bookkeeping"),
        part("reserved"),
        after as f64 / 1e6 - part("buffers") - part("bookkeeping") - part("reserved")
    );
}
