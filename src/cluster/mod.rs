//! Trace-aware sharding across replicas, with no extra tier and no datastore.
//!
//! Members come from `cluster.peers` (re-read on SIGHUP) or from the address records of
//! `cluster.dns` (a headless Service), re-read every `refresh_interval`. Each trace id is
//! owned by one member, chosen by rendezvous hashing (the member with the highest score for
//! the id), so every replica with the same member list routes a trace to the same place and
//! a change of membership moves only the traces of the members that came or went. Spans of
//! traces another member owns are forwarded to it over OTLP/gRPC in batches, marked with
//! the `x-llmtail-forwarded` header.
//!
//! Membership changes without splitting traces:
//! - **Leaving** (SIGTERM): a replica tells every peer it leaves (they take it out of their
//!   rings at once), stops deciding, and hands every trace it holds to the trace's new
//!   owner with how long it has been held and how long until its deadline, so the new
//!   owner decides it on time. Only what no peer takes before `shutdown_timeout` is
//!   decided where it is.
//! - **Joining** (a new member in DNS or in reloaded peers, a member back): for `overlap`
//!   after a ring change both rings are known. A trace whose owner changed goes to its
//!   previous owner, which keeps it if it holds it (or decided it) and otherwise passes it
//!   on to the new owner, marked final. So traces in flight stay where they are until
//!   decided, and new ones go to their new owner.
//! - A forwarded request is routed once more by the receiver (its view of the ring wins),
//!   and a request marked final is always taken: no span goes round in circles.
//! - Forwards carry an idempotency key: a batch whose outcome is unknown (the connection
//!   broke after it was sent) is sent again to the same peer, which takes it once.
//! - A peer that cannot be reached is left out of the ring for `peer_retry_interval` and
//!   the spans meant for it go to the traces' next owner.

mod forward;

use forward::Forwarder;

mod membership;

pub use membership::{Handed, JoinAnswer, Membership, PeerRequest};

mod ring;

pub use ring::{Ring, normalize};

pub mod config;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use parking_lot::Mutex;
use prometheus::IntCounter;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::exporter::SendError;
use crate::exporter::config::{Compression, ExportProtocol, OtlpExporterConfig};
use crate::exporter::otlp::{Delivery, OtlpGrpcSink};
use crate::otlp::TraceId;
use crate::otlp::reframe::{HeldSpan, encode_verbatim};
use crate::telemetry::Metrics;
use crate::units::Dur;
use config::ClusterConfig;

/// The header that marks a request as forwarded by a replica; its value is the sender.
pub const FORWARDED_HEADER: &str = "x-llmtail-forwarded";
/// On a forwarded request: `final` (take it here, do not route it again) or `ask` (keep
/// it if its trace is held or decided here, else pass it to its owner, final).
pub const MODE_HEADER: &str = "x-llmtail-route";
/// On a forwarded request: its idempotency key (sender and sequence).
pub const BATCH_HEADER: &str = "x-llmtail-batch";
/// On a hand-off: each handed trace's id, age and time to its deadline (binary metadata).
pub const HANDOFF_HEADER: &str = "x-llmtail-handoff-bin";
/// On an empty request: recent decisions of a leaving replica (binary metadata).
pub const DECISIONS_HEADER: &str = "x-llmtail-decisions-bin";
/// On an empty request: `join` or `leave`.
pub const MEMBERSHIP_HEADER: &str = "x-llmtail-membership";
/// On the answer to a join: the ring the receiver routed by without the joiner (before
/// the change that added it, or still, when it is not a member there yet).
pub const PREVIOUS_RING_HEADER: &str = "x-llmtail-previous-ring";
/// On the answer to a join: the joiner is not in the receiver's ring (yet).
pub const NOT_A_MEMBER_HEADER: &str = "x-llmtail-not-a-member";

/// How a forwarded request is to be taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Mode {
    /// Routed again by the receiver's ring (its view wins; forwards it makes are final).
    #[default]
    Route,
    /// Taken by the receiver.
    Final,
    /// Sent to a trace's previous owner: kept if its trace is held or decided there,
    /// else passed on to the owner in the receiver's ring, final.
    Ask,
}

