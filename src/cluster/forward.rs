//! Forwarding: spans of traces another replica owns are queued per peer and sent to it in
//! batches bounded in spans and bytes; what a peer does not take comes back to be decided
//! here.

use super::*;

/// Forwarded spans are sent in batches of at most this many spans, and this many bytes
/// (below every receiver's `max_request_bytes`, and gRPC's default 4 MiB message)…
const FORWARD_BATCH_SPANS: usize = 2048;
pub(super) const FORWARD_BATCH_BYTES: usize = crate::exporter::config::DEFAULT_BATCH_BYTES;
/// …or this long after the first span of a batch.
const FORWARD_BATCH_TIMEOUT: Duration = Duration::from_millis(20);
pub(super) const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);

/// One peer's forwarding queue.
pub(super) struct Forwarder {
    tx: mpsc::UnboundedSender<Vec<HeldSpan>>,
    pub(super) queued: Arc<AtomicUsize>,
}

impl Cluster {
    /// Queues spans for `peer`, to be taken as `mode` says; what its queue cannot take is
    /// handed back (taken here).
    pub fn forward(
        self: &Arc<Self>,
        peer: &Arc<str>,
        mode: Mode,
        spans: Vec<HeldSpan>,
    ) -> Result<(), Vec<HeldSpan>> {
        let n = spans.len();
        let mut forwarders = self.forwarders.lock();
        if self.stop.is_cancelled() {
            // Shutting down: forwarders are flushed already. (Checked under the lock
            // `flush` clears them with, so no forwarder starts after it.)
            return Err(spans);
        }
        let key = (peer.clone(), mode);
        let f = match forwarders.get(&key) {
            Some(f) => f,
            None => match self.start_forwarder(peer, mode) {
                Some(f) => forwarders.entry(key).or_insert(f),
                None => return Err(spans),
            },
        };
        let admitted = f
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                (q + n <= self.cfg.forward_queue_spans).then_some(q + n)
            })
            .is_ok();
        if !admitted {
            return Err(spans);
        }
        f.tx.send(spans).map_err(|e| e.0)
    }

    pub(super) fn start_forwarder(
        self: &Arc<Self>,
        peer: &Arc<str>,
        mode: Mode,
    ) -> Option<Forwarder> {
        let sink = self.sink(peer)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(run_forwarder(
            self.clone(),
            peer.clone(),
            mode,
            sink,
            rx,
            queued.clone(),
        ));
        self.tasks.lock().push((task, queued.clone()));
        Some(Forwarder { tx, queued })
    }

    /// Sends what is queued for every peer and stops (shutdown); spans that cannot be
    /// sent go to the fallback, to be decided here. What is still queued or in flight at
    /// `deadline` is given up: returns how many spans that was (their peers may or may not
    /// have taken the batches in flight). No forwarder runs once this returns.
    pub async fn flush(&self, deadline: tokio::time::Instant) -> usize {
        self.stop.cancel();
        self.forwarders.lock().clear();
        let mut tasks = std::mem::take(&mut *self.tasks.lock());
        let all_sent = async {
            for (t, _) in tasks.iter_mut() {
                let _ = t.await;
            }
        };
        if tokio::time::timeout_at(deadline, all_sent).await.is_ok() {
            return 0;
        }
        for (t, _) in &tasks {
            t.abort();
        }
        let mut cut = 0;
        for (t, queued) in tasks {
            if !t.is_finished() {
                // Ends at its next await: a batch is sent back, or counted sent, within
                // one poll, so what `queued` says after this is what was given up.
                let _ = t.await;
            }
            cut += queued.load(Ordering::Acquire);
        }
        cut
    }
}

