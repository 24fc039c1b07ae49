//! Configuration: schema with defaults, `${env:…}` substitution, and validation that reports
//! every problem with its key path and line.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use serde_yaml_ng::{Mapping, Value};

use crate::adaptive::{BoostConfig, TargetConfig};
use crate::llm::PricingEntry;
use crate::llm::anomaly::AnomalyConfig;
use crate::otlp::redact::PrivacyConfig;

/// How many problems one section may report before validation stops repairing it.
const MAX_PROBLEMS_PER_SECTION: usize = 64;

/// A duration written as `10s`, `500ms`, `2m` (humantime syntax).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d).map_err(|_| {
            serde::de::Error::custom("expected a duration such as \"10s\", \"500ms\" or \"2m\"")
        })?;
        humantime::parse_duration(text.trim())
            .map(Dur)
            .map_err(|e| {
                serde::de::Error::custom(format!(
                    "invalid duration {text:?} ({e}); use e.g. \"10s\", \"500ms\", \"2m\""
                ))
            })
    }
}

/// One problem found in the config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub line: Option<usize>,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            Some(line) => write!(f, "line {line}: {}: {}", self.path, self.message),
            None => write!(f, "{}: {}", self.path, self.message),
        }
    }
}

/// Every problem found in a config file.
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
pub struct ConfigErrors(pub Vec<Problem>);

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Config {
    pub receiver: ReceiverConfig,
    pub sampling: SamplingConfig,
    /// From `exporter:` (one, named "default") or `exporters:` (several, each named).
    pub exporters: Vec<ExporterConfig>,
    pub admin: AdminConfig,
    pub llm: LlmConfig,
    pub limits: LimitsConfig,
    pub cluster: ClusterConfig,
    /// Longest a graceful shutdown may take to decide and flush everything pending.
    pub shutdown_timeout: Duration,
}

// ---------------------------------------------------------------------------- cluster

/// Trace-aware sharding across replicas: each trace id has one owner among the members,
/// and spans received elsewhere are forwarded to it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Every replica's OTLP/gRPC address (`host:port`), this one included.
    pub peers: Vec<String>,
    /// Or: a name whose address records are the replicas (a headless Service), with the
    /// gRPC port: `llmtail-peers.observability.svc.cluster.local:4317`.
    pub dns: Option<String>,
    /// This replica's address as the others reach it (e.g. `${env:POD_IP}:4317`).
    #[serde(rename = "self")]
    pub self_address: Option<String>,
    /// How often `dns` is resolved again and unreachable peers are tried again.
    pub refresh_interval: Dur,
    /// How long a peer that failed to take forwarded spans stays out of the ring.
    pub peer_retry_interval: Dur,
    /// Spans waiting to be forwarded to one peer; past it they are kept here instead.
    pub forward_queue_spans: usize,
    /// TLS towards peers (whose gRPC receivers serve TLS): the CA to trust and, for mutual
    /// TLS, this replica's client certificate. Peers are addressed by IP, so their
    /// certificates need IP subject alternative names.
    pub tls: Option<TlsClientConfig>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            peers: Vec::new(),
            dns: None,
            self_address: None,
            refresh_interval: Dur(Duration::from_secs(5)),
            peer_retry_interval: Dur(Duration::from_secs(10)),
            forward_queue_spans: 100_000,
            tls: None,
        }
    }
}

fn host_port_problem(value: &str) -> Option<String> {
    match value.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => None,
        _ => Some(format!("{value:?} is not host:port")),
    }
}

impl ClusterConfig {
    pub fn enabled(&self) -> bool {
        !self.peers.is_empty() || self.dns.is_some()
    }

    fn validate(&self) -> Vec<(String, String)> {
        let mut p = Vec::new();
        if !self.enabled() {
            return p;
        }
        if !self.peers.is_empty() && self.dns.is_some() {
            p.push(("dns".into(), "use either peers or dns, not both".into()));
        }
        for (i, peer) in self.peers.iter().enumerate() {
            if let Some(m) = host_port_problem(peer) {
                p.push((format!("peers[{i}]"), m));
            }
        }
        if let Some(m) = self.dns.as_deref().and_then(host_port_problem) {
            p.push(("dns".into(), m));
        }
        match &self.self_address {
            None => p.push((
                "self".into(),
                "required with peers or dns: this replica's address as the others reach it".into(),
            )),
            Some(me) => {
                if let Some(m) = host_port_problem(me) {
                    p.push(("self".into(), m));
                } else if !self.peers.is_empty()
                    && !self
                        .peers
                        .iter()
                        .any(|p| crate::cluster::normalize(p) == crate::cluster::normalize(me))
                {
                    p.push(("self".into(), format!("{me:?} must be one of peers")));
                }
            }
        }
        if self.forward_queue_spans == 0 {
            p.push(("forward_queue_spans".into(), "must be at least 1".into()));
        }
        p
    }
}

// ---------------------------------------------------------------------------- limits

/// A size in bytes, written as a number or with a unit: `512MiB`, `2GiB`, `64KiB`, `1GB`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub usize);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        let bad = |text: &str| {
            serde::de::Error::custom(format!(
                "invalid size {text:?}; write bytes, or e.g. \"512MiB\", \"2GiB\", \"64KiB\""
            ))
        };
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(ByteSize(n as usize)),
            Raw::Text(text) => {
                let t = text.trim();
                let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
                let (num, unit) = t.split_at(split);
                let n: u64 = num.parse().map_err(|_| bad(&text))?;
                let factor: u64 = match unit.trim() {
                    "" | "B" => 1,
                    "KiB" => 1 << 10,
                    "MiB" => 1 << 20,
                    "GiB" => 1 << 30,
                    "KB" | "kB" => 1_000,
                    "MB" => 1_000_000,
                    "GB" => 1_000_000_000,
                    _ => return Err(bad(&text)),
                };
                n.checked_mul(factor)
                    .map(|b| ByteSize(b as usize))
                    .ok_or_else(|| bad(&text))
            }
        }
    }
}

/// Share of the container's memory limit that the memory budget (`max_buffer_bytes`) takes
/// by default; the rest is the process's fixed overhead (code, runtime, connections,
/// allocator slack), measured in docs/operations.md.
pub const BUFFER_SHARE_OF_CGROUP: f64 = 0.4;
/// `max_buffer_bytes` when there is no cgroup memory limit.
pub const DEFAULT_BUFFER_BYTES: usize = 1 << 30;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Hard mark of the memory budget: request buffers held (by held traces, late spans
    /// and queues), encoded export requests, bookkeeping and the decision cache. At it
    /// receivers refuse retryably. `None`: a share of the cgroup limit.
    pub max_buffer_bytes: Option<ByteSize>,
    /// Share of `max_buffer_bytes` past which the oldest traces are decided early.
    pub soft_mark: f64,
    pub max_spans_per_trace: usize,
    pub max_span_bytes: usize,
    pub max_attribute_bytes: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_buffer_bytes: None,
            soft_mark: 0.8,
            max_spans_per_trace: 10_000,
            max_span_bytes: 4 << 20,
            max_attribute_bytes: 1 << 20,
        }
    }
}

impl LimitsConfig {
    /// The hard mark in force: the configured one, or a share of the cgroup memory limit,
    /// or a fixed default.
    pub fn buffer_bytes(&self) -> usize {
        match self.max_buffer_bytes {
            Some(b) => b.0,
            None => cgroup_memory_limit()
                .map(|limit| (limit as f64 * BUFFER_SHARE_OF_CGROUP) as usize)
                .unwrap_or(DEFAULT_BUFFER_BYTES),
        }
    }

    fn validate(&self) -> Vec<(String, String)> {
        let mut p = Vec::new();
        if !(self.soft_mark > 0.0 && self.soft_mark <= 1.0) {
            p.push(("soft_mark".into(), "must be in (0, 1]".into()));
        }
        if self.max_buffer_bytes.is_some_and(|b| b.0 < 1 << 20) {
            p.push(("max_buffer_bytes".into(), "must be at least 1MiB".into()));
        }
        if self.max_spans_per_trace == 0 {
            p.push(("max_spans_per_trace".into(), "must be at least 1".into()));
        }
        if self.max_span_bytes < 64 {
            p.push(("max_span_bytes".into(), "must be at least 64".into()));
        }
        if self.max_attribute_bytes == 0 {
            p.push(("max_attribute_bytes".into(), "must be at least 1".into()));
        }
        p
    }
}

