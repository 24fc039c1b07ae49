//! Trace-aware sharding across replicas, with no extra tier and no datastore.
//!
//! Members come from `cluster.peers` or from the address records of `cluster.dns` (a
//! headless Service), re-read every `refresh_interval`. Each trace id is owned by one
//! member, chosen by rendezvous hashing (the member with the highest score for the id), so
//! every replica with the same member list routes a trace to the same place and a change
//! of membership moves only the traces of the members that came or went. Spans of traces
//! another member owns are forwarded to it over OTLP/gRPC in batches, marked with the
//! `x-llmtail-forwarded` header; a request carrying it is always taken locally, so no
//! span is forwarded twice even while members disagree about the ring. A peer that cannot
//! take forwarded spans is left out of the ring for `peer_retry_interval`, and the spans
//! meant for it are taken locally: traces in flight are decided where their spans are, and
//! base-rate decisions agree everywhere because they are consistent-probability decisions.

mod forward;

use forward::Forwarder;

mod ring;

pub use ring::{Ring, normalize};

pub mod config;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use parking_lot::Mutex;
use prometheus::IntCounter;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::exporter::SendError;
use crate::exporter::config::{Compression, ExportProtocol, OtlpExporterConfig};
use crate::exporter::otlp::OtlpGrpcSink;
use crate::otlp::reframe::{HeldSpan, encode_verbatim};
use crate::telemetry::Metrics;
use crate::units::Dur;
use config::ClusterConfig;

