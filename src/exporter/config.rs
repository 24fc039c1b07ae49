//! `exporter:` / `exporters:` — where kept traces go, batching, queueing and retries.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::units::{ByteSize, Dur};

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
    pub fn validate(&self) -> Vec<(String, String)> {
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
        if let Some(file) = &self.file {
            if file.path.as_os_str().is_empty() {
                p.push(("file.path".into(), "must not be empty".into()));
            } else if let Some(problem) = directory_problem(&file.path) {
                p.push(("file.path".into(), problem));
            }
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
    /// gzip level, 1 (fastest) to 9 (smallest). 1 by default: on OTLP with prompt text it
    /// compresses ~5x at ~390 MB/s, where level 6 compresses ~7x at ~130 MB/s (zlib-rs,
    /// measured by `llmtail-bench --dump-request`): the default should not be the slow one.
    #[serde(default = "default_compression_level")]
    pub compression_level: u32,
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

    pub fn validate(&self) -> Vec<(String, String)> {
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
        if !(1..=9).contains(&self.compression_level) {
            p.push((
                "compression_level".into(),
                "must be 1 (fastest) to 9 (smallest)".into(),
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

fn default_compression_level() -> u32 {
    1
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
    /// (retryably) until the queue drains. Without a trace log only: with one, queued
    /// spans wait in it, bounded by `storage.max_disk_bytes` and the memory budget.
    pub max_spans: usize,
    /// Export requests in flight at once.
    pub concurrency: usize,
    /// Deprecated (the separate write-ahead log of kept spans is gone): what an older
    /// release left here is moved into the trace log at start, and, with no
    /// `storage.directory`, the trace log lives here.
    pub directory: Option<PathBuf>,
    /// Deprecated, not read (the trace log's bound is `storage.max_disk_bytes`).
    pub max_disk_bytes: ByteSize,
    /// Deprecated: `0s` makes the trace log that takes this queue's directory sync
    /// every write (`storage.sync: always`).
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

/// Why a file cannot be created at `path`: its directory is missing, not a directory, or
/// not writable (no write permission bit at all). `None` when it can, as far as can be
/// told without writing.
fn directory_problem(path: &std::path::Path) -> Option<String> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    match std::fs::metadata(dir) {
        Err(_) => Some(format!("directory {} does not exist", dir.display())),
        Ok(m) if !m.is_dir() => Some(format!("{} is not a directory", dir.display())),
        Ok(m) if m.permissions().readonly() => {
            Some(format!("directory {} is not writable", dir.display()))
        }
        Ok(_) => None,
    }
}

#[cfg(test)]
mod file_path_tests {
    use super::directory_problem;
    use std::path::Path;

    #[test]
    fn a_file_path_in_a_missing_directory_is_a_mistake() {
        assert_eq!(directory_problem(Path::new("kept.jsonl")), None);
        assert_eq!(directory_problem(Path::new("./src/kept.jsonl")), None);
        assert_eq!(
            directory_problem(Path::new("/nonexistent-dir-7/kept.jsonl")).as_deref(),
            Some("directory /nonexistent-dir-7 does not exist")
        );
        assert_eq!(
            directory_problem(Path::new("Cargo.toml/kept.jsonl")).as_deref(),
            Some("Cargo.toml is not a directory")
        );
    }
}
