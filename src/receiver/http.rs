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
use super::config::{CorsConfig, HttpReceiverConfig};
use crate::pipeline::{Overload, Pipeline, Protocol};

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

/// Reads a body into one buffer of its declared length (no chunk list, no concatenating
/// copy), at most `limit` bytes.
async fn read_body(body: Body, declared: Option<usize>, limit: usize) -> Result<Bytes, BodyError> {
    use http_body_util::BodyExt;
    let mut body = body;
    let mut out = bytes::BytesMut::with_capacity(declared.unwrap_or(0).min(limit));
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| BodyError::Corrupt(e.to_string()))?;
        if let Ok(data) = frame.into_data() {
            if out.len() + data.len() > limit {
                return Err(BodyError::TooLarge);
            }
            out.extend_from_slice(&data);
        }
    }
    Ok(out.freeze())
}

/// Why a body could not be read.
enum BodyError {
    TooLarge,
    UnsupportedEncoding(String),
    Corrupt(String),
    /// The memory budget has no room for it now.
    Overloaded(Overload),
}

/// Charges memory about to be allocated for a body; refuses when the budget has no room.
type Grow<'a> = dyn FnMut(usize) -> Result<(), Overload> + 'a;

/// Decompresses `body` as `Content-Encoding` says, never producing more than `limit` bytes
/// (a small compressed bomb is refused as soon as its output passes the limit), and
/// charging what it allocates to the memory budget before allocating it (`grow`).
fn decompress(
    headers: &HeaderMap,
    body: Bytes,
    limit: usize,
    grow: &mut Grow<'_>,
) -> Result<Bytes, BodyError> {
    let encoding = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("identity")
        .trim()
        .to_ascii_lowercase();
    let corrupt = |e: std::io::Error| {
        BodyError::Corrupt(format!("cannot decompress the {encoding} body: {e}"))
    };
    let mut out = Vec::new();
    match encoding.as_str() {
        "" | "identity" => return Ok(body),
        "gzip" | "x-gzip" => read_bounded(
            flate2::read::MultiGzDecoder::new(&body[..]),
            &mut out,
            limit,
            grow,
        )
        .map_err(|e| e.or_corrupt(corrupt))?,
        "deflate" => read_bounded(
            flate2::read::ZlibDecoder::new(&body[..]),
            &mut out,
            limit,
            grow,
        )
        .map_err(|e| e.or_corrupt(corrupt))?,
        "zstd" => zstd(&body, &mut out, limit, grow)?,
        other => {
            return Err(BodyError::UnsupportedEncoding(format!(
                "unsupported Content-Encoding {other:?}; use gzip, deflate, zstd or none"
            )));
        }
    }
    drop(body);
    out.shrink_to_fit();
    Ok(Bytes::from(out))
}

enum ZstdFrame {
    /// A skippable frame of this many bytes, header included.
    Skippable(usize),
    /// A frame whose decoding needs a window of this many bytes.
    Window(u64),
}

/// Reads a zstd frame header (RFC 8878, 3.1.1) far enough to know the window it needs.
fn zstd_frame(input: &[u8]) -> Result<ZstdFrame, &'static str> {
    const MAGIC: u32 = 0xFD2F_B528;
    let le = |bytes: &[u8]| {
        bytes
            .iter()
            .rev()
            .fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
    };
    let magic = le(input.get(..4).ok_or("truncated frame header")?) as u32;
    if magic & 0xFFFF_FFF0 == 0x184D_2A50 {
        let len = le(input.get(4..8).ok_or("truncated skippable frame")?) as usize;
        return Ok(ZstdFrame::Skippable(8 + len));
    }
    if magic != MAGIC {
        return Err("not a zstd frame (bad magic number)");
    }
    let descriptor = *input.get(4).ok_or("truncated frame header")?;
    let single_segment = descriptor & 0x20 != 0;
    let dict_bytes = [0, 1, 2, 4][usize::from(descriptor & 3)];
    let fcs_bytes = match descriptor >> 6 {
        0 => usize::from(single_segment),
        1 => 2,
        2 => 4,
        _ => 8,
    };
    let mut at = 5;
    if !single_segment {
        let wd = *input.get(at).ok_or("truncated frame header")?;
        let base = 1u64 << (10 + (wd >> 3));
        return Ok(ZstdFrame::Window(base + (base / 8) * u64::from(wd & 7)));
    }
    at += dict_bytes;
    let fcs = le(input
        .get(at..at + fcs_bytes)
        .ok_or("truncated frame header")?);
    // A two-byte content size is stored minus 256.
    Ok(ZstdFrame::Window(if fcs_bytes == 2 {
        fcs + 256
    } else {
        fcs
    }))
}

