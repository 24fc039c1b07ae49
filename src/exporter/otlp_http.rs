//! OTLP/HTTP upstream (`http/protobuf`): POSTs re-framed request bytes to
//! `<endpoint>/v1/traces`, optionally gzip-compressed, over rustls when TLS is on.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_ENCODING, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, HeaderName, HeaderValue, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use prost::Message;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::config::{Compression, OtlpExporterConfig, TlsClientConfig};
use super::{Rejected, SendError, SinkError};

/// Path appended to the endpoint, per the OTLP/HTTP specification.
const TRACES_PATH: &str = "/v1/traces";
/// Largest response body read from the upstream.
const MAX_RESPONSE_BYTES: usize = 4 * 1024 * 1024;

pub struct OtlpHttpSink {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    url: Uri,
    headers: HeaderMap,
    /// gzip level, when compressing.
    gzip: Option<u32>,
    timeout: Duration,
}

/// The rustls client setup for an upstream: the CA file's certificates or the bundled
/// Mozilla roots, and a client certificate for mutual TLS when configured.
pub fn rustls_config(tls: &TlsClientConfig) -> Result<rustls::ClientConfig, SinkError> {
    let mut roots = rustls::RootCertStore::empty();
    match &tls.ca_file {
        Some(ca) => {
            for cert in CertificateDer::pem_file_iter(ca)
                .map_err(|e| SinkError(format!("cannot read tls.ca_file {}: {e}", ca.display())))?
            {
                let cert =
                    cert.map_err(|e| SinkError(format!("tls.ca_file {}: {e}", ca.display())))?;
                roots
                    .add(cert)
                    .map_err(|e| SinkError(format!("tls.ca_file {}: {e}", ca.display())))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| SinkError(format!("TLS setup failed: {e}")))?
    .with_root_certificates(roots);
    match (&tls.cert_file, &tls.key_file) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| SinkError(format!("tls.cert_file {}: {e}", cert.display())))?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| SinkError(format!("tls.key_file {}: {e}", key.display())))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| SinkError(format!("client certificate rejected: {e}")))
        }
        _ => Ok(builder.with_no_client_auth()),
    }
}

impl OtlpHttpSink {
    pub fn new(cfg: &OtlpExporterConfig) -> Result<OtlpHttpSink, SinkError> {
        let url: Uri = format!("{}{TRACES_PATH}", cfg.endpoint.trim_end_matches('/'))
            .parse()
            .map_err(|e| {
                SinkError(format!(
                    "endpoint {:?} is not a valid URL: {e}",
                    cfg.endpoint
                ))
            })?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(super::otlp::CONNECT_TIMEOUT));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(rustls_config(&cfg.tls)?)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let mut headers = HeaderMap::new();
        for (name, value) in &cfg.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| SinkError(format!("header name {name:?} is not valid")))?;
            let mut value = HeaderValue::from_str(value)
                .map_err(|_| SinkError(format!("the value of header {name} is not valid")))?;
            value.set_sensitive(true);
            headers.insert(name, value);
        }
        Ok(OtlpHttpSink {
            client: Client::builder(TokioExecutor::new()).build(connector),
            url,
            headers,
            gzip: (cfg.compression == Compression::Gzip).then_some(cfg.compression_level),
            timeout: cfg.timeout.0,
        })
    }

    pub async fn send(&self, request: Bytes) -> Result<Rejected, SendError> {
        let body = match self.gzip {
            Some(level) => Bytes::from(super::gzip(&[], &request, level)?),
            None => request,
        };
        let mut req = Request::post(&self.url)
            .header(CONTENT_TYPE, "application/x-protobuf")
            .body(Full::new(body))
            .map_err(|e| SendError::Permanent(format!("cannot build the request: {e}")))?;
        if self.gzip.is_some() {
            req.headers_mut()
                .insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        }
        req.headers_mut().extend(self.headers.clone());
        let exchange = async {
            let response =
                self.client.request(req).await.map_err(|e| {
                    SendError::Retryable(format!("upstream not reachable: {e}"), None)
                })?;
            let status = response.status();
            let retry_after = response
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            let body = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            Ok::<_, SendError>((status, retry_after, body))
        };
        let (status, retry_after, body) = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| {
                SendError::Retryable(format!("no answer within {:?}", self.timeout), None)
            })??;
        if status.is_success() {
            return Ok(ExportTraceServiceResponse::decode(body)
                .ok()
                .and_then(|r| r.partial_success)
                .map_or_else(Rejected::default, |p| Rejected {
                    spans: p.rejected_spans.max(0) as u64,
                    message: p.error_message,
                }));
        }
        let msg = format!("upstream answered HTTP {status}");
        match status {
            StatusCode::PAYLOAD_TOO_LARGE => Err(SendError::TooLarge(msg)),
            StatusCode::BAD_REQUEST => Err(SendError::BadData(msg)),
            // The OTLP/HTTP specification's retryable statuses.
            StatusCode::TOO_MANY_REQUESTS
            | StatusCode::BAD_GATEWAY
            | StatusCode::SERVICE_UNAVAILABLE
            | StatusCode::GATEWAY_TIMEOUT => Err(SendError::Retryable(msg, retry_after)),
            _ => Err(SendError::Permanent(msg)),
        }
    }
}
