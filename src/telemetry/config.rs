//! `admin:` — the metrics and probe endpoint.

use std::net::SocketAddr;

use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub endpoint: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            endpoint: "0.0.0.0:8888".into(),
        }
    }
}

impl AdminConfig {
    pub fn validate(&self) -> Vec<(String, String)> {
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
