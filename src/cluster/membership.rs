//! Between members: join and leave messages, the hand-off of held traces by a leaving
//! replica, and idempotency keys that let a receiver take a re-sent batch once.

use base64::Engine;

use super::*;
pub use crate::buffer::{CachedDecision, Handed, HeldTrace};

/// Idempotency keys remembered (in two generations): far more batches than are in flight.
pub(super) const SEEN_BATCHES: usize = 65_536;
/// Traces per hand-off request: their ids and times travel in one header (24 bytes each,
/// base64), well under the 16 KiB header list HTTP/2 servers accept by default.
const HANDOFF_TRACES: usize = 200;
const HANDOFF_ENTRY: usize = 24;
/// Decisions per request, in one header likewise: id, decision bits, reason, policy
/// (an index into the request's label table) and age in seconds — 30 bytes each.
const DECISIONS_PER_REQUEST: usize = 250;
const DECISION_ENTRY: usize = 30;
/// How long a join or leave message may take to be answered.
const MEMBERSHIP_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Membership {
    Join,
    Leave,
}

impl Membership {
    fn as_str(self) -> &'static str {
        match self {
            Membership::Join => "join",
            Membership::Leave => "leave",
        }
    }
}

/// What a member's request says beyond its spans (its cluster headers).
#[derive(Debug, Default, Clone)]
pub struct PeerRequest {
    /// The sender's address.
    pub from: String,
    /// How to take it.
    pub mode: Mode,
    /// Its idempotency key.
    pub batch: Option<u128>,
    /// Held traces handed off, with their times.
    pub handoff: HashMap<TraceId, Handed>,
    /// Recent decisions handed over by a leaving replica.
    pub decisions: Vec<(TraceId, CachedDecision)>,
    pub membership: Option<Membership>,
}

impl PeerRequest {
    /// Reads the cluster headers of a request forwarded by member `from`; a header that
    /// cannot be read is named.
    pub fn from_headers(from: &str, headers: &http::HeaderMap) -> Result<PeerRequest, String> {
        let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let batch = match text(BATCH_HEADER) {
            None => None,
            Some(v) => Some(
                u128::from_str_radix(v, 16)
                    .map_err(|_| format!("{BATCH_HEADER}: {v:?} is not a hexadecimal key"))?,
            ),
        };
        let membership = match text(MEMBERSHIP_HEADER) {
            None => None,
            Some("join") => Some(Membership::Join),
            Some("leave") => Some(Membership::Leave),
            Some(v) => {
                return Err(format!(
                    "{MEMBERSHIP_HEADER}: {v:?} is neither join nor leave"
                ));
            }
        };
        let handoff = match text(HANDOFF_HEADER) {
            None => HashMap::new(),
            Some(v) => decode_handoff(v).ok_or_else(|| {
                format!("{HANDOFF_HEADER}: not base64 of 24-byte (trace id, age, due) records")
            })?,
        };
        let decisions = match text(DECISIONS_HEADER) {
            None => Vec::new(),
            Some(v) => decode_decisions(v, Instant::now()).ok_or_else(|| {
                format!("{DECISIONS_HEADER}: not base64 of a label table and 30-byte decisions")
            })?,
        };
        Ok(PeerRequest {
            decisions,
            from: from.to_owned(),
            mode: match text(MODE_HEADER) {
                None => Mode::Route,
                Some("final") => Mode::Final,
                Some("ask") => Mode::Ask {
                    ttl: match text(ASK_TTL_HEADER) {
                        None => 0,
                        Some(v) => v.parse().map_err(|_| {
                            format!("{ASK_TTL_HEADER}: {v:?} is not a count from 0 to 255")
                        })?,
                    },
                },
                Some(v) => return Err(format!("{MODE_HEADER}: {v:?} is neither final nor ask")),
            },
            batch,
            handoff,
            membership,
        })
    }
}

fn encode_handoff(traces: &[(TraceId, Handed)]) -> String {
    let mut raw = Vec::with_capacity(traces.len() * HANDOFF_ENTRY);
    let ms = |d: Duration| u32::try_from(d.as_millis()).unwrap_or(u32::MAX);
    for (id, h) in traces {
        raw.extend_from_slice(&id.0);
        raw.extend_from_slice(&ms(h.age).to_be_bytes());
        // (u32::MAX: more parts of the trace follow.)
        let due_in = h.due_in.map_or(u32::MAX, |d| ms(d).min(u32::MAX - 1));
        raw.extend_from_slice(&due_in.to_be_bytes());
    }
    base64::engine::general_purpose::STANDARD_NO_PAD.encode(raw)
}

