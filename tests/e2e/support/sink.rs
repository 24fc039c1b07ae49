//! OTLP upstreams for the daemon to export to: a gRPC sink (tonic, with gRPC's default
//! 4 MiB limit and scripted faults), an HTTP sink (axum), and stock Python ones (grpcio).

use super::*;
use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::Span;

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
    /// Counting mode: when each stored request arrived, and its spans.
    received: Arc<Mutex<Vec<(Instant, usize)>>>,
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
                let spans = spans_of(std::slice::from_ref(request.get_ref()));
                self.received
                    .lock()
                    .unwrap()
                    .push((Instant::now(), spans.len()));
                for span in spans {
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

    /// Counting mode: spans stored from requests that arrived between `from` and `to`.
    pub fn received_between(&self, from: Instant, to: Instant) -> usize {
        self.state
            .received
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, _)| (from..=to).contains(t))
            .map(|(_, n)| n)
            .sum()
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

/// An OTLP/HTTP upstream on axum: `POST /otlp/v1/traces`, gzip bodies only, and an
/// `x-api-key` header that must match; optionally over TLS.
pub struct HttpSink {
    pub port: u16,
    pub requests: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
    /// Requests refused for a wrong or missing key.
    pub unauthorized: Arc<AtomicU64>,
    /// While set, every request is answered 503: the upstream is down (reachable, unlike a
    /// closed port, which another test's server could take meanwhile).
    pub down: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl HttpSink {
    pub async fn start(port: u16, api_key: &str, tls: Option<&Pki>) -> HttpSink {
        use axum::http::{HeaderMap, StatusCode};
        use prost::Message;
        let requests: Arc<Mutex<Vec<ExportTraceServiceRequest>>> = Arc::default();
        let unauthorized = Arc::new(AtomicU64::new(0));
        let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (reqs, unauth, key) = (requests.clone(), unauthorized.clone(), api_key.to_owned());
        let is_down = down.clone();
        let app = axum::Router::new().route(
            "/otlp/v1/traces",
            axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
                let (reqs, unauth, key) = (reqs.clone(), unauth.clone(), key.clone());
                let is_down = is_down.clone();
                async move {
                    if is_down.load(Ordering::SeqCst) {
                        return (StatusCode::SERVICE_UNAVAILABLE, Vec::new());
                    }
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
        let port = listener.local_addr().unwrap().port();
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
            down,
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

/// tests/python/sink.py: a stock grpcio OTLP server (4 MiB limit) or an OTLP/HTTP one
/// that answers 413 past a body limit.
pub struct PySink {
    kind: String,
    limit: Option<usize>,
    delay: Duration,
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
        PySink::start_slow(kind, limit, Duration::ZERO)
    }

    /// A sink that takes `delay` to answer each export (gRPC only).
    pub fn start_slow(kind: &str, limit: Option<usize>, delay: Duration) -> PySink {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("received.txt");
        std::fs::write(&out, "").unwrap();
        let port = free_port();
        let child = PySink::spawn(kind, port, &out, limit, delay);
        PySink {
            kind: kind.to_owned(),
            limit,
            delay,
            port,
            out,
            child,
            _dir: dir,
        }
    }

    fn spawn(
        kind: &str,
        port: u16,
        out: &std::path::Path,
        limit: Option<usize>,
        delay: Duration,
    ) -> std::process::Child {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/sink.py");
        let mut cmd = Command::new(python());
        cmd.arg(script).arg(kind).arg(port.to_string()).arg(out);
        if let Some(limit) = limit {
            cmd.arg(limit.to_string());
        }
        cmd.env("SINK_DELAY_SECONDS", delay.as_secs_f64().to_string());
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
        child
    }

    /// Kills the sink with SIGKILL, requests in progress and all (what it took stays
    /// recorded).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the sink again on its port, recording on.
    pub fn restart(&mut self) {
        self.child = PySink::spawn(&self.kind, self.port, &self.out, self.limit, self.delay);
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