/// The memory limit of this process's own cgroup: the tightest `memory.max` (v2) or
/// `memory.limit_in_bytes` (v1) of its group and the groups above it, as mounted in a pod
/// (the group path from `/proc/self/cgroup`, under `/sys/fs/cgroup` or, inside a cgroup
/// namespace, at the mount's root). `None` when no limit is set.
pub fn cgroup_memory_limit() -> Option<u64> {
    let groups = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    cgroup_limit_from(&groups, |p| std::fs::read_to_string(p).ok())
}

/// [`cgroup_memory_limit`] over a `/proc/self/cgroup` text and a file reader (tested with
/// fake hierarchies).
fn cgroup_limit_from(groups: &str, read: impl Fn(&str) -> Option<String>) -> Option<u64> {
    // v1 reports "no limit" as a number near 2^63, v2 as "max".
    let parse = |text: String| text.trim().parse::<u64>().ok().filter(|&l| l < 1 << 60);
    let mut limits = Vec::new();
    for line in groups.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let (root, file) = if controllers.is_empty() {
            ("/sys/fs/cgroup", "memory.max")
        } else if controllers.split(',').any(|c| c == "memory") {
            ("/sys/fs/cgroup/memory", "memory.limit_in_bytes")
        } else {
            continue;
        };
        // The group and every ancestor up to the mount's root.
        let mut dir = path.trim_end_matches('/').to_owned();
        loop {
            limits.extend(read(&format!("{root}{dir}/{file}")).and_then(parse));
            match dir.rfind('/') {
                Some(i) => dir.truncate(i),
                None => break,
            }
        }
        // Inside a cgroup namespace the group is mounted at the root.
        limits.extend(read(&format!("{root}/{file}")).and_then(parse));
    }
    limits.into_iter().min()
}

// ---------------------------------------------------------------------------- receiver

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReceiverConfig {
    pub grpc: GrpcReceiverConfig,
    pub http: HttpReceiverConfig,
    pub auth: AuthConfig,
}

/// TLS for a receiver: its certificate chain and key, and for mutual TLS the CA that
/// client certificates must chain to.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTlsConfig {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
}

impl ServerTlsConfig {
    fn validate(&self, key: &str) -> Vec<(String, String)> {
        let mut p = Vec::new();
        let files = [
            ("cert_file", Some(&self.cert_file)),
            ("key_file", Some(&self.key_file)),
            ("client_ca_file", self.client_ca_file.as_ref()),
        ];
        for (name, file) in files {
            if let Some(f) = file
                && let Err(e) = std::fs::metadata(f)
            {
                p.push((
                    format!("{key}.tls.{name}"),
                    format!("cannot read {}: {e}", f.display()),
                ));
            }
        }
        p
    }
}

/// Who may send: requests must carry one of the bearer tokens (`authorization: Bearer …`)
/// or one of the API keys (in `api_key_header`). Off when both lists are empty.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub bearer_tokens: Vec<String>,
    pub api_keys: Vec<String>,
    pub api_key_header: String,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            bearer_tokens: Vec::new(),
            api_keys: Vec::new(),
            api_key_header: "x-api-key".into(),
        }
    }
}

fn socket_problem(key: &str, endpoint: &str, example: &str) -> Option<(String, String)> {
    endpoint.parse::<SocketAddr>().is_err().then(|| {
        (
            key.to_owned(),
            format!("{endpoint:?} is not host:port with an IP host, e.g. {example}"),
        )
    })
}

impl ReceiverConfig {
    fn validate(&self) -> Vec<(String, String)> {
        let mut p = Vec::new();
        for (i, t) in self.auth.bearer_tokens.iter().enumerate() {
            if t.len() < 16 {
                p.push((
                    format!("auth.bearer_tokens[{i}]"),
                    "must be at least 16 characters".into(),
                ));
            }
        }
        for (i, t) in self.auth.api_keys.iter().enumerate() {
            if t.len() < 16 {
                p.push((
                    format!("auth.api_keys[{i}]"),
                    "must be at least 16 characters".into(),
                ));
            }
        }
        if http::HeaderName::from_bytes(self.auth.api_key_header.as_bytes()).is_err() {
            p.push((
                "auth.api_key_header".into(),
                format!("{:?} is not a valid header name", self.auth.api_key_header),
            ));
        }
        if let Some(tls) = &self.grpc.tls {
            p.extend(tls.validate("grpc"));
        }
        if let Some(tls) = &self.http.tls {
            p.extend(tls.validate("http"));
        }
        if self.grpc.max_concurrent_streams == 0 {
            p.push((
                "grpc.max_concurrent_streams".into(),
                "must be at least 1".into(),
            ));
        }
        for (name, n) in [
            ("grpc", self.grpc.max_connections),
            ("http", self.http.max_connections),
        ] {
            if n == 0 {
                p.push((
                    format!("{name}.max_connections"),
                    "must be at least 1".into(),
                ));
            }
        }
        for (name, d) in [
            ("grpc.header_read_timeout", self.grpc.header_read_timeout),
            ("grpc.idle_timeout", self.grpc.idle_timeout),
            ("http.header_read_timeout", self.http.header_read_timeout),
            ("http.idle_timeout", self.http.idle_timeout),
        ] {
            if d.0.is_zero() {
                p.push((name.into(), "must be longer than 0s".into()));
            }
        }
        if self.grpc.enabled {
            p.extend(socket_problem(
                "grpc.endpoint",
                &self.grpc.endpoint,
                "0.0.0.0:4317",
            ));
            if self.grpc.max_request_bytes < MIN_REQUEST_BYTES {
                p.push((
                    "grpc.max_request_bytes".into(),
                    format!("must be at least {MIN_REQUEST_BYTES}"),
                ));
            }
        }
        if self.http.enabled {
            p.extend(socket_problem(
                "http.endpoint",
                &self.http.endpoint,
                "0.0.0.0:4318",
            ));
            if !self.http.path.starts_with('/') {
                p.push((
                    "http.path".into(),
                    format!("{:?} must start with /", self.http.path),
                ));
            }
            if self.http.max_request_bytes < MIN_REQUEST_BYTES {
                p.push((
                    "http.max_request_bytes".into(),
                    format!("must be at least {MIN_REQUEST_BYTES}"),
                ));
            }
            for (i, origin) in self.http.cors.allowed_origins.iter().enumerate() {
                if origin != "*"
                    && !(origin.starts_with("http://") || origin.starts_with("https://"))
                {
                    p.push((
                        format!("http.cors.allowed_origins[{i}]"),
                        format!(
                            "{origin:?} must be \"*\" or an origin such as https://app.example.com"
                        ),
                    ));
                }
            }
        }
        if self.grpc.enabled
            && self.http.enabled
            && self.grpc.endpoint == self.http.endpoint
            && !self.grpc.endpoint.ends_with(":0")
        {
            p.push((
                "http.endpoint".into(),
                "must differ from receiver.grpc.endpoint".into(),
            ));
        }
        if !self.grpc.enabled && !self.http.enabled {
            p.push((
                "".into(),
                "enable at least one of receiver.grpc and receiver.http".into(),
            ));
        }
        p
    }
}

/// Default largest accepted request (after decompression), both protocols.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 16 * 1024 * 1024;
/// Smallest `max_request_bytes` that still admits a realistic request.
const MIN_REQUEST_BYTES: usize = 1024;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpcReceiverConfig {
    pub enabled: bool,
    pub endpoint: String,
    /// Requests larger than this (decompressed) are answered RESOURCE_EXHAUSTED.
    pub max_request_bytes: usize,
    pub tls: Option<ServerTlsConfig>,
    /// HTTP/2 streams (requests) in flight per connection.
    pub max_concurrent_streams: u32,
    /// Longest a request may take, body included (slow senders are cut off).
    pub timeout: Dur,
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// Longest a new connection may take to start its first request (TLS handshake and
    /// HTTP/2 preface included); also how long idle connections last while the receiver
    /// is nearly at `max_connections`.
    pub header_read_timeout: Dur,
    /// Connections with no request in progress for this long are closed (gracefully:
    /// clients reconnect when they next export).
    pub idle_timeout: Dur,
}

