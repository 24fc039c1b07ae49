//! The trace log: every accepted request is appended here before its receiver answers OK,
//! and stays until each of its spans is done with — decided and dropped, or delivered to
//! the upstream (or counted lost). A restart replays it: held traces are held again with
//! their ages, kept ones not yet delivered are sent, nothing acknowledged is lost.
//!
//! Layout of `storage.directory`:
//! - `seg-<first sequence>.log`: records (see [`record`]), one per accepted request;
//! - `marks.log`: decisions and deliveries (see [`marks`]);
//! - `lock`: held by the running process, so two never share a directory.
//!
//! One writer thread owns the files: receivers hand it requests and wait for its answer
//! (requests waiting together are written, and synced with `sync: always`, as one group).
//! Every span taken from a record holds a [`LogPin`] on its segment; a segment no pin holds
//! any more is deleted, in any order. The disk bound is checked before a request is taken:
//! room is reserved for it, so a request is never acknowledged and then found not to fit.

mod config;
pub mod marks;
mod record;
mod segment;
mod writer;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::oneshot;

pub use config::{StorageConfig, SyncPolicy};
pub use marks::{Mark, ReplayMarks};
pub use record::Record;

use segment::SegmentId;
use writer::{Command, Writer};

/// The log's own metrics (registered by the caller: `llmtail_storage_*`).
#[derive(Clone)]
pub struct StorageMetrics {
    pub bytes: prometheus::IntGauge,
    pub limit_bytes: prometheus::IntGauge,
    pub segments: prometheus::IntGauge,
    pub appended_bytes: prometheus::IntCounter,
    pub write_errors: prometheus::IntCounter,
    pub decided_marks: prometheus::IntCounter,
    pub delivered_marks: prometheus::IntCounter,
    /// Marks not written because they would have taken the log past its bound.
    pub dropped_marks: prometheus::IntCounter,
}

#[cfg(test)]
impl StorageMetrics {
    /// Metrics in no registry.
    fn unregistered() -> StorageMetrics {
        let gauge = |n: &str| prometheus::IntGauge::new(n, n).expect("a valid name");
        let counter = |n: &str| prometheus::IntCounter::new(n, n).expect("a valid name");
        StorageMetrics {
            bytes: gauge("bytes"),
            limit_bytes: gauge("limit"),
            segments: gauge("segments"),
            appended_bytes: counter("appended"),
            write_errors: counter("errors"),
            decided_marks: counter("decided"),
            delivered_marks: counter("delivered"),
            dropped_marks: counter("dropped"),
        }
    }
}

/// Share of the filesystem's size the log may take when `max_disk_bytes` is not set.
const DEFAULT_DISK_SHARE: f64 = 0.8;
/// Free space left to others on the filesystem: this much, or a twentieth of a small one.
const FREE_SPACE_MARGIN: u64 = 64 << 20;
/// Share of the bound requests leave to the marks that their spans' decisions and
/// deliveries will add (a mark that would pass the bound is not written).
const MARKS_SHARE: u64 = 16;

/// Why the log did not take a request.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StorageError {
    #[error(
        "llmtail's trace log is full (storage.max_disk_bytes or the disk's free space); retry later"
    )]
    Full,
    #[error("llmtail cannot write its trace log ({0}); retry later")]
    Io(String),
    #[error("llmtail's trace log has stopped")]
    Stopped,
}

/// A record's place in the log, held by every span taken from it (through the span's
/// origin): while one is held, queued for export or in flight, its segment stays.
#[derive(Debug, Clone)]
pub struct LogPin {
    segment: Arc<SegmentId>,
    seq: u64,
    /// Where the record starts in its segment, and its payload's length: enough to read
    /// it back.
    offset: u64,
    len: u32,
}

impl LogPin {
    /// A pin on no segment of any log (unit tests of what holds pins).
    #[cfg(test)]
    pub fn detached(seq: u64) -> LogPin {
        LogPin {
            segment: Arc::new(SegmentId::unmapped(u64::MAX)),
            seq,
            offset: 0,
            len: 0,
        }
    }

    /// The record's sequence number.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The record's payload (the request as accepted): a slice of the mapped segment,
    /// which holds the segment as the pin does.
    pub fn payload(&self) -> Bytes {
        let start = self.offset as usize + record::HEADER;
        self.segment.slice(start, start + self.len as usize)
    }

    /// Whether two pins hold the same segment (one pin per segment is enough to keep it).
    pub fn same_segment(&self, other: &LogPin) -> bool {
        Arc::ptr_eq(&self.segment, &other.segment)
    }
}