/// A failure while reading decompressed output: the budget or the limit said no, or the
/// decoder failed.
enum ReadError {
    Body(BodyError),
    Io(std::io::Error),
}

impl ReadError {
    fn or_corrupt(self, corrupt: impl Fn(std::io::Error) -> BodyError) -> BodyError {
        match self {
            ReadError::Body(b) => b,
            ReadError::Io(e) => corrupt(e),
        }
    }
}

/// Reads `reader` to its end into `out`, at most `limit` bytes, growing `out` only after
/// `grow` has charged the growth.
fn read_bounded(
    mut reader: impl Read,
    out: &mut Vec<u8>,
    limit: usize,
    grow: &mut Grow<'_>,
) -> Result<(), ReadError> {
    const CHUNK: usize = 64 * 1024;
    let mut chunk = vec![0u8; CHUNK];
    grow(CHUNK).map_err(|o| ReadError::Body(BodyError::Overloaded(o)))?;
    loop {
        let n = match reader.read(&mut chunk) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ReadError::Io(e)),
        };
        if out.len() + n > limit {
            return Err(ReadError::Body(BodyError::TooLarge));
        }
        if out.len() + n > out.capacity() {
            let target = (out.capacity() * 2)
                .max(out.len() + n)
                .max(CHUNK)
                .min(limit);
            grow(target - out.capacity()).map_err(|o| ReadError::Body(BodyError::Overloaded(o)))?;
            out.reserve_exact(target - out.len());
        }
        out.extend_from_slice(&chunk[..n]);
    }
}

/// zstd, frame by frame (a body may hold several, and skippable ones): each frame's window,
/// which the decoder allocates before producing a byte, must fit within `limit` and is
/// charged first. (A 32 KB frame declaring a 1 GiB window cost 1 GiB before.)
fn zstd(
    body: &[u8],
    out: &mut Vec<u8>,
    limit: usize,
    grow: &mut Grow<'_>,
) -> Result<(), BodyError> {
    let corrupt = |e: &dyn std::fmt::Display| BodyError::Corrupt(format!("invalid zstd body: {e}"));
    let mut input = body;
    let mut window_charged = 0u64;
    while !input.is_empty() {
        let window = match zstd_frame(input).map_err(|e| corrupt(&e))? {
            ZstdFrame::Skippable(len) => {
                input = input
                    .get(len..)
                    .ok_or_else(|| corrupt(&"truncated skippable frame"))?;
                continue;
            }
            ZstdFrame::Window(window) => window,
        };
        if window > limit as u64 {
            return Err(BodyError::Corrupt(format!(
                "invalid zstd body: its window of {window} bytes is larger than max_request_bytes ({limit})"
            )));
        }
        if window > window_charged {
            grow((window - window_charged) as usize).map_err(BodyError::Overloaded)?;
            window_charged = window;
        }
        let decoder =
            ruzstd::decoding::StreamingDecoder::new(&mut input).map_err(|e| corrupt(&e))?;
        read_bounded(decoder, out, limit, grow).map_err(|e| e.or_corrupt(|e| corrupt(&e)))?;
    }
    Ok(())
}

/// 503 with Retry-After: llmtail is full for now, the sender should retry.
fn unavailable(rx: &Receiver, encoding: Encoding, why: Overload) -> Response {
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
    r
}