/// Connections each receiver serves at once.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
const DEFAULT_HEADER_READ_TIMEOUT: Dur = Dur(Duration::from_secs(10));
/// OpenTelemetry SDKs export every 5 s while busy; a connection idle for two minutes
/// belongs to a quiet service, which reconnects at its next export.
const DEFAULT_IDLE_TIMEOUT: Dur = Dur(Duration::from_secs(120));

/// Longest a receiver waits for a request to arrive whole.
const DEFAULT_RECEIVE_TIMEOUT: Dur = Dur(Duration::from_secs(30));

impl Default for GrpcReceiverConfig {
    fn default() -> Self {
        GrpcReceiverConfig {
            enabled: true,
            endpoint: "0.0.0.0:4317".into(),
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            tls: None,
            max_concurrent_streams: 256,
            timeout: DEFAULT_RECEIVE_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpReceiverConfig {
    pub enabled: bool,
    pub endpoint: String,
    /// Where OTLP/HTTP exports are posted.
    pub path: String,
    /// Bodies larger than this, before or after decompression, are answered 413.
    pub max_request_bytes: usize,
    pub cors: CorsConfig,
    pub tls: Option<ServerTlsConfig>,
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// Longest a client may take to send a request's headers, and a new connection to
    /// start its first request (TLS handshake included); also how long idle connections
    /// last while the receiver is nearly at `max_connections`.
    pub header_read_timeout: Dur,
    /// Longest a request may take, body included.
    pub timeout: Dur,
    /// Connections with no request in progress for this long are closed.
    pub idle_timeout: Dur,
}

impl Default for HttpReceiverConfig {
    fn default() -> Self {
        HttpReceiverConfig {
            enabled: true,
            endpoint: "0.0.0.0:4318".into(),
            path: "/v1/traces".into(),
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            cors: CorsConfig::default(),
            tls: None,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            timeout: DEFAULT_RECEIVE_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
        }
    }
}

/// Cross-origin access for browser instrumentation; off while `allowed_origins` is empty.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CorsConfig {
    /// Origins allowed to post traces, e.g. `https://app.example.com`, or `*`.
    pub allowed_origins: Vec<String>,
    /// Request headers allowed beyond Content-Type, Content-Encoding and Authorization.
    pub allowed_headers: Vec<String>,
    /// How long browsers may cache a preflight answer.
    pub max_age: Dur,
}

impl Default for CorsConfig {
    fn default() -> Self {
        CorsConfig {
            allowed_origins: Vec::new(),
            allowed_headers: Vec::new(),
            max_age: Dur(Duration::from_secs(7200)),
        }
    }
}

// ---------------------------------------------------------------------------- sampling

/// Default bound on traces held at once; past it the oldest are decided early.
pub const DEFAULT_MAX_TRACES: usize = 100_000;
/// Default number of remembered decisions (about 52 bytes each with hash-map overhead).
pub const DEFAULT_DECISION_CACHE_SIZE: usize = 1_000_000;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamplingConfig {
    pub decision_wait: Dur,
    pub root_grace: Dur,
    pub base_rate: f64,
    pub policies: Vec<PolicyConfig>,
    pub max_traces: usize,
    pub decision_cache_size: usize,
    /// Opt-in: keep a service's traces at a higher rate while its calls fail or misbehave.
    pub boost: Option<BoostConfig>,
    /// Opt-in: steer the base rate so kept traces come to this many per second.
    pub target_kept_traces_per_second: Option<f64>,
    pub min_base_rate: f64,
    pub max_base_rate: f64,
    /// How often the target controller adjusts the base rate.
    pub target_interval: Dur,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        let target = TargetConfig::default();
        SamplingConfig {
            decision_wait: Dur(Duration::from_secs(10)),
            root_grace: Dur(Duration::from_secs(1)),
            base_rate: 0.1,
            policies: Vec::new(),
            max_traces: DEFAULT_MAX_TRACES,
            decision_cache_size: DEFAULT_DECISION_CACHE_SIZE,
            boost: None,
            target_kept_traces_per_second: None,
            min_base_rate: target.min_base_rate,
            max_base_rate: target.max_base_rate,
            target_interval: target.interval,
        }
    }
}

impl SamplingConfig {
    /// The target controller's settings, when a target is set.
    pub fn target(&self) -> Option<TargetConfig> {
        self.target_kept_traces_per_second.map(|t| TargetConfig {
            kept_traces_per_second: t,
            min_base_rate: self.min_base_rate,
            max_base_rate: self.max_base_rate,
            interval: self.target_interval,
        })
    }

    fn validate(&self) -> Vec<(String, String)> {
        let mut p = Vec::new();
        if self.decision_wait.0.is_zero() {
            p.push(("decision_wait".into(), "must be greater than 0".into()));
        }
        if self.root_grace.0 > self.decision_wait.0 {
            p.push((
                "root_grace".into(),
                "must not be longer than decision_wait".into(),
            ));
        }
        if !(0.0..=1.0).contains(&self.base_rate) {
            p.push((
                "base_rate".into(),
                format!("must be between 0 and 1, got {}", self.base_rate),
            ));
        }
        if self.max_traces == 0 {
            p.push(("max_traces".into(), "must be at least 1".into()));
        }
        if let Some(target) = self.target() {
            for (key, msg) in target.validate() {
                let key = match key.as_str() {
                    "kept_traces_per_second" => "target_kept_traces_per_second".to_owned(),
                    "interval" => "target_interval".to_owned(),
                    other => other.to_owned(),
                };
                p.push((key, msg));
            }
        }
        if let Some(boost) = &self.boost {
            p.extend(
                boost
                    .validate()
                    .into_iter()
                    .map(|(k, m)| (format!("boost.{k}"), m)),
            );
        }
        for (i, policy) in self.policies.iter().enumerate() {
            for (key, msg) in policy.validate() {
                p.push((format!("policies[{i}].{key}"), msg));
            }
            if self.policies[..i]
                .iter()
                .any(|other| other.name == policy.name)
            {
                p.push((
                    format!("policies[{i}].name"),
                    format!("duplicate policy name {:?}", policy.name),
                ));
            }
            for trigger in policy.triggers.iter().flatten() {
                let known = self.policies.iter().find(|q| &q.name == trigger);
                if !known.is_some_and(|q| q.kind.can_trigger_session()) {
                    p.push((
                        format!("policies[{i}].triggers"),
                        format!("{trigger:?} is not an error, anomaly, latency or cost policy of this list"),
                    ));
                }
            }
        }
        p
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyType {
    /// Any span with status ERROR or an `exception` event.
    Error,
    /// Trace duration, or any span's `llm.latency_ms`, at or above `threshold_ms`.
    Latency,
    /// Sum of the trace's LLM call costs at or above `threshold_usd`.
    Cost,
    /// An LLM call of the trace was anomalous (latency, cost or tokens).
    Anomaly,
    /// Another trace of the same session was kept by a trigger policy within `window`.
    Session,
}

impl PolicyType {
    fn can_trigger_session(self) -> bool {
        !matches!(self, PolicyType::Session)
    }

    /// The optional keys this type takes, and whether each is required.
    fn keys(self) -> &'static [(&'static str, bool)] {
        match self {
            PolicyType::Error | PolicyType::Anomaly => &[],
            PolicyType::Latency => &[("threshold_ms", true)],
            PolicyType::Cost => &[("threshold_usd", true)],
            PolicyType::Session => &[
                ("window", false),
                ("triggers", false),
                ("max_sessions", false),
            ],
        }
    }
}

/// Default `window` of a session policy.
pub const DEFAULT_SESSION_WINDOW: Duration = Duration::from_secs(300);
/// Default `max_sessions` of a session policy.
pub const DEFAULT_MAX_SESSIONS: usize = 100_000;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: PolicyType,
    pub threshold_ms: Option<f64>,
    pub threshold_usd: Option<f64>,
    #[serde(default = "full_rate")]
    pub rate: f64,
    /// Session policy: how long after a trigger the session's traces are kept.
    pub window: Option<Dur>,
    /// Session policy: the policies whose keeps mark a session (default: all others).
    pub triggers: Option<Vec<String>>,
    /// Session policy: sessions remembered at once.
    pub max_sessions: Option<usize>,
}

