//! The write-ahead log behind a durable export queue (`exporter.queue.directory`).
//!
//! Every export batch is appended as one encoded `ExportTraceServiceRequest` (at most
//! `batch.max_bytes`) before it is sent; a record is acknowledged only once the upstream has
//! answered for it (accepted, or refused for good), never because retries gave up. Records
//! beyond the queue's memory share are not kept in memory: the exporter reads them back
//! from disk when their turn comes, and on start every record not acknowledged is found
//! by reading headers only, so replaying a log of any size takes little memory. Layout of
//! the directory:
//!
//! - `seg-<first id>.wal`: records `[payload length u32][crc32 u32][id u64][spans u32]
//!   [payload]`, little-endian; the CRC covers id, spans and payload, so a record torn by a
//!   crash is detected and the segment is cut there.
//! - `acked.log`: ids of acknowledged records, 8 bytes each, rewritten when it grows.
//!
//! A segment whose records are all acknowledged is deleted; when every record is, the
//! current segment and the ack log are truncated. Disk use is bounded by `max_bytes`.

use std::collections::{BTreeMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;

/// Bytes before a record's payload.
const HEADER: usize = 4 + 4 + 8 + 4;
/// What a record takes on disk besides its payload.
pub const RECORD_HEADER: usize = HEADER;
/// A new segment is started past this size.
const SEGMENT_BYTES: u64 = 16 << 20;
/// Largest payload accepted when reading back (a corrupt length must not allocate more).
const MAX_PAYLOAD: usize = 256 << 20;
const ACKED: &str = "acked.log";

/// Where a record sits in the log: enough to read it back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub id: u64,
    pub spans: u32,
    /// Offset of the record's header in its segment.
    offset: u64,
    len: u32,
}

struct Segment {
    path: PathBuf,
    bytes: u64,
    records: u64,
    acked: u64,
}

struct Inner {
    /// By first record id.
    segments: BTreeMap<u64, Segment>,
    /// The segment being appended to: its first id and file.
    current: Option<(u64, Arc<File>)>,
    next_id: u64,
    /// Acknowledged ids of records still on disk (to rewrite the ack log from).
    acked_ids: HashSet<u64>,
    acked_log: File,
    acked_log_bytes: u64,
    total_bytes: u64,
}

pub struct Wal {
    dir: PathBuf,
    max_bytes: u64,
    /// fsync every append (`fsync_interval: 0s`); otherwise [`Wal::sync`] is called on a timer.
    sync_each: bool,
    inner: Mutex<Inner>,
}

fn segment_path(dir: &Path, first_id: u64) -> PathBuf {
    dir.join(format!("seg-{first_id:020}.wal"))
}

fn crc(id: u64, spans: u32, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&id.to_le_bytes());
    h.update(&spans.to_le_bytes());
    h.update(payload);
    h.finalize()
}

/// Finds a segment's intact records, checking each one's CRC but keeping no payload;
/// returns their locations and the length of the intact prefix.
fn scan_segment(path: &Path) -> io::Result<(Vec<Location>, u64)> {
    let file = File::open(path)?;
    let size = file.metadata()?.len();
    let mut reader = io::BufReader::with_capacity(1 << 16, file);
    let mut records = Vec::new();
    let mut payload = Vec::new();
    let mut at = 0u64;
    let mut header = [0u8; HEADER];
    while size - at >= HEADER as u64 {
        reader.read_exact(&mut header)?;
        let (len, sum, id, spans) = parse_header(&header);
        if len > MAX_PAYLOAD || size - at - (HEADER as u64) < len as u64 {
            break;
        }
        payload.resize(len, 0);
        reader.read_exact(&mut payload)?;
        if crc(id, spans, &payload) != sum {
            break;
        }
        records.push(Location {
            id,
            spans,
            offset: at,
            len: len as u32,
        });
        at += (HEADER + len) as u64;
    }
    Ok((records, at))
}

/// A record header's payload length, CRC, id and span count.
fn parse_header(h: &[u8; HEADER]) -> (usize, u32, u64, u32) {
    let word = |r: std::ops::Range<usize>| {
        let mut b = [0u8; 8];
        b[..r.len()].copy_from_slice(&h[r]);
        u64::from_le_bytes(b)
    };
    (
        word(0..4) as usize,
        word(4..8) as u32,
        word(8..16),
        word(16..20) as u32,
    )
}

