//! OTLP/gRPC upstream: sends re-framed request bytes as `TraceService/Export`.

use std::time::Duration;

use bytes::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use tonic::Code;
use tonic::codec::CompressionEncoding;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic_types::StatusExt;

use super::config::{Compression, OtlpExporterConfig};
use super::{Rejected, SendError, SinkError};
use crate::otlp::codec::{Prost, RawCodec};

const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";
/// How long to wait for a TCP/HTTP2 connection to the upstream before retrying.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest response accepted from the upstream (responses are tiny).
const MAX_RESPONSE_BYTES: usize = 4 * 1024 * 1024;

pub struct OtlpGrpcSink {
    grpc: tonic::client::Grpc<Channel>,
    /// Configured headers, sent as metadata with every request.
    metadata: MetadataMap,
}

fn read(path: &std::path::Path) -> Result<Vec<u8>, SinkError> {
    std::fs::read(path).map_err(|e| SinkError(format!("cannot read {}: {e}", path.display())))
}

impl OtlpGrpcSink {
    pub fn new(cfg: &OtlpExporterConfig) -> Result<OtlpGrpcSink, SinkError> {
        let mut endpoint = Endpoint::from_shared(cfg.endpoint.clone())
            .map_err(|e| {
                SinkError(format!(
                    "endpoint {:?} is not a valid URI: {e}",
                    cfg.endpoint
                ))
            })?
            .timeout(cfg.timeout.0)
            .connect_timeout(CONNECT_TIMEOUT);
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
        let mut grpc = tonic::client::Grpc::new(endpoint.connect_lazy())
            .max_decoding_message_size(MAX_RESPONSE_BYTES)
            .accept_compressed(CompressionEncoding::Gzip);
        if cfg.compression == Compression::Gzip {
            grpc = grpc.send_compressed(CompressionEncoding::Gzip);
        }
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
        Ok(OtlpGrpcSink { grpc, metadata })
    }

    pub async fn send(&self, request: Bytes) -> Result<Rejected, SendError> {
        let mut grpc = self.grpc.clone();
        grpc.ready()
            .await
            .map_err(|e| SendError::Retryable(format!("upstream not reachable: {e}"), None))?;
        let mut request = tonic::Request::new(request);
        *request.metadata_mut() = self.metadata.clone();
        let response = grpc
            .unary(
                request,
                http::uri::PathAndQuery::from_static(EXPORT_PATH),
                RawCodec::<Bytes, Prost<ExportTraceServiceResponse>>::default(),
            )
            .await;
        match response {
            Ok(r) => Ok(r
                .into_inner()
                .0
                .partial_success
                .map_or_else(Rejected::default, |p| Rejected {
                    spans: p.rejected_spans.max(0) as u64,
                    message: p.error_message,
                })),
            Err(status) => Err(classify(&status)),
        }
    }
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