fn decode_handoff(value: &str) -> Option<HashMap<TraceId, Handed>> {
    let raw = base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(value.trim_end_matches('='))
        .ok()?;
    if raw.len() % HANDOFF_ENTRY != 0 {
        return None;
    }
    let raw_ms = |b: &[u8]| u32::from_be_bytes(b.try_into().expect("4 bytes"));
    let ms = |b: &[u8]| Duration::from_millis(u64::from(raw_ms(b)));
    Some(
        raw.chunks_exact(HANDOFF_ENTRY)
            .map(|r| {
                let id = TraceId(r[..16].try_into().expect("16 bytes"));
                (
                    id,
                    Handed {
                        age: ms(&r[16..20]),
                        due_in: (raw_ms(&r[20..24]) != u32::MAX).then(|| ms(&r[20..24])),
                    },
                )
            })
            .collect(),
    )
}

/// `[labels n][n × (len, bytes)][records]`, base64: the labels are the policies.
fn encode_decisions(decisions: &[(TraceId, CachedDecision)]) -> String {
    let mut labels: Vec<&str> = Vec::new();
    let mut records = Vec::with_capacity(decisions.len() * DECISION_ENTRY);
    for (id, d) in decisions {
        let (bits, by, reason) = d.to_wire();
        let by = &by[..by.len().min(255)];
        let index = match labels.iter().position(|l| *l == by) {
            Some(i) => i,
            None => {
                labels.push(by);
                labels.len() - 1
            }
        };
        records.extend_from_slice(&id.0);
        records.extend_from_slice(&bits.to_be_bytes());
        records.push(reason);
        records.push(u8::try_from(index).unwrap_or(u8::MAX));
        let age = u32::try_from(d.age(Instant::now()).as_secs()).unwrap_or(u32::MAX);
        records.extend_from_slice(&age.to_be_bytes());
    }
    let mut raw = vec![u8::try_from(labels.len()).unwrap_or(u8::MAX)];
    for l in labels.iter().take(255) {
        raw.push(l.len() as u8);
        raw.extend_from_slice(l.as_bytes());
    }
    raw.extend(records);
    base64::engine::general_purpose::STANDARD_NO_PAD.encode(raw)
}

fn decode_decisions(value: &str, now: Instant) -> Option<Vec<(TraceId, CachedDecision)>> {
    let raw = base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(value.trim_end_matches('='))
        .ok()?;
    let (&n, mut rest) = raw.split_first()?;
    let mut labels = Vec::with_capacity(usize::from(n));
    for _ in 0..n {
        let (&len, tail) = rest.split_first()?;
        let label = tail.get(..usize::from(len))?;
        labels.push(std::str::from_utf8(label).ok()?);
        rest = &tail[usize::from(len)..];
    }
    if rest.len() % DECISION_ENTRY != 0 {
        return None;
    }
    rest.chunks_exact(DECISION_ENTRY)
        .map(|r| {
            let id = TraceId(r[..16].try_into().ok()?);
            let bits = u64::from_be_bytes(r[16..24].try_into().ok()?);
            let by = labels.get(usize::from(r[25]))?;
            let age = u32::from_be_bytes(r[26..30].try_into().ok()?);
            let d = CachedDecision::from_wire(
                bits,
                by,
                r[24],
                Duration::from_secs(u64::from(age)),
                now,
            );
            Some((id, d))
        })
        .collect()
}

/// What a member answers to a join that matters to the joiner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinAnswer {
    /// The members it routed by without the joiner.
    pub previous: String,
    /// Whether the joiner is in its ring now.
    pub member: bool,
}

/// Idempotency keys of batches taken recently, in two generations (bounded, O(1)).
pub(super) struct Seen {
    current: HashSet<u128>,
    previous: HashSet<u128>,
    generation: usize,
}

impl Seen {
    pub(super) fn new(capacity: usize) -> Seen {
        Seen {
            current: HashSet::new(),
            previous: HashSet::new(),
            generation: capacity / 2,
        }
    }

    /// Remembers `key`; false if it was seen already.
    fn insert(&mut self, key: u128) -> bool {
        if self.current.contains(&key) || self.previous.contains(&key) {
            return false;
        }
        if self.current.len() >= self.generation {
            self.previous = std::mem::take(&mut self.current);
        }
        self.current.insert(key);
        true
    }