/// Where a span goes ([`Routing::route`]).
#[derive(Debug, PartialEq, Eq)]
pub enum Route<'a> {
    /// This replica owns its trace.
    Here,
    /// Forwarded to this member, its owner.
    To(&'a Arc<str>),
    /// Forwarded to this member, its previous owner, which keeps it if it holds it.
    Ask(&'a Arc<str>),
    /// This replica owned its trace before the ring changed: kept here if held or decided
    /// here, else passed on to the owner given.
    HereIfKnown(&'a Arc<str>),
}

/// The ring in force and, for `overlap` after it changed, the ring before it.
#[derive(Debug)]
pub struct Routing {
    pub current: Ring,
    previous: Option<(Ring, Instant)>,
}

impl Routing {
    /// Where a span of `trace` goes at `now`.
    pub fn route(&self, trace: &TraceId, now: Instant) -> Route<'_> {
        let owner = self.current.elsewhere(trace);
        if let Some((previous, until)) = &self.previous
            && now < *until
            && !previous.is_empty()
        {
            let before = previous.owner_addr(trace);
            if before != self.current.owner_addr(trace) {
                // The previous owner, while still a member, keeps what it holds.
                if self.current.me_addr() == Some(before) {
                    if let Some(owner) = owner {
                        return Route::HereIfKnown(owner);
                    }
                } else if let Some(member) = self.current.member(before) {
                    return Route::Ask(member);
                }
            }
        }
        owner.map_or(Route::Here, Route::To)
    }

    /// Whether an overlap window is open at `now`.
    pub fn overlapping(&self, now: Instant) -> bool {
        self.previous
            .as_ref()
            .is_some_and(|(_, until)| now < *until)
    }
}

pub struct Cluster {
    me: String,
    cfg: ClusterConfig,
    /// How long both rings are known after a change.
    overlap: Duration,
    routing: ArcSwap<Routing>,
    /// Members as configured or last resolved.
    known: Mutex<Vec<String>>,
    /// The IP addresses of the members (host names resolved at each refresh): only
    /// requests from these may carry the forwarding header.
    member_ips: Mutex<HashSet<std::net::IpAddr>>,
    /// Peers out of the ring until the given time.
    down: Mutex<HashMap<String, Instant>>,
    /// Peers that said they leave: out of the ring until they say they joined again.
    left: Mutex<HashSet<String>>,
    /// This replica is leaving: it owns nothing.
    leaving: AtomicBool,
    /// Held while the ring is rebuilt or replaced: one change at a time, each from the
    /// ring the one before it left.
    changing: Mutex<()>,
    /// The first refresh is done: the ring before it was no ring in force (with `dns`,
    /// only this replica), so it opens no overlap.
    started: AtomicBool,
    /// Peers that have not yet heard that this replica joined.
    unannounced: Mutex<HashSet<String>>,
    forwarders: Mutex<HashMap<(Arc<str>, Mode), Forwarder>>,
    /// Spans a peer did not take, handed back: (request, whether to route it again).
    fallback: mpsc::UnboundedSender<(Bytes, bool)>,
    /// A bearer token for peers that require one (the first of `receiver.auth`).
    auth_header: Option<String>,
    /// The address connections to peers leave from: this replica's own, when it is an IP
    /// of this host (peers accept the forwarding header only from members' addresses).
    local_ip: Option<std::net::IpAddr>,
    /// Forwarded batches recently taken, by idempotency key.
    seen: Mutex<membership::Seen>,
    /// This process's idempotency keys: a random prefix and a sequence.
    batch_prefix: u64,
    batch_seq: AtomicU64,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Cluster {
    /// Starts clustering; spans that cannot be forwarded arrive on the returned receiver,
    /// encoded as a request, with whether to route them again.
    pub fn new(
        cfg: &ClusterConfig,
        overlap: Duration,
        auth_token: Option<&str>,
        metrics: Arc<Metrics>,
    ) -> (Arc<Cluster>, mpsc::UnboundedReceiver<(Bytes, bool)>) {
        let me = normalize(cfg.self_address.as_deref().unwrap_or_default());
        let (fallback, rx) = mpsc::unbounded_channel();
        let local_ip = me
            .parse::<std::net::SocketAddr>()
            .ok()
            .map(|a| a.ip())
            .filter(|ip| !ip.is_unspecified())
            .filter(|ip| std::net::TcpListener::bind((*ip, 0)).is_ok());
        let known: Vec<String> = cfg.peers.iter().map(|p| normalize(p)).collect();
        // A replica that starts and finds, as it says it joins, that its peers worked
        // without it takes their ring before it as its previous one (see `announce_join`).
        let routing = Routing {
            current: Ring::new(known.clone(), &me),
            previous: None,
        };
        let cluster = Arc::new(Cluster {
            routing: ArcSwap::from_pointee(routing),
            unannounced: Mutex::new(known.iter().filter(|k| **k != me).cloned().collect()),
            me,
            cfg: cfg.clone(),
            overlap,
            member_ips: Mutex::new(
                known
                    .iter()
                    .filter_map(|k| k.parse::<std::net::SocketAddr>().ok())
                    .map(|a| a.ip())
                    .collect(),
            ),
            known: Mutex::new(known),
            down: Mutex::new(HashMap::new()),
            left: Mutex::new(HashSet::new()),
            leaving: AtomicBool::new(false),
            started: AtomicBool::new(false),
            changing: Mutex::new(()),
            forwarders: Mutex::new(HashMap::new()),
            fallback,
            auth_header: auth_token.map(|t| format!("Bearer {t}")),
            local_ip,
            seen: Mutex::new(membership::Seen::new(membership::SEEN_BATCHES)),
            batch_prefix: rand::random(),
            batch_seq: AtomicU64::new(0),
            metrics,
            stop: CancellationToken::new(),
            tasks: Mutex::new(Vec::new()),
        });
        cluster.publish();
        (cluster, rx)
    }

    /// The ring in force.
    pub fn ring(&self) -> arc_swap::Guard<Arc<Routing>> {
        self.routing.load()
    }

    /// This replica's address.
    pub fn me(&self) -> &str {
        &self.me
    }

    /// How long both rings are known after a change.
    pub fn overlap(&self) -> Duration {
        self.overlap
    }

    /// Whether this replica is leaving the ring (shutting down).
    pub fn is_leaving(&self) -> bool {
        self.leaving.load(Ordering::SeqCst)
    }

    /// Counts the traces of `spans` as split for `reason` (`peer`: the member involved).
    pub fn count_split(&self, spans: &[HeldSpan], reason: &str, peer: &str) {
        let traces: HashSet<TraceId> = spans
            .iter()
            .filter_map(|s| crate::otlp::scan::trace_id(&s.bytes))
            .collect();
        if let Some(example) = traces.iter().next() {
            self.metrics
                .count_split(reason, traces.len() as u64, example, peer);
        }
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
        let mut ips = HashSet::new();
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
            .set(self.routing.load().current.len() as i64);
    }

    /// Rebuilds the ring from the known members minus those marked down or gone; a
    /// change opens an overlap window in which the ring before it is known too.
    fn rebuild(&self) {
        let _one_at_a_time = self.changing.lock();
        let now = Instant::now();
        let mut down = self.down.lock();
        down.retain(|_, until| *until > now);
        let left = self.left.lock();
        let members: Vec<String> = self
            .known
            .lock()
            .iter()
            .filter(|a| !down.contains_key(*a) && !left.contains(*a))
            .cloned()
            .collect();
        drop((down, left));
        let ring = if self.leaving.load(Ordering::SeqCst) {
            Ring::without_me(members, &self.me)
        } else {
            Ring::new(members, &self.me)
        };
        // Forwarders to peers that left (not merely down) send what they hold and end;
        // their metric series go with them.
        {
            let known = self.known.lock();
            self.forwarders
                .lock()
                .retain(|(peer, _), _| known.iter().any(|k| **k == **peer));
        }
        let old = self.routing.load();
        if old.current.same_members(&ring) {
            return;
        }
        tracing::info!(
            members = ?ring.addrs().map(|a| &**a).collect::<Vec<_>>(),
            overlap = ?self.overlap,
            "cluster ring changed"
        );
        let previous =
            if self.leaving.load(Ordering::SeqCst) || !self.started.load(Ordering::SeqCst) {
                // A leaving replica hands its traces off, a starting one holds none: no overlap.
                None
            } else {
                Some((old.current.clone(), now + self.overlap))
            };
        self.routing.store(Arc::new(Routing {
            current: ring,
            previous,
        }));
        self.metrics.cluster_ring_changes.inc();
        self.publish();
    }

    /// Takes `peer` out of the ring for `peer_retry_interval`.
    fn mark_down(&self, peer: &str) {
        self.down.lock().insert(
            peer.to_owned(),
            Instant::now() + self.cfg.peer_retry_interval.0,
        );
        self.rebuild();
    }

    /// Puts reloaded static peers in force (a ring change like any other).
    pub fn set_peers(&self, peers: &[String]) {
        let peers: Vec<String> = peers.iter().map(|p| normalize(p)).collect();
        {
            let mut known = self.known.lock();
            if *known == peers {
                return;
            }
            let mut unannounced = self.unannounced.lock();
            for p in &peers {
                if *p != self.me && !known.contains(p) {
                    unannounced.insert(p.clone());
                }
            }
            *known = peers;
        }
        // A member named again in the config is in the ring again.
        self.left.lock().clear();
        {
            let ips: HashSet<std::net::IpAddr> = self
                .known
                .lock()
                .iter()
                .filter_map(|k| k.parse::<std::net::SocketAddr>().ok())
                .map(|a| a.ip())
                .collect();
            self.member_ips.lock().extend(ips);
        }
        self.rebuild();
    }

    /// Re-resolves `cluster.dns`, lets peers back in and tells peers that have not heard
    /// it yet that this replica joined, every `refresh_interval`.
    pub async fn refresh(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.cfg.refresh_interval.0);
        loop {
            tokio::select! {
                () = self.stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            self.refresh_once().await;
        }
    }

    /// One refresh: what `refresh` does each time (and a starting replica before it takes
    /// spans, so that it routes by its peers from its first span).
    pub async fn refresh_once(self: &Arc<Self>) {
        if let Some(name) = &self.cfg.dns {
            match tokio::net::lookup_host(name.as_str()).await {
                Ok(addrs) => {
                    let mut found: Vec<String> = addrs.map(|a| a.to_string()).collect();
                    found.sort();
                    found.dedup();
                    let mut known = self.known.lock();
                    if *known != found {
                        let mut unannounced = self.unannounced.lock();
                        for p in &found {
                            if *p != self.me && !known.contains(p) {
                                unannounced.insert(p.clone());
                            }
                        }
                        // An address gone from DNS is gone; one back is a new member.
                        self.left.lock().retain(|l| found.contains(l));
                        *known = found;
                    }
                }
                Err(e) => {
                    tracing::warn!(dns = %name, error = %e, "cannot resolve the cluster's peers; keeping the last members");
                }
            }
        }
        self.resolve_members().await;
        self.rebuild();
        self.started.store(true, Ordering::SeqCst);
        if !self.leaving.load(Ordering::SeqCst) {
            self.announce_join().await;
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
        let (cluster, mut fallback) =
            Cluster::new(&cfg, Duration::from_secs(1), None, metrics.clone());
        let peer: Arc<str> = Arc::from("127.0.0.1:9");
        // Nothing listens on the discard port: the batch comes back to be taken here.
        let series = || String::from_utf8_lossy(&metrics.render()).contains("peer=\"127.0.0.1:9\"");
        assert!(cluster.forward(&peer, Mode::Route, Vec::new()).is_ok());
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
    fn after_a_join_moved_traces_go_to_their_previous_owner_through_the_overlap() {
        let t0 = Instant::now();
        let until = t0 + Duration::from_secs(10);
        let routing = |me: &str| Routing {
            current: ring(&["a:1", "b:1", "c:1"], me),
            // The new member's previous ring is the one without it.
            previous: Some((
                if me == "c:1" {
                    Ring::without_me(vec!["a:1".into(), "b:1".into()], me)
                } else {
                    ring(&["a:1", "b:1"], me)
                },
                until,
            )),
        };
        let (at_a, at_c) = (routing("a:1"), routing("c:1"));
        let (mut moved, mut stayed) = (0, 0);
        for id in ids(3_000) {
            let before = at_a.previous.as_ref().unwrap().0.owner_addr(&id).to_owned();
            let now = at_a.current.owner_addr(&id).to_owned();
            if before == now {
                stayed += 1;
                // Not moved: straight to its owner, from anywhere.
                let expect = if now == "a:1" {
                    Route::Here
                } else {
                    Route::To(at_a.current.member(&now).unwrap())
                };
                assert_eq!(at_a.route(&id, t0), expect);
                continue;
            }
            moved += 1;
            assert_eq!(now, "c:1", "only traces of the new member move");
            // At the previous owner: kept if held there, else on to the new owner.
            // Elsewhere (the new member included): to the previous owner.
            if before == "a:1" {
                assert!(matches!(at_a.route(&id, t0), Route::HereIfKnown(o) if &**o == "c:1"));
            } else {
                assert!(matches!(at_a.route(&id, t0), Route::Ask(p) if **p == *before));
            }
            assert!(matches!(at_c.route(&id, t0), Route::Ask(p) if **p == *before));
            // After the overlap: the new owner.
            assert!(matches!(at_a.route(&id, until), Route::To(p) if &**p == "c:1"));
            assert_eq!(at_c.route(&id, until), Route::Here);
        }
        assert!((800..1_200).contains(&moved), "{moved} of 3000 moved");
        assert!(stayed > 1_800);
    }

    #[test]
    fn after_a_leave_its_traces_go_straight_to_their_new_owner() {
        let t0 = Instant::now();
        // "c:1" left: it is in the previous ring only, so there is no one to go back to.
        let at_a = Routing {
            current: ring(&["a:1", "b:1"], "a:1"),
            previous: Some((
                ring(&["a:1", "b:1", "c:1"], "a:1"),
                t0 + Duration::from_secs(10),
            )),
        };
        let leaving = Ring::without_me(vec!["a:1".into(), "b:1".into(), "c:1".into()], "c:1");
        for id in ids(1_000) {
            let owner = at_a.current.owner_addr(&id);
            let expect = if owner == "a:1" {
                Route::Here
            } else {
                Route::To(at_a.current.member(owner).unwrap())
            };
            assert_eq!(at_a.route(&id, t0), expect);
            // The leaving replica owns nothing and agrees on the new owner.
            assert_eq!(leaving.elsewhere(&id).map(|p| &**p), Some(owner));
        }
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
