//! Forwarding: spans of traces another replica owns are queued per peer and sent to it in
//! batches bounded in spans and bytes; what a peer does not take comes back to be decided
//! here.

use super::*;

/// Forwarded spans are sent in batches of at most this many spans, and this many bytes
/// (below every receiver's `max_request_bytes`, and gRPC's default 4 MiB message)…
const FORWARD_BATCH_SPANS: usize = 2048;
const FORWARD_BATCH_BYTES: usize = crate::exporter::config::DEFAULT_BATCH_BYTES;
/// …or this long after the first span of a batch.
const FORWARD_BATCH_TIMEOUT: Duration = Duration::from_millis(20);
/// Attempts per batch before the peer is taken out of the ring.
const FORWARD_ATTEMPTS: u32 = 3;
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait between attempts while the owner pushes back (it is alive, only full).
const BACKPRESSURE_WAIT: Duration = Duration::from_millis(500);

/// One peer's forwarding queue.
pub(super) struct Forwarder {
    tx: mpsc::UnboundedSender<Vec<HeldSpan>>,
    pub(super) queued: Arc<AtomicUsize>,
}

impl Cluster {
    /// Queues spans for `peer`; what its queue cannot take is handed back (taken here).
    pub fn forward(
        self: &Arc<Self>,
        peer: &Arc<str>,
        spans: Vec<HeldSpan>,
    ) -> Result<(), Vec<HeldSpan>> {
        let n = spans.len();
        let mut forwarders = self.forwarders.lock();
        let f = match forwarders.get(peer) {
            Some(f) => f,
            None => match self.start_forwarder(peer) {
                Some(f) => forwarders.entry(peer.clone()).or_insert(f),
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

    pub(super) fn start_forwarder(self: &Arc<Self>, peer: &Arc<str>) -> Option<Forwarder> {
        let mut headers = std::collections::BTreeMap::new();
        headers.insert(FORWARDED_HEADER.to_owned(), self.me.clone());
        if let Some(auth) = &self.auth_header {
            headers.insert("authorization".to_owned(), auth.clone());
        }
        let (scheme, tls) = match &self.cfg.tls {
            Some(tls) => ("https", tls.clone()),
            None => ("http", Default::default()),
        };
        let sink = OtlpGrpcSink::new(&OtlpExporterConfig {
            endpoint: format!("{scheme}://{peer}"),
            protocol: ExportProtocol::Grpc,
            timeout: Dur(FORWARD_TIMEOUT),
            compression: Compression::None,
            compression_level: 1,
            headers,
            tls,
        });
        let sink = match sink {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(peer = %peer, error = %e, "cannot forward to peer");
                return None;
            }
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(run_forwarder(
            self.clone(),
            peer.clone(),
            sink,
            rx,
            queued.clone(),
        ));
        self.tasks.lock().push(task);
        Some(Forwarder { tx, queued })
    }

    /// Sends what is queued for every peer and stops (shutdown); spans that cannot be
    /// sent go to the fallback, to be decided here.
    pub async fn flush(&self) {
        self.stop.cancel();
        self.forwarders.lock().clear();
        let tasks = std::mem::take(&mut *self.tasks.lock());
        for t in tasks {
            let _ = t.await;
        }
    }
}

async fn run_forwarder(
    cluster: Arc<Cluster>,
    peer: Arc<str>,
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
            send_batch(&cluster, &peer, &sink, batch, &forwarded, &failures).await;
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

fn span_wire_bytes(s: &HeldSpan) -> usize {
    s.bytes.len() + s.origin.resource.len() + s.origin.scope.len() + 32
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
    sink: &OtlpGrpcSink,
    batch: Vec<HeldSpan>,
    forwarded: &IntCounter,
    failures: &IntCounter,
) {
    let request = encode_verbatim(&batch);
    let mut wait = Duration::from_millis(100);
    let mut attempt = 0;
    while attempt < FORWARD_ATTEMPTS {
        attempt += 1;
        match sink.send(request.clone()).await {
            Ok(_) => {
                forwarded.inc_by(batch.len() as u64);
                return;
            }
            // The owner answered that it is full (with RetryInfo): it is alive, so it stays
            // in the ring and the batch waits for it, until shutdown.
            Err(SendError::Retryable(msg, Some(hint))) if !cluster.stop.is_cancelled() => {
                tracing::debug!(peer, error = %msg, "peer pushes back; waiting");
                attempt -= 1;
                tokio::time::sleep(hint.min(BACKPRESSURE_WAIT)).await;
            }
            Err(SendError::Retryable(msg, _)) if attempt < FORWARD_ATTEMPTS => {
                tracing::debug!(peer, error = %msg, attempt, "forwarding failed; retrying");
                tokio::time::sleep(wait).await;
                wait *= 2;
            }
            Err(e) => {
                failures.inc();
                tracing::warn!(peer, spans = batch.len(), error = %e, "peer cannot take forwarded spans; taking them here and leaving it out of the ring for a while");
                cluster.mark_down(peer);
                break;
            }
        }
    }
    // Decided here, with whatever else of their traces arrives here.
    let _ = cluster.fallback.send(request);
}