    fn remove(&mut self, key: u128) {
        self.current.remove(&key);
        self.previous.remove(&key);
    }
}

/// How a delivery to a peer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    Taken,
    /// The peer refused it or could not be reached: it does not have it.
    NotTaken,
    /// Sent, and never answered: the peer may have it.
    Unknown,
}

/// Attempts of a batch the peer does not take before it is taken out of the ring.
const ATTEMPTS: u32 = 3;
/// Longest wait between attempts while the owner pushes back (it is alive, only full).
const BACKPRESSURE_WAIT: Duration = Duration::from_millis(500);
/// How long a batch whose outcome is unknown is sent again to the same peer.
const UNKNOWN_HORIZON: Duration = Duration::from_secs(15);

impl Cluster {
    /// A client to `peer` (the sender header and the peers' token set on every request).
    pub(super) fn sink(&self, peer: &str) -> Option<OtlpGrpcSink> {
        let mut headers = std::collections::BTreeMap::new();
        headers.insert(FORWARDED_HEADER.to_owned(), self.me.clone());
        if let Some(auth) = &self.auth_header {
            headers.insert("authorization".to_owned(), auth.clone());
        }
        let (scheme, tls) = match &self.cfg.tls {
            Some(tls) => ("https", tls.clone()),
            None => ("http", Default::default()),
        };
        let cfg = OtlpExporterConfig {
            endpoint: format!("{scheme}://{peer}"),
            protocol: ExportProtocol::Grpc,
            timeout: Dur(forward::FORWARD_TIMEOUT),
            compression: Compression::None,
            compression_level: 1,
            headers,
            tls,
        };
        match OtlpGrpcSink::from(&cfg, self.local_ip) {
            Ok(sink) => Some(sink),
            Err(e) => {
                tracing::error!(peer = %peer, error = %e, "cannot forward to peer");
                None
            }
        }
    }

    /// The headers of one forwarded batch: its idempotency key, and how to take it.
    pub(super) fn batch_headers(&self, mode: Mode) -> http::HeaderMap {
        let seq = self.batch_seq.fetch_add(1, Ordering::Relaxed);
        let key = (u128::from(self.batch_prefix) << 64) | u128::from(seq);
        let mut headers = http::HeaderMap::new();
        headers.insert(
            BATCH_HEADER,
            http::HeaderValue::from_str(&format!("{key:x}")).expect("hex is a header value"),
        );
        match mode {
            Mode::Route => {}
            Mode::Final => {
                headers.insert(MODE_HEADER, http::HeaderValue::from_static("final"));
            }
            Mode::Ask { ttl } => {
                headers.insert(MODE_HEADER, http::HeaderValue::from_static("ask"));
                if ttl > 0 {
                    headers.insert(ASK_TTL_HEADER, http::HeaderValue::from(u16::from(ttl)));
                }
            }
        }
        headers
    }

