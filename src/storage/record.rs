//! Records of the trace log: one accepted request each, framed with its length, a CRC, its
//! sequence number and when it was accepted; segments are read back record by record and a
//! torn tail (a crash mid-write) is found by its length or CRC.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

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
    pub payload: Vec<u8>,
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

/// Reads the record at `offset` whose payload is `len` bytes, checking its CRC.
pub fn read_at(file: &File, offset: u64, len: u32) -> io::Result<Record> {
    use std::os::unix::fs::FileExt;
    let mut raw = vec![0u8; HEADER + len as usize];
    file.read_exact_at(&mut raw, offset)?;
    let (stored_len, sum, seq, time_ns) = parse_header(raw[..HEADER].try_into().expect("a header"));
    let payload = raw.split_off(HEADER);
    if stored_len != len as usize || crc(seq, time_ns, &payload) != sum {
        return Err(io::Error::other(format!(
            "the trace log's record at offset {offset} is damaged"
        )));
    }
    Ok(Record {
        seq,
        time_ns,
        payload,
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

/// Reads a segment's records in order, stopping at the first that is cut short or fails
/// its CRC.
pub struct SegmentReader {
    reader: io::BufReader<File>,
    size: u64,
    /// Bytes of intact records read so far.
    pub intact: u64,
}

impl SegmentReader {
    pub fn open(path: &Path) -> io::Result<SegmentReader> {
        let file = File::open(path)?;
        let size = file.metadata()?.len();
        Ok(SegmentReader {
            reader: io::BufReader::with_capacity(1 << 20, file),
            size,
            intact: 0,
        })
    }

    /// The next intact record, or `None` at the end or at a torn or damaged record.
    pub fn next_record(&mut self) -> io::Result<Option<Record>> {
        let left = self.size - self.intact;
        if left < HEADER as u64 {
            return Ok(None);
        }
        let mut header = [0u8; HEADER];
        self.reader.read_exact(&mut header)?;
        let (len, sum, seq, time_ns) = parse_header(&header);
        if len > MAX_PAYLOAD || left - (HEADER as u64) < len as u64 {
            return Ok(None);
        }
        let mut payload = vec![0u8; len];
        self.reader.read_exact(&mut payload)?;
        if crc(seq, time_ns, &payload) != sum {
            return Ok(None);
        }
        self.intact += (HEADER + len) as u64;
        Ok(Some(Record {
            seq,
            time_ns,
            payload,
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
        let mut r = SegmentReader::open(&path).unwrap();
        let a = r.next_record().unwrap().unwrap();
        assert_eq!((a.seq, a.time_ns, &a.payload[..]), (7, 70, &b"first"[..]));
        assert_eq!(r.next_record().unwrap().unwrap().payload, b"second");
        assert!(r.next_record().unwrap().is_none());
        assert!(r.torn());
        assert_eq!(r.intact as usize, whole - (HEADER + 5));
        // Damaged: one bit of the second payload flipped.
        data[HEADER + 5 + HEADER] ^= 1;
        File::create(&path).unwrap().write_all(&data).unwrap();
        let mut r = SegmentReader::open(&path).unwrap();
        assert!(r.next_record().unwrap().is_some());
        assert!(r.next_record().unwrap().is_none());
        assert!(r.torn());
    }
}