fn full_rate() -> f64 {
    1.0
}

impl PolicyConfig {
    fn validate(&self) -> Vec<(String, String)> {
        let mut p = Vec::new();
        if self.name.trim().is_empty() {
            p.push(("name".into(), "must not be empty".into()));
        }
        if !(0.0..=1.0).contains(&self.rate) {
            p.push((
                "rate".into(),
                format!("must be between 0 and 1, got {}", self.rate),
            ));
        }
        let kind = format!("{:?}", self.kind).to_lowercase();
        let present = [
            ("threshold_ms", self.threshold_ms.is_some()),
            ("threshold_usd", self.threshold_usd.is_some()),
            ("window", self.window.is_some()),
            ("triggers", self.triggers.is_some()),
            ("max_sessions", self.max_sessions.is_some()),
        ];
        let takes = self.kind.keys();
        for (key, is_set) in present {
            match takes.iter().find(|(k, _)| *k == key) {
                None if is_set => {
                    p.push((key.into(), format!("does not apply to a {kind} policy")))
                }
                Some((_, true)) if !is_set => {
                    p.push((key.into(), format!("required for a {kind} policy")))
                }
                _ => {}
            }
        }
        for (key, v) in [
            ("threshold_ms", self.threshold_ms),
            ("threshold_usd", self.threshold_usd),
        ] {
            if let Some(v) = v
                && !(v.is_finite() && v >= 0.0)
            {
                p.push((key.into(), format!("must be a number ≥ 0, got {v}")));
            }
        }
        p
    }
}

// ---------------------------------------------------------------------------- exporter

/// One exporter: where kept traces go, with its own batching, queue and retry.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExporterConfig {
    /// Names the exporter in metrics and logs; required in `exporters:`.
    pub name: String,
    pub otlp: Option<OtlpExporterConfig>,
    pub file: Option<FileExporterConfig>,
    pub batch: BatchConfig,
    pub queue: QueueConfig,
    pub retry: RetryConfig,
}

/// Name of the exporter given as the single `exporter:` section.
pub const DEFAULT_EXPORTER_NAME: &str = "default";

impl Default for ExporterConfig {
    fn default() -> Self {
        ExporterConfig {
            name: DEFAULT_EXPORTER_NAME.into(),
            otlp: None,
            file: None,
            batch: BatchConfig::default(),
            queue: QueueConfig::default(),
            retry: RetryConfig::default(),
        }
    }
}

impl ExporterConfig {
    fn validate(&self) -> Vec<(String, String)> {
        let mut p = Vec::new();
        if self.name.trim().is_empty() {
            p.push(("name".into(), "must not be empty".into()));
        }
        match (&self.otlp, &self.file) {
            (None, None) => p.push(("".into(), "set exactly one of otlp or file".into())),
            (Some(_), Some(_)) => p.push((
                "file".into(),
                "set exactly one of otlp or file, not both".into(),
            )),
            _ => {}
        }
        if let Some(otlp) = &self.otlp {
            for (key, msg) in otlp.validate() {
                p.push((format!("otlp.{key}"), msg));
            }
        }
        if let Some(file) = &self.file
            && file.path.as_os_str().is_empty()
        {
            p.push(("file.path".into(), "must not be empty".into()));
        }
        if self.batch.max_spans == 0 {
            p.push(("batch.max_spans".into(), "must be at least 1".into()));
        }
        if self.batch.max_bytes.0 < MIN_BATCH_BYTES {
            p.push((
                "batch.max_bytes".into(),
                format!("must be at least {MIN_BATCH_BYTES} bytes"),
            ));
        }
        if self.queue.max_spans < self.batch.max_spans {
            p.push((
                "queue.max_spans".into(),
                "must be at least batch.max_spans".into(),
            ));
        }
        if self.queue.concurrency == 0 {
            p.push(("queue.concurrency".into(), "must be at least 1".into()));
        }
        if self.retry.initial_interval.0.is_zero()
            || self.retry.max_interval.0 < self.retry.initial_interval.0
        {
            p.push((
                "retry".into(),
                "need 0 < initial_interval ≤ max_interval".into(),
            ));
        }
        p
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    Gzip,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum ExportProtocol {
    #[serde(rename = "grpc")]
    Grpc,
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OtlpExporterConfig {
    /// Upstream endpoint: `http://tempo:4317` (gRPC), or for `http/protobuf` the base URL
    /// that `/v1/traces` is appended to.
    pub endpoint: String,
    #[serde(default = "default_export_protocol")]
    pub protocol: ExportProtocol,
    #[serde(default = "default_export_timeout")]
    pub timeout: Dur,
    #[serde(default = "default_compression")]
    pub compression: Compression,
    /// Sent with every export (API keys); never logged.
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub tls: TlsClientConfig,
}

/// TLS towards the upstream (rustls). `https://` endpoints use TLS with the bundled Mozilla
/// roots unless `ca_file` names the CA to trust.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsClientConfig {
    /// Plain text. Defaults to true for `http://` endpoints and false for `https://` ones.
    pub insecure: Option<bool>,
    /// PEM file of the CA certificate(s) to trust instead of the bundled roots.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain and key, for mutual TLS.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

impl OtlpExporterConfig {
    /// Whether the connection is TLS.
    pub fn uses_tls(&self) -> bool {
        match self.tls.insecure {
            Some(insecure) => !insecure,
            None => self.endpoint.starts_with("https://"),
        }
    }

    fn validate(&self) -> Vec<(String, String)> {
        let mut p = Vec::new();
        let scheme_ok =
            self.endpoint.starts_with("http://") || self.endpoint.starts_with("https://");
        if !scheme_ok || self.endpoint.parse::<http::Uri>().is_err() {
            p.push((
                "endpoint".into(),
                format!(
                    "{:?} must be an http:// or https:// URL such as http://tempo:4317",
                    self.endpoint
                ),
            ));
        }
        if self.endpoint.starts_with("https://") && self.tls.insecure == Some(true) {
            p.push((
                "tls.insecure".into(),
                "an https:// endpoint cannot be plain text; use http:// or drop tls.insecure"
                    .into(),
            ));
        }
        if self.timeout.0.is_zero() {
            p.push(("timeout".into(), "must be greater than 0".into()));
        }
        for (name, value) in &self.headers {
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                p.push((
                    format!("headers.{name}"),
                    "is not a valid HTTP header name".into(),
                ));
            }
            if http::HeaderValue::from_str(value).is_err() {
                // The value may be a secret: say what is wrong without echoing it.
                p.push((
                    format!("headers.{name}"),
                    "value is not a valid HTTP header value".into(),
                ));
            }
        }
        if self.tls.cert_file.is_some() != self.tls.key_file.is_some() {
            p.push((
                "tls".into(),
                "cert_file and key_file go together (mutual TLS)".into(),
            ));
        }
        for (key, file) in [
            ("tls.ca_file", &self.tls.ca_file),
            ("tls.cert_file", &self.tls.cert_file),
            ("tls.key_file", &self.tls.key_file),
        ] {
            if let Some(f) = file
                && let Err(e) = std::fs::metadata(f)
            {
                p.push((key.into(), format!("cannot read {}: {e}", f.display())));
            }
        }
        if (self.tls.ca_file.is_some() || self.tls.cert_file.is_some()) && !self.uses_tls() {
            p.push((
                "tls".into(),
                "TLS files are set but the connection is plain text; use an https:// endpoint"
                    .into(),
            ));
        }
        p
    }
}

fn default_export_protocol() -> ExportProtocol {
    ExportProtocol::Grpc
}

fn default_export_timeout() -> Dur {
    Dur(Duration::from_secs(10))
}

fn default_compression() -> Compression {
    Compression::Gzip
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileExporterConfig {
    /// OTLP/JSON lines, one ExportTraceServiceRequest per line, appended.
    pub path: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    /// A batch is sent once it holds this many spans...
    pub max_spans: usize,
    /// ...or this many bytes of encoded, uncompressed request (upstreams limit the size of
    /// a request after decompression: gRPC's default is 4 MiB)...
    pub max_bytes: ByteSize,
    /// ...or this long after its first span.
    pub timeout: Dur,
}

/// Smallest `batch.max_bytes`: a batch must hold at least one ordinary span.
const MIN_BATCH_BYTES: usize = 4096;

/// Default `batch.max_bytes`: below gRPC's default 4 MiB message limit (the OpenTelemetry
/// Collector's `max_recv_msg_size_mib`, Tempo's and most backends'), with room for framing.
pub const DEFAULT_BATCH_BYTES: usize = 3_670_016;

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_spans: 4096,
            max_bytes: ByteSize(DEFAULT_BATCH_BYTES),
            timeout: Dur(Duration::from_millis(200)),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// Kept spans waiting for (or retrying) export past which receivers refuse new data
    /// (retryably) until the queue drains (memory-only queues; a durable queue is bounded
    /// by `max_disk_bytes`). Decided traces always enter the queue: nothing
    /// accepted is dropped for want of room; the memory budget bounds what it holds.
    pub max_spans: usize,
    /// Export requests in flight at once.
    pub concurrency: usize,
    /// Where the write-ahead log of kept spans lives; off (memory only) when unset.
    pub directory: Option<PathBuf>,
    /// Largest size of the write-ahead log. Receivers refuse new data before the log and
    /// the traces held for it would pass it; kept spans that still do not fit are lost
    /// (`wal_full`).
    pub max_disk_bytes: ByteSize,
    /// How often the log is flushed to disk; `0s` flushes every write.
    pub fsync_interval: Dur,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            max_spans: 200_000,
            concurrency: 4,
            directory: None,
            max_disk_bytes: ByteSize(256 << 20),
            fsync_interval: Dur(Duration::from_secs(1)),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    pub initial_interval: Dur,
    pub max_interval: Dur,
    /// Retry horizon: a batch still failing this long after its first attempt is lost
    /// (`reason="retries_exhausted"`).
    pub max_elapsed: Dur,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            initial_interval: Dur(Duration::from_millis(200)),
            max_interval: Dur(Duration::from_secs(5)),
            max_elapsed: Dur(Duration::from_secs(300)),
        }
    }
}

