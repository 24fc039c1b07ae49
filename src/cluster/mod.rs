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
//!   decided, and new ones go to their new owner. Each change's ring before it is known for
//!   its own overlap: after several changes (a rolling restart) a trace's owners in each
//!   are asked in turn (oldest first), its owner now last.
//! - A forwarded request is routed once more by the receiver (its view of the ring wins),
//!   a request marked final is always taken, and asks carry how many more may be asked:
//!   no span goes round in circles.
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
/// On a request forwarded as [`Mode::Ask`]: how many more members may be asked after the
/// receiver (absent: none, the receiver passes what it does not hold to the owner).
pub const ASK_TTL_HEADER: &str = "x-llmtail-ask-ttl";
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
    /// Sent to a member that may hold its trace (an owner before a ring change): kept if
    /// the trace is held or decided there, else passed on to the next member that may
    /// hold it (at most `ttl` more asked) and at last to its owner, final.
    Ask { ttl: u8 },
}

/// Where a span goes ([`Routing::route`]).
#[derive(Debug, PartialEq, Eq)]
pub enum Route<'a> {
    /// This replica owns its trace.
    Here,
    /// Forwarded to this member, its owner.
    To(&'a Arc<str>),
    /// Forwarded to this member, which may hold its trace (an owner before a ring
    /// change), as [`Mode::Ask`] with this `ttl`.
    Ask(&'a Arc<str>, u8),
    /// This replica may hold its trace (it owned it before a ring change, or owns it now
    /// while another may hold it): kept here if held or decided here, else sent to the
    /// member given, as the mode given.
    HereIfKnown(&'a Arc<str>, Mode),
}

/// Rings remembered before the one in force: more changes within one overlap than this
/// (a rolling restart of many replicas at once) forget the oldest.
const RING_HISTORY: usize = 8;

/// The ring in force and, for `overlap` after each change, the rings before it (oldest
/// first): a trace in flight across several changes (a rolling restart replaces replicas
/// faster than long traces end) is held by its owner in one of them.
#[derive(Debug)]
pub struct Routing {
    pub current: Ring,
    previous: Vec<(Ring, Instant)>,
}

/// The members that may hold a trace besides its owner, in the order they are asked.
struct Holders<'a> {
    members: [Option<&'a Arc<str>>; RING_HISTORY],
    len: usize,
}

impl<'a> Holders<'a> {
    fn iter(&self) -> impl Iterator<Item = &'a Arc<str>> + '_ {
        self.members[..self.len].iter().flatten().copied()
    }
}

impl Routing {
    /// A routing with no ring before `current`.
    pub fn new(current: Ring) -> Routing {
        Routing {
            current,
            previous: Vec::new(),
        }
    }

    /// The routing after a change to `next`: this one's current ring becomes the newest
    /// of the rings before, known until `until`.
    fn changed_to(&self, next: Ring, now: Instant, until: Instant) -> Routing {
        let mut routing = Routing {
            current: next,
            previous: self.open(now).cloned().collect(),
        };
        routing.remember(self.current.clone(), until);
        routing
    }

    /// This routing with `before` remembered as the newest ring before the current one,
    /// until `until` (a joining replica learns it from its peers).
    fn remembering(&self, before: Ring, now: Instant, until: Instant) -> Routing {
        let mut routing = Routing {
            current: self.current.clone(),
            previous: self.open(now).cloned().collect(),
        };
        routing.remember(before, until);
        routing
    }

    /// Remembers `ring` as the newest ring before the current one, until `until`.
    fn remember(&mut self, ring: Ring, until: Instant) {
        self.previous.retain(|(r, _)| !r.same_members(&ring));
        self.previous.push((ring, until));
        if self.previous.len() > RING_HISTORY {
            self.previous.remove(0);
        }
    }

    /// The rings before the current one whose overlap is open at `now`, oldest first.
    fn open(&self, now: Instant) -> impl Iterator<Item = &(Ring, Instant)> {
        self.previous
            .iter()
            .filter(move |(ring, until)| now < *until && !ring.is_empty())
    }

    /// The members other than `owner` that may hold `trace`: its owners in the rings
    /// before (oldest first) that are members now, each once.
    fn holders(&self, trace: &TraceId, owner: &Arc<str>, now: Instant) -> Holders<'_> {
        let mut h = Holders {
            members: [None; RING_HISTORY],
            len: 0,
        };
        for (ring, _) in self.open(now) {
            let before = ring.owner_addr(trace);
            if before == &**owner || h.iter().any(|m| &**m == before) {
                continue;
            }
            if let Some(member) = self.current.member(before) {
                h.members[h.len] = Some(member);
                h.len += 1;
            }
        }
        h
    }

    /// Where a span of `trace` goes at `now`.
    pub fn route(&self, trace: &TraceId, now: Instant) -> Route<'_> {
        let Some(owner) = self.current.owner_member(trace) else {
            return Route::Here;
        };
        let mine = |m: &Arc<str>| self.current.me_addr() == Some(&**m);
        let holders = self.holders(trace, owner, now);
        if holders.len == 0 {
            return if mine(owner) {
                Route::Here
            } else {
                Route::To(owner)
            };
        }
        // (`ttl`: how many more may be asked after the first.)
        let others = holders.iter().filter(|m| !mine(m)).count() as u8;
        let first = holders.iter().find(|m| !mine(m));
        if mine(owner) || others < holders.len as u8 {
            // Kept here if held here; else the others are asked, the owner last.
            return match first {
                Some(next) => Route::HereIfKnown(next, Mode::Ask { ttl: others - 1 }),
                None => Route::HereIfKnown(owner, Mode::Final),
            };
        }
        Route::Ask(first.expect("one at least"), others - 1)
    }

    /// Where a span of `trace` goes that `from` asked this replica about
    /// ([`Mode::Ask`]) and that is neither held nor decided here: to the next member that
    /// may hold it (`ttl` more may be asked), else to its owner, final; `None` when this
    /// replica owns it.
    pub fn after_ask(
        &self,
        trace: &TraceId,
        now: Instant,
        from: &str,
        ttl: u8,
    ) -> Option<(&Arc<str>, Mode)> {
        let owner = self.current.owner_member(trace)?;
        let me = self.current.me_addr();
        if me == Some(&**owner) {
            return None;
        }
        if ttl > 0 {
            let holders = self.holders(trace, owner, now);
            let after_me = holders
                .iter()
                .position(|m| Some(&**m) == me)
                .map_or(0, |i| i + 1);
            if let Some(next) = holders
                .iter()
                .skip(after_me)
                .find(|m| &***m != from && Some(&***m) != me)
            {
                return Some((next, Mode::Ask { ttl: ttl - 1 }));
            }
        }
        Some((owner, Mode::Final))
    }

    /// Whether an overlap window is open at `now`.
    pub fn overlapping(&self, now: Instant) -> bool {
        self.open(now).next().is_some()
    }

    /// The newest ring before the current one, open at `now`, that `addr` is not in.
    pub fn before(&self, addr: &str, now: Instant) -> Option<&Ring> {
        self.open(now)
            .map(|(ring, _)| ring)
            .filter(|ring| !ring.contains(addr))
            .last()
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
    /// Forwarder tasks, each with its count of spans queued or in flight.
    tasks: Mutex<Vec<(tokio::task::JoinHandle<()>, Arc<AtomicUsize>)>>,
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
        let routing = Routing::new(Ring::new(known.clone(), &me));
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
            .filter_map(|s| crate::otlp::scan::trace_id(s.bytes()))
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
        let routing = if self.leaving.load(Ordering::SeqCst) || !self.started.load(Ordering::SeqCst)
        {
            // A leaving replica hands its traces off, a starting one holds none: no overlap.
            Routing::new(ring)
        } else {
            old.changed_to(ring, now, now + self.overlap)
        };
        self.routing.store(Arc::new(routing));
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

    /// `peer` failed a request lately and is out of the ring until `peer_retry_interval`
    /// has passed.
    fn is_down(&self, peer: &str) -> bool {
        self.down
            .lock()
            .get(peer)
            .is_some_and(|until| Instant::now() < *until)
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

    /// The ring of `members` as `me` sees it, whether or not it is one of them.
    fn ring_at(members: &[&str], me: &str) -> Ring {
        let addrs = members.iter().map(|s| s.to_string()).collect();
        if members.contains(&me) {
            Ring::new(addrs, me)
        } else {
            Ring::without_me(addrs, me)
        }
    }

    /// Where a span that reaches `at` ends up, following each replica's routing, when
    /// `holder` holds its trace: the replica that takes it, and the hops it took.
    fn follow<'a>(
        routings: &'a HashMap<&str, Routing>,
        id: &TraceId,
        holder: &str,
        at: &'a str,
        now: Instant,
    ) -> (&'a str, usize) {
        let (mut at, mut mode, mut from): (&str, Mode, &str) = (at, Mode::Route, "client");
        for hops in 0..10 {
            let r = &routings[at];
            let knows = at == holder;
            let next = match mode {
                Mode::Final => None,
                Mode::Ask { ttl } if !knows => r.after_ask(id, now, from, ttl),
                Mode::Ask { .. } => None,
                Mode::Route => match r.route(id, now) {
                    Route::Here => None,
                    Route::To(p) => Some((
                        p,
                        if from == "client" {
                            Mode::Route
                        } else {
                            Mode::Final
                        },
                    )),
                    Route::Ask(p, ttl) => Some((p, Mode::Ask { ttl })),
                    Route::HereIfKnown(p, m) => (!knows).then_some((p, m)),
                },
            };
            match next {
                None => return (at, hops),
                Some((p, m)) => {
                    from = at;
                    at = routings.get_key_value(&**p).expect("a member").0;
                    mode = m;
                }
            }
        }
        panic!("{id:?} went round in circles")
    }

    /// A span of `n` bytes, as held and forwarded.
    pub(super) fn held_span(n: usize) -> HeldSpan {
        HeldSpan::lone(Bytes::from(vec![0u8; n]), None, false)
    }

    /// A peer that hangs: it accepts connections and never answers (a frozen node).
    async fn hanging_peer() -> Arc<str> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((conn, _)) = listener.accept().await {
                held.push(conn);
            }
        });
        Arc::from(addr)
    }

    fn cluster_with(peer: &str) -> (Arc<Cluster>, mpsc::UnboundedReceiver<(Bytes, bool)>) {
        let cfg = ClusterConfig {
            self_address: Some("127.0.0.1:1".into()),
            peers: vec!["127.0.0.1:1".into(), peer.to_owned()],
            ..ClusterConfig::default()
        };
        Cluster::new(&cfg, Duration::from_secs(1), None, Metrics::new())
    }

    #[tokio::test]
    async fn a_peer_that_failed_lately_has_the_rest_of_its_queue_rerouted_at_once() {
        let peer = hanging_peer().await;
        let (cluster, mut fallback) = cluster_with(&peer);
        cluster.mark_down(&peer);
        assert!(
            cluster
                .forward(&peer, Mode::Route, vec![held_span(10), held_span(10)])
                .is_ok()
        );
        // Sent to the hanging peer, the batch would come back after the 15 s horizon.
        let (request, reroute) = tokio::time::timeout(Duration::from_secs(3), fallback.recv())
            .await
            .expect("the batch comes back without waiting on the peer")
            .unwrap();
        assert!(reroute, "routed again, over the ring without the peer");
        assert_eq!(request, encode_verbatim(&[held_span(10), held_span(10)]));
    }

    #[tokio::test]
    async fn a_flush_cut_short_by_the_shutdown_deadline_says_what_it_gave_up() {
        let peer = hanging_peer().await;
        let (cluster, mut fallback) = cluster_with(&peer);
        assert!(
            cluster
                .forward(&peer, Mode::Route, vec![held_span(10); 3])
                .is_ok()
        );
        let deadline = tokio::time::Instant::now() + Duration::from_millis(300);
        assert_eq!(
            cluster.flush(deadline).await,
            3,
            "in flight to a hanging peer"
        );
        assert!(cluster.tasks.lock().is_empty());
        assert!(
            fallback.try_recv().is_err(),
            "nothing comes back after the flush"
        );
        assert!(
            cluster
                .forward(&peer, Mode::Route, vec![held_span(10)])
                .is_err(),
            "once flushed, spans are taken here"
        );
        // With nothing queued, a flush gives up nothing.
        let (idle, _) = cluster_with(&peer);
        let deadline = tokio::time::Instant::now() + Duration::from_millis(300);
        assert_eq!(idle.flush(deadline).await, 0);
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
        for (t, _) in tasks {
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
            previous: vec![(ring_at(&["a:1", "b:1"], me), until)],
        };
        let (at_a, at_c) = (routing("a:1"), routing("c:1"));
        let (mut moved, mut stayed) = (0, 0);
        for id in ids(3_000) {
            let before = at_a.previous[0].0.owner_addr(&id).to_owned();
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
            // At the previous owner: kept if held there, else on to the new owner, final.
            // Elsewhere: to the previous owner. At the new owner: kept if held there
            // already, else to the previous owner.
            if before == "a:1" {
                assert!(
                    matches!(at_a.route(&id, t0), Route::HereIfKnown(o, Mode::Final) if &**o == "c:1")
                );
            } else {
                assert!(matches!(at_a.route(&id, t0), Route::Ask(p, 0) if **p == *before));
            }
            assert!(matches!(
                at_c.route(&id, t0),
                Route::HereIfKnown(p, Mode::Ask { ttl: 0 }) if **p == *before
            ));
            // After the overlap: the new owner.
            assert!(matches!(at_a.route(&id, until), Route::To(p) if &**p == "c:1"));
            assert_eq!(at_c.route(&id, until), Route::Here);
        }
        assert!((800..1_200).contains(&moved), "{moved} of 3000 moved");
        assert!(stayed > 1_800);
    }

    /// A rolling restart: a leaves (its traces handed to their owners among b and c),
    /// comes back, then b leaves (its traces handed to their owners among a and c) — all
    /// within one overlap. Wherever a trace's later span arrives, it reaches the member
    /// that holds the trace, whichever ring that member owned it in (before, only the
    /// ring just before the last change was known: a trace handed off by a and held by c
    /// through a's return went to a once b left, and was split).
    #[test]
    fn through_a_rolling_restart_a_span_reaches_whoever_holds_its_trace() {
        let t0 = Instant::now();
        let until = t0 + Duration::from_secs(10);
        let history: [&[&str]; 3] = [
            &["a:1", "b:1", "c:1"],
            &["b:1", "c:1"],
            &["a:1", "b:1", "c:1"],
        ];
        let members = ["a:1", "c:1"];
        let routings: HashMap<&str, Routing> = members
            .iter()
            .map(|me| {
                let mut r = Routing::new(ring(&members, me));
                for h in history {
                    r.remember(ring_at(h, me), until);
                }
                (*me, r)
            })
            .collect();
        // (Rings with the same members are remembered once, as of their latest change.)
        assert_eq!(routings["a:1"].previous.len(), 2);
        // Knowing only the ring before the last change, as before, misses some holders.
        let last_only: HashMap<&str, Routing> = members
            .iter()
            .map(|me| {
                let mut r = Routing::new(ring(&members, me));
                r.remember(ring_at(history[2], me), until);
                (*me, r)
            })
            .collect();
        let (mut away, mut missed) = (0, 0);
        for id in ids(2_000) {
            // Who may hold it: its owner in any ring since (if still a member).
            let mut holders: Vec<&str> = history
                .iter()
                .map(|h| ring_at(h, "x:1").owner_addr(&id).to_owned())
                .chain([routings["a:1"].current.owner_addr(&id).to_owned()])
                .filter(|o| members.contains(&o.as_str()))
                .map(|o| *members.iter().find(|m| **m == o).unwrap())
                .collect();
            holders.dedup();
            let owner = routings["a:1"].current.owner_addr(&id);
            for holder in &holders {
                away += usize::from(*holder != owner);
                for start in members {
                    let (taken, hops) = follow(&routings, &id, holder, start, t0);
                    assert_eq!(taken, *holder, "sent to {start}, held by {holder}");
                    assert!(hops <= 3, "{hops} hops");
                    missed += usize::from(follow(&last_only, &id, holder, start, t0).0 != *holder);
                }
            }
            // After the overlap: straight to the owner.
            for start in members {
                assert_eq!(follow(&routings, &id, owner, start, until).0, owner);
            }
        }
        assert!(
            away > 100,
            "the test sees traces held away from their owner: {away}"
        );
        assert!(missed > 50, "{missed}");
    }

    /// Rings are remembered up to a bound: a cluster changing many times within one overlap
    /// keeps the newest.
    #[test]
    fn the_rings_remembered_are_bounded() {
        let t0 = Instant::now();
        let mut r = Routing::new(ring(&["a:1"], "a:1"));
        for n in 0..20 {
            let peer = format!("p{n}:1");
            r = r.changed_to(
                ring(&["a:1", &peer], "a:1"),
                t0,
                t0 + Duration::from_secs(10),
            );
        }
        assert_eq!(r.previous.len(), RING_HISTORY);
        assert!(r.previous.last().unwrap().0.contains("p18:1"));
        // Expired rings are not carried into the next change.
        let later = r.changed_to(
            ring(&["a:1"], "a:1"),
            t0 + Duration::from_secs(11),
            t0 + Duration::from_secs(21),
        );
        assert_eq!(later.previous.len(), 1);
    }

    #[test]
    fn after_a_leave_its_traces_go_straight_to_their_new_owner() {
        let t0 = Instant::now();
        // "c:1" left: it is in the previous ring only, so there is no one to go back to.
        let at_a = Routing {
            current: ring(&["a:1", "b:1"], "a:1"),
            previous: vec![(
                ring(&["a:1", "b:1", "c:1"], "a:1"),
                t0 + Duration::from_secs(10),
            )],
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
