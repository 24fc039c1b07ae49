//! OTLP/gRPC upstream: sends re-framed request bytes as `TraceService/Export`.

use std::time::Duration;

use bytes::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use tonic::Code;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic_types::StatusExt;

use super::config::{Compression, OtlpExporterConfig};
use super::{Rejected, SendError, SinkError};
use prost::Message;

const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";
/// How long to wait for a TCP/HTTP2 connection to the upstream before retrying.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest response accepted from the upstream (responses are tiny).
const MAX_RESPONSE_BYTES: usize = 4 * 1024 * 1024;

/// HTTP/2 PING while a request waits this long with nothing read from the connection…
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// …and the connection is closed (and made again) when no answer comes within this.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

pub struct OtlpGrpcSink {
    /// The connection; made anew after a request got no answer in time (see
    /// [`OtlpGrpcSink::send_with`]).
    channel: parking_lot::Mutex<Channel>,
    endpoint: Endpoint,
    /// gzip level of requests, when compressing.
    gzip: Option<u32>,
    /// Configured headers, sent as metadata with every request.
    metadata: MetadataMap,
    timeout: Duration,
}

fn read(path: &std::path::Path) -> Result<Vec<u8>, SinkError> {
    std::fs::read(path).map_err(|e| SinkError(format!("cannot read {}: {e}", path.display())))
}

impl OtlpGrpcSink {
    pub fn new(cfg: &OtlpExporterConfig) -> Result<OtlpGrpcSink, SinkError> {
        OtlpGrpcSink::from(cfg, None)
    }

    /// A sink whose connections leave from `local` (a replica reaching its peers from the
    /// address they know it by).
    pub fn from(
        cfg: &OtlpExporterConfig,
        local: Option<std::net::IpAddr>,
    ) -> Result<OtlpGrpcSink, SinkError> {
        let mut endpoint = Endpoint::from_shared(cfg.endpoint.clone())
            .map_err(|e| {
                SinkError(format!(
                    "endpoint {:?} is not a valid URI: {e}",
                    cfg.endpoint
                ))
            })?
            .timeout(cfg.timeout.0)
            .connect_timeout(CONNECT_TIMEOUT)
            // Only while a request is open: grpc-go servers (the Collector, Tempo) answer
            // pings on idle connections with GOAWAY too_many_pings.
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(false)
            .local_address(local);
        if cfg.uses_tls() {
            let mut tls = ClientTlsConfig::new();
            tls = match &cfg.tls.ca_file {
                Some(ca) => tls.ca_certificate(Certificate::from_pem(read(ca)?)),
                None => tls.with_webpki_roots(),
            };
            if let (Some(cert), Some(key)) = (&cfg.tls.cert_file, &cfg.tls.key_file) {
                tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| SinkError(format!("TLS setup failed: {e}")))?;
        }
        let channel = endpoint.connect_lazy();
        let mut metadata = MetadataMap::new();
        for (name, value) in &cfg.headers {
            let key =
                MetadataKey::from_bytes(name.to_ascii_lowercase().as_bytes()).map_err(|_| {
                    SinkError(format!("header name {name:?} is not valid gRPC metadata"))
                })?;
            let value = MetadataValue::try_from(value.as_str()).map_err(|_| {
                SinkError(format!(
                    "the value of header {name:?} is not valid gRPC metadata"
                ))
            })?;
            metadata.insert(key, value);
        }
        Ok(OtlpGrpcSink {
            channel: parking_lot::Mutex::new(channel),
            endpoint,
            gzip: (cfg.compression == Compression::Gzip).then_some(cfg.compression_level),
            metadata,
            timeout: cfg.timeout.0,
        })
    }

    /// One unary `Export` call, framed here rather than by tonic's client so that the
    /// request is gzipped at the configured level (tonic's is fixed at 6, three times the
    /// CPU of level 1 on OTLP) and sent without another copy: the 5-byte gRPC message
    /// header and the request go out as two body frames.
    pub async fn send(&self, request: Bytes) -> Result<Rejected, SendError> {
        self.send_with(request, http::HeaderMap::new())
            .await
            .map(|(rejected, _)| rejected)
            .map_err(|(e, _)| e)
    }

