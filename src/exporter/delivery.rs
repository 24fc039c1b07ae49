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
    /// `batch.max_bytes`: a batch whose encoding passes it goes as several requests.
    pub(super) max_bytes: usize,
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
    /// Sends one batch, now that a slot is free, and accounts for every span of it; marks
    /// what the upstream answered for in the trace log. The batch is encoded for each
    /// attempt and the encoding dropped before waiting to retry: a batch waiting out an
    /// outage, in the queue or in flight, holds no encoded copy.
    pub(super) async fn export(&self, batch: Batch) {
        let Batch { spans, logged } = batch;
        let mut parts = Vec::new();
        self.off_the_workers(|| encode_within(&spans, self.max_bytes, &mut parts));
        let mut tally = Tally::default();
        let mut at = 0;
        for (request, n) in parts {
            let part = &spans[at..at + n];
            at += n;
            self.deliver(part, Some(self.budget.charge(request)), &mut tally)
                .await;
        }
        self.queue.exported.inc_by(tally.exported as u64);
        for (reason, n) in &tally.lost {
            self.queue.count_lost(*reason, *n);
        }
        if tally.interrupted > 0 {
            // What the trace log on disk holds is sent after the next start.
            self.queue
                .count_lost(Loss::Shutdown, tally.interrupted.min(logged.perishable));
        }
        self.queue.answered(spans.len());
        // Answered for: a restart must not send it again. (Its pins go with `logged`.) A
        // request cut short stays in the log, to be sent after the next start.
        if let Some(log) = &self.queue.log
            && tally.interrupted == 0
        {
            log.mark(&logged.marks);
        }
    }

    /// Sends spans as one request with retries (`encoded`: its encoding, when at hand);
    /// when the upstream says it is too large, or refuses its content, sends its halves
    /// instead (down to single spans, which are lost if still refused).
    pub(super) fn deliver<'a>(
        &'a self,
        spans: &'a [KeptSpan],
        encoded: Option<Bytes>,
        tally: &'a mut Tally,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>> {
        Box::pin(async move {
            let n = spans.len();
            let (why, msg) = match self.send_with_retries(spans, encoded).await {
                Ok(rejected) => {
                    let refused = (rejected.spans as usize).min(n);
                    tally.exported += n - refused;
                    if refused > 0 || !rejected.message.is_empty() {
                        tracing::warn!(exporter = self.queue.name(), spans = n, rejected = refused, message = %rejected.message, "upstream accepted an export request in part");
                    }
                    if refused > 0 {
                        tally.lost.push((Loss::Partial, refused));
                    }
                    return;
                }
                Err(Failed::Lost(reason)) => return tally.lost.push((reason, n)),
                Err(Failed::Interrupted) => return tally.interrupted += n,
                Err(Failed::Split(why, msg)) => (why, msg),
            };
            let out_of_sends =
                matches!(why, Split::BadData) && tally.split_sends + 2 > MAX_SPLIT_SENDS;
            if n <= 1 || out_of_sends {
                return self.refused_for_good(why, &msg, n, tally);
            }
            tracing::debug!(
                exporter = self.queue.name(),
                spans = n,
                error = %msg,
                "upstream refused the request; sending it in halves"
            );
            tally.split_sends += 2;
            let (a, b) = spans.split_at(n / 2);
            self.deliver(a, None, tally).await;
            self.deliver(b, None, tally).await;
        })
    }

    /// Runs `encode` (reading kept spans' bytes) where a page fault may block: with the
    /// trace log on disk, pages the kernel evicted during a long wait are read back from
    /// the disk, so the async worker hands its other tasks on first.
    fn off_the_workers<T>(&self, encode: impl FnOnce() -> T) -> T {
        use tokio::runtime::{Handle, RuntimeFlavor};
        if self.queue.is_durable()
            && Handle::try_current().is_ok_and(|h| h.runtime_flavor() == RuntimeFlavor::MultiThread)
        {
            tokio::task::block_in_place(encode)
        } else {
            encode()
        }
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

    /// Sends one request until the upstream answers for it. Without a trace log,
    /// retryable failures give up at `retry.max_elapsed`; with one, they never do: the log
    /// holds the spans until the upstream is back, however long that takes, and receivers
    /// refuse once it is full.
    pub(super) async fn send_with_retries(
        &self,
        kept: &[KeptSpan],
        mut encoded: Option<Bytes>,
    ) -> Result<Rejected, Failed> {
        let spans = kept.len();
        let waits = self.queue.log.is_some();
        let started = Instant::now();
        let mut backoff = self.retry.initial_interval.0;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let request = encoded.take().unwrap_or_else(|| {
                self.budget
                    .charge(self.off_the_workers(|| encode_request(kept)))
            });
            // The encoding goes with the attempt.
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
            if !waits && started.elapsed() + wait > self.retry.max_elapsed.0 {
                tracing::warn!(exporter = self.queue.name(), spans, attempts = attempt, error = %msg, "export retries exhausted; spans lost (set storage.directory: kept spans then wait in the trace log until the upstream is back)");
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
