//! The writer thread: the only code that writes the log's files. Requests waiting together
//! are written as one group (one write, and one sync with `sync: always`); marks are
//! appended beside them. Between groups it syncs on the interval, deletes segments no pin
//! holds, reads the filesystem's free space, and compacts the marks. Every write error
//! lands here and becomes a refusal: the bytes it may have left are cut off, the requests
//! of the group are answered with the error, and writing is tried again after
//! `retry_interval`.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tokio::sync::oneshot;

use super::{LogPin, SegmentId, Shared, StorageError, SyncPolicy, marks, record};

/// How often the writer looks for work besides requests (syncs, deletions).
const TICK: Duration = Duration::from_millis(50);
/// How often the filesystem's free space is read.
const SPACE_EVERY: Duration = Duration::from_secs(1);
/// Write errors are said in the log at most this often (they are all counted).
const ERRORS_LOGGED_EVERY: Duration = Duration::from_secs(10);
/// Most requests written as one group.
const GROUP_REQUESTS: usize = 512;
/// The marks file is compacted when it has grown past this plus twice its size after the
/// last compaction.
const MARKS_SLACK: u64 = 1 << 20;

/// An anonymous in-memory file (memfd) for a segment of a log in memory.
pub(super) fn memory_file() -> std::io::Result<File> {
    let fd = rustix::fs::memfd_create("llmtail-segment", rustix::fs::MemfdFlags::CLOEXEC)?;
    Ok(File::from(fd))
}

/// Where a request's append is answered: its pin, or why it was not written.
pub(super) type Reply = oneshot::Sender<Result<LogPin, StorageError>>;

/// A request waiting to be written: its bytes, the room reserved for it, its answer.
type Pending = (Bytes, u64, Reply);

pub(super) enum Command {
    Append {
        payload: Bytes,
        /// Room reserved for it (released if it is not written).
        reserved: u64,
        reply: Reply,
    },
    /// Marks' bytes, and how many of each kind they are.
    Marks(Vec<u8>, u64, u64),
    /// Sync everything written so far; answered with whether it all was written and
    /// synced (no mark dropped since the last such command).
    Sync(oneshot::Sender<bool>),
    /// Sync everything and stop.
    Stop(std::sync::mpsc::SyncSender<()>),
}

/// A segment file on disk.
pub(super) struct Segment {
    pub(super) id: Arc<SegmentId>,
    /// None for a segment in memory.
    pub(super) path: Option<PathBuf>,
    pub(super) bytes: u64,
}

/// The segment being appended to.
struct Current {
    first: u64,
    file: File,
    len: u64,
    /// Bytes mapped: a group that would pass it goes to a new segment.
    capacity: u64,
}

/// What the writer starts with.
pub(super) struct Setup {
    /// None: the segments are in memory (memfd), and there are no marks.
    pub(super) dir: Option<PathBuf>,
    pub(super) shared: Arc<Shared>,
    pub(super) sync: SyncPolicy,
    pub(super) segment_bytes: u64,
    pub(super) max_disk: Option<u64>,
    pub(super) retry_interval: Duration,
    pub(super) next_seq: u64,
}

impl Setup {
    /// Where the log is, for messages.
    fn place(&self) -> String {
        self.dir
            .as_ref()
            .map_or_else(|| "memory".into(), |d| d.display().to_string())
    }
}

pub(super) struct Writer {
    setup: Setup,
    /// Every segment on disk, by first sequence number (the current one included).
    segments: BTreeMap<u64, Segment>,
    current: Option<Current>,
    marks_file: File,
    marks_len: u64,
    /// The marks file's length after its last compaction.
    marks_compacted: u64,
    /// Written since the last sync.
    unsynced: bool,
    last_sync: Instant,
    last_space: Instant,
    /// When a write error was last said (at most every [`ERRORS_LOGGED_EVERY`]).
    error_logged: Option<Instant>,
    /// Marks were dropped since the last [`Command::Sync`].
    dropped_marks: bool,
}

impl Writer {
    /// A writer over the segments found on disk and the marks file (open, and its length).
    pub(super) fn new(
        setup: Setup,
        segments: Vec<Segment>,
        (marks_file, marks_len): (File, u64),
    ) -> Writer {
        let segments = segments.into_iter().map(|s| (s.id.first, s)).collect();
        Writer {
            setup,
            segments,
            current: None,
            marks_file,
            marks_len,
            marks_compacted: marks_len,
            unsynced: false,
            last_sync: Instant::now(),
            last_space: Instant::now(),
            error_logged: None,
            dropped_marks: false,
        }
    }