async fn export(State(rx): State<Receiver>, headers: HeaderMap, body: Body) -> Response {
    // Authentication comes before anything else about the request.
    let encoding = body_encoding(&headers);
    if let Some(auth) = &rx.auth
        && !auth.allows(&headers)
    {
        let answer_in = encoding.as_ref().copied().unwrap_or(Encoding::Protobuf);
        rx.pipeline
            .metrics
            .auth_failures
            .with_label_values(&[answer_in.protocol().label()])
            .inc();
        let mut r = error(
            StatusCode::UNAUTHORIZED,
            answer_in,
            CODE_UNAUTHENTICATED,
            UNAUTHENTICATED.into(),
        );
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return r;
    }
    let encoding = match encoding {
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
        return unavailable(&rx, encoding, why);
    }
    // The body is charged to the memory budget before it is read: its declared length, or
    // the most it may be.
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    if declared.is_some_and(|n| n > rx.max_request_bytes) {
        return too_large();
    }
    let mut reservation = None;
    let pipeline = rx.pipeline.clone();
    let mut grow = |n: usize| pipeline.reserve(&mut reservation, n);
    if let Err(why) = grow(declared.unwrap_or(rx.max_request_bytes)) {
        return unavailable(&rx, encoding, why);
    }
    let raw = match read_body(body, declared, rx.max_request_bytes).await {
        Ok(b) => b,
        Err(BodyError::TooLarge) => return too_large(),
        Err(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                encoding,
                CODE_INVALID_ARGUMENT,
                "the request body could not be read whole".into(),
            );
        }
    };
    let raw = match decompress(&headers, raw, rx.max_request_bytes, &mut grow) {
        Ok(b) => b,
        Err(BodyError::TooLarge) => return too_large(),
        Err(BodyError::Overloaded(why)) => return unavailable(&rx, encoding, why),
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
        Encoding::Json => {
            // The JSON is freed as soon as it is converted: it is not held with the result.
            let converted = crate::otlp::json::to_protobuf(&raw);
            drop(raw);
            match converted {
                Ok(p) => Bytes::from(p),
                Err(e) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        encoding,
                        CODE_INVALID_ARGUMENT,
                        format!("the body is not a valid OTLP/JSON ExportTraceServiceRequest: {e}"),
                    );
                }
            }
        }
    };
    // From here the request is charged as what it is.
    drop(reservation);
    let outcome = match rx.pipeline.accept(protobuf, encoding.protocol()).await {
        Ok(o) => o,
        Err(crate::pipeline::IngestError::Full(why)) => return unavailable(&rx, encoding, why),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn zstd_of(data: &[u8]) -> Vec<u8> {
        ruzstd::encoding::compress_to_vec(data, ruzstd::encoding::CompressionLevel::Fastest)
    }

    fn headers(encoding: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_ENCODING,
            HeaderValue::from_str(encoding).unwrap(),
        );
        h
    }

    /// Decompresses with a budget of `room` bytes; returns the output and what was charged.
    fn run(
        encoding: &str,
        body: Vec<u8>,
        limit: usize,
        room: usize,
    ) -> (Result<Bytes, BodyError>, usize) {
        let mut charged = 0usize;
        let mut grow = |n: usize| {
            if charged + n > room {
                return Err(Overload::Memory);
            }
            charged += n;
            Ok(())
        };
        let out = decompress(&headers(encoding), Bytes::from(body), limit, &mut grow);
        (out, charged)
    }

    #[test]
    fn zstd_frames_skippable_frames_included_decode_whole() {
        let (a, b) = (vec![b'a'; 100_000], vec![b'b'; 50_000]);
        let mut body = zstd_of(&a);
        body.extend_from_slice(&[0x50, 0x2a, 0x4d, 0x18, 3, 0, 0, 0, 9, 9, 9]);
        body.extend_from_slice(&zstd_of(&b));
        let (out, charged) = run("zstd", body, 1 << 20, usize::MAX);
        let out = out.ok().unwrap();
        assert_eq!(out.len(), 150_000);
        assert!(
            out[..100_000].iter().all(|c| *c == b'a') && out[100_000..].iter().all(|c| *c == b'b')
        );
        assert!(
            charged >= 150_000,
            "what was allocated was charged: {charged}"
        );
    }

    #[test]
    fn a_zstd_window_bomb_is_refused_before_anything_is_allocated() {
        // A frame declaring a 1 GiB window (exponent 20), then a raw block of 3 bytes.
        let bomb = [
            0x28, 0xb5, 0x2f, 0xfd, 0x00, 0xa0, 0x19, 0x00, 0x00, b'x', b'y', b'z',
        ];
        let (out, charged) = run("zstd", bomb.to_vec(), 16 << 20, usize::MAX);
        match out {
            Err(BodyError::Corrupt(msg)) => {
                assert!(msg.contains("window of 1073741824 bytes"), "{msg}")
            }
            _ => panic!("a 1 GiB window must be refused"),
        }
        assert_eq!(charged, 0);
    }

    #[test]
    fn output_past_the_limit_or_the_budget_is_refused() {
        let big = zstd_of(&vec![0u8; 4 << 20]);
        assert!(matches!(
            run("zstd", big.clone(), 1 << 20, usize::MAX).0,
            Err(BodyError::TooLarge)
        ));
        assert!(matches!(
            run(
                "gzip",
                crate::receiver::http::tests::gzip(&vec![0u8; 4 << 20]),
                1 << 20,
                usize::MAX
            )
            .0,
            Err(BodyError::TooLarge)
        ));
        // Within the limit, but the budget has room for 1 MiB only.
        assert!(matches!(
            run("zstd", big, 16 << 20, 1 << 20).0,
            Err(BodyError::Overloaded(Overload::Memory))
        ));
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }
}
