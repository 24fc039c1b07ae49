//! Delivery: one request sent with retries and backoff; a request the upstream finds too
//! large, or whose content it refuses, sent in halves until only the spans at fault are left.

use super::*;

/// Requests one refused request may become while its halves are searched for the spans at
/// fault: a poison span among thousands is found in ~2·log2(n) sends, and an upstream that
/// refuses everything costs no more than this many.
const MAX_SPLIT_SENDS: u32 = 64;

#[derive(Clone)]
pub(super) struct Worker {
    pub(super) sink: Arc<Sink>,
    pub(super) retry: RetryConfig,
    pub(super) queue: Arc<ExportQueue>,
    pub(super) abort: CancellationToken,
    /// `llmtail_export_retries_total{exporter}`.
    pub(super) retries: IntCounter,
    pub(super) budget: Arc<Budget>,
}

/// How one request (or the halves it was split into) ended.
#[derive(Default)]
pub(super) struct Tally {
    pub(super) exported: usize,
    pub(super) lost: Vec<(Loss, usize)>,
    /// Cut short by the shutdown timeout.
    pub(super) interrupted: usize,
    /// Halves sent so far while searching a refused request (see [`MAX_SPLIT_SENDS`]).
    pub(super) split_sends: u32,
}

/// Why sending one request ended without an answer for its spans.
pub(super) enum Failed {
    Lost(Loss),
    /// Too large, or refused as bad data: its halves may go through.
    Split(Split, String),
    Interrupted,
}

#[derive(Clone, Copy)]
pub(super) enum Split {
    TooLarge,
    BadData,
}

impl Worker {
    /// Sends one queued request and accounts for every span of it; acknowledges its
    /// record once the upstream answered for all.
    pub(super) async fn export(&self, item: Encoded) {
        let Encoded {
            spans,
            payload,
            record,
            logged,
        } = item;
        let mut tally = Tally::default();
        self.deliver(payload, spans, &mut tally).await;
        self.queue.exported.inc_by(tally.exported as u64);
        for (reason, n) in &tally.lost {
            self.queue.count_lost(*reason, *n);
        }
        if tally.interrupted > 0 && record.is_none() {
            // What the trace log holds is sent after the next start.
            let unlogged = tally.interrupted.min(logged.unlogged);
            self.queue.count_lost(Loss::Shutdown, unlogged);
        }
        self.queue.answered(spans);
        // Answered for: a restart must not send it again. (Its pins go with `logged`.)
        if let Some(log) = &self.queue.log
            && tally.interrupted == 0
        {
            log.mark(&logged.marks);
        }
        // Answered for (accepted, or refused for good): the log need not keep it. A
        // request cut short stays in the log, to be sent after the next start.
        if let (Some(id), Some(wal)) = (record, &self.queue.wal)
            && tally.interrupted == 0
        {
            if let Err(e) = wal.ack(&[id]) {
                tracing::error!(exporter = self.queue.name(), error = %e, "cannot update the write-ahead log; records may be sent again after a restart");
            }
            self.queue.wal_bytes.set(wal.bytes() as i64);
        }
    }

    /// The request's bytes: in memory, or read back from the log (charged while held).
    pub(super) async fn load(&self, payload: &Payload) -> Result<Bytes, Failed> {
        match payload {
            Payload::Memory(b) => Ok(b.clone()),
            Payload::Disk(at) => {
                let wal = self.queue.wal.clone().expect("records on disk have a log");
                let at = *at;
                let read = tokio::task::spawn_blocking(move || wal.read(&at))
                    .await
                    .map_err(std::io::Error::other)
                    .and_then(|read| read);
                read.map(|b| self.budget.charge(b)).map_err(|e| {
                    self.queue.log_wal_problem(&format!(
                        "cannot read a record back from the write-ahead log: {e}; its spans are lost"
                    ));
                    Failed::Lost(Loss::WalError)
                })
            }
        }
    }