    pub(super) fn run(mut self, rx: Receiver<Command>) {
        loop {
            let first = match rx.recv_timeout(TICK) {
                Ok(cmd) => Some(cmd),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            let mut appends = Vec::new();
            let mut marks = Vec::new();
            let mut counts = (0, 0);
            let mut stop = None;
            let mut syncs = Vec::new();
            let mut next = first;
            while let Some(cmd) = next.take() {
                match cmd {
                    Command::Append {
                        payload,
                        reserved,
                        reply,
                    } => appends.push((payload, reserved, reply)),
                    Command::Marks(raw, decided, delivered) => {
                        marks.extend_from_slice(&raw);
                        counts.0 += decided;
                        counts.1 += delivered;
                    }
                    Command::Sync(reply) => syncs.push(reply),
                    Command::Stop(reply) => stop = Some(reply),
                }
                if appends.len() < GROUP_REQUESTS && stop.is_none() {
                    next = rx.try_recv().ok();
                }
            }
            if !appends.is_empty() {
                self.append_group(appends);
            }
            if !marks.is_empty() {
                let metrics = self.setup.shared.metrics.clone();
                if self.write_marks(&marks) {
                    metrics.decided_marks.inc_by(counts.0);
                    metrics.delivered_marks.inc_by(counts.1);
                } else {
                    metrics.dropped_marks.inc_by(counts.0 + counts.1);
                    self.dropped_marks = true;
                }
            }
            if !syncs.is_empty() {
                let synced = self.sync() && !std::mem::take(&mut self.dropped_marks);
                for reply in syncs {
                    let _ = reply.send(synced);
                }
            }
            if let Some(reply) = stop {
                self.sync();
                let _ = reply.send(());
                return;
            }
            self.maintain();
        }
        self.sync();
    }

    /// Writes a group of requests as records, each answered with its pin or the error.
    fn append_group(&mut self, group: Vec<Pending>) {
        let reserved: u64 = group.iter().map(|(_, r, _)| r).sum();
        let result = self.write_records(&group);
        let shared = &self.setup.shared;
        match result {
            Ok((segment, first_seq, mut offset)) => {
                shared.failing.store(false, Ordering::Release);
                shared.metrics.appended_bytes.inc_by(reserved);
                for (i, (payload, _, reply)) in group.into_iter().enumerate() {
                    let _ = reply.send(Ok(LogPin {
                        segment: segment.clone(),
                        seq: first_seq + i as u64,
                        offset,
                        len: payload.len() as u32,
                    }));
                    offset += (record::HEADER + payload.len()) as u64;
                }
            }
            Err(e) => {
                shared.release(reserved);
                shared.metrics.write_errors.inc();
                *shared.retry_at.lock() = Instant::now() + self.setup.retry_interval;
                shared.failing.store(true, Ordering::Release);
                if self.may_log_error() {
                    tracing::error!(directory = %self.setup.place(), error = %e, "cannot write the trace log; receivers refuse retryably until it can be written again (llmtail_storage_write_errors_total)");
                }
                let why = StorageError::Io(e.to_string());
                for (_, _, reply) in group {
                    let _ = reply.send(Err(why.clone()));
                }
            }
        }
    }

    /// Writes the group at the end of the current segment (a new one when it is full);
    /// returns the segment, the first record's sequence number and its offset. On an
    /// error, what the write may have left is cut off, so later records follow the last
    /// intact one.
    fn write_records(&mut self, group: &[Pending]) -> std::io::Result<(Arc<SegmentId>, u64, u64)> {
        let size: usize = group.iter().map(|(p, _, _)| record::HEADER + p.len()).sum();
        if self
            .current
            .as_ref()
            .is_none_or(|c| c.len + size as u64 > c.capacity)
        {
            self.rotate(size as u64)?;
        }
        let first_seq = self.setup.next_seq;
        let now = super::unix_nanos(SystemTime::now());
        let mut buf = Vec::with_capacity(size);
        for (i, (payload, _, _)) in group.iter().enumerate() {
            record::put_header(&mut buf, first_seq + i as u64, now, payload);
            buf.extend_from_slice(payload);
        }
        let current = self
            .current
            .as_mut()
            .expect("a current segment after rotate");
        let written = current.file.write_all_at(&buf, current.len).and_then(|()| {
            if self.setup.sync == SyncPolicy::Always {
                current.file.sync_data()
            } else {
                Ok(())
            }
        });
        if let Err(e) = written {
            if current.file.set_len(current.len).is_err() {
                // Cannot even cut it: the next group starts a new segment.
                self.current = None;
            }
            return Err(e);
        }
        let offset = current.len;
        current.len += buf.len() as u64;
        let first = current.first;
        self.setup.next_seq += group.len() as u64;
        self.unsynced = self.setup.sync != SyncPolicy::Always;
        let segment = self.segments.get_mut(&first).expect("the current segment");
        segment.bytes += buf.len() as u64;
        Ok((segment.id.clone(), first_seq, offset))
    }

    /// Starts a new segment at the next sequence number, mapped for `segment_bytes` (or
    /// `need`, for a group larger than that); the one before is synced first, so a segment
    /// no longer written to is whole on disk.
    fn rotate(&mut self, need: u64) -> std::io::Result<()> {
        if let Some(old) = &self.current {
            old.file.sync_data()?;
        }
        let first = self.setup.next_seq;
        let (file, path) = match &self.setup.dir {
            Some(dir) => {
                let path = record::segment_path(dir, first);
                let file = OpenOptions::new()
                    .create(true)
                    .truncate(true)
                    .read(true)
                    .write(true)
                    .open(&path)?;
                // The new name must survive a crash as well as what is written under it.
                File::open(dir)?.sync_all()?;
                (file, Some(path))
            }
            None => (memory_file()?, None),
        };
        let capacity = self.setup.segment_bytes.max(need);
        let id = SegmentId::map(
            first,
            &file,
            usize::try_from(capacity).map_err(std::io::Error::other)?,
        )?;
        self.segments.insert(
            first,
            Segment {
                id: Arc::new(id),
                path,
                bytes: 0,
            },
        );
        self.current = Some(Current {
            first,
            file,
            len: 0,
            capacity,
        });
        Ok(())
    }

    /// Appends marks; false when they could not be written (said in the log): the disk
    /// failed, or they would take the log past its bound even once compacted (a restart
    /// may then decide or send again what they were about; never more than the bound).
    fn write_marks(&mut self, raw: &[u8]) -> bool {
        let shared = &self.setup.shared;
        let fits = |shared: &Shared| {
            shared.used.load(Ordering::Acquire) + raw.len() as u64
                <= shared.limit.load(Ordering::Acquire)
        };
        if !fits(shared) {
            self.compact_marks(true);
            if !fits(&self.setup.shared) {
                if self.may_log_error() {
                    tracing::warn!(directory = %self.setup.place(), "the trace log is at its bound: marks of decisions and deliveries are not written (llmtail_storage_marks_total{{kind=\"dropped\"}}); after a restart, what they were about may be decided or sent again");
                }
                return false;
            }
        }
        let written = self
            .marks_file
            .write_all_at(raw, self.marks_len)
            .and_then(|()| {
                if self.setup.sync == SyncPolicy::Always {
                    self.marks_file.sync_data()
                } else {
                    Ok(())
                }
            });
        match written {
            Ok(()) => {
                self.marks_len += raw.len() as u64;
                self.setup
                    .shared
                    .used
                    .fetch_add(raw.len() as u64, Ordering::AcqRel);
                self.unsynced = true;
                true
            }
            Err(e) => {
                let _ = self.marks_file.set_len(self.marks_len);
                self.setup.shared.metrics.write_errors.inc();
                if self.may_log_error() {
                    tracing::error!(directory = %self.setup.place(), error = %e, "cannot write the trace log's marks; after a restart, what they said may be decided or sent again");
                }
                false
            }
        }
    }

    /// Whether a write error may be said now.
    fn may_log_error(&mut self) -> bool {
        let now = Instant::now();
        let may = self
            .error_logged
            .is_none_or(|t| now.duration_since(t) >= ERRORS_LOGGED_EVERY);
        if may {
            self.error_logged = Some(now);
        }
        may
    }

    /// Flushes what was written to the disk; false when that failed.
    fn sync(&mut self) -> bool {
        let mut result = self.marks_file.sync_data();
        if let Some(c) = &self.current {
            result = result.and(c.file.sync_data());
        }
        self.last_sync = Instant::now();
        self.unsynced = false;
        if let Err(e) = result {
            let shared = &self.setup.shared;
            shared.metrics.write_errors.inc();
            *shared.retry_at.lock() = Instant::now() + self.setup.retry_interval;
            shared.failing.store(true, Ordering::Release);
            tracing::error!(directory = %self.setup.place(), error = %e, "cannot sync the trace log to disk");
            return false;
        }
        true
    }

    /// Syncs on the interval, deletes what no pin holds, reads the free space, compacts the
    /// marks.
    fn maintain(&mut self) {
        let now = Instant::now();
        if let SyncPolicy::Every(every) = self.setup.sync
            && self.unsynced
            && now.duration_since(self.last_sync) >= every
        {
            self.sync();
        }
        self.delete_unpinned();
        if now.duration_since(self.last_space) >= SPACE_EVERY {
            self.last_space = now;
            self.refresh_bound();
            self.compact_marks(false);
        }
        let shared = &self.setup.shared;
        shared
            .metrics
            .bytes
            .set(shared.used.load(Ordering::Acquire) as i64);
        shared.metrics.segments.set(self.segments.len() as i64);
    }

    /// Deletes every segment no pin holds; the current one too (the next request starts
    /// a new one), so a log whose every span is done takes no room.
    fn delete_unpinned(&mut self) {
        if self.setup.shared.keep_all.load(Ordering::Acquire) {
            return;
        }
        let current = self.current.as_ref().map(|c| c.first);
        let done: Vec<u64> = self
            .segments
            .iter()
            .filter(|(_, s)| Arc::strong_count(&s.id) == 1)
            .map(|(first, _)| *first)
            .collect();
        for first in done {
            let seg = &self.segments[&first];
            if let Some(path) = &seg.path
                && let Err(e) = std::fs::remove_file(path)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::error!(segment = %path.display(), error = %e, "cannot delete a segment of the trace log");
                continue;
            }
            if Some(first) == current {
                self.current = None;
            }
            let seg = self.segments.remove(&first).expect("listed above");
            self.setup.shared.release(seg.bytes);
        }
    }