// ---------------------------------------------------------------------------- admin, llm

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub endpoint: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            endpoint: "0.0.0.0:8888".into(),
        }
    }
}

impl AdminConfig {
    fn validate(&self) -> Vec<(String, String)> {
        match self.endpoint.parse::<SocketAddr>() {
            Ok(_) => Vec::new(),
            Err(_) => vec![(
                "endpoint".into(),
                format!(
                    "{:?} is not host:port with an IP host, e.g. 0.0.0.0:8888",
                    self.endpoint
                ),
            )],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LlmConfig {
    pub pricing: Vec<PricingEntry>,
    /// A YAML list of pricing entries, re-read every `pricing_reload_interval`; its entries
    /// come before `pricing`'s.
    pub pricing_file: Option<PathBuf>,
    pub pricing_reload_interval: Dur,
    pub anomaly: AnomalyConfig,
    pub labels: LabelLimits,
    /// Append the trace's LLM totals and the keeping policy to the root span on export.
    pub trace_rollup: bool,
    pub privacy: PrivacyConfig,
}

impl Default for LlmConfig {
    fn default() -> Self {
        LlmConfig {
            pricing: Vec::new(),
            pricing_file: None,
            pricing_reload_interval: Dur(Duration::from_secs(30)),
            anomaly: AnomalyConfig::default(),
            labels: LabelLimits::default(),
            trace_rollup: true,
            privacy: PrivacyConfig::default(),
        }
    }
}

/// Bounds on label values taken from span data.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LabelLimits {
    /// Distinct services with their own label (first seen); later ones are `other`.
    pub max_services: usize,
    /// Distinct models (and providers, operations) with their own label.
    pub max_models: usize,
    /// Users with their own label: the top K by cost.
    pub top_users: usize,
    /// Sessions with their own label: the top K by cost.
    pub top_sessions: usize,
    /// (service, model) pairs with their own series, first seen; later pairs are counted
    /// under (other, other). Bounds the per-call metrics as a whole, whatever the product
    /// of services and models.
    pub max_service_models: usize,
    /// Label sets of the GenAI semantic-convention metrics (operation, provider, request
    /// and response model, error type), first seen; later sets are all `other`.
    pub max_genai_label_sets: usize,
}

impl Default for LabelLimits {
    fn default() -> Self {
        LabelLimits {
            max_services: 200,
            max_models: 200,
            top_users: 100,
            top_sessions: 100,
            max_service_models: 1000,
            max_genai_label_sets: 200,
        }
    }
}

impl LlmConfig {
    fn validate(&self) -> Vec<(String, String)> {
        let mut p: Vec<(String, String)> = self
            .pricing
            .iter()
            .enumerate()
            .flat_map(|(i, e)| {
                e.validate()
                    .into_iter()
                    .map(move |msg| (format!("pricing[{i}]"), msg))
            })
            .collect();
        if let Some(file) = &self.pricing_file {
            let pricing = crate::llm::Pricing::default();
            if let Err(e) = pricing.load_file(file) {
                p.push(("pricing_file".into(), e.message));
            }
        }
        p.extend(
            self.anomaly
                .validate()
                .into_iter()
                .map(|(k, m)| (format!("anomaly.{k}"), m)),
        );
        p.extend(
            self.privacy
                .validate()
                .into_iter()
                .map(|(k, m)| (format!("privacy.{k}"), m)),
        );
        p
    }
}

#[derive(Deserialize)]
struct TopLevelTimeout(Dur);

/// Default for `shutdown_timeout`.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------- loading

const TOP_LEVEL_KEYS: &[&str] = &[
    "receiver",
    "sampling",
    "exporter",
    "exporters",
    "admin",
    "llm",
    "limits",
    "cluster",
    "shutdown_timeout",
];

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![Problem {
                path: path.display().to_string(),
                line: None,
                message: format!("cannot read the config file: {e}"),
            }])
        })?;
        Config::parse(&text)
    }

    /// Parses and validates a config; on failure returns every problem found.
    pub fn parse(text: &str) -> Result<Config, ConfigErrors> {
        let (text, mut problems) = substitute_env(text, |name| std::env::var(name).ok());
        let value: Value = match serde_yaml_ng::from_str(&text) {
            Ok(Value::Null) => Value::Mapping(Mapping::new()),
            Ok(v) => v,
            Err(e) => {
                problems.push(Problem {
                    path: "(document)".into(),
                    line: e.location().map(|l| l.line()),
                    message: format!("not valid YAML: {e}"),
                });
                return Err(ConfigErrors(problems));
            }
        };
        let locator = Locator::new(&text);
        let Value::Mapping(top) = value else {
            problems.push(Problem {
                path: "(document)".into(),
                line: Some(1),
                message: "the config must be a mapping of sections".into(),
            });
            return Err(ConfigErrors(problems));
        };
        let report = |path: Vec<String>, message: String, problems: &mut Vec<Problem>| {
            problems.push(Problem {
                line: locator.line(&path),
                path: render(&path),
                message,
            });
        };
        for key in top.keys() {
            let name = key.as_str().unwrap_or("");
            if !TOP_LEVEL_KEYS.contains(&name) {
                report(
                    vec![name.to_owned()],
                    format!("unknown section; allowed: {}", TOP_LEVEL_KEYS.join(", ")),
                    &mut problems,
                );
            }
        }
        let section = |name: &str| {
            top.get(name)
                .cloned()
                .unwrap_or(Value::Mapping(Mapping::new()))
        };
        let mut cfg = Config {
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            ..Config::default()
        };
        // Each section is deserialised and validated on its own, so one bad section does
        // not hide the problems of the others.
        macro_rules! load {
            ($($field:ident),*) => {$(
                let name = stringify!($field);
                if let Some(c) = load_section(vec![name.into()], section(name), &mut problems, &report) {
                    cfg.$field = c;
                }
            )*};
        }
        load!(receiver, sampling, admin, llm, limits, cluster);
        match (top.get("exporter"), top.get("exporters")) {
            (Some(_), Some(_)) => report(
                vec!["exporters".into()],
                "use either exporter (one) or exporters (a list), not both".into(),
                &mut problems,
            ),
            (None, None) => problems.push(Problem {
                path: "exporter".into(),
                line: None,
                message: "required: set exporter.otlp.endpoint, or exporter.file.path when there is no upstream".into(),
            }),
            (Some(one), None) => {
                if let Some(mut c) = load_section::<ExporterConfig>(vec!["exporter".into()], one.clone(), &mut problems, &report) {
                    c.name = DEFAULT_EXPORTER_NAME.into();
                    cfg.exporters = vec![c];
                }
            }
            (None, Some(Value::Sequence(list))) if !list.is_empty() => {
                for (i, item) in list.iter().enumerate() {
                    let path = vec!["exporters".to_owned(), i.to_string()];
                    if item.get("name").is_none() {
                        report(path.clone(), "every entry of exporters needs a name".into(), &mut problems);
                    }
                    if let Some(c) = load_section::<ExporterConfig>(path.clone(), item.clone(), &mut problems, &report) {
                        if cfg.exporters.iter().any(|e| e.name == c.name) {
                            report([path, vec!["name".into()]].concat(), format!("duplicate exporter name {:?}", c.name), &mut problems);
                        }
                        cfg.exporters.push(c);
                    }
                }
            }
            (None, Some(_)) => report(
                vec!["exporters".into()],
                "must be a non-empty list of exporters, each with a name".into(),
                &mut problems,
            ),
        }
        if let Some(v) = top.get("shutdown_timeout") {
            match serde_yaml_ng::from_value::<TopLevelTimeout>(v.clone()) {
                Ok(TopLevelTimeout(d)) => cfg.shutdown_timeout = d.0,
                Err(e) => report(
                    vec!["shutdown_timeout".into()],
                    e.to_string(),
                    &mut problems,
                ),
            }
        }
        if cfg.cluster.enabled() && cfg.receiver.grpc.tls.is_some() && cfg.cluster.tls.is_none() {
            report(
                vec!["cluster".into()],
                "receiver.grpc serves TLS, so peers must be reached over TLS: set cluster.tls (ca_file, and cert_file/key_file for mutual TLS)".into(),
                &mut problems,
            );
        }
        if problems.is_empty() {
            Ok(cfg)
        } else {
            Err(ConfigErrors(problems))
        }
    }
}

