//! Test harness: the real `llmtail` binary on ephemeral ports, an OTLP sink built on
//! opentelemetry-proto's tonic server, a client, and a Prometheus text reader.
#![allow(dead_code)] // each test binary uses a different part of the harness

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
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

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("an ephemeral port")
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

/// How the sink answers.
pub const SINK_OK: u32 = 0;
/// Every request is refused with INVALID_ARGUMENT (a permanent error).
pub const SINK_INVALID_ARGUMENT: u32 = 1;
/// Every request is refused with UNAVAILABLE: the upstream is down (retryable). Tests use
/// this rather than a closed port, which another test's server could take meanwhile.
pub const SINK_UNAVAILABLE: u32 = 2;
/// Refuses with INVALID_ARGUMENT every request holding a span named [`REFUSED_NAME`], as an
/// upstream refuses content it has its own rules against.
pub const SINK_REFUSE_MARKED: u32 = 3;
pub const REFUSED_NAME: &str = "the-upstream-refuses-this";

/// One misbehaviour of the sink, taken by the next call (see `Sink::fault_next`).
#[derive(Clone, Debug)]
pub enum Fault {
    /// Answer with this gRPC error, after `retry_after` in a RetryInfo detail if given.
    Status(tonic::Code, Option<Duration>),
    /// Take this long before accepting the request (the exporter's timeout may fire).
    Slow(Duration),
    /// Accept and store the request, but report this many spans rejected (partial success).
    Partial(i64, &'static str),
}

#[derive(Clone, Default)]
struct SinkState {
    requests: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
    calls: Arc<AtomicU64>,
    mode: Arc<AtomicU32>,
    faults: Arc<Mutex<std::collections::VecDeque<Fault>>>,
    call_times: Arc<Mutex<Vec<Instant>>>,
    /// Counting mode: span ids (trace id ++ span id) and how often each arrived, instead
    /// of whole requests, for floods of millions of spans.
    ids: Option<Arc<Mutex<SpanCounts>>>,
}

/// Span ids (trace id ++ span id) and how many times each arrived.
type SpanCounts = HashMap<[u8; 24], u32>;

#[tonic::async_trait]
impl TraceService for SinkState {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.call_times.lock().unwrap().push(Instant::now());
        match self.mode.load(Ordering::SeqCst) {
            SINK_INVALID_ARGUMENT => {
                return Err(tonic::Status::invalid_argument("sink refuses everything"));
            }
            SINK_UNAVAILABLE => return Err(tonic::Status::unavailable("sink is down")),
            SINK_REFUSE_MARKED
                if spans_of(std::slice::from_ref(request.get_ref()))
                    .iter()
                    .any(|s| s.name == REFUSED_NAME) =>
            {
                return Err(tonic::Status::invalid_argument(format!(
                    "span named {REFUSED_NAME}"
                )));
            }
            _ => {}
        }
        let fault = self.faults.lock().unwrap().pop_front();
        let mut response = ExportTraceServiceResponse::default();
        match fault {
            None => {}
            Some(Fault::Status(code, retry_after)) => {
                use tonic_types::{ErrorDetails, StatusExt};
                return Err(match retry_after {
                    Some(d) => tonic::Status::with_error_details(
                        code,
                        "sink says try later",
                        ErrorDetails::with_retry_info(Some(d)),
                    ),
                    None => tonic::Status::new(code, "sink is out of resources"),
                });
            }
            Some(Fault::Slow(d)) => {
                tokio::time::sleep(d).await;
                // The client gave up by now; what arrives late is not stored.
                return Err(tonic::Status::unavailable("too late"));
            }
            Some(Fault::Partial(n, message)) => {
                response.partial_success = Some(
                    opentelemetry_proto::tonic::collector::trace::v1::ExportTracePartialSuccess {
                        rejected_spans: n,
                        error_message: message.into(),
                    },
                );
            }
        }
        match &self.ids {
            Some(ids) => {
                let mut ids = ids.lock().unwrap();
                for span in spans_of(std::slice::from_ref(request.get_ref())) {
                    let mut id = [0u8; 24];
                    id[..16].copy_from_slice(&span.trace_id);
                    id[16..].copy_from_slice(&span.span_id);
                    *ids.entry(id).or_default() += 1;
                }
            }
            None => self.requests.lock().unwrap().push(request.into_inner()),
        }
        Ok(tonic::Response::new(response))
    }
}

