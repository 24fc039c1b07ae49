//! `admin:` — the metrics and probe endpoint.

use std::net::SocketAddr;

use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub endpoint: String,
    /// Serve `GET /debug/traces/{trace_id}`: where a trace is and why it was decided.
    pub debug_traces: bool,
    /// Tokens the status page and the debug endpoints require, as a bearer token or as the
    /// password of HTTP basic authentication (`/metrics` and the probes stay open for
    /// Prometheus and the kubelet).
    pub bearer_tokens: Vec<String>,
    /// Serve the status page at `/` (and its data at `/api/status`).
    pub status_page: bool,
    /// A link from each kept trace on the status page to the trace backend: `{trace_id}`
    /// is replaced, e.g. `https://grafana.example.com/explore?...{trace_id}...`.
    pub trace_url: Option<String>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            endpoint: "0.0.0.0:8888".into(),
            debug_traces: false,
            bearer_tokens: Vec::new(),
            status_page: true,
            trace_url: None,
        }
    }
}

impl AdminConfig {
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut p: Vec<(String, String)> = self
            .bearer_tokens
            .iter()
            .enumerate()
            .filter(|(_, t)| t.len() < 16)
            .map(|(i, _)| {
                (
                    format!("bearer_tokens[{i}]"),
                    "must be at least 16 characters".to_owned(),
                )
            })
            .collect();
        p.extend(self.validate_endpoint());
        if let Some(url) = &self.trace_url
            && (!url.contains("{trace_id}")
                || !(url.starts_with("https://") || url.starts_with("http://")))
        {
            p.push((
                "trace_url".into(),
                format!("{url:?} must be an http(s) URL containing {{trace_id}}"),
            ));
        }
        p
    }

    fn validate_endpoint(&self) -> Vec<(String, String)> {
        match self.endpoint.parse::<SocketAddr>() {
            Ok(_) => Vec::new(),
            Err(_) => vec![(
                "endpoint".into(),
                format!(
                    "{:?} is not host:port with an IP host, e.g. 0.0.0.0:8888",
                    self.endpoint
                ),
            )],
        }
    }
}