async fn run_forwarder(
    cluster: Arc<Cluster>,
    peer: Arc<str>,
    mode: Mode,
    sink: OtlpGrpcSink,
    mut rx: mpsc::UnboundedReceiver<Vec<HeldSpan>>,
    queued: Arc<AtomicUsize>,
) {
    let forwarded = cluster
        .metrics
        .cluster_forwarded
        .with_label_values(&[&peer]);
    let failures = cluster
        .metrics
        .cluster_forward_failures
        .with_label_values(&[&peer]);
    let mut pending: Vec<HeldSpan> = Vec::new();
    let mut deadline = tokio::time::Instant::now();
    loop {
        let closed = tokio::select! {
            item = rx.recv() => match item {
                Some(spans) => {
                    if pending.is_empty() {
                        deadline = tokio::time::Instant::now() + FORWARD_BATCH_TIMEOUT;
                    }
                    pending.extend(spans);
                    if pending.len() < FORWARD_BATCH_SPANS && wire_bytes(&pending) < FORWARD_BATCH_BYTES {
                        continue;
                    }
                    false
                }
                None => true,
            },
            () = tokio::time::sleep_until(deadline), if !pending.is_empty() => false,
        };
        while !pending.is_empty() {
            let take = batch_len(&pending);
            let rest = pending.split_off(take);
            let batch = std::mem::replace(&mut pending, rest);
            let n = batch.len();
            send_batch(&cluster, &peer, mode, &sink, batch, &forwarded, &failures).await;
            queued.fetch_sub(n, Ordering::AcqRel);
        }
        if closed {
            // A peer that left: its series go (a peer merely down keeps its forwarder).
            if !cluster.known.lock().iter().any(|k| **k == *peer) {
                for vec in [
                    &cluster.metrics.cluster_forwarded,
                    &cluster.metrics.cluster_forward_failures,
                    &cluster.metrics.cluster_received,
                ] {
                    let _ = vec.remove_label_values(&[&peer]);
                }
            }
            return;
        }
    }
}

/// Encoded size of forwarded spans (resources and scopes counted per span: an upper bound).
fn wire_bytes(spans: &[HeldSpan]) -> usize {
    spans.iter().map(span_wire_bytes).sum()
}

pub(super) fn span_wire_bytes(s: &HeldSpan) -> usize {
    s.len() + s.origin.resource.len() + s.origin.scope.len() + 32
}

/// How many of the first spans make one batch within the span and byte bounds (at least
/// one).
fn batch_len(spans: &[HeldSpan]) -> usize {
    let mut bytes = 0;
    for (i, s) in spans.iter().enumerate().take(FORWARD_BATCH_SPANS) {
        bytes += span_wire_bytes(s);
        if bytes > FORWARD_BATCH_BYTES && i > 0 {
            return i;
        }
    }
    spans.len().min(FORWARD_BATCH_SPANS)
}

async fn send_batch(
    cluster: &Cluster,
    peer: &str,
    mode: Mode,
    sink: &OtlpGrpcSink,
    batch: Vec<HeldSpan>,
    forwarded: &IntCounter,
    failures: &IntCounter,
) {
    let request = encode_verbatim(&batch);
    if cluster.is_down(peer) {
        // It failed a batch lately: the rest of its queue goes to the traces' next owner
        // now, not after a delivery horizon each (15 s apiece for a peer that hangs).
        failures.inc();
        let _ = cluster.fallback.send((request, true));
        return;
    }
    let headers = cluster.batch_headers(mode);
    let outcome = cluster.deliver(peer, sink, &request, &headers, None).await;
    if outcome == membership::Outcome::Taken {
        forwarded.inc_by(batch.len() as u64);
        return;
    }
    failures.inc();
    if outcome == membership::Outcome::Unknown {
        // The peer may have these spans: if it does, they are now in two places.
        cluster.count_split(&batch, "unknown_outcome", peer);
    }
    tracing::warn!(
        peer,
        spans = batch.len(),
        ?outcome,
        "peer did not take forwarded spans; leaving it out of the ring for a while and sending them to their traces' next owner"
    );
    cluster.mark_down(peer);
    // Routed again over the ring without the peer (or decided here, shutting down).
    let _ = cluster.fallback.send((request, true));
}
