//! The harness of the end-to-end tests: the daemon (`daemon`), upstreams (`sink`), TLS
//! material (`pki`), Prometheus text (`metrics`), and here the small helpers every area
//! shares: clients, raw HTTP, generated traffic, ports.
#![allow(dead_code)] // each test uses a different part of the harness

mod daemon;
mod metrics;
mod pki;
mod proxy;
mod sink;

pub use daemon::*;
pub use metrics::*;
pub use pki::*;
pub use proxy::*;
pub use sink::*;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::trace::v1::Span;

/// The Python of the test virtualenv (tests/install-deps.sh), with the pinned SDKs.
pub fn python() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/.venv/bin/python3")
}

/// Now, in Unix nanoseconds (span timestamps).
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// `n` generated traces of `kind` (the conventions in turn), starting now.
pub fn generated(
    seed: u64,
    kind: llmtail_tools::loadgen::Kind,
    n: usize,
) -> Vec<llmtail_tools::loadgen::GeneratedTrace> {
    use rand::SeedableRng;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let now = now_ns();
    (0..n)
        .map(|i| {
            llmtail_tools::loadgen::trace(
                &mut rng,
                kind,
                llmtail_tools::loadgen::convention_for(i),
                now,
            )
        })
        .collect()
}

/// Sends every span of `traces` to the daemon in one gRPC request.
pub async fn send_traces(d: &Daemon, traces: &[llmtail_tools::loadgen::GeneratedTrace]) {
    let spans = traces.iter().flat_map(|t| t.spans.clone()).collect();
    client(&d.endpoint())
        .await
        .export(llmtail_tools::loadgen::request(spans))
        .await
        .expect("llmtail takes the request");
}

