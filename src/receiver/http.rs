//! OTLP/HTTP receiver: `POST /v1/traces` with protobuf or JSON bodies, gzip/deflate/zstd,
//! answered in the request's content type, per the OTLP/HTTP specification.

use std::io::Read;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceResponse,
};
use prost::Message;
use tower_http::cors::{AllowOrigin, CorsLayer};

use super::auth::{Authenticator, UNAUTHENTICATED};
use crate::config::{CorsConfig, HttpReceiverConfig};
use crate::pipeline::{Pipeline, Protocol};

const PROTOBUF: &str = "application/x-protobuf";
const JSON: &str = "application/json";
/// Seconds a sender is asked to wait when llmtail is overloaded.
const RETRY_AFTER_SECS: &str = "2";
/// Headers a browser may send on a cross-origin export, beyond any configured ones.
const CORS_DEFAULT_HEADERS: &[&str] = &["content-type", "content-encoding", "authorization"];

/// `google.rpc.Status`, the body of every OTLP/HTTP error response.
#[derive(Clone, PartialEq, Message, serde::Serialize)]
pub struct RpcStatus {
    #[prost(int32, tag = "1")]
    pub code: i32,
    #[prost(string, tag = "2")]
    pub message: String,
}

/// gRPC code numbers used in `google.rpc.Status` bodies.
const CODE_INVALID_ARGUMENT: i32 = 3;
const CODE_RESOURCE_EXHAUSTED: i32 = 8;
const CODE_UNAVAILABLE: i32 = 14;
const CODE_UNAUTHENTICATED: i32 = 16;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Protobuf,
    Json,
}

impl Encoding {
    fn content_type(self) -> &'static str {
        match self {
            Encoding::Protobuf => PROTOBUF,
            Encoding::Json => JSON,
        }
    }

    fn protocol(self) -> Protocol {
        match self {
            Encoding::Protobuf => Protocol::HttpProtobuf,
            Encoding::Json => Protocol::HttpJson,
        }
    }
}

#[derive(Clone)]
struct Receiver {
    pipeline: Arc<Pipeline>,
    max_request_bytes: usize,
    auth: Option<Arc<Authenticator>>,
}

fn error(status: StatusCode, encoding: Encoding, code: i32, message: String) -> Response {
    let status_body = RpcStatus { code, message };
    let body = match encoding {
        Encoding::Protobuf => status_body.encode_to_vec(),
        Encoding::Json => serde_json::to_vec(&status_body).unwrap_or_default(),
    };
    (
        status,
        [(header::CONTENT_TYPE, encoding.content_type())],
        body,
    )
        .into_response()
}

fn body_encoding(headers: &HeaderMap) -> Result<Encoding, String> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match mime.as_str() {
        PROTOBUF => Ok(Encoding::Protobuf),
        JSON => Ok(Encoding::Json),
        _ => Err(format!(
            "unsupported Content-Type {ct:?}; send {PROTOBUF} or {JSON}"
        )),
    }
}

/// Why a body could not be read.
enum BodyError {
    TooLarge,
    UnsupportedEncoding(String),
    Corrupt(String),
}

/// Decompresses `body` as `Content-Encoding` says, never producing more than `limit` bytes
/// (a small compressed bomb is refused as soon as its output passes the limit).
fn decompress(headers: &HeaderMap, body: Bytes, limit: usize) -> Result<Bytes, BodyError> {
    let encoding = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("identity")
        .trim()
        .to_ascii_lowercase();
    let reader: Box<dyn Read + '_> = match encoding.as_str() {
        "" | "identity" => return Ok(body),
        "gzip" | "x-gzip" => Box::new(flate2::read::MultiGzDecoder::new(&body[..])),
        "deflate" => Box::new(flate2::read::ZlibDecoder::new(&body[..])),
        "zstd" => Box::new(
            ruzstd::decoding::StreamingDecoder::new(&body[..])
                .map_err(|e| BodyError::Corrupt(format!("invalid zstd body: {e}")))?,
        ),
        other => {
            return Err(BodyError::UnsupportedEncoding(format!(
                "unsupported Content-Encoding {other:?}; use gzip, deflate, zstd or none"
            )));
        }
    };
    let mut out = Vec::with_capacity((body.len() * 4).min(limit));
    reader
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| BodyError::Corrupt(format!("cannot decompress the {encoding} body: {e}")))?;
    if out.len() > limit {
        return Err(BodyError::TooLarge);
    }
    Ok(Bytes::from(out))
}

