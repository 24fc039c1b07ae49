//! Records of the trace log: one accepted request each, framed with its length, a CRC, its
//! sequence number and when it was accepted; segments are read back record by record and a
//! torn tail (a crash mid-write) is found by its length or CRC.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;

use super::segment::SegmentId;

/// Bytes before a record's payload: length u32, CRC u32, sequence u64, accepted-at u64
/// (Unix nanoseconds), little-endian. The CRC covers sequence, time and payload.
pub const HEADER: usize = 4 + 4 + 8 + 8;

/// The largest payload read back: a corrupt length must not allocate more. Requests are
/// bounded by the receivers' `max_request_bytes` (at most 64 MiB decompressed).
const MAX_PAYLOAD: usize = 256 << 20;

/// A record as read back.
#[derive(Debug)]
pub struct Record {
    pub seq: u64,
    /// When the request was accepted, in Unix nanoseconds.
    pub time_ns: u64,
    /// A slice of the mapped segment.
    pub payload: Bytes,
}

fn crc(seq: u64, time_ns: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&seq.to_le_bytes());
    h.update(&time_ns.to_le_bytes());
    h.update(payload);
    h.finalize()
}

/// Appends a record's header for `payload` to `out`.
pub fn put_header(out: &mut Vec<u8>, seq: u64, time_ns: u64, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc(seq, time_ns, payload).to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&time_ns.to_le_bytes());
}

/// The file of the segment whose first record is `first_seq`.
pub fn segment_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!("seg-{first_seq:020}.log"))
}

/// The first sequence number a segment file's name gives.
pub fn segment_first_seq(path: &Path) -> Option<u64> {
    let name = path.file_name()?.to_str()?;
    name.strip_prefix("seg-")?
        .strip_suffix(".log")?
        .parse()
        .ok()
}

/// The record at `offset` of a mapped segment whose payload is `len` bytes, its CRC checked;
/// the payload is a slice of the mapping.
pub fn read_at(segment: &Arc<SegmentId>, offset: u64, len: u32) -> io::Result<Record> {
    let damaged = || {
        io::Error::other(format!(
            "the trace log's record at offset {offset} is damaged"
        ))
    };
    let start = usize::try_from(offset).map_err(|_| damaged())?;
    let data = segment.mapped();
    let end = start + HEADER + len as usize;
    if end > data.len() {
        return Err(damaged());
    }
    let (stored_len, sum, seq, time_ns) =
        parse_header(data[start..start + HEADER].try_into().expect("a header"));
    if stored_len != len as usize || crc(seq, time_ns, &data[start + HEADER..end]) != sum {
        return Err(damaged());
    }
    Ok(Record {
        seq,
        time_ns,
        payload: segment.slice(start + HEADER, end),
    })
}

/// A header's payload length, CRC, sequence number and time.
fn parse_header(header: &[u8; HEADER]) -> (usize, u32, u64, u64) {
    let word = |r: std::ops::Range<usize>| {
        let mut b = [0u8; 8];
        b[..r.len()].copy_from_slice(&header[r]);
        u64::from_le_bytes(b)
    };
    (
        word(0..4) as usize,
        word(4..8) as u32,
        word(8..16),
        word(16..24),
    )
}

/// Maps a segment's file as it is now; returns the mapping and the file's length.
pub fn map_file(path: &Path, first: u64) -> io::Result<(Arc<SegmentId>, u64)> {
    let file = File::open(path)?;
    let size = file.metadata()?.len();
    let capacity = usize::try_from(size).map_err(io::Error::other)?;
    Ok((Arc::new(SegmentId::map(first, &file, capacity)?), size))
}

/// Reads a segment's records in order, stopping at the first that is cut short or fails
/// its CRC. The segment is mapped; payloads are slices of the mapping.
pub struct SegmentReader {
    segment: Arc<SegmentId>,
    size: u64,
    /// Bytes of intact records read so far.
    pub intact: u64,
}

impl SegmentReader {
    /// Maps the segment at `path`, named by its first sequence number `first`.
    pub fn open(path: &Path, first: u64) -> io::Result<SegmentReader> {
        let (segment, size) = map_file(path, first)?;
        Ok(SegmentReader::new(segment, size))
    }

    /// Reads the first `size` bytes of a mapped segment.
    pub fn new(segment: Arc<SegmentId>, size: u64) -> SegmentReader {
        SegmentReader {
            segment,
            size,
            intact: 0,
        }
    }

    /// The next intact record, or `None` at the end or at a torn or damaged record.
    pub fn next_record(&mut self) -> io::Result<Option<Record>> {
        let left = self.size - self.intact;
        if left < HEADER as u64 {
            return Ok(None);
        }
        let at = self.intact as usize;
        let data = self.segment.mapped();
        let (len, sum, seq, time_ns) =
            parse_header(data[at..at + HEADER].try_into().expect("a header"));
        if len > MAX_PAYLOAD || left - (HEADER as u64) < len as u64 {
            return Ok(None);
        }
        let payload = at + HEADER..at + HEADER + len;
        if crc(seq, time_ns, &data[payload.clone()]) != sum {
            return Ok(None);
        }
        self.intact += (HEADER + len) as u64;
        Ok(Some(Record {
            seq,
            time_ns,
            payload: self.segment.slice(payload.start, payload.end),
        }))
    }

    /// Whether bytes follow the intact records (a torn or damaged tail).
    pub fn torn(&self) -> bool {
        self.intact < self.size
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn records_read_back_in_order_and_a_torn_or_damaged_tail_stops_the_reader() {
        let dir = tempfile::tempdir().unwrap();
        let path = segment_path(dir.path(), 7);
        assert_eq!(segment_first_seq(&path), Some(7));
        let mut data = Vec::new();
        for (seq, payload) in [(7u64, &b"first"[..]), (8, b"second"), (9, b"third")] {
            put_header(&mut data, seq, seq * 10, payload);
            data.extend_from_slice(payload);
        }
        let whole = data.len();
        // Torn: the last record's payload cut short.
        File::create(&path)
            .unwrap()
            .write_all(&data[..whole - 2])
            .unwrap();
        let mut r = SegmentReader::open(&path, 7).unwrap();
        let a = r.next_record().unwrap().unwrap();
        assert_eq!((a.seq, a.time_ns, &a.payload[..]), (7, 70, &b"first"[..]));
        assert_eq!(&r.next_record().unwrap().unwrap().payload[..], b"second");
        assert!(r.next_record().unwrap().is_none());
        assert!(r.torn());
        assert_eq!(r.intact as usize, whole - (HEADER + 5));
        // Damaged: one bit of the second payload flipped.
        data[HEADER + 5 + HEADER] ^= 1;
        File::create(&path).unwrap().write_all(&data).unwrap();
        let mut r = SegmentReader::open(&path, 7).unwrap();
        assert!(r.next_record().unwrap().is_some());
        assert!(r.next_record().unwrap().is_none());
        assert!(r.torn());
    }
}