/// A config section that checks its own values.
trait Validate {
    /// Problems as (key path relative to the section, message).
    fn validate(&self) -> Vec<(String, String)>;
}

macro_rules! validated {
    ($($t:ty),*) => {$(
        impl Validate for $t {
            fn validate(&self) -> Vec<(String, String)> {
                <$t>::validate(self)
            }
        }
    )*};
}
validated!(
    ReceiverConfig,
    SamplingConfig,
    ExporterConfig,
    AdminConfig,
    LlmConfig,
    LimitsConfig,
    ClusterConfig
);

/// Deserializes and validates one section, reporting every problem under `path`.
fn load_section<T: DeserializeOwned + Validate>(
    path: Vec<String>,
    value: Value,
    problems: &mut Vec<Problem>,
    report: &impl Fn(Vec<String>, String, &mut Vec<Problem>),
) -> Option<T> {
    let (parsed, errs) = deserialize_repairing::<T>(value);
    for (rel, msg) in errs {
        report([path.clone(), rel].concat(), msg, problems);
    }
    let parsed = parsed?;
    for (suffix, msg) in parsed.validate() {
        report([path.clone(), split_path(&suffix)].concat(), msg, problems);
    }
    Some(parsed)
}

/// Deserializes `value` as `T`; on an error, records it, removes the offending key and
/// tries again, so one pass reports every unknown key and every bad value of a section.
fn deserialize_repairing<T: DeserializeOwned>(
    mut value: Value,
) -> (Option<T>, Vec<(Vec<String>, String)>) {
    let mut errors = Vec::new();
    while errors.len() < MAX_PROBLEMS_PER_SECTION {
        match serde_path_to_error::deserialize::<_, T>(value.clone()) {
            Ok(parsed) => return (Some(parsed), errors),
            Err(e) => {
                let path: Vec<String> = e
                    .path()
                    .iter()
                    .filter_map(|seg| match seg {
                        serde_path_to_error::Segment::Seq { index } => Some(index.to_string()),
                        serde_path_to_error::Segment::Map { key } => Some(key.clone()),
                        serde_path_to_error::Segment::Enum { variant } => Some(variant.clone()),
                        serde_path_to_error::Segment::Unknown => None,
                    })
                    .collect();
                let message = e.into_inner().to_string();
                let removed = remove_at(&mut value, &path);
                errors.push((path, message));
                if !removed {
                    return (None, errors);
                }
            }
        }
    }
    (None, errors)
}

/// Removes the node at `path` (a key of a mapping or an item of a sequence).
fn remove_at(value: &mut Value, path: &[String]) -> bool {
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    let mut node = value;
    for seg in parents {
        node = match node {
            Value::Mapping(m) => match m.get_mut(seg.as_str()) {
                Some(v) => v,
                None => return false,
            },
            Value::Sequence(s) => match seg.parse::<usize>().ok().and_then(|i| s.get_mut(i)) {
                Some(v) => v,
                None => return false,
            },
            _ => return false,
        };
    }
    match node {
        Value::Mapping(m) => m.remove(last.as_str()).is_some(),
        Value::Sequence(s) => match last.parse::<usize>() {
            Ok(i) if i < s.len() => {
                s.remove(i);
                true
            }
            _ => false,
        },
        _ => false,
    }
}

