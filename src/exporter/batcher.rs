//! Batching: kept spans gather into requests bounded in spans and bytes; with a durable
//! queue each request is written to the log as it is made.

use super::*;

/// What travels from the queue's handle to the batcher: kept spans to batch (memory-only
/// queue), or requests already in the log (durable queue).
pub(super) enum Queued {
    Spans(Vec<KeptSpan>),
    Encoded(Encoded),
}

/// Spans gathering into the next request, with the estimated size of their encoding.
#[derive(Default)]
pub(super) struct Pending {
    pub(super) spans: Vec<KeptSpan>,
    pub(super) bytes: usize,
    /// Resources and scopes already counted (by address: written once per request).
    pub(super) origins: HashSet<usize>,
}

/// One export request: encoded, with its spans, and its record in the log if durable.
pub(super) struct Encoded {
    pub(super) spans: usize,
    pub(super) payload: Payload,
    pub(super) record: Option<u64>,
    /// Its spans' place in the trace log.
    pub(super) logged: Logged,
}

/// What an export request's spans hold of the trace log: their segments (kept on disk
/// until the upstream answers), the marks to write then, and how many of its spans are in
/// no log (lost if a shutdown cuts them short).
#[derive(Default)]
pub(super) struct Logged {
    pins: Vec<crate::storage::LogPin>,
    pub(super) marks: Vec<crate::storage::Mark>,
    pub(super) unlogged: usize,
}

impl Logged {
    pub(super) fn of(spans: &[KeptSpan]) -> Logged {
        use crate::storage::Mark;
        let mut out = Logged::default();
        for k in spans {
            // (Without a log no span has a pin: nothing is scanned.)
            let Some((pin, trace)) = k
                .span
                .origin
                .pin
                .as_ref()
                .and_then(|pin| Some((pin, scan::trace_id(k.span.bytes())?)))
            else {
                out.unlogged += 1;
                continue;
            };
            if !out.pins.iter().any(|p| p.same_segment(pin)) {
                out.pins.push(pin.clone());
            }
            match out.marks.last_mut() {
                Some(Mark::Delivered {
                    trace: t,
                    seq,
                    spans,
                }) if *t == trace.0 && *seq == pin.seq() => *spans += 1,
                _ => out.marks.push(Mark::Delivered {
                    trace: trace.0,
                    seq: pin.seq(),
                    spans: 1,
                }),
            }
        }
        out
    }
}

pub(super) enum Payload {
    Memory(Bytes),
    /// In the log only; read back when it is sent.
    Disk(wal::Location),
}

/// Gathers kept spans into requests bounded by `batch.max_spans` and `batch.max_bytes`,
/// encodes them (and writes them to the log), and starts at most `queue.concurrency`
/// exports at a time, oldest first.
pub(super) struct Batcher {
    pub(super) settings: ExporterSettings,
    pub(super) worker: Worker,
    pub(super) in_flight: Arc<Semaphore>,
    pub(super) pending: Pending,
    /// Encoded requests waiting for a free slot.
    pub(super) ready: VecDeque<Encoded>,
}