async fn export(State(rx): State<Receiver>, headers: HeaderMap, body: Body) -> Response {
    let encoding = match body_encoding(&headers) {
        Ok(e) => e,
        Err(msg) => {
            return error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                Encoding::Protobuf,
                CODE_INVALID_ARGUMENT,
                msg,
            );
        }
    };
    if let Some(auth) = &rx.auth
        && !auth.allows(&headers)
    {
        rx.pipeline
            .metrics
            .auth_failures
            .with_label_values(&[encoding.protocol().label()])
            .inc();
        let mut r = error(
            StatusCode::UNAUTHORIZED,
            encoding,
            CODE_UNAUTHENTICATED,
            UNAUTHENTICATED.into(),
        );
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return r;
    }
    let too_large = || {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            encoding,
            CODE_RESOURCE_EXHAUSTED,
            format!(
                "request body exceeds receiver.http.max_request_bytes ({} bytes)",
                rx.max_request_bytes
            ),
        )
    };
    if let Some(why) = rx.pipeline.overloaded() {
        rx.pipeline.refuse(encoding.protocol(), why);
        let mut r = error(
            StatusCode::SERVICE_UNAVAILABLE,
            encoding,
            CODE_UNAVAILABLE,
            why.message().into(),
        );
        r.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from_static(RETRY_AFTER_SECS),
        );
        return r;
    }
    let raw = match axum::body::to_bytes(body, rx.max_request_bytes).await {
        Ok(b) => b,
        Err(_) => return too_large(),
    };
    let raw = match decompress(&headers, raw, rx.max_request_bytes) {
        Ok(b) => b,
        Err(BodyError::TooLarge) => return too_large(),
        Err(BodyError::UnsupportedEncoding(msg)) => {
            return error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                encoding,
                CODE_INVALID_ARGUMENT,
                msg,
            );
        }
        Err(BodyError::Corrupt(msg)) => {
            return error(
                StatusCode::BAD_REQUEST,
                encoding,
                CODE_INVALID_ARGUMENT,
                msg,
            );
        }
    };
    let protobuf = match encoding {
        Encoding::Protobuf => raw,
        Encoding::Json => match crate::otlp::json::to_protobuf(&raw) {
            Ok(p) => Bytes::from(p),
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    encoding,
                    CODE_INVALID_ARGUMENT,
                    format!("the body is not a valid OTLP/JSON ExportTraceServiceRequest: {e}"),
                );
            }
        },
    };
    let outcome = match rx.pipeline.ingest(protobuf, encoding.protocol()) {
        Ok(o) => o,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                encoding,
                CODE_INVALID_ARGUMENT,
                e.to_string(),
            );
        }
    };
    let response = ExportTraceServiceResponse {
        partial_success: (outcome.rejected > 0).then_some(ExportTracePartialSuccess {
            rejected_spans: outcome.rejected as i64,
            error_message: outcome.error_message,
        }),
    };
    let body = match encoding {
        Encoding::Protobuf => response.encode_to_vec(),
        Encoding::Json => serde_json::to_vec(&response).unwrap_or_default(),
    };
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, encoding.content_type())],
        body,
    )
        .into_response()
}

fn cors_layer(cors: &CorsConfig) -> Option<CorsLayer> {
    if cors.allowed_origins.is_empty() {
        return None;
    }
    let origins = if cors.allowed_origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            cors.allowed_origins
                .iter()
                .filter_map(|o| HeaderValue::from_str(o).ok()),
        )
    };
    let headers: Vec<header::HeaderName> = CORS_DEFAULT_HEADERS
        .iter()
        .map(|h| h.to_string())
        .chain(cors.allowed_headers.iter().cloned())
        .filter_map(|h| h.parse().ok())
        .collect();
    Some(
        CorsLayer::new()
            .allow_origin(origins)
            .allow_methods([axum::http::Method::POST])
            .allow_headers(headers)
            .max_age(cors.max_age.0),
    )
}

/// The receiver's routes: `POST <path>`; any other method on it is answered 405.
pub fn router(
    pipeline: Arc<Pipeline>,
    cfg: &HttpReceiverConfig,
    auth: Option<Arc<Authenticator>>,
) -> Router {
    let state = Receiver {
        pipeline,
        max_request_bytes: cfg.max_request_bytes,
        auth,
    };
    let router = Router::new()
        .route(&cfg.path, post(export))
        // The body limit is enforced by `export` itself, before and after decompression.
        .layer(DefaultBodyLimit::disable())
        // A request (body included) that takes longer is answered 408.
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            cfg.timeout.0,
        ))
        .with_state(state);
    match cors_layer(&cfg.cors) {
        Some(cors) => router.layer(cors),
        None => router,
    }
}

/// Serves `app` on `listener` until `stop`: plain HTTP or TLS, HTTP/1.1 and h2c/h2, at
/// most `max_connections` connections at once, headers within `header_read_timeout`;
/// on `stop` it accepts no more connections and lets requests in progress finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    cfg: &HttpReceiverConfig,
    stop: tokio_util::sync::CancellationToken,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.header_read_timeout.0);
    builder.http2().timer(TokioTimer::new());
    let builder = Arc::new(builder);
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let slots = Arc::new(tokio::sync::Semaphore::new(cfg.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let handshake_timeout = cfg.header_read_timeout.0;
    loop {
        let permit = tokio::select! {
            () = stop.cancelled() => break,
            permit = slots.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (tcp, _) = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "HTTP receiver cannot accept a connection");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let builder = builder.clone();
        match &acceptor {
            None => {
                let conn = builder
                    .serve_connection_with_upgrades(TokioIo::new(tcp), service)
                    .into_owned();
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    let _ = conn.await;
                    drop(permit);
                });
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                let watcher = graceful.watcher();
                tokio::spawn(async move {
                    let Ok(Ok(stream)) =
                        tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await
                    else {
                        return;
                    };
                    let conn = builder
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .into_owned();
                    let _ = watcher.watch(conn).await;
                    drop(permit);
                });
            }
        }
    }
    graceful.shutdown().await;
}