/// State the writer thread and the receivers share.
struct Shared {
    /// Bytes the log takes on disk, plus room reserved for requests on their way to it.
    used: AtomicU64,
    /// The bound: `max_disk_bytes`, or less when the filesystem has less free.
    limit: AtomicU64,
    /// The last write failed: requests are refused until `retry_at`, then one is tried.
    failing: Arc<AtomicBool>,
    retry_at: Mutex<std::time::Instant>,
    /// Shutting down: no segment is deleted any more, whatever its pins say (see
    /// [`TraceLog::keep_all`]).
    keep_all: AtomicBool,
    metrics: StorageMetrics,
}

impl Shared {
    fn release(&self, bytes: u64) {
        self.used.fetch_sub(bytes, Ordering::AcqRel);
    }

    /// What requests may fill: the bound less the marks' share.
    fn requests_limit(&self) -> u64 {
        let limit = self.limit.load(Ordering::Acquire);
        limit - limit / MARKS_SHARE
    }
}

pub struct TraceLog {
    /// None: in memory.
    dir: Option<PathBuf>,
    commands: std::sync::mpsc::Sender<Command>,
    shared: Arc<Shared>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Held while the process runs: a second process on the directory is refused.
    _lock: Option<File>,
}

/// What `open` found: segments on disk, the marks file (open, and its length), the bytes
/// the log takes, its bound, and the next sequence number.
struct Found {
    segments: Vec<writer::Segment>,
    marks: (File, u64),
    used: u64,
    limit: u64,
    next_seq: u64,
}

/// What a start finds in the log: the segments to replay, oldest first, and the marks.
pub struct Replay {
    segments: Vec<(PathBuf, Arc<SegmentId>, u64)>,
    pub marks: ReplayMarks,
}

impl Replay {
    /// Whether there is anything to replay.
    pub fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }

    /// Segments to read back.
    pub fn segments(&self) -> usize {
        self.segments.len()
    }

    /// Reads every intact record, oldest first, handing each to `take` with its pin and the
    /// marks. A segment is held (not deleted) until its records are read; a torn or
    /// damaged record ends its segment (the rest of it cannot be framed), said in the log.
    pub fn run(self, mut take: impl FnMut(Record, LogPin, &ReplayMarks)) {
        let Replay { segments, marks } = self;
        for (path, segment, size) in segments {
            let mut reader = record::SegmentReader::new(segment.clone(), size);
            loop {
                let offset = reader.intact;
                match reader.next_record() {
                    Ok(Some(rec)) => {
                        let pin = LogPin {
                            segment: segment.clone(),
                            seq: rec.seq,
                            offset,
                            len: rec.payload.len() as u32,
                        };
                        take(rec, pin, &marks);
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::error!(segment = %path.display(), error = %e, "cannot read a segment of the trace log to its end");
                        break;
                    }
                }
            }
            if reader.torn() {
                tracing::warn!(segment = %path.display(), intact_bytes = reader.intact, "the trace log's segment ends in a torn or damaged record (a crash mid-write); the records before it were replayed");
            }
        }
    }
}

/// Unix nanoseconds now.
pub fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos().min(u128::from(u64::MAX)) as u64)
}

/// The filesystem holding `dir`: its size and the bytes free to an unprivileged writer.
fn filesystem(dir: &Path) -> std::io::Result<(u64, u64)> {
    let s = rustix::fs::statvfs(dir)?;
    Ok((
        s.f_blocks.saturating_mul(s.f_frsize),
        s.f_bavail.saturating_mul(s.f_frsize),
    ))
}

/// The most the log may take now: `max_disk` (or a share of the filesystem), and no more
/// than what it takes (`used`) plus the filesystem's free space less a margin.
fn bound(max_disk: Option<u64>, used: u64, (size, free): (u64, u64)) -> u64 {
    let max = max_disk.unwrap_or((size as f64 * DEFAULT_DISK_SHARE) as u64);
    let margin = FREE_SPACE_MARGIN.min(size / 20);
    max.min((used + free).saturating_sub(margin))
}