/// The header that marks a request as forwarded by a replica; its value is the sender.
pub const FORWARDED_HEADER: &str = "x-llmtail-forwarded";
pub struct Cluster {
    me: String,
    cfg: ClusterConfig,
    ring: ArcSwap<Ring>,
    /// Members as configured or last resolved.
    known: Mutex<Vec<String>>,
    /// The IP addresses of the members (host names resolved at each refresh): only
    /// requests from these may carry the forwarding header.
    member_ips: Mutex<std::collections::HashSet<std::net::IpAddr>>,
    /// Peers out of the ring until the given time.
    down: Mutex<HashMap<String, Instant>>,
    forwarders: Mutex<HashMap<Arc<str>, Forwarder>>,
    /// Spans a peer could not take, handed back to be taken here.
    fallback: mpsc::UnboundedSender<Bytes>,
    /// A bearer token for peers that require one (the first of `receiver.auth`).
    auth_header: Option<String>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Cluster {
    /// Starts clustering; spans that cannot be forwarded arrive on the returned receiver,
    /// encoded as a request, to be taken locally.
    pub fn new(
        cfg: &ClusterConfig,
        auth_token: Option<&str>,
        metrics: Arc<Metrics>,
    ) -> (Arc<Cluster>, mpsc::UnboundedReceiver<Bytes>) {
        let me = normalize(cfg.self_address.as_deref().unwrap_or_default());
        let (fallback, rx) = mpsc::unbounded_channel();
        let known: Vec<String> = cfg.peers.iter().map(|p| normalize(p)).collect();
        let cluster = Arc::new(Cluster {
            ring: ArcSwap::from_pointee(Ring::new(known.clone(), &me)),
            me,
            cfg: cfg.clone(),
            member_ips: Mutex::new(
                known
                    .iter()
                    .filter_map(|k| k.parse::<std::net::SocketAddr>().ok())
                    .map(|a| a.ip())
                    .collect(),
            ),
            known: Mutex::new(known),
            down: Mutex::new(HashMap::new()),
            forwarders: Mutex::new(HashMap::new()),
            fallback,
            auth_header: auth_token.map(|t| format!("Bearer {t}")),
            metrics,
            stop: CancellationToken::new(),
            tasks: Mutex::new(Vec::new()),
        });
        cluster.publish();
        (cluster, rx)
    }

    pub fn ring(&self) -> arc_swap::Guard<Arc<Ring>> {
        self.ring.load()
    }

    /// True when some peer's forward queue is nearly full: receivers then push back
    /// rather than decide that peer's traces here (which would split them).
    pub fn is_high(&self) -> bool {
        let high = self.cfg.forward_queue_spans / 10 * 9;
        self.forwarders
            .lock()
            .values()
            .any(|f| f.queued.load(Ordering::Relaxed) >= high)
    }

    /// Bookkeeping memory of the spans queued for peers (the memory budget's share here;
    /// the buffers they refer to are charged to it directly).
    pub fn bookkeeping(&self) -> usize {
        self.forwarders
            .lock()
            .values()
            .map(|f| f.queued.load(Ordering::Relaxed))
            .sum::<usize>()
            * crate::memory::SPAN_OVERHEAD
    }

    /// The address a request's forwarded header names, if it is a known member (the
    /// label of `llmtail_cluster_spans_received_total`; anything else is `unknown`).
    pub fn peer_label(&self, sender: &str) -> String {
        if self.known.lock().iter().any(|k| k == sender) {
            sender.to_owned()
        } else {
            "unknown".to_owned()
        }
    }

    /// Whether `ip` is the address of a cluster member (this replica included).
    pub fn is_member(&self, ip: std::net::IpAddr) -> bool {
        self.member_ips.lock().contains(&ip)
    }

    /// Resolves the members' addresses (names included) for [`Cluster::is_member`].
    async fn resolve_members(&self) {
        let known = self.known.lock().clone();
        let mut ips = std::collections::HashSet::new();
        let mut unresolved = false;
        for member in known {
            match member.parse::<std::net::SocketAddr>() {
                Ok(addr) => {
                    ips.insert(addr.ip());
                }
                Err(_) => match tokio::net::lookup_host(member.as_str()).await {
                    Ok(addrs) => ips.extend(addrs.map(|a| a.ip())),
                    Err(_) => unresolved = true,
                },
            }
        }
        let mut current = self.member_ips.lock();
        if unresolved {
            // A name that did not resolve this time keeps its last addresses.
            current.extend(ips);
        } else {
            *current = ips;
        }
    }

    fn publish(&self) {
        self.metrics
            .cluster_peers
            .set(self.ring.load().len() as i64);
    }

    /// Rebuilds the ring from the known members minus those marked down.
    fn rebuild(&self) {
        let now = Instant::now();
        let mut down = self.down.lock();
        down.retain(|_, until| *until > now);
        let members: Vec<String> = self
            .known
            .lock()
            .iter()
            .filter(|a| !down.contains_key(*a))
            .cloned()
            .collect();
        drop(down);
        let ring = Ring::new(members, &self.me);
        // Forwarders to peers that left (not merely down) send what they hold and end;
        // their metric series go with them.
        {
            let known = self.known.lock();
            self.forwarders
                .lock()
                .retain(|peer, _| known.iter().any(|k| **k == **peer));
        }
        let changed = {
            let old = self.ring.load();
            old.members.len() != ring.members.len()
                || old
                    .members
                    .iter()
                    .zip(&ring.members)
                    .any(|(a, b)| a.addr != b.addr)
        };
        if changed {
            tracing::info!(
                members = ?ring.members.iter().map(|m| &*m.addr).collect::<Vec<_>>(),
                "cluster ring changed"
            );
            self.ring.store(Arc::new(ring));
            self.publish();
        }
    }

    /// Takes `peer` out of the ring for `peer_retry_interval`.
    fn mark_down(&self, peer: &str) {
        self.down.lock().insert(
            peer.to_owned(),
            Instant::now() + self.cfg.peer_retry_interval.0,
        );
        self.rebuild();
    }

    /// Re-resolves `cluster.dns` and lets peers back in, every `refresh_interval`.
    pub async fn refresh(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.cfg.refresh_interval.0);
        loop {
            tokio::select! {
                () = self.stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Some(name) = &self.cfg.dns {
                match tokio::net::lookup_host(name.as_str()).await {
                    Ok(addrs) => {
                        let mut found: Vec<String> = addrs.map(|a| a.to_string()).collect();
                        found.sort();
                        found.dedup();
                        *self.known.lock() = found;
                    }
                    Err(e) => {
                        tracing::warn!(dns = %name, error = %e, "cannot resolve the cluster's peers; keeping the last members");
                    }
                }
            }
            self.resolve_members().await;
            self.rebuild();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ring::mix;
    use super::*;
    use crate::otlp::TraceId;

    fn ids(n: usize) -> Vec<TraceId> {
        (0..n as u64)
            .map(|i| {
                let mut id = [0u8; 16];
                id[..8].copy_from_slice(&mix(i + 1).to_le_bytes());
                id[8..].copy_from_slice(&mix(i + 1_000_000).to_le_bytes());
                TraceId(id)
            })
            .collect()
    }

    fn ring(members: &[&str], me: &str) -> Ring {
        Ring::new(members.iter().map(|s| s.to_string()).collect(), me)
    }

    #[tokio::test]
    async fn a_peer_that_left_loses_its_forwarder_and_metric_series() {
        let metrics = Metrics::new();
        let cfg = ClusterConfig {
            self_address: Some("127.0.0.1:1".into()),
            peers: vec!["127.0.0.1:1".into(), "127.0.0.1:9".into()],
            ..ClusterConfig::default()
        };
        let (cluster, mut fallback) = Cluster::new(&cfg, None, metrics.clone());
        let peer: Arc<str> = Arc::from("127.0.0.1:9");
        // Nothing listens on the discard port: the batch comes back to be taken here.
        let series = || String::from_utf8_lossy(&metrics.render()).contains("peer=\"127.0.0.1:9\"");
        assert!(cluster.forward(&peer, Vec::new()).is_ok());
        tokio::task::yield_now().await;
        assert!(series(), "the forwarder publishes its series");
        *cluster.known.lock() = vec!["127.0.0.1:1".into()];
        cluster.rebuild();
        assert!(cluster.forwarders.lock().is_empty());
        let tasks = std::mem::take(&mut *cluster.tasks.lock());
        for t in tasks {
            t.await.unwrap();
        }
        assert!(!series(), "the series went with the peer");
        assert!(fallback.try_recv().is_err(), "an empty queue sends nothing");
    }

    #[test]
    fn addresses_are_compared_in_one_form() {
        assert_eq!(normalize("fd00::7:4317"), "[fd00::7]:4317");
        assert_eq!(normalize("[fd00::7]:4317"), "[fd00::7]:4317");
        assert_eq!(normalize("10.0.0.1:4317"), "10.0.0.1:4317");
        assert_eq!(normalize("llmtail-0.peers:4317"), "llmtail-0.peers:4317");
    }

    #[test]
    fn every_replica_computes_the_same_owner() {
        let members = ["10.0.0.1:4317", "10.0.0.2:4317", "10.0.0.3:4317"];
        let rings: Vec<Ring> = members.iter().map(|me| ring(&members, me)).collect();
        for id in ids(1000) {
            let owners: Vec<&str> = rings
                .iter()
                .map(|r| &*r.members[r.owner(&id)].addr)
                .collect();
            assert!(owners.windows(2).all(|w| w[0] == w[1]), "{owners:?}");
            // Exactly one replica keeps it; the others forward it.
            assert_eq!(
                rings.iter().filter(|r| r.elsewhere(&id).is_none()).count(),
                1
            );
        }
    }

    #[test]
    fn shares_are_even_and_a_leaving_member_moves_only_its_own_traces() {
        let three = ring(&["a:1", "b:1", "c:1"], "a:1");
        let two = ring(&["a:1", "b:1"], "a:1");
        let ids = ids(30_000);
        let mut share = [0usize; 3];
        for id in &ids {
            share[three.owner(id)] += 1;
        }
        for s in share {
            assert!((9_000..11_000).contains(&s), "{share:?}");
        }
        for id in &ids {
            let before = &three.members[three.owner(id)].addr;
            let after = &two.members[two.owner(id)].addr;
            if &**before != "c:1" {
                assert_eq!(before, after, "a trace of a staying member moved");
            }
        }
    }
}