impl Wal {
    /// Opens (or creates) the log in `dir`; returns it and where the records to replay
    /// are, oldest first.
    pub fn open(dir: &Path, max_bytes: u64, sync_each: bool) -> io::Result<(Wal, Vec<Location>)> {
        std::fs::create_dir_all(dir)?;
        let mut acked = HashSet::new();
        if let Ok(mut f) = File::open(dir.join(ACKED)) {
            let mut raw = Vec::new();
            f.read_to_end(&mut raw)?;
            acked.extend(
                raw.chunks_exact(8)
                    .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))),
            );
        }
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("seg-") && n.ends_with(".wal"))
            })
            .collect();
        paths.sort();
        let mut segments = BTreeMap::new();
        let mut replay = Vec::new();
        let mut acked_ids = HashSet::new();
        let mut next_id = 0;
        let mut total_bytes = 0;
        for path in paths {
            let (records, intact) = scan_segment(&path)?;
            if intact < std::fs::metadata(&path)?.len() {
                tracing::warn!(segment = %path.display(), "write-ahead log segment cut at a torn record");
                OpenOptions::new()
                    .write(true)
                    .open(&path)?
                    .set_len(intact)?;
            }
            let Some(first) = records.first().map(|r| r.id) else {
                std::fs::remove_file(&path)?;
                continue;
            };
            let mut seg = Segment {
                path,
                bytes: intact,
                records: records.len() as u64,
                acked: 0,
            };
            for r in records {
                next_id = next_id.max(r.id + 1);
                if acked.contains(&r.id) {
                    seg.acked += 1;
                    acked_ids.insert(r.id);
                } else {
                    replay.push(r);
                }
            }
            if seg.acked == seg.records {
                std::fs::remove_file(&seg.path)?;
                for id in first..next_id {
                    acked_ids.remove(&id);
                }
            } else {
                total_bytes += seg.bytes;
                segments.insert(first, seg);
            }
        }
        let acked_log = rewrite_acked(dir, &acked_ids)?;
        let wal = Wal {
            dir: dir.to_owned(),
            max_bytes,
            sync_each,
            inner: Mutex::new(Inner {
                segments,
                current: None,
                next_id,
                acked_log_bytes: acked_ids.len() as u64 * 8,
                acked_ids,
                acked_log,
                total_bytes,
            }),
        };
        Ok((wal, replay))
    }

    /// Appends a record of `spans` spans; `Ok(None)` when the log is full (`max_bytes`).
    pub fn append(&self, spans: u32, payload: &[u8]) -> io::Result<Option<Location>> {
        let len = (HEADER + payload.len()) as u64;
        let mut inner = self.inner.lock();
        if inner.total_bytes + len > self.max_bytes {
            return Ok(None);
        }
        let id = inner.next_id;
        let rotate = match &inner.current {
            None => true,
            Some((first, _)) => inner.segments[first].bytes >= SEGMENT_BYTES,
        };
        if rotate {
            let path = segment_path(&self.dir, id);
            let file = OpenOptions::new().create(true).append(true).open(&path)?;
            inner.segments.insert(
                id,
                Segment {
                    path,
                    bytes: 0,
                    records: 0,
                    acked: 0,
                },
            );
            inner.current = Some((id, Arc::new(file)));
        }
        let (first, file) = inner.current.clone().expect("a current segment");
        let offset = inner.segments[&first].bytes;
        let mut record = Vec::with_capacity(len as usize);
        record.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        record.extend_from_slice(&crc(id, spans, payload).to_le_bytes());
        record.extend_from_slice(&id.to_le_bytes());
        record.extend_from_slice(&spans.to_le_bytes());
        record.extend_from_slice(payload);
        (&*file).write_all(&record)?;
        if self.sync_each {
            file.sync_data()?;
        }
        inner.next_id += 1;
        inner.total_bytes += len;
        let seg = inner.segments.get_mut(&first).expect("current segment");
        seg.bytes += len;
        seg.records += 1;
        Ok(Some(Location {
            id,
            spans,
            offset,
            len: payload.len() as u32,
        }))
    }

    /// Reads a record back (one not yet acknowledged), checking its CRC.
    pub fn read(&self, at: &Location) -> io::Result<Bytes> {
        let path = {
            let inner = self.inner.lock();
            match inner.segments.range(..=at.id).next_back() {
                Some((_, seg)) => seg.path.clone(),
                None => {
                    return Err(io::Error::other(format!(
                        "record {} is not in the log",
                        at.id
                    )));
                }
            }
        };
        let mut record = vec![0u8; HEADER + at.len as usize];
        read_exact_at(&File::open(&path)?, &mut record, at.offset)?;
        let header: &[u8; HEADER] = record[..HEADER].try_into().expect("header length");
        let (len, sum, id, spans) = parse_header(header);
        let payload = &record[HEADER..];
        if len != payload.len()
            || id != at.id
            || spans != at.spans
            || crc(id, spans, payload) != sum
        {
            return Err(io::Error::other(format!(
                "record {} in {} is damaged",
                at.id,
                path.display()
            )));
        }
        record.drain(..HEADER);
        Ok(Bytes::from(record))
    }

    /// Marks records as answered for; deletes what no longer holds anything to send.
    pub fn ack(&self, ids: &[u64]) -> io::Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut inner = self.inner.lock();
        let inner = &mut *inner;
        let mut raw = Vec::with_capacity(ids.len() * 8);
        for id in ids {
            raw.extend_from_slice(&id.to_le_bytes());
        }
        inner.acked_log.write_all(&raw)?;
        inner.acked_log_bytes += raw.len() as u64;
        let current = inner.current.as_ref().map(|(first, _)| *first);
        for &id in ids {
            let Some((&first, seg)) = inner.segments.range_mut(..=id).next_back() else {
                continue;
            };
            seg.acked += 1;
            inner.acked_ids.insert(id);
            if seg.acked == seg.records && Some(first) != current {
                std::fs::remove_file(&seg.path)?;
                inner.total_bytes -= seg.bytes;
                let end = inner
                    .segments
                    .range(first + 1..)
                    .next()
                    .map_or(inner.next_id, |(k, _)| *k);
                inner.acked_ids.retain(|i| *i < first || *i >= end);
                inner.segments.remove(&first);
            }
        }
        let all_acked = inner.segments.values().all(|s| s.acked == s.records);
        if all_acked && let Some((first, file)) = &inner.current {
            // Everything sent: start the current segment and the ack log afresh.
            file.set_len(0)?;
            inner.total_bytes = 0;
            let seg = inner.segments.get_mut(first).expect("current segment");
            *seg = Segment {
                path: seg.path.clone(),
                bytes: 0,
                records: 0,
                acked: 0,
            };
            inner.acked_ids.clear();
            inner.acked_log.set_len(0)?;
            inner.acked_log_bytes = 0;
        } else if inner.acked_log_bytes > 64 * 1024 + 2 * 8 * inner.acked_ids.len() as u64 {
            inner.acked_log = rewrite_acked(&self.dir, &inner.acked_ids)?;
            inner.acked_log_bytes = inner.acked_ids.len() as u64 * 8;
        }
        Ok(())
    }

    /// Flushes appended records to the disk (called on `fsync_interval`).
    pub fn sync(&self) -> io::Result<()> {
        let (current, acked) = {
            let inner = self.inner.lock();
            (
                inner.current.as_ref().map(|(_, f)| f.clone()),
                inner.acked_log.try_clone()?,
            )
        };
        if let Some(file) = current {
            file.sync_data()?;
        }
        acked.sync_data()
    }

    /// Bytes of records on disk.
    pub fn bytes(&self) -> u64 {
        self.inner.lock().total_bytes
    }
}