impl TraceLog {
    /// Opens the log in `cfg.directory` (creating it), taking its lock, or in memory
    /// (`cfg.memory`: empty, nothing to replay); returns it and what it holds from before.
    pub fn open(
        cfg: &StorageConfig,
        metrics: StorageMetrics,
    ) -> anyhow::Result<(TraceLog, Replay)> {
        use anyhow::Context;
        let Some(dir) = cfg.directory.clone() else {
            anyhow::ensure!(cfg.memory, "storage.directory is not set");
            let max = cfg
                .max_disk_bytes
                .context("storage.memory needs storage.max_disk_bytes")?
                .0 as u64;
            let found = Found {
                segments: Vec::new(),
                marks: (writer::memory_file()?, 0),
                used: 0,
                limit: max,
                next_seq: 0,
            };
            let replay = Replay {
                segments: Vec::new(),
                marks: ReplayMarks::new(&[]),
            };
            return TraceLog::start(cfg, metrics, None, None, found, replay);
        };
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create storage.directory {}", dir.display()))?;
        let lock = File::create(dir.join("lock"))
            .with_context(|| format!("cannot write in storage.directory {}", dir.display()))?;
        if lock.try_lock().is_err() {
            anyhow::bail!(
                "another llmtail process uses storage.directory {}; give each its own",
                dir.display()
            );
        }
        let mut paths: Vec<(u64, PathBuf)> = std::fs::read_dir(&dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter_map(|p| record::segment_first_seq(&p).map(|seq| (seq, p)))
            .collect();
        paths.sort();
        // New records go to a new segment after the highest sequence number ever used
        // (the last segment's last record, or a mark's), so no mark can name them.
        let mut next_seq = paths.last().map_or(0, |(first, _)| *first);
        if let Some((first_of_last, last)) = paths.last() {
            let mut reader = record::SegmentReader::open(last, *first_of_last)?;
            while let Some(rec) = reader.next_record()? {
                next_seq = next_seq.max(rec.seq + 1);
            }
            if reader.torn() {
                tracing::warn!(segment = %last.display(), "the trace log's newest segment ends in a torn record (a crash mid-write); cut there");
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(last)?
                    .set_len(reader.intact)?;
            }
        }
        let found = marks::read_marks(&dir.join(marks::MARKS_FILE))?;
        if let Some(m) = found.iter().map(Mark::seq).max() {
            next_seq = next_seq.max(m + 1);
        }
        let mut segments = Vec::new();
        let mut used = 0;
        for (first, path) in paths {
            let bytes = std::fs::metadata(&path)?.len();
            if bytes == 0 {
                std::fs::remove_file(&path)?;
                continue;
            }
            used += bytes;
            let (id, _) = record::map_file(&path, first)
                .with_context(|| format!("cannot map {}", path.display()))?;
            segments.push(writer::Segment {
                id,
                path: Some(path),
                bytes,
            });
        }
        let oldest = segments.first().map_or(u64::MAX, |s| s.id.first);
        let live = marks::live(found, oldest);
        let replay_marks = ReplayMarks::new(&live);
        let (marks_file, marks_len) = marks::rewrite(&dir, &live)?;
        used += marks_len;
        let max_disk = cfg.max_disk_bytes.map(|b| b.0 as u64);
        let limit = bound(max_disk, used, filesystem(&dir)?);
        let replay = Replay {
            segments: segments
                .iter()
                .filter_map(|s| Some((s.path.clone()?, s.id.clone(), s.bytes)))
                .collect(),
            marks: replay_marks,
        };
        let found = Found {
            segments,
            marks: (marks_file, marks_len),
            used,
            limit,
            next_seq,
        };
        TraceLog::start(cfg, metrics, Some(dir), Some(lock), found, replay)
    }

    /// Starts the writer over what `open` found.
    fn start(
        cfg: &StorageConfig,
        metrics: StorageMetrics,
        dir: Option<PathBuf>,
        lock: Option<File>,
        found: Found,
        replay: Replay,
    ) -> anyhow::Result<(TraceLog, Replay)> {
        let Found {
            segments,
            marks,
            used,
            limit,
            next_seq,
        } = found;
        metrics.limit_bytes.set(limit as i64);
        metrics.bytes.set(used as i64);
        let shared = Arc::new(Shared {
            used: AtomicU64::new(used),
            limit: AtomicU64::new(limit),
            failing: Arc::new(AtomicBool::new(false)),
            retry_at: Mutex::new(std::time::Instant::now()),
            keep_all: AtomicBool::new(false),
            metrics,
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let writer = Writer::new(
            writer::Setup {
                dir: dir.clone(),
                shared: shared.clone(),
                sync: cfg.sync,
                segment_bytes: cfg.segment_bytes.0 as u64,
                max_disk: cfg.max_disk_bytes.map(|b| b.0 as u64),
                retry_interval: cfg.retry_interval.0,
                next_seq,
            },
            segments,
            marks,
        );
        let handle = std::thread::Builder::new()
            .name("llmtail-log".into())
            .spawn(move || writer.run(rx))?;
        Ok((
            TraceLog {
                dir,
                commands: tx,
                shared,
                writer: Mutex::new(Some(handle)),
                _lock: lock,
            },
            replay,
        ))
    }

    /// Whether the log is in memory (nothing survives the process; no marks are kept).
    pub fn in_memory(&self) -> bool {
        self.dir.is_none()
    }

    /// Appends one request (an encoded `ExportTraceServiceRequest`) and returns its pin once
    /// it is written (and synced, with `sync: always`). Refused, with nothing written, when
    /// the log has no room for it or cannot be written.
    pub async fn append(&self, payload: Bytes) -> Result<LogPin, StorageError> {
        let need = (record::HEADER + payload.len()) as u64;
        self.reserve(need)?;
        let (reply, answer) = oneshot::channel();
        let sent = self.commands.send(Command::Append {
            payload,
            reserved: need,
            reply,
        });
        if sent.is_err() {
            self.shared.release(need);
            return Err(StorageError::Stopped);
        }
        answer.await.unwrap_or(Err(StorageError::Stopped))
    }

    /// Takes room for `need` bytes, or says why not.
    fn reserve(&self, need: u64) -> Result<(), StorageError> {
        if let Some(why) = self.refusal() {
            return Err(why);
        }
        let limit = self.shared.requests_limit();
        let mut used = self.shared.used.load(Ordering::Acquire);
        loop {
            if used + need > limit {
                return Err(StorageError::Full);
            }
            match self.shared.used.compare_exchange_weak(
                used,
                used + need,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Ok(()),
                Err(now) => used = now,
            }
        }
    }

    /// Why requests would be refused now, if they would: the last write failed (until its
    /// retry interval has passed), or the log is at its bound.
    pub fn refusal(&self) -> Option<StorageError> {
        if self.shared.failing.load(Ordering::Acquire)
            && std::time::Instant::now() < *self.shared.retry_at.lock()
        {
            return Some(StorageError::Io(
                "the last write failed; see the log".into(),
            ));
        }
        (self.shared.used.load(Ordering::Acquire) >= self.shared.requests_limit())
            .then_some(StorageError::Full)
    }

    /// True while writes fail (`/readyz` says so).
    pub fn failing_flag(&self) -> Arc<AtomicBool> {
        self.shared.failing.clone()
    }

    /// Bytes the log takes on disk (and has reserved), and its bound now.
    pub fn usage(&self) -> (u64, u64) {
        (
            self.shared.used.load(Ordering::Acquire),
            self.shared.limit.load(Ordering::Acquire),
        )
    }

    /// Records marks (decisions, deliveries); written and synced with the records, never
    /// waited for.
    pub fn mark(&self, marks: &[Mark]) {
        // A log in memory is never replayed: nothing to remember.
        if marks.is_empty() || self.in_memory() {
            return;
        }
        let mut raw = Vec::with_capacity(marks.len() * marks::MARK_BYTES);
        let (mut decided, mut delivered) = (0, 0);
        for m in marks {
            m.put(&mut raw);
            match m {
                Mark::Decided { .. } => decided += 1,
                Mark::Delivered { .. } => delivered += 1,
            }
        }
        let _ = self.commands.send(Command::Marks(raw, decided, delivered));
    }

    /// Waits until every record and mark sent to the log before this call is written and
    /// synced to disk; false when some could not be (the error is in the log).
    pub async fn sync(&self) -> bool {
        let (reply, answer) = oneshot::channel();
        if self.commands.send(Command::Sync(reply)).is_err() {
            return false;
        }
        answer.await.unwrap_or(false)
    }

    /// Reads a record back, its CRC checked, from the mapped segment (pages the kernel
    /// evicted are read from disk: call it off the async workers).
    pub fn read(&self, pin: &LogPin) -> std::io::Result<Record> {
        let record = record::read_at(&pin.segment, pin.offset, pin.len)?;
        if record.seq != pin.seq {
            return Err(std::io::Error::other(format!(
                "record {} of segment {} is not where it was written",
                pin.seq, pin.segment.first
            )));
        }
        Ok(record)
    }

    /// From now on no segment is deleted. Called when shutting down: what is still queued
    /// or held is then dropped without being delivered, its pins with it, and must stay
    /// for the next start (segments delivered meanwhile are skipped by the replay and
    /// deleted after it).
    pub fn keep_all(&self) {
        self.shared.keep_all.store(true, Ordering::Release);
    }

    /// Syncs everything written and stops the writer (shutdown; blocks: call it off the
    /// async workers).
    pub fn close(&self) {
        let (reply, done) = std::sync::mpsc::sync_channel(1);
        if self.commands.send(Command::Stop(reply)).is_ok() {
            let _ = done.recv();
        }
        if let Some(handle) = self.writer.lock().take() {
            let _ = handle.join();
        }
    }
}

/// How long ago a record was accepted (zero for a clock that went back).
pub fn age_of(time_ns: u64, now: SystemTime) -> Duration {
    Duration::from_nanos(unix_nanos(now).saturating_sub(time_ns))
}

#[cfg(test)]
mod tests;