/// An OTLP/gRPC upstream that records what it receives.
pub struct Sink {
    pub port: u16,
    state: SinkState,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Sink {
    /// Starts a sink on `port` (0: any free port).
    pub async fn start(port: u16) -> Sink {
        Sink::serve(port, None, SinkState::default()).await
    }

    /// A sink that keeps only the ids of the spans it receives (see [`Sink::ids`]).
    pub async fn start_counting(port: u16) -> Sink {
        let state = SinkState {
            ids: Some(Arc::default()),
            ..SinkState::default()
        };
        Sink::serve(port, None, state).await
    }

    /// Counting mode: every span id received, with how many times it arrived.
    pub fn ids(&self) -> HashMap<[u8; 24], u32> {
        self.state
            .ids
            .as_ref()
            .expect("a counting sink")
            .lock()
            .unwrap()
            .clone()
    }

    /// Counting mode: distinct spans received.
    pub fn distinct_spans(&self) -> usize {
        self.state
            .ids
            .as_ref()
            .expect("a counting sink")
            .lock()
            .unwrap()
            .len()
    }

    /// A gRPC sink over TLS that requires a client certificate signed by the PKI's CA.
    pub async fn start_mtls(port: u16, pki: &Pki) -> Sink {
        Sink::serve(port, Some(pki), SinkState::default()).await
    }

    async fn serve(port: u16, mtls: Option<&Pki>, state: SinkState) -> Sink {
        use tonic::transport::{Certificate, Identity, ServerTlsConfig};
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("sink port free");
        let port = listener.local_addr().unwrap().port();
        // gRPC's default 4 MiB message limit, as the Collector, Tempo and most backends.
        let svc = TraceServiceServer::new(state.clone())
            .accept_compressed(tonic::codec::CompressionEncoding::Gzip);
        let mut server = tonic::transport::Server::builder();
        if let Some(pki) = mtls {
            let tls = ServerTlsConfig::new()
                .identity(Identity::from_pem(
                    &pki.server_cert_pem,
                    &pki.server_key_pem,
                ))
                .client_ca_root(Certificate::from_pem(&pki.ca_pem));
            server = server.tls_config(tls).unwrap();
        }
        tokio::spawn(server.add_service(svc).serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener),
            async {
                let _ = rx.await;
            },
        ));
        Sink {
            port,
            state,
            stop: Some(tx),
        }
    }

    /// A sink that is not listening (yet): only its port is reserved by the caller.
    pub fn unstarted(port: u16) -> Sink {
        Sink {
            port,
            state: SinkState::default(),
            stop: None,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn set_mode(&self, mode: u32) {
        self.state.mode.store(mode, Ordering::SeqCst);
    }

    pub fn calls(&self) -> u64 {
        self.state.calls.load(Ordering::SeqCst)
    }

    /// The next calls misbehave as listed, one fault each, then the sink is well again.
    pub fn fault_next(&self, faults: &[Fault]) {
        self.state
            .faults
            .lock()
            .unwrap()
            .extend(faults.iter().cloned());
    }

    /// When each call arrived.
    pub fn call_times(&self) -> Vec<Instant> {
        self.state.call_times.lock().unwrap().clone()
    }

    pub fn requests(&self) -> Vec<ExportTraceServiceRequest> {
        self.state.requests.lock().unwrap().clone()
    }

    pub fn spans(&self) -> Vec<Span> {
        spans_of(&self.requests())
    }

    pub fn traces(&self) -> HashMap<Vec<u8>, Vec<Span>> {
        let mut out: HashMap<Vec<u8>, Vec<Span>> = HashMap::new();
        for s in self.spans() {
            out.entry(s.trace_id.clone()).or_default().push(s);
        }
        out
    }

    /// Waits until the sink holds at least `n` spans (or the timeout passes).
    pub async fn wait_for_spans(&self, n: usize, timeout: Duration) -> usize {
        wait_for_count(n, timeout, || self.spans().len()).await
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The real daemon, started from a config written for the test.
pub struct Daemon {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub admin: SocketAddr,
    child: Child,
    pub dir: tempfile::TempDir,
}

pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_llmtail"))
}

impl Daemon {
    /// Starts llmtail with `body` (YAML for every section but receiver and admin, which get
    /// ephemeral ports) and waits until `/readyz` answers 200.
    pub fn start(body: &str) -> Daemon {
        Daemon::start_with("", body)
    }

    /// Like [`Daemon::start`], with environment variables for `${env:…}` in the config.
    pub fn start_env(body: &str, envs: &[(&str, &str)]) -> Daemon {
        Daemon::launch("", body, envs)
    }

    /// Like [`Daemon::start`], with extra keys for `receiver.http` (indented 4 spaces).
    pub fn start_with(http_extra: &str, body: &str) -> Daemon {
        Daemon::launch(http_extra, body, &[])
    }

    /// Extra receiver keys: `grpc_extra` and `http_extra` are lines under `receiver.grpc`
    /// and `receiver.http` (4-space indent); `http_extra` may end with receiver-level keys
    /// (2-space indent), e.g. `auth`.
    pub fn start_receivers(grpc_extra: &str, http_extra: &str, body: &str) -> Daemon {
        Daemon::launch_with(grpc_extra, http_extra, body, &[])
    }

    fn launch(http_extra: &str, body: &str, envs: &[(&str, &str)]) -> Daemon {
        Daemon::launch_with("", http_extra, body, envs)
    }

    /// A daemon whose gRPC receiver listens on `grpc_port` (for peers that must know it).
    pub fn start_at(grpc_port: u16, body: &str) -> Daemon {
        Daemon::launch_with(&format!("@{grpc_port}"), "", body, &[])
    }

    /// Like `start_at`, with extra receiver keys as in `start_receivers`.
    pub fn start_at_with(grpc_port: u16, grpc_extra: &str, http_extra: &str, body: &str) -> Daemon {
        Daemon::launch_with(
            &format!("@{grpc_port}\n{grpc_extra}"),
            http_extra,
            body,
            &[],
        )
    }

    /// The receiver and admin part of every test config; a `grpc_extra` of `@PORT` fixes
    /// the gRPC port.
    fn prefix(grpc_extra: &str, http_extra: &str) -> String {
        Daemon::prefix_limited(grpc_extra, http_extra, 1_000_000)
    }

    fn prefix_limited(grpc_extra: &str, http_extra: &str, max_request_bytes: usize) -> String {
        let (port, grpc_extra) = match grpc_extra.strip_prefix('@') {
            Some(rest) => rest.split_once('\n').unwrap_or((rest, "")),
            None => ("0", grpc_extra),
        };
        format!(
            "receiver:\n  grpc:\n    endpoint: 127.0.0.1:{port}\n    max_request_bytes: {max_request_bytes}\n{grpc_extra}  http:\n    endpoint: 127.0.0.1:0\n    max_request_bytes: {max_request_bytes}\n{http_extra}admin:\n  endpoint: 127.0.0.1:0\n"
        )
    }

    /// Starts llmtail as [`Launch`] says.
    pub fn launch_opts(body: &str, opts: Launch<'_>) -> Daemon {
        let config = format!(
            "{}{body}",
            Daemon::prefix_limited(
                opts.grpc_extra,
                opts.http_extra,
                opts.max_request_bytes.unwrap_or(1_000_000)
            )
        );
        Daemon::spawn(config, opts.envs, opts.cgroup, opts.dir)
    }

    /// Rewrites the config file with a new `body` (receivers as at start) and sends SIGHUP.
    pub fn reload(&self, body: &str) {
        let path = self.dir.path().join("config.yaml");
        std::fs::write(&path, format!("{}{body}", Daemon::prefix("", ""))).unwrap();
        self.signal("HUP");
    }

    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    fn launch_with(
        grpc_extra: &str,
        http_extra: &str,
        body: &str,
        envs: &[(&str, &str)],
    ) -> Daemon {
        // Port 0 everywhere: the daemon logs the addresses it bound, so tests never race
        // each other for ports.
        let config = format!("{}{body}", Daemon::prefix(grpc_extra, http_extra));
        Daemon::spawn(config, envs, None, None)
    }

    fn spawn(
        config: String,
        envs: &[(&str, &str)],
        cgroup: Option<&MemoryCgroup>,
        dir: Option<tempfile::TempDir>,
    ) -> Daemon {
        let dir = dir.unwrap_or_else(|| tempfile::tempdir().unwrap());
        let path = dir.path().join("config.yaml");
        std::fs::write(&path, config).unwrap();
        let log_path = dir.path().join("llmtail.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let mut command = match cgroup {
            // The shell moves itself into the group, then becomes llmtail.
            Some(group) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg("echo $$ > \"$0\" && exec \"$@\"")
                    .arg(group.procs())
                    .arg(binary());
                c
            }
            None => Command::new(binary()),
        };
        let mut child = command
            .arg("--config")
            .arg(&path)
            .current_dir(dir.path())
            .env("RUST_LOG", "info")
            .envs(envs.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("llmtail starts");
        let end = Instant::now() + Duration::from_secs(20);
        let addr_after = |line: &str, key: &str| -> Option<SocketAddr> {
            let rest = &line[line.find(key)? + key.len()..];
            let token = rest.split([' ', '/']).next()?;
            token.parse().ok()
        };
        let (grpc, http, admin) = loop {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            if let Some(line) = text.lines().find(|l| l.contains("llmtail is ready")) {
                break (
                    addr_after(line, "grpc=").expect("grpc address in the ready line"),
                    addr_after(line, "http=").expect("http address in the ready line"),
                    addr_after(line, "admin=").expect("admin address in the ready line"),
                );
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("llmtail exited with {status}: {text}");
            }
            assert!(Instant::now() < end, "llmtail not ready: {text}");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(http_get(admin, "/readyz").map(|r| r.0), Some(200));
        Daemon {
            grpc,
            http,
            admin,
            child,
            dir,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// The most resident memory the process has had (`VmHWM`), in bytes.
    pub fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("llmtail.log")).unwrap_or_default()
    }

    pub fn metrics(&self) -> Metrics {
        let (code, body) = http_get(self.admin, "/metrics").expect("metrics answer");
        assert_eq!(code, 200);
        Metrics::parse(&body)
    }

    /// Polls the metrics until `pred` holds.
    pub async fn wait_metrics(
        &self,
        timeout: Duration,
        pred: impl Fn(&Metrics) -> bool,
    ) -> Metrics {
        let end = Instant::now() + timeout;
        loop {
            let m = self.metrics();
            if pred(&m) || Instant::now() > end {
                return m;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn sigterm(&self) {
        self.signal("TERM");
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let end = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < end, "llmtail did not exit: {}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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

/// Prometheus text exposition, parsed into series.
pub struct Metrics {
    series: Vec<(String, BTreeMap<String, String>, f64)>,
}

impl Metrics {
    pub fn parse(text: &str) -> Metrics {
        let mut series = Vec::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (head, value) = line.rsplit_once(' ').unwrap();
            let (name, labels) = match head.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (head, ""),
            };
            let labels = labels
                .split(',')
                .filter(|l| !l.is_empty())
                .map(|l| {
                    let (k, v) = l.split_once('=').unwrap();
                    (k.to_owned(), v.trim_matches('"').to_owned())
                })
                .collect();
            series.push((name.to_owned(), labels, value.parse().unwrap()));
        }
        Metrics { series }
    }

    /// Sum of every series of `name` whose labels include all of `filter`.
    pub fn sum(&self, name: &str, filter: &[(&str, &str)]) -> f64 {
        self.series
            .iter()
            .filter(|(n, labels, _)| {
                n == name
                    && filter
                        .iter()
                        .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, _, v)| v)
            .sum()
    }
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

/// A throwaway PKI: a CA, a server certificate for localhost/127.0.0.1 and a client
/// certificate, all signed by the CA, written as PEM files.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca_pem: String,
    pub server_cert_pem: String,
    pub server_key_pem: String,
}

impl Pki {
    pub fn new() -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let server_key = KeyPair::generate().unwrap();
        let server = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .unwrap()
            .signed_by(&server_key, &ca)
            .unwrap();
        let client_key = KeyPair::generate().unwrap();
        let client = CertificateParams::new(vec!["llmtail".to_owned()])
            .unwrap()
            .signed_by(&client_key, &ca)
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.path().join("server.pem"), server.pem()).unwrap();
        std::fs::write(
            dir.path().join("server-key.pem"),
            server_key.serialize_pem(),
        )
        .unwrap();
        std::fs::write(dir.path().join("client.pem"), client.pem()).unwrap();
        std::fs::write(
            dir.path().join("client-key.pem"),
            client_key.serialize_pem(),
        )
        .unwrap();
        Pki {
            dir,
            ca_pem: ca.pem(),
            server_cert_pem: server.pem(),
            server_key_pem: server_key.serialize_pem(),
        }
    }

    pub fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }
}

/// An OTLP/HTTP upstream on axum: `POST /otlp/v1/traces`, gzip bodies only, and an
/// `x-api-key` header that must match; optionally over TLS.
pub struct HttpSink {
    pub port: u16,
    pub requests: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
    /// Requests refused for a wrong or missing key.
    pub unauthorized: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl HttpSink {
    pub async fn start(port: u16, api_key: &str, tls: Option<&Pki>) -> HttpSink {
        use axum::http::{HeaderMap, StatusCode};
        use prost::Message;
        let requests: Arc<Mutex<Vec<ExportTraceServiceRequest>>> = Arc::default();
        let unauthorized = Arc::new(AtomicU64::new(0));
        let (reqs, unauth, key) = (requests.clone(), unauthorized.clone(), api_key.to_owned());
        let app = axum::Router::new().route(
            "/otlp/v1/traces",
            axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
                let (reqs, unauth, key) = (reqs.clone(), unauth.clone(), key.clone());
                async move {
                    if headers.get("x-api-key").and_then(|v| v.to_str().ok()) != Some(key.as_str())
                    {
                        unauth.fetch_add(1, Ordering::SeqCst);
                        return (StatusCode::UNAUTHORIZED, Vec::new());
                    }
                    if headers
                        .get("content-encoding")
                        .and_then(|v| v.to_str().ok())
                        != Some("gzip")
                    {
                        return (StatusCode::BAD_REQUEST, Vec::new());
                    }
                    let mut raw = Vec::new();
                    flate2::read::GzDecoder::new(&body[..])
                        .read_to_end(&mut raw)
                        .unwrap();
                    reqs.lock()
                        .unwrap()
                        .push(ExportTraceServiceRequest::decode(&raw[..]).unwrap());
                    (
                        StatusCode::OK,
                        ExportTraceServiceResponse::default().encode_to_vec(),
                    )
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let task = match tls {
            None => tokio::spawn(async move {
                let _ = axum::serve(listener, app).await;
            }),
            Some(pki) => {
                use rustls::pki_types::pem::PemObject;
                let certs = vec![
                    rustls::pki_types::CertificateDer::from_pem_slice(
                        pki.server_cert_pem.as_bytes(),
                    )
                    .unwrap(),
                ];
                let key =
                    rustls::pki_types::PrivateKeyDer::from_pem_slice(pki.server_key_pem.as_bytes())
                        .unwrap();
                let config = rustls::ServerConfig::builder_with_provider(Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(certs, key)
                .unwrap();
                let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
                tokio::spawn(async move {
                    loop {
                        let Ok((tcp, _)) = listener.accept().await else {
                            return;
                        };
                        let (acceptor, app) = (acceptor.clone(), app.clone());
                        tokio::spawn(async move {
                            let Ok(tls) = acceptor.accept(tcp).await else {
                                return;
                            };
                            let service = hyper_util::service::TowerToHyperService::new(app);
                            let _ = hyper_util::server::conn::auto::Builder::new(
                                hyper_util::rt::TokioExecutor::new(),
                            )
                            .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                            .await;
                        });
                    }
                })
            }
        };
        HttpSink {
            port,
            requests,
            unauthorized,
            task,
        }
    }

    pub fn spans(&self) -> Vec<Span> {
        spans_of(&self.requests.lock().unwrap())
    }

    pub async fn wait_for_spans(&self, n: usize, timeout: Duration) -> usize {
        wait_for_count(n, timeout, || self.spans().len()).await
    }
}

impl Drop for HttpSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An OTLP/gRPC client over TLS to the daemon's gRPC receiver, trusting the PKI's CA, with
/// the PKI's client certificate when `with_cert` (mutual TLS).
pub async fn mtls_client(
    d: &Daemon,
    pki: &Pki,
    with_cert: bool,
) -> Result<TraceServiceClient<tonic::transport::Channel>, tonic::transport::Error> {
    use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca_pem))
        .domain_name("localhost");
    if with_cert {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(pki.path("client.pem")).unwrap(),
            std::fs::read(pki.path("client-key.pem")).unwrap(),
        ));
    }
    let channel = Channel::from_shared(format!("https://localhost:{}", d.grpc.port()))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await?;
    Ok(TraceServiceClient::new(channel))
}

/// How [`Daemon::launch_opts`] starts the daemon.
#[derive(Default)]
pub struct Launch<'a> {
    /// `receiver.*.max_request_bytes` (1,000,000 unless given).
    pub max_request_bytes: Option<usize>,
    pub envs: &'a [(&'a str, &'a str)],
    /// Run inside this memory-limited cgroup.
    pub cgroup: Option<&'a MemoryCgroup>,
    /// The working directory (e.g. one a durable queue outlives restarts in).
    pub dir: Option<tempfile::TempDir>,
    /// Extra keys under `receiver.grpc` and `receiver.http` (4-space indent).
    pub grpc_extra: &'a str,
    pub http_extra: &'a str,
}

/// A memory-limited cgroup (v1 or v2, whichever the machine mounts), as a pod's limit is;
/// removed when dropped. Needs root, as CI has.
pub struct MemoryCgroup {
    dir: PathBuf,
    v2: bool,
}

impl MemoryCgroup {
    pub fn create(name: &str, limit: u64) -> MemoryCgroup {
        let v2 = std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
        let base = if v2 {
            // Enable the memory controller for the root's children (harmless if on).
            let _ = std::fs::write("/sys/fs/cgroup/cgroup.subtree_control", "+memory");
            PathBuf::from("/sys/fs/cgroup")
        } else {
            PathBuf::from("/sys/fs/cgroup/memory")
        };
        let dir = base.join(format!("{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| {
            panic!(
                "cannot create the cgroup {} (the test needs root and a memory cgroup): {e}",
                dir.display()
            )
        });
        let file = if v2 {
            "memory.max"
        } else {
            "memory.limit_in_bytes"
        };
        std::fs::write(dir.join(file), limit.to_string()).unwrap();
        if !v2 {
            // No swap: the limit is the limit.
            let _ = std::fs::write(dir.join("memory.swappiness"), "0");
        }
        MemoryCgroup { dir, v2 }
    }

    pub fn procs(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }

    fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.dir.join(file)).unwrap_or_default()
    }

    /// Most memory the group used (v1 `max_usage_in_bytes`, v2 `memory.peak`).
    pub fn peak_bytes(&self) -> u64 {
        let file = if self.v2 {
            "memory.peak"
        } else {
            "memory.max_usage_in_bytes"
        };
        self.read(file).trim().parse().unwrap_or(0)
    }

    /// Processes of the group killed by the OOM killer.
    pub fn oom_kills(&self) -> u64 {
        let file = if self.v2 {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        self.read(file)
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// tests/python/sink.py: a stock grpcio OTLP server (4 MiB limit) or an OTLP/HTTP one
/// that answers 413 past a body limit.
pub struct PySink {
    pub port: u16,
    out: PathBuf,
    child: Child,
    _dir: tempfile::TempDir,
}

/// What a [`PySink`] recorded.
#[derive(Default, Debug)]
pub struct PySinkLog {
    /// Every span received, as (trace id hex, span id hex), duplicates included.
    pub spans: Vec<(String, String)>,
    /// Size in bytes of every accepted request.
    pub requests: Vec<usize>,
    /// Size of every request refused as too large.
    pub refused: Vec<usize>,
}

impl PySink {
    /// `kind` is `grpc` or `http`; `limit` the HTTP body limit.
    pub fn start(kind: &str, limit: Option<usize>) -> PySink {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("received.txt");
        std::fs::write(&out, "").unwrap();
        let port = free_port();
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/sink.py");
        let mut cmd = Command::new(python());
        cmd.arg(script).arg(kind).arg(port.to_string()).arg(&out);
        if let Some(limit) = limit {
            cmd.arg(limit.to_string());
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("tests/.venv/bin/python3 runs (run tests/install-deps.sh)");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(line.trim(), "listening", "sink.py did not start");
        PySink {
            port,
            out,
            child,
            _dir: dir,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> PySinkLog {
        let text = std::fs::read_to_string(&self.out).unwrap_or_default();
        let mut log = PySinkLog::default();
        for line in text.lines() {
            let mut words = line.split(' ');
            match (words.next(), words.next(), words.next()) {
                (Some("#"), Some("request"), Some(n)) => log.requests.push(n.parse().unwrap()),
                (Some("#"), Some("refused"), Some(n)) => log.refused.push(n.parse().unwrap()),
                (Some(t), Some(s), None) => log.spans.push((t.to_owned(), s.to_owned())),
                _ => {}
            }
        }
        log
    }

    /// Waits until at least `n` spans arrived (or the timeout passes); returns the count.
    pub async fn wait_for_spans(&self, n: usize, timeout: Duration) -> usize {
        wait_for_count(n, timeout, || self.log().spans.len()).await
    }
}

impl Drop for PySink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