impl Batcher {
    pub(super) async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<Queued>,
        control: ExporterControl,
    ) {
        let timeout = self.settings.batch.timeout.0;
        let mut deadline = tokio::time::Instant::now();
        loop {
            let slot = {
                let in_flight = self.in_flight.clone();
                let waiting = !self.ready.is_empty();
                async move {
                    if waiting {
                        in_flight.acquire_owned().await.ok()
                    } else {
                        std::future::pending().await
                    }
                }
            };
            tokio::select! {
                biased;
                () = control.flush.cancelled() => break,
                Some(permit) = slot => self.start_one(permit),
                item = rx.recv() => match item {
                    None => break,
                    Some(Queued::Encoded(encoded)) => self.ready.push_back(encoded),
                    Some(Queued::Spans(spans)) => {
                        if self.pending.spans.is_empty() {
                            deadline = tokio::time::Instant::now() + timeout;
                        }
                        if self.add(spans) {
                            deadline = tokio::time::Instant::now() + timeout;
                        }
                    }
                },
                () = tokio::time::sleep_until(deadline), if !self.pending.spans.is_empty() => {
                    self.close();
                }
            }
        }
        // Flush: everything submitted before the flush signal is in the channel by now.
        while let Ok(item) = rx.try_recv() {
            match item {
                Queued::Encoded(encoded) => self.ready.push_back(encoded),
                Queued::Spans(spans) => {
                    self.add(spans);
                }
            }
        }
        self.close();
        while !self.ready.is_empty() {
            tokio::select! {
                biased;
                () = control.abort.cancelled() => break,
                permit = self.in_flight.clone().acquire_owned() => match permit {
                    Ok(permit) => self.start_one(permit),
                    Err(_) => break,
                },
            }
        }
        // The shutdown timeout ran out with requests still waiting: with a log they are
        // sent after the next start; without one they are lost.
        let queue = &self.worker.queue;
        for left in self.ready.drain(..) {
            if left.record.is_none() {
                queue.count_lost(Loss::Shutdown, left.logged.unlogged);
            }
            queue.answered(left.spans);
        }
        // Wait for every request in flight to finish (each honours `abort`).
        let _all = self
            .in_flight
            .acquire_many(self.settings.concurrency as u32)
            .await;
    }

    /// Adds spans to the pending request, closing it whenever the next span would take it
    /// past `max_spans` or `max_bytes`; returns whether a request was closed.
    pub(super) fn add(&mut self, spans: Vec<KeptSpan>) -> bool {
        let (max_spans, max_bytes) = (
            self.settings.batch.max_spans,
            self.settings.batch.max_bytes.0,
        );
        let mut closed = false;
        for k in spans {
            let own = k.span.len() + k.extra.as_ref().map_or(0, |e| e.len()) + SPAN_FRAMING;
            let key = Arc::as_ptr(&k.span.origin) as usize;
            let origin = &k.span.origin;
            let origin_bytes = origin.resource.len()
                + origin.scope.len()
                + origin.resource_schema_url.len()
                + origin.scope_schema_url.len()
                + 2 * SPAN_FRAMING;
            let mut bytes = own
                + if self.pending.origins.contains(&key) {
                    0
                } else {
                    origin_bytes
                };
            if !self.pending.spans.is_empty()
                && (self.pending.spans.len() >= max_spans || self.pending.bytes + bytes > max_bytes)
            {
                self.close();
                closed = true;
                bytes = own + origin_bytes;
            }
            self.pending.origins.insert(key);
            self.pending.bytes += bytes;
            self.pending.spans.push(k);
        }
        closed
    }

    /// Encodes the pending spans into requests of at most `max_bytes` (a single span may
    /// be larger: the upstream decides), writes them to the log when durable, and queues
    /// them.
    pub(super) fn close(&mut self) {
        let pending = std::mem::take(&mut self.pending);
        if pending.spans.is_empty() {
            return;
        }
        let mut requests = Vec::new();
        encode_within(
            &pending.spans,
            self.settings.batch.max_bytes.0,
            &mut requests,
        );
        let queue = self.worker.queue.clone();
        queue
            .unencoded
            .fetch_sub(pending.spans.len(), Ordering::AcqRel);
        let mut written = Vec::new();
        let mut start = 0;
        for (request, spans) in requests {
            match &queue.wal {
                None => self.ready.push_back(Encoded {
                    spans,
                    payload: Payload::Memory(self.settings.budget.charge(request)),
                    record: None,
                    logged: Logged::of(&pending.spans[start..start + spans]),
                }),
                Some(_) => {
                    queue.write_ahead(&pending.spans[start..start + spans], &request, &mut written);
                    self.ready.extend(written.drain(..));
                }
            }
            start += spans;
        }
        drop(pending);
    }

    /// Sends the oldest waiting request on its own task, holding `permit` until it is
    /// answered for.
    pub(super) fn start_one(&mut self, permit: OwnedSemaphorePermit) {
        let Some(next) = self.ready.pop_front() else {
            return;
        };
        let worker = self.worker.clone();
        tokio::spawn(async move {
            worker.export(next).await;
            drop(permit);
        });
    }
}

/// Encodes `spans` as requests of at most `max` bytes each, halving where one is larger.
pub(super) fn encode_within(spans: &[KeptSpan], max: usize, out: &mut Vec<(Bytes, usize)>) {
    let request = encode_request(spans);
    if request.len() > max && spans.len() > 1 {
        let (a, b) = spans.split_at(spans.len() / 2);
        encode_within(a, max, out);
        encode_within(b, max, out);
    } else {
        out.push((request, spans.len()));
    }
}
