//! `cluster:` — sharding across replicas: members, forwarding, TLS to peers.

use std::time::Duration;

use serde::Deserialize;

use crate::exporter::config::TlsClientConfig;
use crate::units::Dur;

/// Trace-aware sharding across replicas: each trace id has one owner among the members,
/// and spans received elsewhere are forwarded to it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Every replica's OTLP/gRPC address (`host:port`), this one included.
    pub peers: Vec<String>,
    /// Or: a name whose address records are the replicas (a headless Service), with the
    /// gRPC port: `llmtail-peers.observability.svc.cluster.local:4317`.
    pub dns: Option<String>,
    /// This replica's address as the others reach it (e.g. `${env:POD_IP}:4317`).
    #[serde(rename = "self")]
    pub self_address: Option<String>,
    /// How often `dns` is resolved again and unreachable peers are tried again.
    pub refresh_interval: Dur,
    /// How long a peer that failed to take forwarded spans stays out of the ring.
    pub peer_retry_interval: Dur,
    /// Spans waiting to be forwarded to one peer; past it they are kept here instead.
    pub forward_queue_spans: usize,
    /// How long after a ring change a trace whose owner changed still goes to its previous
    /// owner first (which keeps it if it holds it). Default: `sampling.max_trace_duration`
    /// plus two `refresh_interval`s — every trace held before the change is decided by
    /// then, on replicas that learn of the change one refresh apart.
    pub overlap: Option<Dur>,
    /// TLS towards peers (whose gRPC receivers serve TLS): the CA to trust and, for mutual
    /// TLS, this replica's client certificate. Peers are addressed by IP, so their
    /// certificates need IP subject alternative names.
    pub tls: Option<TlsClientConfig>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            peers: Vec::new(),
            dns: None,
            self_address: None,
            refresh_interval: Dur(Duration::from_secs(5)),
            peer_retry_interval: Dur(Duration::from_secs(10)),
            forward_queue_spans: 100_000,
            overlap: None,
            tls: None,
        }
    }
}

fn host_port_problem(value: &str) -> Option<String> {
    match value.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => None,
        _ => Some(format!("{value:?} is not host:port")),
    }
}

impl ClusterConfig {
    /// The overlap window after a ring change.
    pub fn overlap(&self, max_trace_duration: Duration) -> Duration {
        self.overlap
            .map_or(max_trace_duration + self.refresh_interval.0 * 2, |o| o.0)
    }

    /// The keys a reload cannot change (they need a restart), named.
    pub fn needs_restart(&self, new: &ClusterConfig) -> Vec<&'static str> {
        let mut keys = Vec::new();
        if self.enabled() != new.enabled() {
            keys.push("cluster (enabling or disabling clustering)");
        }
        if self.dns != new.dns {
            keys.push("cluster.dns");
        }
        if self.self_address != new.self_address {
            keys.push("cluster.self");
        }
        if self.tls != new.tls {
            keys.push("cluster.tls");
        }
        if self.refresh_interval != new.refresh_interval {
            keys.push("cluster.refresh_interval");
        }
        if self.peer_retry_interval != new.peer_retry_interval {
            keys.push("cluster.peer_retry_interval");
        }
        if self.forward_queue_spans != new.forward_queue_spans {
            keys.push("cluster.forward_queue_spans");
        }
        if self.overlap != new.overlap {
            keys.push("cluster.overlap");
        }
        keys
    }

    pub fn enabled(&self) -> bool {
        !self.peers.is_empty() || self.dns.is_some()
    }

    pub fn validate(&self) -> Vec<(String, String)> {
        let mut p = Vec::new();
        if !self.enabled() {
            return p;
        }
        if !self.peers.is_empty() && self.dns.is_some() {
            p.push(("dns".into(), "use either peers or dns, not both".into()));
        }
        for (i, peer) in self.peers.iter().enumerate() {
            if let Some(m) = host_port_problem(peer) {
                p.push((format!("peers[{i}]"), m));
            }
        }
        if let Some(m) = self.dns.as_deref().and_then(host_port_problem) {
            p.push(("dns".into(), m));
        }
        match &self.self_address {
            None => p.push((
                "self".into(),
                "required with peers or dns: this replica's address as the others reach it".into(),
            )),
            Some(me) => {
                if let Some(m) = host_port_problem(me) {
                    p.push(("self".into(), m));
                } else if !self.peers.is_empty()
                    && !self
                        .peers
                        .iter()
                        .any(|p| crate::cluster::normalize(p) == crate::cluster::normalize(me))
                {
                    p.push(("self".into(), format!("{me:?} must be one of peers")));
                }
            }
        }
        if self.forward_queue_spans == 0 {
            p.push(("forward_queue_spans".into(), "must be at least 1".into()));
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reload_names_the_cluster_keys_that_need_a_restart() {
        let old = ClusterConfig {
            peers: vec!["10.0.0.1:4317".into(), "10.0.0.2:4317".into()],
            self_address: Some("10.0.0.1:4317".into()),
            ..ClusterConfig::default()
        };
        // Peers change live.
        let more = ClusterConfig {
            peers: vec![
                "10.0.0.1:4317".into(),
                "10.0.0.2:4317".into(),
                "10.0.0.3:4317".into(),
            ],
            ..old.clone()
        };
        assert!(old.needs_restart(&more).is_empty());
        let moved = ClusterConfig {
            self_address: Some("10.0.0.9:4317".into()),
            forward_queue_spans: 5,
            ..more.clone()
        };
        assert_eq!(
            old.needs_restart(&moved),
            ["cluster.self", "cluster.forward_queue_spans"]
        );
        assert_eq!(
            old.needs_restart(&ClusterConfig::default()),
            ["cluster (enabling or disabling clustering)", "cluster.self"]
        );
    }

    #[test]
    fn the_overlap_covers_a_decision_and_two_refreshes_unless_set() {
        let c = ClusterConfig::default();
        assert_eq!(c.overlap(Duration::from_secs(10)), Duration::from_secs(20));
        let set = ClusterConfig {
            overlap: Some(Dur(Duration::from_secs(3))),
            ..c
        };
        assert_eq!(set.overlap(Duration::from_secs(10)), Duration::from_secs(3));
    }
}