    /// Reads the filesystem's free space and sets the bound from it.
    fn refresh_bound(&mut self) {
        let shared = &self.setup.shared;
        // In memory, the bound is `max_disk_bytes` alone.
        let Some(dir) = &self.setup.dir else {
            return;
        };
        match super::filesystem(dir) {
            Ok(fs) => {
                let limit =
                    super::bound(self.setup.max_disk, shared.used.load(Ordering::Acquire), fs);
                shared.limit.store(limit, Ordering::Release);
                shared.metrics.limit_bytes.set(limit as i64);
            }
            Err(e) => {
                tracing::warn!(directory = %self.setup.place(), error = %e, "cannot read the free space of storage.directory");
            }
        }
    }

    /// Rewrites the marks without those about deleted segments, once the file has grown
    /// (or at once when no segment is left: then no mark is about anything).
    /// `now`: whatever the file's size (the log is at its bound).
    fn compact_marks(&mut self, now: bool) {
        let Some(dir) = self.setup.dir.clone() else {
            return;
        };
        let grown = self.marks_len >= MARKS_SLACK + 2 * self.marks_compacted;
        let obsolete = self.segments.is_empty() && self.marks_len > 0;
        if !grown && !obsolete && !now {
            return;
        }
        let oldest = self.segments.keys().next().copied().unwrap_or(u64::MAX);
        let rewritten = marks::read_marks(&dir.join(marks::MARKS_FILE))
            .and_then(|all| marks::rewrite(&dir, &marks::live(all, oldest)));
        match rewritten {
            Ok((file, len)) => {
                self.setup
                    .shared
                    .release(self.marks_len - len.min(self.marks_len));
                self.marks_file = file;
                self.marks_len = len;
                self.marks_compacted = len;
            }
            Err(e) => {
                tracing::warn!(directory = %self.setup.place(), error = %e, "cannot compact the trace log's marks");
            }
        }
    }
}