/// A port for a daemon that must listen on a known one (cluster peers, restarts on the
/// same address). Taken below Linux's ephemeral range (32768+), where nothing binding port
/// 0 or connecting out can take it between this call and the daemon's bind (or while a
/// restarted replica is down), and never the same twice in this run (nor, but by rare
/// chance, in another test process running beside it).
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    const LOW: u16 = 20_000;
    const SPAN: u16 = 12_000;
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let _ = NEXT.compare_exchange(
        0,
        // (Spread by a prime stride: test processes started together have adjacent ids.)
        LOW + (std::process::id().wrapping_mul(7919) % u32::from(SPAN)) as u16,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..SPAN {
        let port = NEXT.fetch_add(1, Ordering::SeqCst);
        let port = LOW + port.wrapping_sub(LOW) % SPAN;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {LOW}..{}", LOW + SPAN)
}

/// Bytes from hex (a trace id as the Python and JavaScript clients write it).
pub fn unhex(hex: &str) -> Vec<u8> {
    (0..hex.len() / 2)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
        .collect()
}

/// The ids (trace id ++ span id) of a request's spans, as a counting sink keeps them.
pub fn span_ids(request: &ExportTraceServiceRequest) -> Vec<[u8; 24]> {
    request
        .resource_spans
        .iter()
        .flat_map(|rs| &rs.scope_spans)
        .flat_map(|ss| &ss.spans)
        .map(|s| {
            let mut id = [0u8; 24];
            id[..16].copy_from_slice(&s.trace_id);
            id[16..].copy_from_slice(&s.span_id);
            id
        })
        .collect()
}

/// Bytes (a trace or span id) in lowercase hex, as OTLP/JSON and `/debug/traces` write them.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Every span of the requests, in order.
fn spans_of(requests: &[ExportTraceServiceRequest]) -> Vec<Span> {
    requests
        .iter()
        .flat_map(|r| &r.resource_spans)
        .flat_map(|rs| &rs.scope_spans)
        .flat_map(|ss| ss.spans.iter().cloned())
        .collect()
}

/// Polls `count` until it reaches `n` or the timeout passes; returns the last count.
async fn wait_for_count(n: usize, timeout: Duration, count: impl Fn() -> usize) -> usize {
    let end = Instant::now() + timeout;
    loop {
        let got = count();
        if got >= n || Instant::now() > end {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `llmtail --validate` on `yaml`; returns the exit code and stderr.
pub fn validate(yaml: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.yaml");
    std::fs::write(&path, yaml).unwrap();
    let out = Command::new(binary())
        .args(["--validate", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A span attribute's value.
pub fn attr<'a>(
    span: &'a Span,
    key: &str,
) -> Option<&'a opentelemetry_proto::tonic::common::v1::any_value::Value> {
    span.attributes
        .iter()
        .find(|a| a.key == key)?
        .value
        .as_ref()?
        .value
        .as_ref()
}

/// Runs a Python client under `tests/python/` (in the test virtualenv) with `args`, fails
/// the test if it fails, and returns the manifest it wrote at `manifest` (its argument
/// after the daemon's endpoint and the count).
pub async fn python_client<T: serde::de::DeserializeOwned>(
    script: &str,
    endpoint: &str,
    count: usize,
    manifest: &std::path::Path,
    extra: &[&str],
) -> Vec<T> {
    let script = format!("{}/tests/python/{script}", env!("CARGO_MANIFEST_DIR"));
    let out = tokio::process::Command::new(python())
        .arg(&script)
        .arg(endpoint)
        .arg(count.to_string())
        .arg(manifest)
        .args(extra)
        .output()
        .await
        .expect("the client runs");
    assert!(
        out.status.success(),
        "{script} failed (run tests/install-deps.sh): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sent: Vec<T> = serde_json::from_slice(&std::fs::read(manifest).unwrap()).unwrap();
    assert_eq!(
        sent.len(),
        count,
        "{script} wrote a manifest of every trace"
    );
    sent
}

/// A plain HTTP/1.0 GET; returns the status code and body.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let code = raw.split_whitespace().nth(1)?.parse().ok()?;
    let body = raw.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((code, body))
}

pub async fn client(endpoint: &str) -> TraceServiceClient<tonic::transport::Channel> {
    TraceServiceClient::connect(endpoint.to_owned())
        .await
        .expect("connect to llmtail")
}

/// Threshold arithmetic of the consistent rule, written out independently of llmtail:
/// keep iff R ≥ round((1 − p) · 2^56), R = the trace id's last 7 bytes.
pub fn consistent_keep(trace_id: &[u8], p: f64) -> bool {
    let mut r: u64 = 0;
    for b in &trace_id[9..16] {
        r = (r << 8) | u64::from(*b);
    }
    let t = ((1.0 - p) * 2f64.powi(56)).round();
    (r as f64) >= t
}

/// A raw HTTP/1.1 request; returns the status, the headers (lower-cased names) and the body.
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, HashMap<String, String>, Vec<u8>) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    // The server may answer (413) and close before reading a large body.
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("an HTTP response head");
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect::<HashMap<_, _>>();
    let mut body = raw[split + 4..].to_vec();
    if headers
        .get("transfer-encoding")
        .is_some_and(|t| t == "chunked")
    {
        body = dechunk(&body);
    }
    (status, headers, body)
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = data.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&data[..eol])
            .ok()
            .and_then(|s| usize::from_str_radix(s.trim(), 16).ok())
            .unwrap_or(0);
        if size == 0 {
            break;
        }
        out.extend_from_slice(&data[eol + 2..eol + 2 + size]);
        data = &data[eol + 2 + size + 2..];
    }
    out
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

/// Production-shaped load (`llmtail_tools::mix`: 20 services, 30 models, Zipf users,
/// agent traces, prompt-sized spans) in the background: a 512-span request every 100 ms,
/// for at most 90 s, until [`MixLoad::finish`].
pub struct MixLoad {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<(usize, u64)>,
}

impl MixLoad {
    /// Starts sending to `endpoint`. With `malformed`, the first span of every request has
    /// a 5-byte trace id (llmtail rejects it alone, as a partial success).
    pub fn start(endpoint: String, seed: u64, malformed: bool) -> MixLoad {
        use rand::SeedableRng;
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                let mix = llmtail_tools::mix::Mix::default();
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
                let mut client = client(&endpoint).await;
                let started = Instant::now();
                let (mut sent, mut rejected) = (0usize, 0u64);
                while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(90) {
                    let (mut request, traces) = mix.request(&mut rng, 512, now_ns());
                    if malformed {
                        request.resource_spans[0].scope_spans[0].spans[0].trace_id = vec![7; 5];
                    }
                    if let Ok(answer) = client.export(request).await {
                        sent += traces.len();
                        rejected += answer
                            .into_inner()
                            .partial_success
                            .map_or(0, |p| p.rejected_spans as u64);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                (sent, rejected)
            }
        });
        MixLoad { stop, task }
    }

    /// Stops sending; returns the traces sent in accepted requests and the spans rejected.
    pub async fn finish(self) -> (usize, u64) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.task.await.expect("the load task")
    }
}