/// Reads `buf.len()` bytes at `offset`.
fn read_exact_at(mut file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    use std::io::Seek;
    file.seek(io::SeekFrom::Start(offset))?;
    file.read_exact(buf)
}

/// Writes the ack log anew (to a temporary file renamed over the old one).
fn rewrite_acked(dir: &Path, ids: &HashSet<u64>) -> io::Result<File> {
    let tmp = dir.join("acked.log.tmp");
    {
        let mut f = File::create(&tmp)?;
        let mut raw = Vec::with_capacity(ids.len() * 8);
        for id in ids {
            raw.extend_from_slice(&id.to_le_bytes());
        }
        f.write_all(&raw)?;
        f.sync_data()?;
    }
    std::fs::rename(&tmp, dir.join(ACKED))?;
    OpenOptions::new().append(true).open(dir.join(ACKED))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unacknowledged_records_are_replayed_and_acknowledged_ones_are_not() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (wal, replay) = Wal::open(dir.path(), 1 << 20, false).unwrap();
            assert!(replay.is_empty());
            let a = wal.append(3, b"first").unwrap().unwrap();
            let b = wal.append(4, b"second").unwrap().unwrap();
            let c = wal.append(5, b"third").unwrap().unwrap();
            assert_eq!(&wal.read(&c).unwrap()[..], b"third");
            wal.ack(&[a.id, c.id]).unwrap();
            assert_eq!(&wal.read(&b).unwrap()[..], b"second");
        }
        let (wal, replay) = Wal::open(dir.path(), 1 << 20, false).unwrap();
        assert_eq!(replay.len(), 1);
        assert_eq!(
            (replay[0].spans, &wal.read(&replay[0]).unwrap()[..]),
            (4, &b"second"[..])
        );
        // New ids never reuse old ones.
        let d = wal.append(1, b"fourth").unwrap().unwrap();
        assert!(d.id > replay[0].id);
        wal.ack(&[replay[0].id, d.id]).unwrap();
        assert_eq!(wal.bytes(), 0, "all acknowledged: nothing left on disk");
        let (_, replay) = Wal::open(dir.path(), 1 << 20, false).unwrap();
        assert!(replay.is_empty());
    }

    #[test]
    fn a_torn_record_is_cut_and_the_intact_ones_replayed() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (wal, _) = Wal::open(dir.path(), 1 << 20, true).unwrap();
            wal.append(1, b"intact").unwrap();
            wal.append(1, b"torn-record").unwrap();
        }
        let seg = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|e| e == "wal"))
            .unwrap();
        let len = std::fs::metadata(&seg).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(len - 3)
            .unwrap();
        let (wal, replay) = Wal::open(dir.path(), 1 << 20, false).unwrap();
        assert_eq!(replay.len(), 1);
        assert_eq!(&wal.read(&replay[0]).unwrap()[..], b"intact");
    }

    #[test]
    fn a_full_log_refuses_and_frees_space_on_acknowledgement() {
        let dir = tempfile::tempdir().unwrap();
        // Records of 20 header + 40 payload bytes: two fit in 130 bytes, three do not.
        let (wal, _) = Wal::open(dir.path(), 130, false).unwrap();
        let a = wal.append(1, &[0; 40]).unwrap().unwrap().id;
        assert!(wal.append(1, &[0; 40]).unwrap().is_some());
        assert_eq!(wal.append(1, &[0; 40]).unwrap(), None, "over 130 bytes");
        wal.ack(&[a]).unwrap();
        // The segment still holds the other record; space comes back when all are acked.
        assert_eq!(wal.bytes(), 120);
        wal.ack(&[a + 1]).unwrap();
        assert!(wal.append(1, &[0; 40]).unwrap().is_some());
    }

    #[test]
    fn replay_finds_records_without_holding_their_payloads() {
        let dir = tempfile::tempdir().unwrap();
        let payload = vec![3u8; 1 << 20];
        {
            let (wal, _) = Wal::open(dir.path(), 1 << 30, false).unwrap();
            for _ in 0..40 {
                wal.append(7, &payload).unwrap().unwrap();
            }
        }
        let (wal, replay) = Wal::open(dir.path(), 1 << 30, false).unwrap();
        assert_eq!(replay.len(), 40);
        assert!(replay.iter().all(|r| r.spans == 7));
        // Read back one at a time, in any order, across segments.
        assert_eq!(wal.read(&replay[39]).unwrap(), payload);
        assert_eq!(wal.read(&replay[0]).unwrap(), payload);
        // A damaged record is reported, not returned.
        let seg = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "wal"))
            .min()
            .unwrap();
        let mut data = std::fs::read(&seg).unwrap();
        data[HEADER + 10] ^= 0xff;
        std::fs::write(&seg, data).unwrap();
        assert!(wal.read(&replay[0]).is_err());
    }

    #[test]
    fn fully_acknowledged_segments_are_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _) = Wal::open(dir.path(), 1 << 30, false).unwrap();
        let big = vec![7u8; (SEGMENT_BYTES / 2) as usize];
        let ids: Vec<u64> = (0..5)
            .map(|_| wal.append(1, &big).unwrap().unwrap().id)
            .collect();
        let segments = || {
            std::fs::read_dir(dir.path())
                .unwrap()
                .filter(|e| {
                    e.as_ref()
                        .unwrap()
                        .path()
                        .extension()
                        .is_some_and(|x| x == "wal")
                })
                .count()
        };
        assert_eq!(segments(), 3);
        wal.ack(&ids[..2]).unwrap();
        assert_eq!(
            segments(),
            2,
            "the first segment's records are all acknowledged"
        );
        let (_, replay) = {
            drop(wal);
            Wal::open(dir.path(), 1 << 30, false).unwrap()
        };
        assert_eq!(replay.iter().map(|r| r.id).collect::<Vec<_>>(), ids[2..]);
    }
}