    /// [`OtlpGrpcSink::send`] with headers for this request only, returning the response's
    /// headers too; an error says whether the request may have reached the server
    /// ([`Delivery`]).
    pub async fn send_with(
        &self,
        request: Bytes,
        extra: http::HeaderMap,
    ) -> Result<(Rejected, http::HeaderMap), (SendError, Delivery)> {
        let (header, payload) = match self.gzip {
            Some(level) => {
                let mut framed =
                    super::gzip(&[0; 5], &request, level).map_err(|e| (e, Delivery::NotSent))?;
                let len = (framed.len() - 5) as u32;
                framed[0] = 1;
                framed[1..5].copy_from_slice(&len.to_be_bytes());
                (Bytes::from(framed), Bytes::new())
            }
            None => {
                let mut header = [0u8; 5];
                header[1..5].copy_from_slice(&(request.len() as u32).to_be_bytes());
                (Bytes::copy_from_slice(&header), request)
            }
        };
        let mut http = http::Request::builder()
            .method(http::Method::POST)
            .uri(EXPORT_PATH)
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .header(http::header::TE, "trailers")
            .header("grpc-accept-encoding", "gzip");
        if self.gzip.is_some() {
            http = http.header("grpc-encoding", "gzip");
        }
        let mut http = http
            .body(tonic::body::Body::new(Frames(vec![payload, header])))
            .map_err(|e| {
                (
                    SendError::Permanent(format!("cannot build the request: {e}")),
                    Delivery::NotSent,
                )
            })?;
        http.headers_mut()
            .extend(self.metadata.clone().into_headers());
        http.headers_mut().extend(extra);
        let mut channel = self.channel.lock().clone();
        let call = async {
            let channel = tower::ServiceExt::ready(&mut channel).await.map_err(|e| {
                (
                    SendError::Retryable(format!("upstream not reachable: {e}"), None),
                    Delivery::NotSent,
                )
            })?;
            let response = tower::Service::call(channel, http).await.map_err(|e| {
                let delivery = if never_connected(&e) {
                    Delivery::NotSent
                } else {
                    Delivery::Unknown
                };
                (no_answer(&e), delivery)
            })?;
            let (parts, body) = response.into_parts();
            let collected = http_body_util::BodyExt::collect(body)
                .await
                .map_err(|e| (no_answer(&e), Delivery::Unknown))?;
            let status = collected
                .trailers()
                .and_then(tonic::Status::from_header_map)
                .or_else(|| tonic::Status::from_header_map(&parts.headers))
                .unwrap_or_else(|| status_of_http(parts.status));
            if status.code() != Code::Ok {
                return Err((classify(&status), Delivery::Refused));
            }
            let compressed = parts
                .headers
                .get("grpc-encoding")
                .is_some_and(|e| e.as_bytes() == b"gzip");
            Ok((
                response_message(&collected.to_bytes(), compressed),
                parts.headers,
            ))
        };
        match tokio::time::timeout(self.timeout, call).await {
            Ok(result) => result,
            Err(_) => {
                // The connection may be hung while new ones would work (a load balancer
                // with a dead pod behind it): the next request goes on a new one.
                *self.channel.lock() = self.endpoint.connect_lazy();
                Err((
                    classify(&tonic::Status::deadline_exceeded(
                        "timed out: no answer within the export timeout",
                    )),
                    Delivery::Unknown,
                ))
            }
        }
    }
}

/// The HTTP body of a request: its frames, sent in order (popped from the back).
struct Frames(Vec<Bytes>);

impl http_body::Body for Frames {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        loop {
            match self.0.pop() {
                Some(b) if b.is_empty() => continue,
                Some(b) => return std::task::Poll::Ready(Some(Ok(http_body::Frame::data(b)))),
                None => return std::task::Poll::Ready(None),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.0.iter().all(Bytes::is_empty)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.0.iter().map(|b| b.len() as u64).sum())
    }
}

/// A response without grpc-status, by its HTTP status, as gRPC's HTTP mapping says.
fn status_of_http(status: http::StatusCode) -> tonic::Status {
    let code = match status {
        http::StatusCode::OK => return tonic::Status::unknown("no grpc-status in the response"),
        http::StatusCode::BAD_REQUEST => Code::Internal,
        http::StatusCode::UNAUTHORIZED => Code::Unauthenticated,
        http::StatusCode::FORBIDDEN => Code::PermissionDenied,
        http::StatusCode::NOT_FOUND => Code::Unimplemented,
        http::StatusCode::TOO_MANY_REQUESTS
        | http::StatusCode::BAD_GATEWAY
        | http::StatusCode::SERVICE_UNAVAILABLE
        | http::StatusCode::GATEWAY_TIMEOUT => Code::Unavailable,
        _ => Code::Unknown,
    };
    tonic::Status::new(
        code,
        format!("grpc-status missing, HTTP status {}", status.as_u16()),
    )
}

/// What an `ExportTraceServiceResponse` message says was rejected. A response that cannot
/// be read rejected nothing: the upstream said OK.
fn response_message(body: &[u8], compressed: bool) -> Rejected {
    let Some(message) = body.get(5..) else {
        return Rejected::default();
    };
    let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    let message = &message[..len.min(message.len()).min(MAX_RESPONSE_BYTES)];
    let decoded = if compressed && body[0] == 1 {
        use std::io::Read;
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(message)
            .take(MAX_RESPONSE_BYTES as u64)
            .read_to_end(&mut out)
            .ok()
            .and_then(|_| ExportTraceServiceResponse::decode(&out[..]).ok())
    } else {
        ExportTraceServiceResponse::decode(message).ok()
    };
    decoded
        .and_then(|r| r.partial_success)
        .map_or_else(Rejected::default, |p| Rejected {
            spans: p.rejected_spans.max(0) as u64,
            message: p.error_message,
        })
}