    /// Sends `request` to `peer` until it is taken, refused, or its outcome stays unknown:
    /// while the peer pushes back it is waited for (until `patience`, or without end
    /// before shutdown); a broken connection after sending is retried with the same key.
    pub(super) async fn deliver(
        &self,
        peer: &str,
        sink: &OtlpGrpcSink,
        request: &Bytes,
        headers: &http::HeaderMap,
        patience: Option<tokio::time::Instant>,
    ) -> Outcome {
        let mut wait = Duration::from_millis(100);
        let mut failures = 0;
        let mut unknown = false;
        let horizon = Instant::now() + UNKNOWN_HORIZON;
        let patient = || {
            patience.map_or(!self.stop.is_cancelled(), |p| {
                tokio::time::Instant::now() < p
            })
        };
        loop {
            match sink.send_with(request.clone(), headers.clone()).await {
                Ok(_) => return Outcome::Taken,
                // The owner answered that it is full (with RetryInfo): it is alive, so it
                // stays in the ring and the batch waits for it.
                Err((SendError::Retryable(msg, Some(hint)), Delivery::Refused)) if patient() => {
                    tracing::debug!(peer, error = %msg, "peer pushes back; waiting");
                    tokio::time::sleep(hint.min(BACKPRESSURE_WAIT)).await;
                    continue;
                }
                Err((e, delivery)) => {
                    failures += 1;
                    let again = match delivery {
                        Delivery::Unknown => {
                            unknown = true;
                            Instant::now() < horizon
                        }
                        Delivery::NotSent => failures < ATTEMPTS,
                        Delivery::Refused => {
                            failures < ATTEMPTS && matches!(e, SendError::Retryable(..))
                        }
                    };
                    if !again {
                        tracing::warn!(peer, error = %e, outcome_unknown = unknown, "peer did not take forwarded spans");
                        return if unknown {
                            Outcome::Unknown
                        } else {
                            Outcome::NotTaken
                        };
                    }
                    tracing::debug!(peer, error = %e, ?delivery, failures, "forwarding failed; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// Takes a forwarded batch's key: false if a batch with it was taken already (a
    /// retry after an unknown outcome), which is then answered without taking it again.
    pub fn accept_batch(&self, key: u128) -> bool {
        let new = self.seen.lock().insert(key);
        if !new {
            self.metrics.cluster_duplicates.inc();
        }
        new
    }

    /// Forgets a batch's key when it could not be taken (the retry must go through).
    pub fn forget_batch(&self, key: u128) {
        self.seen.lock().remove(key);
    }

    /// A peer said it joins or leaves. The answer to a join: the ring this replica routed
    /// by without the joiner — before the change that added it, while that change's
    /// overlap is open, or the ring in force when the joiner is not a member here (yet) —
    /// and whether it is a member here.
    pub fn on_membership(&self, from: &str, m: Membership) -> Option<JoinAnswer> {
        let from = normalize(from);
        tracing::info!(peer = %from, message = m.as_str(), "cluster member says so");
        match m {
            Membership::Leave => {
                self.left.lock().insert(from.clone());
                self.rebuild();
                None
            }
            Membership::Join => {
                self.left.lock().remove(&from);
                self.down.lock().remove(&from);
                self.rebuild();
                let routing = self.routing.load();
                let members =
                    |ring: &Ring| ring.addrs().map(|a| &**a).collect::<Vec<_>>().join(",");
                if !routing.current.contains(&from) {
                    return Some(JoinAnswer {
                        previous: members(&routing.current),
                        member: false,
                    });
                }
                routing
                    .before(&from, Instant::now())
                    .map(|ring| JoinAnswer {
                        previous: members(ring),
                        member: true,
                    })
            }
        }
    }

    /// Waits (up to `limit`) until nothing is queued or in flight for `peer`: a leaving
    /// peer is answered once the spans routed to it before it left have reached it, so it
    /// can stop listening without a forward to it failing.
    pub async fn drained(&self, peer: &str, limit: Duration) {
        let peer = normalize(peer);
        let end = tokio::time::Instant::now() + limit;
        loop {
            let queued: usize = self
                .forwarders
                .lock()
                .iter()
                .filter(|((p, _), _)| **p == *peer)
                .map(|(_, f)| f.queued.load(Ordering::Acquire))
                .sum();
            if queued == 0 || tokio::time::Instant::now() >= end {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The answer to a join from an address that is not a member here (yet): the ring in
    /// force, which it is not in.
    pub fn answer_stranger(&self) -> JoinAnswer {
        let routing = self.routing.load();
        JoinAnswer {
            previous: routing
                .current
                .addrs()
                .map(|a| &**a)
                .collect::<Vec<_>>()
                .join(","),
            member: false,
        }
    }

    /// Sends a membership message to `peers`; returns those that took it.
    async fn announce(
        self: &Arc<Self>,
        m: Membership,
        peers: Vec<String>,
    ) -> Vec<(String, Option<JoinAnswer>)> {
        let mut sends = tokio::task::JoinSet::new();
        for peer in peers {
            let cluster = self.clone();
            sends.spawn(async move { cluster.announce_to(m, peer).await });
        }
        let mut told = Vec::new();
        while let Some(done) = sends.join_next().await {
            if let Ok(Some(answer)) = done {
                told.push(answer);
            }
        }
        told
    }

    async fn announce_to(
        &self,
        m: Membership,
        peer: String,
    ) -> Option<(String, Option<JoinAnswer>)> {
        {
            let sink = self.sink(&peer)?;
            let mut headers = http::HeaderMap::new();
            headers.insert(
                MEMBERSHIP_HEADER,
                http::HeaderValue::from_static(m.as_str()),
            );
            match tokio::time::timeout(MEMBERSHIP_TIMEOUT, sink.send_with(Bytes::new(), headers))
                .await
            {
                Ok(Ok((_, headers))) => {
                    let answer = headers
                        .get(PREVIOUS_RING_HEADER)
                        .and_then(|v| v.to_str().ok())
                        .map(|previous| JoinAnswer {
                            previous: previous.to_owned(),
                            member: !headers.contains_key(NOT_A_MEMBER_HEADER),
                        });
                    Some((peer, answer))
                }
                Ok(Err((e, _))) => {
                    tracing::debug!(peer, error = %e, message = m.as_str(), "peer did not take a membership message");
                    None
                }
                Err(_) => None,
            }
        }
    }

    /// Tells peers that have not heard it yet that this replica is a member. A peer that
    /// routed without it answers with that ring: this replica then routes by it as its
    /// previous ring through an overlap (traces held there stay there), and a peer that
    /// has not taken it into its ring yet (static peers not reloaded) is told again at the
    /// next refresh, the overlap lasting meanwhile.
    pub async fn announce_join(self: &Arc<Self>) {
        let peers: Vec<String> = self.unannounced.lock().iter().cloned().collect();
        if peers.is_empty() {
            return;
        }
        let mut previous = None;
        for (peer, answer) in self.announce(Membership::Join, peers).await {
            if let Some(answer) = answer {
                if answer.member {
                    self.unannounced.lock().remove(&peer);
                }
                previous = previous.or(Some(answer.previous));
            } else {
                self.unannounced.lock().remove(&peer);
            }
        }
        let Some(before) = previous else { return };
        let _one_at_a_time = self.changing.lock();
        let routing = self.routing.load();
        let members: Vec<String> = before.split(',').map(normalize).collect();
        if !routing.overlapping(Instant::now()) {
            tracing::info!(previous = ?members, overlap = ?self.overlap, "joined a running cluster: traces its members hold stay with them through the overlap");
        }
        let now = Instant::now();
        self.routing.store(Arc::new(routing.remembering(
            Ring::without_me(members, &self.me),
            now,
            now + self.overlap,
        )));
    }

    /// Leaves the ring: first hands `decisions` (recent ones, made here) to the traces'
    /// owners in the ring without this replica, so that late spans follow them there; then
    /// owns nothing from now on, and tells every peer at once (those that do not answer
    /// learn it when forwards to it fail).
    pub async fn leave(
        self: &Arc<Self>,
        decisions: Vec<(TraceId, CachedDecision)>,
        until: tokio::time::Instant,
    ) {
        let after = {
            let routing = self.routing.load();
            Ring::without_me(
                routing.current.addrs().map(|a| a.to_string()).collect(),
                &self.me,
            )
        };
        let mut per_peer: HashMap<Arc<str>, Vec<(TraceId, CachedDecision)>> = HashMap::new();
        for (id, d) in decisions {
            if let Some(peer) = after.elsewhere(&id) {
                per_peer.entry(peer.clone()).or_default().push((id, d));
            }
        }
        let mut sends = tokio::task::JoinSet::new();
        for (peer, decisions) in per_peer {
            let cluster = self.clone();
            sends.spawn(async move {
                let Some(sink) = cluster.sink(&peer) else {
                    return 0;
                };
                let mut sent = 0;
                for chunk in decisions.chunks(DECISIONS_PER_REQUEST) {
                    let mut headers = cluster.batch_headers(Mode::Final);
                    headers.insert(
                        DECISIONS_HEADER,
                        http::HeaderValue::from_str(&encode_decisions(chunk)).expect("base64"),
                    );
                    let delivered = tokio::time::timeout_at(
                        until,
                        cluster.deliver(&peer, &sink, &Bytes::new(), &headers, Some(until)),
                    )
                    .await;
                    if delivered != Ok(Outcome::Taken) {
                        break;
                    }
                    sent += chunk.len();
                }
                sent
            });
        }
        let mut handed = 0;
        while let Some(done) = sends.join_next().await {
            handed += done.unwrap_or(0);
        }
        tracing::info!(
            decisions = handed,
            "handed recent decisions to their traces' new owners"
        );
        self.leaving.store(true, Ordering::SeqCst);
        self.rebuild();
        let peers: Vec<String> = self
            .known
            .lock()
            .iter()
            .filter(|p| **p != self.me)
            .cloned()
            .collect();
        let told = self.announce(Membership::Leave, peers.clone()).await;
        tracing::info!(
            told = told.len(),
            peers = peers.len(),
            "left the cluster ring; handing held traces to their new owners"
        );
    }

    /// Hands held traces to their owners in the ring without this replica, with their
    /// ages and deadlines, until `until`; returns the spans of the traces no peer took.
    pub async fn hand_off(
        self: &Arc<Self>,
        traces: Vec<HeldTrace>,
        until: tokio::time::Instant,
    ) -> Vec<HeldSpan> {
        let routing = self.routing.load();
        let mut per_peer: HashMap<Arc<str>, Vec<HeldTrace>> = HashMap::new();
        let mut kept = Vec::new();
        for t in traces {
            match routing.current.elsewhere(&t.id) {
                Some(peer) => per_peer.entry(peer.clone()).or_default().push(t),
                None => kept.extend(t.spans),
            }
        }
        let mut sends = tokio::task::JoinSet::new();
        for (peer, traces) in per_peer {
            let cluster = self.clone();
            sends.spawn(async move { cluster.hand_off_to(&peer, traces, until).await });
        }
        while let Some(done) = sends.join_next().await {
            kept.extend(done.unwrap_or_default());
        }
        kept
    }

    async fn hand_off_to(
        &self,
        peer: &Arc<str>,
        traces: Vec<HeldTrace>,
        until: tokio::time::Instant,
    ) -> Vec<HeldSpan> {
        let Some(sink) = self.sink(peer) else {
            return traces.into_iter().flat_map(|t| t.spans).collect();
        };
        let handed = self.metrics.cluster_handed_off.with_label_values(&[peer]);
        let mut rest = Vec::new();
        let mut batches = handoff_batches(traces).into_iter();
        while let Some((entries, spans)) = batches.next() {
            if tokio::time::Instant::now() >= until {
                rest.extend(spans);
                rest.extend(batches.flat_map(|(_, s)| s));
                break;
            }
            let mut headers = self.batch_headers(Mode::Final);
            headers.insert(
                HANDOFF_HEADER,
                http::HeaderValue::from_str(&encode_handoff(&entries)).expect("base64"),
            );
            let request = encode_verbatim(&spans);
            let outcome = tokio::time::timeout_at(
                until,
                self.deliver(peer, &sink, &request, &headers, Some(until)),
            )
            .await
            .unwrap_or(Outcome::Unknown);
            match outcome {
                Outcome::Taken => handed.inc_by(entries.len() as u64),
                // Decided here, and counted so, by the caller.
                Outcome::NotTaken | Outcome::Unknown => rest.extend(spans),
            }
        }
        rest
    }
}

/// One hand-off request: its traces' times (the header) and their spans (the body).
type HandoffBatch = (Vec<(TraceId, Handed)>, Vec<HeldSpan>);

/// Hand-off requests: whole traces together, at most [`HANDOFF_TRACES`] traces and
/// [`forward::FORWARD_BATCH_BYTES`] bytes each (a larger trace goes in parts, each
/// carrying its times).
fn handoff_batches(traces: Vec<HeldTrace>) -> Vec<HandoffBatch> {
    let mut out: Vec<HandoffBatch> = Vec::new();
    let mut bytes = 0;
    for t in traces {
        let entry = (t.id, t.handed);
        for span in t.spans {
            let size = forward::span_wire_bytes(&span);
            let fits = out.last().is_some_and(|(entries, spans)| {
                !spans.is_empty()
                    && bytes + size <= forward::FORWARD_BATCH_BYTES
                    && (entries.last().is_some_and(|(id, _)| *id == entry.0)
                        || entries.len() < HANDOFF_TRACES)
            });
            if !fits {
                out.push((Vec::new(), Vec::new()));
                bytes = 0;
            }
            if !fits
                && let Some((before, _)) = out.iter_mut().rev().nth(1)
                && let Some(last) = before.last_mut()
                && last.0 == entry.0
            {
                // The trace goes on in this request: its deadline waits for the last part.
                last.1.due_in = None;
            }
            let (entries, spans) = out.last_mut().expect("pushed");
            if entries.last().is_none_or(|(id, _)| *id != entry.0) {
                entries.push(entry);
            }
            bytes += size;
            spans.push(span);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A gRPC server on 127.0.0.1 that records each request's idempotency key and resets
    /// the stream of the first `lose` requests after reading them (as a peer whose answer is
    /// lost: it has the request, the sender does not know).
    async fn lossy_peer(lose: usize) -> (String, Arc<Mutex<Vec<String>>>) {
        use hyper_util::rt::{TokioExecutor, TokioIo};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let keys = Arc::new(Mutex::new(Vec::new()));
        let seen = keys.clone();
        tokio::spawn(async move {
            loop {
                let (io, _) = listener.accept().await.unwrap();
                let seen = seen.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let seen = seen.clone();
                            async move {
                                let key = req
                                    .headers()
                                    .get(BATCH_HEADER)
                                    .map(|v| v.to_str().unwrap().to_owned());
                                let _ = http_body_util::BodyExt::collect(req.into_body()).await;
                                let n = {
                                    let mut seen = seen.lock();
                                    seen.push(key.unwrap_or_default());
                                    seen.len()
                                };
                                if n <= lose {
                                    return Err::<http::Response<http_body_util::Full<Bytes>>, _>(
                                        std::io::Error::other("answer lost"),
                                    );
                                }
                                Ok(http::Response::builder()
                                    .header("content-type", "application/grpc")
                                    .header("grpc-status", "0")
                                    .body(http_body_util::Full::new(Bytes::new()))
                                    .unwrap())
                            }
                        },
                    );
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .http2_only()
                        .serve_connection(TokioIo::new(io), service)
                        .await;
                });
            }
        });
        (addr, keys)
    }

    fn cluster_of(peer: &str) -> Arc<Cluster> {
        let cfg = ClusterConfig {
            self_address: Some("127.0.0.1:1".into()),
            peers: vec!["127.0.0.1:1".into(), peer.into()],
            ..ClusterConfig::default()
        };
        Cluster::new(&cfg, Duration::from_secs(1), None, Metrics::new()).0
    }

    #[tokio::test]
    async fn a_batch_whose_answer_is_lost_is_sent_again_with_its_key() {
        let (peer, keys) = lossy_peer(2).await;
        let cluster = cluster_of(&peer);
        let sink = cluster.sink(&peer).unwrap();
        let headers = cluster.batch_headers(Mode::Route);
        let outcome = cluster
            .deliver(&peer, &sink, &Bytes::new(), &headers, None)
            .await;
        assert_eq!(outcome, Outcome::Taken);
        let keys = keys.lock().clone();
        assert_eq!(keys.len(), 3, "two answers lost, the third taken");
        assert!(!keys[0].is_empty());
        assert!(
            keys.iter().all(|k| *k == keys[0]),
            "one key throughout: {keys:?}"
        );
    }

    #[tokio::test]
    async fn a_peer_that_cannot_be_reached_has_not_taken_the_batch() {
        // Nothing listens on the discard port: nothing was sent, the spans go elsewhere.
        let cluster = cluster_of("127.0.0.1:9");
        let sink = cluster.sink("127.0.0.1:9").unwrap();
        let headers = cluster.batch_headers(Mode::Final);
        let outcome = cluster
            .deliver("127.0.0.1:9", &sink, &Bytes::new(), &headers, None)
            .await;
        assert_eq!(outcome, Outcome::NotTaken);
    }

    #[test]
    fn handoff_records_survive_the_header() {
        let entries = vec![
            (
                TraceId([7; 16]),
                Handed {
                    age: Duration::from_millis(1_234),
                    due_in: Some(Duration::from_millis(8_766)),
                },
            ),
            (
                TraceId([9; 16]),
                Handed {
                    age: Duration::ZERO,
                    due_in: Some(Duration::ZERO),
                },
            ),
            (
                TraceId([11; 16]),
                Handed {
                    age: Duration::from_millis(40),
                    due_in: None,
                },
            ),
        ];
        let header = encode_handoff(&entries);
        let back = decode_handoff(&header).expect("decodes");
        assert_eq!(back.len(), 3);
        for (id, handed) in &entries {
            assert_eq!(back[id], *handed);
        }
        // Padded base64 (as some encoders write binary metadata) reads the same.
        assert_eq!(decode_handoff(&format!("{header}==")).unwrap().len(), 3);
        assert!(decode_handoff("AAAA").is_none(), "not a whole record");
        // The largest batch stays well under a 16 KiB header list.
        let many: Vec<_> = (0..HANDOFF_TRACES)
            .map(|i| (TraceId([i as u8; 16]), entries[0].1))
            .collect();
        assert!(encode_handoff(&many).len() < 8 * 1024);
    }

    #[test]
    fn decisions_survive_the_header_with_their_policy() {
        let now = Instant::now();
        let d = |bits: u64, by: &str| {
            CachedDecision::from_wire(bits, by, 1, Duration::from_secs(3), now)
        };
        let decisions = vec![
            (TraceId([1; 16]), d(1 << 63, "errors")),
            (TraceId([2; 16]), d(0x0123, "base_rate")),
            (TraceId([3; 16]), d(1 << 63, "errors")),
        ];
        let header = encode_decisions(&decisions);
        let back = decode_decisions(&header, now).expect("decodes");
        assert_eq!(back.len(), 3);
        for ((id, d), (id2, d2)) in decisions.iter().zip(&back) {
            assert_eq!(id, id2);
            assert_eq!(d.keep(), d2.keep());
            assert_eq!(d.threshold(), d2.threshold());
            assert_eq!(d.by().label(), d2.by().label());
            assert_eq!(d.reason(), d2.reason());
        }
        assert_eq!(back[0].1.by().label(), "errors");
        assert!(
            decode_decisions("AQ", now).is_none(),
            "a label table cut short"
        );
        let many: Vec<_> = (0..DECISIONS_PER_REQUEST)
            .map(|i| {
                (
                    TraceId([i as u8; 16]),
                    d(1 << 63, "a-rather-long-policy-name"),
                )
            })
            .collect();
        assert!(encode_decisions(&many).len() < 11 * 1024);
    }

    #[test]
    fn a_key_is_taken_once_until_forgotten() {
        let mut seen = Seen::new(4);
        assert!(seen.insert(1));
        assert!(!seen.insert(1), "a retry of a batch taken");
        seen.remove(1);
        assert!(
            seen.insert(1),
            "a batch that could not be taken goes through again"
        );
        for k in 2..=4 {
            assert!(seen.insert(k));
        }
        // Bounded: the oldest generation is forgotten.
        assert!(seen.current.len() + seen.previous.len() <= 4);
    }

    #[test]
    fn hand_off_batches_keep_traces_together_and_bounded() {
        let span = crate::cluster::tests::held_span;
        let handed = Handed {
            age: Duration::from_secs(1),
            due_in: Some(Duration::from_secs(2)),
        };
        let traces: Vec<HeldTrace> = (0..450)
            .map(|i| HeldTrace {
                id: TraceId([
                    (i % 256) as u8,
                    (i / 256) as u8,
                    1,
                    1,
                    1,
                    1,
                    1,
                    1,
                    1,
                    1,
                    1,
                    1,
                    1,
                    1,
                    1,
                    1,
                ]),
                handed,
                spans: vec![span(100), span(100)],
            })
            .chain(std::iter::once(HeldTrace {
                id: TraceId([0xee; 16]),
                handed,
                spans: (0..3)
                    .map(|_| span(forward::FORWARD_BATCH_BYTES / 2))
                    .collect(),
            }))
            .collect();
        let batches = handoff_batches(traces);
        let spans: usize = batches.iter().map(|(_, s)| s.len()).sum();
        assert_eq!(spans, 903);
        for (entries, spans) in &batches {
            assert!(entries.len() <= HANDOFF_TRACES);
            assert!(
                spans.len() == 1
                    || spans.iter().map(forward::span_wire_bytes).sum::<usize>()
                        <= forward::FORWARD_BATCH_BYTES
            );
        }
        // Small traces are never cut in two; the large one goes in parts, each with its
        // age, and only the last with its deadline (the receiver holds the parts till then).
        let big: Vec<Handed> = batches
            .iter()
            .flat_map(|(e, _)| e.iter().filter(|(id, _)| *id == TraceId([0xee; 16])))
            .map(|(_, h)| *h)
            .collect();
        assert!(big.len() >= 2);
        let (last, before) = big.split_last().unwrap();
        assert_eq!(*last, handed);
        for part in before {
            assert_eq!(part.age, handed.age);
            assert_eq!(part.due_in, None);
        }
        assert!(
            batches
                .iter()
                .flat_map(|(e, _)| e)
                .filter(|(id, _)| *id != TraceId([0xee; 16]))
                .all(|(_, h)| *h == handed)
        );
        let mut seen = HashSet::new();
        for (entries, _) in &batches {
            for (id, _) in entries {
                assert!(
                    seen.insert(*id) || *id == TraceId([0xee; 16]),
                    "a trace cut in two"
                );
            }
        }
    }
}
