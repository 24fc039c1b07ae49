//! OTLP/gRPC receiver: `opentelemetry.proto.collector.trace.v1.TraceService/Export`, with the
//! request body taken as raw bytes for the zero-copy pipeline.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceResponse,
};
use tonic::Status;
use tonic::body::Body;
use tonic::codec::CompressionEncoding;
use tonic::codegen::{BoxFuture, Service, StdError, http};
use tonic::server::{NamedService, UnaryService};

use super::auth::{Authenticator, UNAUTHENTICATED};
use crate::cluster::FORWARDED_HEADER;
use crate::otlp::codec::{Prost, RawCodec};
use crate::pipeline::{IngestError, Pipeline, Protocol};

const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";
/// How long a refused sender is asked to wait (RetryInfo), as HTTP's Retry-After says.
const RETRY_DELAY: std::time::Duration = std::time::Duration::from_secs(2);

/// UNAVAILABLE with a RetryInfo detail: OTLP exporters wait that long before retrying, and
/// a replica forwarding here knows this one is alive, only full.
fn overloaded(why: crate::pipeline::Overload) -> Status {
    use tonic_types::{ErrorDetails, StatusExt};
    Status::with_error_details(
        tonic::Code::Unavailable,
        why.message(),
        ErrorDetails::with_retry_info(Some(RETRY_DELAY)),
    )
}

/// A request body whose bytes are charged to the memory budget as they arrive, before
/// tonic buffers them: when the budget has no room, the request fails UNAVAILABLE (with
/// RetryInfo) instead of growing the process. The charge ends with the request.
struct ChargedBody<B> {
    inner: std::pin::Pin<Box<B>>,
    pipeline: Arc<Pipeline>,
    protocol: Protocol,
    reservation: Option<crate::pipeline::Reservation>,
}

