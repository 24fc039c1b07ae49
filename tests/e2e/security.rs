//! Receiver security: TLS and mutual TLS, bearer tokens and API keys (refused before the
//! body is read, counted), secrets kept out of the log, slow clients cut off.

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::support::*;
use llmtail_tools::loadgen::{self, Kind};
use prost::Message;
use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOKEN: &str = "tok-0123456789abcdef-secret";
const API_KEY: &str = "key-fedcba9876543210-secret";

fn request(
    seed: u64,
) -> opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest {
    let mut rng = StdRng::seed_from_u64(seed);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    loadgen::request(loadgen::trace(&mut rng, Kind::Error, loadgen::convention_for(0), now).spans)
}

fn body(sink: &Sink) -> String {
    format!(
        "sampling:\n  decision_wait: 2s\n  root_grace: 100ms\n  base_rate: 0.0\n  policies:\n    - {{name: errors, type: error}}\nexporter:\n  otlp:\n    endpoint: {}\n  batch:\n    timeout: 50ms\n",
        sink.endpoint()
    )
}

fn auth_yaml() -> String {
    format!("  auth:\n    bearer_tokens: [\"{TOKEN}\"]\n    api_keys: [\"{API_KEY}\"]\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_over_mutual_tls_with_a_bearer_token() {
    let pki = Pki::new();
    let sink = Sink::start(0).await;
    let grpc_tls = format!(
        "    tls:\n      cert_file: {}\n      key_file: {}\n      client_ca_file: {}\n",
        pki.path("server.pem"),
        pki.path("server-key.pem"),
        pki.path("ca.pem"),
    );
    let d = Daemon::start_receivers(&grpc_tls, &auth_yaml(), &body(&sink));

    // No client certificate: the handshake (or the first request) fails.
    let refused = match mtls_client(&d, &pki, false).await {
        Err(_) => true,
        Ok(mut c) => c.export(request(1)).await.is_err(),
    };
    assert!(
        refused,
        "a client without a certificate must not get through"
    );

    let mut client = mtls_client(&d, &pki, true).await.expect("mTLS handshake");
    // Certificate but no token: UNAUTHENTICATED, counted.
    let status = client.export(request(2)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    // A wrong token likewise.
    let mut req = tonic::Request::new(request(3));
    req.metadata_mut().insert(
        "authorization",
        "Bearer tok-0123456789abcdef-secreT".parse().unwrap(),
    );
    assert_eq!(
        client.export(req).await.unwrap_err().code(),
        tonic::Code::Unauthenticated
    );
    // The right token.
    let mut req = tonic::Request::new(request(4));
    req.metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    client.export(req).await.expect("accepted with the token");
    // The API key in its header works too.
    let mut req = tonic::Request::new(request(5));
    req.metadata_mut()
        .insert("x-api-key", API_KEY.parse().unwrap());
    client.export(req).await.expect("accepted with the API key");

    assert_eq!(sink.wait_for_spans(8, Duration::from_secs(10)).await, 8);
    let m = d.metrics();
    assert_eq!(
        m.sum("llmtail_auth_failures_total", &[("protocol", "grpc")]),
        2.0
    );
    // Refused requests never reached the pipeline.
    assert_eq!(m.sum("llmtail_spans_received_total", &[]), 8.0);
    let log = d.log();
    assert!(
        !log.contains(TOKEN) && !log.contains(API_KEY),
        "secrets in the log: {log}"
    );
}

/// One HTTP/1.1 request over TLS; returns the status code and the raw head.
async fn https_request(
    port: u16,
    pki: &Pki,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String) {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_slice(pki.ca_pem.as_bytes()).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let mut tls = connector
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .expect("TLS handshake");
    let mut head = format!(
        "POST /v1/traces HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/x-protobuf\r\ncontent-length: {}\r\nconnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    tls.write_all(head.as_bytes()).await.unwrap();
    tls.write_all(body).await.unwrap();
    let mut response = Vec::new();
    let _ = tls.read_to_end(&mut response).await;
    let text = String::from_utf8_lossy(&response).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_over_tls_with_an_api_key() {
    let pki = Pki::new();
    let sink = Sink::start(0).await;
    let http = format!(
        "    tls:\n      cert_file: {}\n      key_file: {}\n{}",
        pki.path("server.pem"),
        pki.path("server-key.pem"),
        auth_yaml()
    );
    let d = Daemon::start_receivers("", &http, &body(&sink));
    let payload = request(6).encode_to_vec();
    let (code, head) = https_request(d.http.port(), &pki, &[], &payload).await;
    assert_eq!(code, 401, "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("www-authenticate: bearer"),
        "{head}"
    );
    let (code, _) = https_request(
        d.http.port(),
        &pki,
        &[("x-api-key", "nope-nope-nope-nope")],
        &payload,
    )
    .await;
    assert_eq!(code, 401);
    let (code, head) =
        https_request(d.http.port(), &pki, &[("x-api-key", API_KEY)], &payload).await;
    assert_eq!(code, 200, "{head}");
    let bearer = format!("Bearer {TOKEN}");
    let (code, _) = https_request(
        d.http.port(),
        &pki,
        &[("authorization", &bearer)],
        &request(7).encode_to_vec(),
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(sink.wait_for_spans(8, Duration::from_secs(10)).await, 8);
    let m = d.metrics();
    assert_eq!(
        m.sum(
            "llmtail_auth_failures_total",
            &[("protocol", "http_protobuf")]
        ),
        2.0
    );
    // Plain HTTP to the TLS port gets nowhere.
    let mut plain = std::net::TcpStream::connect(d.http).unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let _ = plain.write_all(b"POST /v1/traces HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n");
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer);
    assert!(!String::from_utf8_lossy(&answer).contains(" 200 "));
    let log = d.log();
    assert!(
        !log.contains(TOKEN) && !log.contains(API_KEY),
        "secrets in the log: {log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_finishes_its_headers_is_cut_off() {
    let sink = Sink::start(0).await;
    let d = Daemon::start_receivers("", "    header_read_timeout: 1s\n", &body(&sink));
    let started = Instant::now();
    let mut slow = std::net::TcpStream::connect(d.http).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    slow.write_all(b"POST /v1/traces HTTP/1.1\r\nhost: x\r\n")
        .unwrap();
    let mut buf = Vec::new();
    // The server answers 408 and/or closes; either way the read ends, long before the
    // client's own 10 s.
    let _ = slow.read_to_end(&mut buf);
    let waited = started.elapsed();
    assert!(waited < Duration::from_secs(8), "held open for {waited:?}");
    // Other senders were served all along.
    let (code, _, _) = http_request(
        d.http,
        "POST",
        "/v1/traces",
        &[("content-type", "application/x-protobuf")],
        &request(8).encode_to_vec(),
    );
    assert_eq!(code, 200);
}
