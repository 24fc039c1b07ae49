//! OTLP/gRPC upstream: sends re-framed request bytes as `TraceService/Export`.

use std::time::Duration;

use bytes::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use tonic::Code;
use tonic::codec::CompressionEncoding;
use tonic::transport::{Channel, Endpoint};

use super::SendError;
use crate::config::{Compression, OtlpExporterConfig};
use crate::otlp::codec::{Prost, RawCodec};

const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";
/// How long to wait for a TCP/HTTP2 connection to the upstream before retrying.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest response accepted from the upstream (responses are tiny).
const MAX_RESPONSE_BYTES: usize = 4 * 1024 * 1024;

pub struct OtlpSink {
    grpc: tonic::client::Grpc<Channel>,
}

#[derive(Debug, thiserror::Error)]
#[error("exporter.otlp.endpoint {endpoint:?} is not a valid URI: {source}")]
pub struct BadEndpoint {
    endpoint: String,
    source: tonic::transport::Error,
}

impl OtlpSink {
    pub fn new(cfg: &OtlpExporterConfig) -> Result<OtlpSink, BadEndpoint> {
        let channel = Endpoint::from_shared(cfg.endpoint.clone())
            .map_err(|source| BadEndpoint {
                endpoint: cfg.endpoint.clone(),
                source,
            })?
            .timeout(cfg.timeout.0)
            .connect_timeout(CONNECT_TIMEOUT)
            .connect_lazy();
        let mut grpc = tonic::client::Grpc::new(channel)
            .max_decoding_message_size(MAX_RESPONSE_BYTES)
            .accept_compressed(CompressionEncoding::Gzip);
        if cfg.compression == Compression::Gzip {
            grpc = grpc.send_compressed(CompressionEncoding::Gzip);
        }
        Ok(OtlpSink { grpc })
    }

    pub async fn send(&self, request: Bytes) -> Result<u64, SendError> {
        let mut grpc = self.grpc.clone();
        grpc.ready()
            .await
            .map_err(|e| SendError::Retryable(format!("upstream not reachable: {e}"), None))?;
        let response = grpc
            .unary(
                tonic::Request::new(request),
                http::uri::PathAndQuery::from_static(EXPORT_PATH),
                RawCodec::<Bytes, Prost<ExportTraceServiceResponse>>::default(),
            )
            .await;
        match response {
            Ok(r) => Ok(r
                .into_inner()
                .0
                .partial_success
                .map_or(0, |p| p.rejected_spans.max(0) as u64)),
            Err(status) => Err(classify(&status)),
        }
    }
}

/// The OTLP specification's retryable codes; everything else is permanent.
/// RESOURCE_EXHAUSTED is retried: the upstream is shedding load, and losing kept traces
/// to a momentary overload is worse than one more attempt.
fn classify(status: &tonic::Status) -> SendError {
    let msg = format!(
        "upstream answered {:?}: {}",
        status.code(),
        status.message()
    );
    match status.code() {
        Code::Cancelled
        | Code::DeadlineExceeded
        | Code::Aborted
        | Code::OutOfRange
        | Code::Unavailable
        | Code::DataLoss
        | Code::ResourceExhausted => SendError::Retryable(msg, None),
        _ => SendError::Permanent(msg),
    }
}