    /// Sends a request with retries; when the upstream says it is too large, sends its
    /// halves instead (down to single spans, which are lost if still too large).
    pub(super) fn deliver<'a>(
        &'a self,
        payload: Payload,
        spans: usize,
        tally: &'a mut Tally,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>> {
        Box::pin(async move {
            let (why, msg) = match self.send_with_retries(&payload, spans).await {
                Ok(rejected) => {
                    let refused = (rejected.spans as usize).min(spans);
                    tally.exported += spans - refused;
                    if refused > 0 || !rejected.message.is_empty() {
                        tracing::warn!(exporter = self.queue.name(), spans, rejected = refused, message = %rejected.message, "upstream accepted an export request in part");
                    }
                    if refused > 0 {
                        tally.lost.push((Loss::Partial, refused));
                    }
                    return;
                }
                Err(Failed::Lost(reason)) => return tally.lost.push((reason, spans)),
                Err(Failed::Interrupted) => return tally.interrupted += spans,
                Err(Failed::Split(why, msg)) => (why, msg),
            };
            let single = spans <= 1;
            let out_of_sends =
                matches!(why, Split::BadData) && tally.split_sends + 2 > MAX_SPLIT_SENDS;
            if single || out_of_sends {
                return self.refused_for_good(why, &msg, spans, tally);
            }
            let request = match self.load(&payload).await {
                Ok(request) => request,
                Err(_) => return tally.lost.push((Loss::WalError, spans)),
            };
            drop(payload);
            let Some([(a, na), (b, nb)]) = split_request(&request) else {
                return self.refused_for_good(why, &msg, spans, tally);
            };
            tracing::debug!(
                exporter = self.queue.name(),
                spans,
                bytes = request.len(),
                error = %msg,
                "upstream refused the request; sending it in halves"
            );
            drop(request);
            tally.split_sends += 2;
            let (a, b) = (self.budget.charge(a), self.budget.charge(b));
            self.deliver(Payload::Memory(a), na, tally).await;
            self.deliver(Payload::Memory(b), nb, tally).await;
        })
    }

    /// Counts spans the upstream will not take however they are sent, and says so once.
    pub(super) fn refused_for_good(&self, why: Split, msg: &str, spans: usize, tally: &mut Tally) {
        match why {
            Split::TooLarge => {
                if !self.queue.too_large_logged.swap(true, Ordering::Relaxed) {
                    tracing::error!(
                        exporter = self.queue.name(),
                        spans,
                        error = %msg,
                        "a span alone is larger than the upstream accepts; it is lost (llmtail_spans_lost_total{{reason=\"span_too_large\"}}). Raise the upstream's message limit or lower limits.max_span_bytes. Reported once."
                    );
                }
                tally.lost.push((Loss::SpanTooLarge, spans));
            }
            Split::BadData => {
                self.queue.log_refusal(spans, msg);
                tally.lost.push((Loss::Rejected, spans));
            }
        }
    }

    /// Sends one request until the upstream answers for it. Without a log, retryable
    /// failures give up at `retry.max_elapsed`; with one, they never do (the log holds the
    /// spans until the upstream is back, however long that takes), and the request is
    /// read back from it for each attempt, so waiting holds no memory.
    pub(super) async fn send_with_retries(
        &self,
        payload: &Payload,
        spans: usize,
    ) -> Result<Rejected, Failed> {
        let durable = self.queue.is_durable();
        let started = Instant::now();
        let mut backoff = self.retry.initial_interval.0;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let request = self.load(payload).await?;
            let sent = tokio::select! {
                biased;
                () = self.abort.cancelled() => return Err(Failed::Interrupted),
                sent = self.sink.send(request) => sent,
            };
            let (msg, hint) = match sent {
                Ok(rejected) => return Ok(rejected),
                Err(SendError::TooLarge(msg)) => return Err(Failed::Split(Split::TooLarge, msg)),
                Err(SendError::BadData(msg)) => return Err(Failed::Split(Split::BadData, msg)),
                Err(SendError::Permanent(msg)) => {
                    self.queue.log_refusal(spans, &msg);
                    return Err(Failed::Lost(Loss::Rejected));
                }
                Err(SendError::Retryable(msg, hint)) => (msg, hint),
            };
            self.retries.inc();
            // The upstream's own delay (RetryInfo, Retry-After) is the least wait.
            let wait = jittered(backoff).max(hint.unwrap_or_default());
            if !durable && started.elapsed() + wait > self.retry.max_elapsed.0 {
                tracing::warn!(exporter = self.queue.name(), spans, attempts = attempt, error = %msg, "export retries exhausted; spans lost (set exporter.queue.directory for a durable queue)");
                return Err(Failed::Lost(Loss::RetriesExhausted));
            }
            if attempt == 1 {
                tracing::warn!(exporter = self.queue.name(), spans, error = %msg, retry_in = ?wait, "export failed; retrying");
            } else {
                tracing::debug!(exporter = self.queue.name(), spans, attempt, error = %msg, retry_in = ?wait, "export failed again");
            }
            tokio::select! {
                biased;
                () = self.abort.cancelled() => return Err(Failed::Interrupted),
                () = tokio::time::sleep(wait) => {}
            }
            backoff = (backoff * 2).min(self.retry.max_interval.0);
        }
    }
}

/// Full backoff ± 50%, so replicas that failed together do not retry together.
pub(super) fn jittered(d: Duration) -> Duration {
    d.mul_f64(rand::rng().random_range(0.5..1.5))
}