/// Whether an upstream refused a request for its size: gRPC servers answer
/// RESOURCE_EXHAUSTED (grpc-go, grpcio, the Collector: "received message larger than max";
/// tonic: "decoded message length too large"), some OUT_OF_RANGE, with no RetryInfo.
fn says_too_large(status: &tonic::Status) -> bool {
    if !matches!(status.code(), Code::ResourceExhausted | Code::OutOfRange) {
        return false;
    }
    let message = status.message().to_ascii_lowercase();
    ["larger than", "too large", "too big", "exceeds"]
        .iter()
        .any(|m| message.contains(m))
}

fn says_undecodable(status: &tonic::Status) -> bool {
    let message = status.message().to_ascii_lowercase();
    [
        "unmarshal",
        "deserializ",
        "decode",
        "parse",
        "invalid utf-8",
    ]
    .iter()
    .any(|m| message.contains(m))
}

/// The OTLP specification's retryable codes; everything else is permanent. The delay in
/// a `google.rpc.RetryInfo` detail is honoured as the least wait before the next attempt;
/// RESOURCE_EXHAUSTED is retried only when it carries one (the upstream says recovery is
/// possible), as the specification requires.
/// Whether a failed request may have reached the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// No connection was made: the server cannot have seen it.
    NotSent,
    /// The server answered with an error status: it did not take it.
    Refused,
    /// Sent, and then no answer (a broken connection, a timeout): it may have been taken.
    Unknown,
}

/// Whether a transport error says the server never processed the request: no connection
/// could be made (refused, no route), or HTTP/2 refused the stream.
fn never_connected(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(e);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused
                    | std::io::ErrorKind::AddrNotAvailable
                    | std::io::ErrorKind::HostUnreachable
                    | std::io::ErrorKind::NetworkUnreachable
            )
        {
            return true;
        }
        // A stream the server refused, or one above the last it will process (GOAWAY):
        // HTTP/2 says it was not processed.
        if let Some(h2) = err.downcast_ref::<h2::Error>()
            && ((h2.is_go_away() && h2.is_remote())
                || h2.reason() == Some(h2::Reason::REFUSED_STREAM))
        {
            return true;
        }
        source = err.source();
    }
    false
}

/// A request that got no answer: the connection could not be made, broke, or the stream
/// was reset before the upstream's status. Always retryable: only an answer from the
/// upstream can be permanent, and a backend restarting mid-request (a rollout) must not
/// lose what it had not taken.
fn no_answer(e: &(dyn std::error::Error + 'static)) -> SendError {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    SendError::Retryable(format!("no answer from the upstream: {message}"), None)
}

pub(crate) fn classify(status: &tonic::Status) -> SendError {
    let msg = format!(
        "upstream answered {:?}: {}",
        status.code(),
        status.message()
    );
    let retry_after = status
        .get_details_retry_info()
        .and_then(|info| info.retry_delay);
    if retry_after.is_none() && says_too_large(status) {
        return SendError::TooLarge(msg);
    }
    match status.code() {
        Code::Cancelled
        | Code::DeadlineExceeded
        | Code::Aborted
        | Code::OutOfRange
        | Code::Unavailable
        | Code::DataLoss => SendError::Retryable(msg, retry_after),
        Code::ResourceExhausted if retry_after.is_some() => SendError::Retryable(msg, retry_after),
        Code::InvalidArgument => SendError::BadData(msg),
        // grpc-go (the Collector, Tempo, Jaeger) and grpcio answer INTERNAL when they
        // cannot unmarshal a request.
        Code::Internal if says_undecodable(status) => SendError::BadData(msg),
        _ => SendError::Permanent(msg),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Status;

    #[test]
    fn size_refusals_are_told_apart_from_throttling() {
        let too_large = [
            Status::resource_exhausted(
                "grpc: received message larger than max (5242880 vs. 4194304)",
            ),
            Status::resource_exhausted("Received message larger than max (9512303 vs. 4194304)"),
            Status::resource_exhausted(
                "Error, decoded message length too large: found 5000000 bytes, the limit is: 4194304 bytes",
            ),
            Status::out_of_range("Error, encoded message length too large"),
        ];
        for status in &too_large {
            assert!(
                matches!(classify(status), SendError::TooLarge(_)),
                "{status:?}"
            );
        }
        // Throttling without RetryInfo is permanent (OTLP spec); with it, retryable.
        for throttled in ["quota exceeded for tenant", "rate limited"] {
            assert!(matches!(
                classify(&Status::resource_exhausted(throttled)),
                SendError::Permanent(_)
            ));
        }
        assert!(matches!(
            classify(&Status::unavailable("message too large? no: down")),
            SendError::Retryable(..)
        ));
        // Refused content is searched for by halves; other internal errors are not.
        for bad in [
            Status::invalid_argument("span named x"),
            Status::internal("grpc: error unmarshalling request: proto: invalid UTF-8"),
            Status::internal("Exception deserializing request!"),
        ] {
            assert!(matches!(classify(&bad), SendError::BadData(_)), "{bad:?}");
        }
        assert!(matches!(
            classify(&Status::internal("database is on fire")),
            SendError::Permanent(_)
        ));
    }
}
