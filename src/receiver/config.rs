//! `receiver:` — the OTLP/gRPC and OTLP/HTTP receivers, TLS and authentication.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::units::{Dur, socket_problem};

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

impl ReceiverConfig {
    pub fn validate(&self) -> Vec<(String, String)> {
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
