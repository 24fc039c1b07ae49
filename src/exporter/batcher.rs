//! Batching: kept spans gather into batches bounded in spans and (by an estimate that is
//! never below the encoding) in bytes. A batch waits as its spans; it is encoded when a slot
//! to send it is free.

use super::*;

/// Spans gathering into the next request, with the estimated size of their encoding.
#[derive(Default)]
pub(super) struct Pending {
    pub(super) spans: Vec<KeptSpan>,
    pub(super) bytes: usize,
    /// Resources and scopes already counted (by address: written once per request).
    pub(super) origins: HashSet<usize>,
}

/// One export request's spans, waiting for a slot to be sent in, with what they hold of
/// the trace log.
pub(super) struct Batch {
    pub(super) spans: Vec<KeptSpan>,
    pub(super) logged: Logged,
}

/// What an export request's spans hold of the trace log on disk: their segments (kept
/// until the upstream answers), the marks to write then, and how many of its spans are in
/// no such log (lost if a shutdown cuts them short).
#[derive(Default)]
pub(super) struct Logged {
    pins: Vec<crate::storage::LogPin>,
    pub(super) marks: Vec<crate::storage::Mark>,
    pub(super) perishable: usize,
}

impl Logged {
    /// What `spans` hold of the log, if it is on disk (`durable`): a log in memory is not
    /// replayed, so its spans perish with the process like any other.
    pub(super) fn of(spans: &[KeptSpan], durable: bool) -> Logged {
        use crate::storage::Mark;
        let mut out = Logged::default();
        for k in spans {
            let Some((pin, trace)) = k
                .span
                .origin
                .pin
                .as_ref()
                .filter(|_| durable)
                .and_then(|pin| Some((pin, scan::trace_id(k.span.bytes())?)))
            else {
                out.perishable += 1;
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

/// Gathers kept spans into batches bounded by `batch.max_spans` and `batch.max_bytes`, and
/// starts at most `queue.concurrency` exports at a time, oldest first.
pub(super) struct Batcher {
    pub(super) settings: ExporterSettings,
    pub(super) worker: Worker,
    pub(super) in_flight: Arc<Semaphore>,
    pub(super) pending: Pending,
    /// Batches waiting for a free slot.
    pub(super) ready: VecDeque<Batch>,
}

impl Batcher {
    pub(super) async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<Vec<KeptSpan>>,
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
                    Some(spans) => {
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
        // Closed first, so that what is submitted from now on (a receiver that outlived the
        // shutdown timeout) is refused and counted at once, not left in the channel.
        rx.close();
        while let Ok(spans) = rx.try_recv() {
            self.add(spans);
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
        // The shutdown timeout ran out with batches still waiting: what the log on disk
        // holds is sent after the next start; the rest is lost.
        let queue = &self.worker.queue;
        for left in self.ready.drain(..) {
            queue.count_lost(Loss::Shutdown, left.logged.perishable);
            queue.answered(left.spans.len());
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

    /// Closes the pending batch: it waits for a slot as it is (encoded only then).
    pub(super) fn close(&mut self) {
        let pending = std::mem::take(&mut self.pending);
        if pending.spans.is_empty() {
            return;
        }
        let logged = Logged::of(&pending.spans, self.worker.queue.is_durable());
        self.ready.push_back(Batch {
            spans: pending.spans,
            logged,
        });
    }

    /// Sends the oldest waiting batch on its own task, holding `permit` until it is
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