fn split_path(suffix: &str) -> Vec<String> {
    suffix
        .split(['.', '[', ']'])
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// `["sampling", "policies", "0", "rate"]` → `sampling.policies[0].rate`.
fn render(path: &[String]) -> String {
    let mut out = String::new();
    for seg in path {
        if seg.parse::<usize>().is_ok() {
            out.push_str(&format!("[{seg}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(seg);
        }
    }
    out
}

/// Replaces `${env:NAME}` and `${env:NAME:-default}`; `$${` stays a literal `${`.
/// Returns the new text and a problem for every variable that is unset with no default.
pub fn substitute_env(
    text: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> (String, Vec<Problem>) {
    let mut out = String::with_capacity(text.len());
    let mut problems = Vec::new();
    for (line_no, line) in text.split_inclusive('\n').enumerate() {
        let mut rest = line;
        while let Some(i) = rest.find("${") {
            if rest[..i].ends_with('$') {
                out.push_str(&rest[..i - 1]);
                out.push_str("${");
                rest = &rest[i + 2..];
                continue;
            }
            out.push_str(&rest[..i]);
            let after = &rest[i + 2..];
            let Some(end) = after.find('}') else {
                out.push_str(&rest[i..]);
                rest = "";
                break;
            };
            let inner = &after[..end];
            match inner.strip_prefix("env:") {
                Some(spec) => {
                    let (name, default) = match spec.split_once(":-") {
                        Some((n, d)) => (n, Some(d)),
                        None => (spec, None),
                    };
                    match (lookup(name), default) {
                        (Some(v), _) => out.push_str(&v),
                        (None, Some(d)) => out.push_str(d),
                        (None, None) => problems.push(Problem {
                            path: format!("${{env:{name}}}"),
                            line: Some(line_no + 1),
                            message: format!(
                                "environment variable {name} is not set; set it or write ${{env:{name}:-default}}"
                            ),
                        }),
                    }
                }
                None => problems.push(Problem {
                    path: format!("${{{inner}}}"),
                    line: Some(line_no + 1),
                    message: "only ${env:NAME} and ${env:NAME:-default} are substituted; write $${ for a literal ${".into(),
                }),
            }
            rest = &after[end + 1..];
        }
        out.push_str(rest);
    }
    (out, problems)
}

/// Finds the line of a key path in the YAML text, for error messages.
struct Locator {
    lines: Vec<(Vec<String>, usize)>,
}

impl Locator {
    fn new(text: &str) -> Locator {
        use yaml_rust2::parser::{Event, Parser};
        enum Frame {
            Map { key: Option<String> },
            Seq { index: usize },
        }
        let mut lines = Vec::new();
        let mut stack: Vec<Frame> = Vec::new();
        let mut parser = Parser::new_from_str(text);
        let path_of = |stack: &[Frame]| -> Vec<String> {
            stack
                .iter()
                .filter_map(|f| match f {
                    Frame::Map { key } => key.clone(),
                    Frame::Seq { index } => Some(index.to_string()),
                })
                .collect()
        };
        // Called when a value (scalar or container) completes at the current level.
        fn advance(stack: &mut [Frame]) {
            match stack.last_mut() {
                Some(Frame::Map { key }) => *key = None,
                Some(Frame::Seq { index }) => *index += 1,
                None => {}
            }
        }
        while let Ok((event, mark)) = parser.next_token() {
            let line = mark.line().max(1);
            match event {
                Event::StreamEnd => break,
                Event::Scalar(s, ..) => {
                    if let Some(Frame::Map { key: key @ None }) = stack.last_mut() {
                        *key = Some(s);
                        lines.push((path_of(&stack), line));
                    } else {
                        if matches!(stack.last(), Some(Frame::Seq { .. })) {
                            lines.push((path_of(&stack), line));
                        }
                        advance(&mut stack);
                    }
                }
                Event::MappingStart(..) | Event::SequenceStart(..) => {
                    if matches!(stack.last(), Some(Frame::Seq { .. })) {
                        lines.push((path_of(&stack), line));
                    }
                    stack.push(if matches!(event, Event::MappingStart(..)) {
                        Frame::Map { key: None }
                    } else {
                        Frame::Seq { index: 0 }
                    });
                }
                Event::MappingEnd | Event::SequenceEnd => {
                    stack.pop();
                    advance(&mut stack);
                }
                _ => {}
            }
        }
        Locator { lines }
    }

    /// The line of the deepest prefix of `path` that appears in the file.
    fn line(&self, path: &[String]) -> Option<usize> {
        (1..=path.len()).rev().find_map(|n| {
            self.lines
                .iter()
                .find(|(p, _)| p.as_slice() == &path[..n])
                .map(|(_, line)| *line)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHIPPED: &str = include_str!("../config.yaml");

    #[test]
    fn shipped_config_is_valid() {
        let cfg = Config::parse(SHIPPED).expect("config.yaml must validate");
        assert!(cfg.exporters[0].file.is_some());
        assert_eq!(cfg.sampling.policies.len(), 3);
    }

    #[test]
    fn defaults_apply() {
        let cfg = Config::parse("exporter:\n  otlp:\n    endpoint: http://x:4317\n").unwrap();
        assert_eq!(cfg.receiver.grpc.endpoint, "0.0.0.0:4317");
        assert_eq!(cfg.receiver.grpc.max_request_bytes, 16 * 1024 * 1024);
        assert_eq!(cfg.sampling.decision_wait.0, Duration::from_secs(10));
        assert_eq!(cfg.sampling.root_grace.0, Duration::from_secs(1));
        assert_eq!(cfg.sampling.base_rate, 0.1);
        assert_eq!(cfg.sampling.decision_cache_size, 1_000_000);
        assert_eq!(cfg.admin.endpoint, "0.0.0.0:8888");
        assert_eq!(cfg.shutdown_timeout, Duration::from_secs(20));
        assert_eq!(
            cfg.exporters[0].otlp.as_ref().unwrap().compression,
            Compression::Gzip
        );
        assert_eq!(cfg.exporters[0].name, "default");
        assert!(cfg.receiver.http.enabled);
        assert_eq!(cfg.receiver.http.endpoint, "0.0.0.0:4318");
        assert_eq!(cfg.receiver.http.path, "/v1/traces");
    }

    #[test]
    fn every_problem_is_reported_with_path_and_line() {
        let text = "\
receiver:
  grpc:
    endpoint: nowhere
    colour: blue
sampling:
  base_rate: 2
  decision_wait: soon
  policies:
    - name: slow
      type: latency
    - name: pricey
      type: cost
      threshold_usd: 0.1
      bogus: 1
exporter:
  otlp:
    endpoint: http://x:4317
extra: 1
";
        let errs = Config::parse(text).unwrap_err().0;
        let find = |path: &str| {
            errs.iter()
                .find(|p| p.path == path)
                .unwrap_or_else(|| panic!("no problem at {path}: {errs:#?}"))
        };
        assert_eq!(find("receiver.grpc.colour").line, Some(4));
        assert!(find("receiver.grpc.colour").message.contains("endpoint"));
        assert_eq!(find("receiver.grpc.endpoint").line, Some(3));
        assert_eq!(find("sampling.decision_wait").line, Some(7));
        assert_eq!(find("sampling.policies[1].bogus").line, Some(14));
        assert_eq!(find("extra").line, Some(18));
        assert!(find("extra").message.contains("allowed"));
        // decision_wait was removed as invalid, so the rest of the section is still validated
        // with its default.
        assert!(
            find("sampling.base_rate")
                .message
                .contains("between 0 and 1")
        );
        assert_eq!(find("sampling.policies[0].threshold_ms").line, Some(9));
    }

    #[test]
    fn llm_and_adaptive_keys_are_validated() {
        let text = "\
sampling:
  target_kept_traces_per_second: -1
  boost: {rate: 2}
  policies:
    - {name: errors, type: error, window: 1m}
    - {name: conv, type: session, triggers: [errors, nope], threshold_ms: 5}
exporter:
  file: {path: x}
llm:
  anomaly: {latency_sigmas: 0}
  privacy:
    mask: {attributes: [a], patterns: [\"(unclosed\"]}
";
        let errs = Config::parse(text).unwrap_err().0;
        let paths: Vec<&str> = errs.iter().map(|p| p.path.as_str()).collect();
        for want in [
            "sampling.target_kept_traces_per_second",
            "sampling.boost.rate",
            "sampling.policies[0].window",
            "sampling.policies[1].triggers",
            "sampling.policies[1].threshold_ms",
            "llm.anomaly.latency_sigmas",
            "llm.privacy.mask.patterns[0]",
        ] {
            assert!(paths.contains(&want), "{want} missing from {paths:?}");
        }
        let ok = "sampling:\n  target_kept_traces_per_second: 50\n  boost: {}\n  policies:\n    - {name: e, type: error}\n    - {name: s, type: session}\nexporter:\n  file: {path: x}\n";
        let cfg = Config::parse(ok).unwrap();
        assert_eq!(cfg.sampling.target().unwrap().kept_traces_per_second, 50.0);
        assert!(cfg.sampling.boost.is_some());
        assert!(cfg.llm.trace_rollup);
    }

    #[test]
    fn limits_security_and_queue_keys_are_validated() {
        let text = "\
receiver:
  auth: {bearer_tokens: [short], api_key_header: \"bad header\"}
  grpc: {tls: {cert_file: /nonexistent/cert.pem, key_file: /nonexistent/key.pem}}
  http: {max_connections: 0}
limits:
  max_buffer_bytes: 12XB
  soft_mark: 1.5
  max_spans_per_trace: 0
exporter:
  file: {path: x}
  queue: {max_disk_bytes: lots}
";
        let errs = Config::parse(text).unwrap_err().0;
        let paths: Vec<&str> = errs.iter().map(|p| p.path.as_str()).collect();
        for want in [
            "receiver.auth.bearer_tokens[0]",
            "receiver.auth.api_key_header",
            "receiver.grpc.tls.cert_file",
            "receiver.grpc.tls.key_file",
            "receiver.http.max_connections",
            "limits.max_buffer_bytes",
            "limits.soft_mark",
            "limits.max_spans_per_trace",
            "exporter.queue.max_disk_bytes",
        ] {
            assert!(paths.contains(&want), "{want} missing from {paths:?}");
        }
        let ok = "limits:\n  max_buffer_bytes: 512MiB\nexporter:\n  file: {path: x}\n  queue: {directory: /tmp/q, max_disk_bytes: 2GB, fsync_interval: 0s}\n";
        let cfg = Config::parse(ok).unwrap();
        assert_eq!(cfg.limits.buffer_bytes(), 512 << 20);
        assert_eq!(cfg.exporters[0].queue.max_disk_bytes.0, 2_000_000_000);
        assert!(cfg.exporters[0].queue.fsync_interval.0.is_zero());
        // Without a configured value: a share of the cgroup limit, or the fixed default.
        let default = Config::parse("exporter:\n  file: {path: x}\n").unwrap();
        let expected = cgroup_memory_limit().map_or(DEFAULT_BUFFER_BYTES, |l| {
            (l as f64 * BUFFER_SHARE_OF_CGROUP) as usize
        });
        assert_eq!(default.limits.buffer_bytes(), expected);
    }

    #[test]
    fn cluster_keys_are_validated() {
        let errs = |text: &str| -> Vec<String> {
            Config::parse(text)
                .unwrap_err()
                .0
                .into_iter()
                .map(|p| format!("{}: {}", p.path, p.message))
                .collect()
        };
        let e =
            errs("cluster:\n  peers: [a:1, nope]\n  dns: x:4317\nexporter:\n  file: {path: x}\n");
        assert!(e.iter().any(|m| m.starts_with("cluster.peers[1]")), "{e:?}");
        assert!(
            e.iter().any(|m| m.starts_with("cluster.dns: use either")),
            "{e:?}"
        );
        assert!(
            e.iter().any(|m| m.starts_with("cluster.self: required")),
            "{e:?}"
        );
        let e = errs("cluster:\n  peers: [a:1, b:1]\n  self: c:1\nexporter:\n  file: {path: x}\n");
        assert!(
            e.iter().any(|m| m.contains("must be one of peers")),
            "{e:?}"
        );
        let e = errs(
            "receiver:\n  grpc:\n    tls: {cert_file: Cargo.toml, key_file: Cargo.toml}\ncluster:\n  dns: peers:4317\n  self: 10.0.0.1:4317\nexporter:\n  file: {path: x}\n",
        );
        assert!(
            e.iter()
                .any(|m| m.starts_with("cluster: receiver.grpc serves TLS")),
            "{e:?}"
        );
        let ok = Config::parse(
            "cluster:\n  dns: peers:4317\n  self: 10.0.0.1:4317\nexporter:\n  file: {path: x}\n",
        )
        .unwrap();
        assert!(ok.cluster.enabled());
        assert!(
            !Config::parse("exporter:\n  file: {path: x}\n")
                .unwrap()
                .cluster
                .enabled()
        );
    }

    #[test]
    fn env_substitution() {
        let lookup = |name: &str| (name == "HOST").then(|| "tempo".to_owned());
        let (text, problems) = substitute_env(
            "a: ${env:HOST}:4317\nb: ${env:PORT:-99}\nc: $${env:HOST}\nd: ${env:MISSING}\n",
            lookup,
        );
        assert_eq!(text, "a: tempo:4317\nb: 99\nc: ${env:HOST}\nd: \n");
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].line, Some(4));
    }

    #[test]
    fn missing_exporter_is_reported() {
        let errs = Config::parse("admin:\n  endpoint: 127.0.0.1:1\n")
            .unwrap_err()
            .0;
        assert!(errs.iter().any(|p| p.path == "exporter"), "{errs:?}");
    }
    #[test]
    fn the_cgroup_limit_is_the_tightest_of_the_process_group_and_its_ancestors() {
        let files: std::collections::HashMap<&str, &str> = [
            // v1, as in this pod: the group under the memory controller's mount.
            (
                "/sys/fs/cgroup/memory/kubepods/pod1/memory.limit_in_bytes",
                "402653184\n",
            ),
            (
                "/sys/fs/cgroup/memory/kubepods/memory.limit_in_bytes",
                "9223372036854771712\n",
            ),
            (
                "/sys/fs/cgroup/memory/memory.limit_in_bytes",
                "9223372036854771712\n",
            ),
            // v2: a parent tighter than the group itself.
            ("/sys/fs/cgroup/app/worker/memory.max", "max\n"),
            ("/sys/fs/cgroup/app/memory.max", "268435456\n"),
        ]
        .into_iter()
        .collect();
        let read = |p: &str| files.get(p).map(|s| s.to_string());
        assert_eq!(
            cgroup_limit_from("4:memory:/kubepods/pod1\n3:cpu:/x\n", read),
            Some(402653184)
        );
        assert_eq!(cgroup_limit_from("0::/app/worker\n", read), Some(268435456));
        assert_eq!(cgroup_limit_from("0::/elsewhere\n", read), None);
        assert_eq!(cgroup_limit_from("", read), None);
    }

    /// The keys a section accepts, as the parser itself reports them for an unknown one;
    /// `None` when the value at `path` is not a section (a scalar, list or map).
    fn keys_of(path: &[String]) -> Option<Vec<String>> {
        let mut yaml = "{zzz: 1}".to_owned();
        for part in path.iter().rev() {
            yaml = format!("{{{part}: {yaml}}}");
        }
        let errors = match Config::parse(&yaml) {
            Ok(_) => return None,
            Err(e) => e.0,
        };
        let want = path
            .iter()
            .map(String::as_str)
            .chain(["zzz"])
            .collect::<Vec<_>>()
            .join(".");
        let p = errors.iter().find(|p| p.path == want)?;
        let list = if path.is_empty() {
            p.message.split_once("allowed: ")?.1.to_owned()
        } else if p.message.contains("unknown field") {
            p.message.split_once("expected ")?.1.to_owned()
        } else {
            return None;
        };
        Some(
            list.split([',', ' '])
                .map(|w| w.trim_matches('`'))
                .filter(|w| !w.is_empty() && *w != "or" && *w != "one" && *w != "of")
                .map(str::to_owned)
                .collect(),
        )
    }

    /// docs/configuration.md documents every key the parser accepts: in its own row, as a
    /// sibling in a row (`a.b.c`, `d`), or inside its section's row (`{x: 1, y: 2}`).
    #[test]
    fn docs_configuration_lists_every_key() {
        let docs = include_str!("../docs/configuration.md");
        let rows: Vec<&str> = docs.lines().filter(|l| l.starts_with("| `")).collect();
        let documented = |key: &str| {
            let (parent, last) = key.rsplit_once('.').unwrap_or(("", key));
            docs.contains(&format!("`{key}`"))
                || rows.iter().any(|row| {
                    let first = row.split('|').nth(1).unwrap_or_default();
                    (first.contains(&format!("`{parent}.")) && first.contains(&format!("`{last}`")))
                        || (!parent.is_empty()
                            && first.contains(&format!("`{parent}`"))
                            && row.contains(last))
                })
        };
        let mut missing = Vec::new();
        let mut stack: Vec<Vec<String>> = vec![Vec::new()];
        let mut seen = 0;
        while let Some(path) = stack.pop() {
            for key in keys_of(&path).unwrap_or_default() {
                let mut child = path.clone();
                child.push(key);
                seen += 1;
                // Sections are documented through their keys.
                if keys_of(&child).is_none() && !documented(&child.join(".")) {
                    missing.push(child.join("."));
                }
                stack.push(child);
            }
        }
        assert!(
            seen > 80,
            "only {seen} keys found: the enumeration is broken"
        );
        assert!(
            missing.is_empty(),
            "docs/configuration.md lacks {missing:?}"
        );
    }
}