impl<B> tonic::codegen::Body for ChargedBody<B>
where
    B: tonic::codegen::Body,
    B::Error: Into<StdError>,
{
    type Data = B::Data;
    type Error = StdError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        use bytes::Buf;
        let this = &mut *self;
        match this.inner.as_mut().poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let n = frame.data_ref().map_or(0, |d| d.remaining());
                if let Err(why) = this.pipeline.reserve(&mut this.reservation, n) {
                    this.pipeline.refuse(this.protocol, why);
                    return Poll::Ready(Some(Err(Box::new(overloaded(why)))));
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// gRPC status codes as they appear in the `grpc-status` header.
const GRPC_OUT_OF_RANGE: &str = "11";
const GRPC_RESOURCE_EXHAUSTED: &str = "8";

/// The gRPC trace service, mounted on a tonic server.
#[derive(Clone)]
pub struct TraceService {
    pipeline: Arc<Pipeline>,
    max_request_bytes: usize,
    /// Longest a request may take, body included.
    timeout: std::time::Duration,
    auth: Option<Arc<Authenticator>>,
}

impl TraceService {
    pub fn new(
        pipeline: Arc<Pipeline>,
        cfg: &super::config::GrpcReceiverConfig,
        auth: Option<Arc<Authenticator>>,
    ) -> Self {
        TraceService {
            pipeline,
            max_request_bytes: cfg.max_request_bytes,
            timeout: cfg.timeout.0,
            auth,
        }
    }
}

/// Longest wait, answering a leaving peer, for the spans routed to it to reach it (within
/// the 2 s it waits for answers).
const LEAVE_DRAIN: std::time::Duration = std::time::Duration::from_millis(1500);

/// `x-llmtail-forwarded` from a client that is not a cluster member, reported at most
/// every 10 s: its spans are taken as any client's.
static FORGED_FORWARD: crate::telemetry::Throttle =
    crate::telemetry::Throttle::new(std::time::Duration::from_secs(10));

impl NamedService for TraceService {
    const NAME: &'static str = "opentelemetry.proto.collector.trace.v1.TraceService";
}

/// The pipeline, the protocol to count spans under, and for spans forwarded by a peer the
/// counter of spans received from it and what its cluster headers say.
struct Export(
    Arc<Pipeline>,
    Protocol,
    Option<(prometheus::IntCounter, Arc<crate::cluster::PeerRequest>)>,
);

impl UnaryService<Bytes> for Export {
    type Response = Prost<ExportTraceServiceResponse>;
    type Future = BoxFuture<tonic::Response<Self::Response>, Status>;

    fn call(&mut self, request: tonic::Request<Bytes>) -> Self::Future {
        let pipeline = self.0.clone();
        let protocol = self.1;
        let from_peer = self.2.clone();
        Box::pin(async move {
            let request = request.into_inner();
            let cluster = pipeline.cluster.as_ref();
            let batch = from_peer.as_ref().and_then(|(_, p)| p.batch);
            if let (Some(cluster), Some(key)) = (cluster, batch)
                && !cluster.accept_batch(key)
            {
                // Taken already: the sender lost the answer and sent it again.
                return Ok(tonic::Response::new(Prost(
                    ExportTraceServiceResponse::default(),
                )));
            }
            let taken = match &from_peer {
                Some((_, peer)) => pipeline.accept_peer(request, peer).await,
                None => pipeline.accept(request, protocol).await,
            };
            if taken.is_err()
                && let (Some(cluster), Some(key)) = (cluster, batch)
            {
                cluster.forget_batch(key);
            }
            let outcome = taken.map_err(|e: IngestError| match e {
                IngestError::Full(why) => {
                    pipeline.refuse(protocol, why);
                    overloaded(why)
                }
                e => Status::invalid_argument(e.to_string()),
            })?;
            if let Some((counter, _)) = from_peer {
                counter.inc_by(outcome.accepted);
            }
            let partial_success = (outcome.rejected > 0).then_some(ExportTracePartialSuccess {
                rejected_spans: outcome.rejected as i64,
                error_message: outcome.error_message,
            });
            Ok(tonic::Response::new(Prost(ExportTraceServiceResponse {
                partial_success,
            })))
        })
    }
}

impl<B> Service<http::Request<B>> for TraceService
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != EXPORT_PATH {
            let status = Status::unimplemented(format!(
                "{} is not served here; llmtail accepts {EXPORT_PATH}",
                req.uri().path()
            ));
            return Box::pin(async move { Ok(status.into_http()) });
        }
        if let Some(auth) = &self.auth
            && !auth.allows(req.headers())
        {
            // Refused before the body is read: an unauthenticated sender costs nothing.
            self.pipeline
                .metrics
                .auth_failures
                .with_label_values(&["grpc"])
                .inc();
            let status = Status::unauthenticated(UNAUTHENTICATED);
            return Box::pin(async move { Ok(status.into_http()) });
        }
        // A replica forwarding a trace's spans to this one, its owner: taken here, counted
        // per sending peer.
        // Honoured only from a cluster member's address: anyone else setting it is a
        // client like any other (its spans are sharded, not taken as a peer's).
        let forwarded_by = req
            .headers()
            .get(FORWARDED_HEADER)
            .and_then(|v| v.to_str().ok());
        let remote = req
            .extensions()
            .get::<super::conn::RemoteAddr>()
            .map(|r| r.0.ip());
        let mut ring_reply = None;
        // A leaving peer is answered once what was routed to it has reached it.
        let mut drain: Option<(Arc<crate::cluster::Cluster>, String)> = None;
        let (protocol, from_peer) = match (forwarded_by, &self.pipeline.cluster) {
            (Some(peer), Some(cluster)) if remote.is_some_and(|ip| cluster.is_member(ip)) => {
                let request = match crate::cluster::PeerRequest::from_headers(peer, req.headers()) {
                    Ok(r) => r,
                    Err(e) => {
                        let status = Status::invalid_argument(e);
                        return Box::pin(async move { Ok(status.into_http()) });
                    }
                };
                if let Some(m) = request.membership {
                    ring_reply = cluster.on_membership(peer, m);
                    if m == crate::cluster::Membership::Leave {
                        drain = Some((cluster.clone(), peer.to_owned()));
                    }
                }
                (
                    Protocol::Peer,
                    Some((
                        self.pipeline
                            .metrics
                            .cluster_received
                            .with_label_values(&[&cluster.peer_label(peer)]),
                        Arc::new(request),
                    )),
                )
            }
            (Some(peer), Some(cluster))
                if req
                    .headers()
                    .get(crate::cluster::MEMBERSHIP_HEADER)
                    .is_some_and(|v| v == "join") =>
            {
                // A replica not (yet) among the members says it joins: told the ring it is
                // not in, nothing else (it becomes a member through `peers` or `dns`).
                tracing::info!(peer, remote = ?remote, "a replica that is not a member yet says it joins");
                ring_reply = Some(cluster.answer_stranger());
                (Protocol::Grpc, None)
            }
            (Some(peer), _) => {
                if let Some(held_back) = FORGED_FORWARD.allow() {
                    tracing::warn!(header = FORWARDED_HEADER, claims = peer, remote = ?remote, similar_reports_held_back = held_back, "a client that is not a cluster member sent the peer-forwarding header; its spans are taken as any client's");
                }
                (Protocol::Grpc, None)
            }
            _ => (Protocol::Grpc, None),
        };
        if let Some(why) = self.pipeline.overloaded() {
            // Refused before the body is read: nothing of it is allocated.
            self.pipeline.refuse(protocol, why);
            return Box::pin(async move { Ok(overloaded(why).into_http()) });
        }
        let export = Export(self.pipeline.clone(), protocol, from_peer);
        let max = self.max_request_bytes;
        let timeout = self.timeout;
        let req = req.map(|body| ChargedBody {
            inner: Box::pin(body),
            pipeline: self.pipeline.clone(),
            protocol,
            reservation: None,
        });
        Box::pin(async move {
            if let Some((cluster, peer)) = drain {
                cluster.drained(&peer, LEAVE_DRAIN).await;
            }
            let mut grpc = tonic::server::Grpc::new(RawCodec::<
                Prost<ExportTraceServiceResponse>,
                Bytes,
            >::default())
            .accept_compressed(CompressionEncoding::Gzip)
            .send_compressed(CompressionEncoding::Gzip)
            .max_decoding_message_size(max);
            let Ok(mut response) = tokio::time::timeout(timeout, grpc.unary(export, req)).await
            else {
                return Ok(Status::deadline_exceeded(format!(
                    "the request did not arrive whole within receiver.grpc.timeout ({timeout:?})"
                ))
                .into_http());
            };
            if let Some(answer) = ring_reply
                && let Ok(previous) = http::HeaderValue::from_str(&answer.previous)
            {
                let headers = response.headers_mut();
                headers.insert(crate::cluster::PREVIOUS_RING_HEADER, previous);
                if !answer.member {
                    headers.insert(
                        crate::cluster::NOT_A_MEMBER_HEADER,
                        http::HeaderValue::from_static("1"),
                    );
                }
            }
            // tonic refuses an oversized uncompressed message with OUT_OF_RANGE (and an
            // oversized decompressed one with RESOURCE_EXHAUSTED); OTLP asks for
            // RESOURCE_EXHAUSTED in both cases. The handler itself never says OUT_OF_RANGE.
            if response
                .headers()
                .get("grpc-status")
                .is_some_and(|v| v == GRPC_OUT_OF_RANGE)
            {
                response.headers_mut().insert(
                    "grpc-status",
                    http::HeaderValue::from_static(GRPC_RESOURCE_EXHAUSTED),
                );
            }
            Ok(response)
        })
    }
}
