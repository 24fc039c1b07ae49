//! TLS for the receivers: a rustls server config from PEM files, with client certificates
//! required when a client CA is configured (mutual TLS).

use std::sync::Arc;

use anyhow::{Context, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::config::ServerTlsConfig;

pub fn server_config(cfg: &ServerTlsConfig, alpn: &[&[u8]]) -> Result<Arc<rustls::ServerConfig>> {
    let certs = CertificateDer::pem_file_iter(&cfg.cert_file)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("cannot read certificates from {}", cfg.cert_file.display()))?;
    let key = PrivateKeyDer::from_pem_file(&cfg.key_file)
        .with_context(|| format!("cannot read a private key from {}", cfg.key_file.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = match &cfg.client_ca_file {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(ca)
                .with_context(|| format!("cannot read {}", ca.display()))?
            {
                roots
                    .add(cert.with_context(|| format!("bad certificate in {}", ca.display()))?)
                    .with_context(|| format!("bad CA certificate in {}", ca.display()))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .context("client certificate verifier")?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .context("the certificate and key do not form a valid pair")?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}
