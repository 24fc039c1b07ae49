//! Marks: what became of the spans in the log, so a restart neither decides a trace twice
//! nor sends what the upstream already took. A mark says "trace T was decided (kept or
//! dropped) on its spans up to record S", or "n spans of trace T from record S were
//! answered for by the upstream". Marks are appended to `marks.log` beside the segments,
//! synced with them, and rewritten without those of deleted segments when the file grows.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::Path;

/// A trace id's 16 bytes (the log is below the OTLP layer: it knows no span format).
pub type TraceId = [u8; 16];

pub const MARKS_FILE: &str = "marks.log";

/// Bytes of one mark: CRC u32, kind u8, reason u8, trace id, sequence u64, value u64.
pub const MARK_BYTES: usize = 4 + 1 + 1 + 16 + 8 + 8;

const KIND_DECIDED: u8 = 1;
const KIND_DELIVERED: u8 = 2;

/// One mark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    /// The trace was decided on its spans in records up to `seq`: `bits` and `reason` are
    /// its cached decision's (threshold, kept and dry-run bits; why then).
    Decided {
        trace: TraceId,
        seq: u64,
        bits: u64,
        reason: u8,
    },
    /// `spans` spans of the trace from record `seq` were answered for by the upstream
    /// (accepted, or refused for good and counted lost).
    Delivered {
        trace: TraceId,
        seq: u64,
        spans: u32,
    },
}

impl Mark {
    /// The record it is about.
    pub fn seq(&self) -> u64 {
        match self {
            Mark::Decided { seq, .. } | Mark::Delivered { seq, .. } => *seq,
        }
    }

    /// Appends the mark's bytes to `out`.
    pub fn put(&self, out: &mut Vec<u8>) {
        let (kind, reason, trace, seq, value) = match *self {
            Mark::Decided {
                trace,
                seq,
                bits,
                reason,
            } => (KIND_DECIDED, reason, trace, seq, bits),
            Mark::Delivered { trace, seq, spans } => {
                (KIND_DELIVERED, 0, trace, seq, u64::from(spans))
            }
        };
        let mut body = [0u8; MARK_BYTES - 4];
        body[0] = kind;
        body[1] = reason;
        body[2..18].copy_from_slice(&trace);
        body[18..26].copy_from_slice(&seq.to_le_bytes());
        body[26..34].copy_from_slice(&value.to_le_bytes());
        out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        out.extend_from_slice(&body);
    }

    fn parse(raw: &[u8]) -> Option<Mark> {
        let sum = u32::from_le_bytes(raw[..4].try_into().ok()?);
        let body = &raw[4..MARK_BYTES];
        if crc32fast::hash(body) != sum {
            return None;
        }
        let trace: TraceId = body[2..18].try_into().ok()?;
        let seq = u64::from_le_bytes(body[18..26].try_into().ok()?);
        let value = u64::from_le_bytes(body[26..34].try_into().ok()?);
        match body[0] {
            KIND_DECIDED => Some(Mark::Decided {
                trace,
                seq,
                bits: value,
                reason: body[1],
            }),
            KIND_DELIVERED => Some(Mark::Delivered {
                trace,
                seq,
                spans: value.min(u64::from(u32::MAX)) as u32,
            }),
            _ => None,
        }
    }
}

/// Reads every intact mark of the file (a torn or damaged one ends it).
pub fn read_marks(path: &Path) -> io::Result<Vec<Mark>> {
    let mut raw = Vec::new();
    match File::open(path) {
        Ok(mut f) => f.read_to_end(&mut raw)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    Ok(raw
        .chunks_exact(MARK_BYTES)
        .map_while(Mark::parse)
        .collect())
}

/// Writes `marks` anew as the marks file (through a temporary file renamed over it) and
/// returns it opened for appending, with its length.
pub fn rewrite(dir: &Path, marks: &[Mark]) -> io::Result<(File, u64)> {
    let tmp = dir.join("marks.log.tmp");
    let mut raw = Vec::with_capacity(marks.len() * MARK_BYTES);
    for m in marks {
        m.put(&mut raw);
    }
    {
        let mut f = File::create(&tmp)?;
        f.write_all(&raw)?;
        f.sync_data()?;
    }
    std::fs::rename(&tmp, dir.join(MARKS_FILE))?;
    let file = OpenOptions::new().append(true).open(dir.join(MARKS_FILE))?;
    Ok((file, raw.len() as u64))
}

/// The marks still about records at or after `oldest` (the first record of the oldest
/// segment left): the others are about spans no longer in the log.
pub fn live(marks: Vec<Mark>, oldest: u64) -> Vec<Mark> {
    marks.into_iter().filter(|m| m.seq() >= oldest).collect()
}

/// What a restart needs of the marks: each trace's decision and what of it was delivered.
#[derive(Debug, Default)]
pub struct ReplayMarks {
    /// Decisions: the cached decision's bits and reason, and the last record decided on.
    pub decided: HashMap<TraceId, (u64, u8, u64)>,
    /// Spans answered for, by trace and record.
    delivered: HashMap<(TraceId, u64), u32>,
    /// The records some spans of which were answered for.
    delivered_records: std::collections::HashSet<u64>,
}

impl ReplayMarks {
    pub fn new(marks: &[Mark]) -> ReplayMarks {
        let mut out = ReplayMarks::default();
        for m in marks {
            match *m {
                Mark::Decided {
                    trace,
                    seq,
                    bits,
                    reason,
                } => {
                    out.decided.insert(trace, (bits, reason, seq));
                }
                Mark::Delivered { trace, seq, spans } => {
                    *out.delivered.entry((trace, seq)).or_default() += spans;
                    out.delivered_records.insert(seq);
                }
            }
        }
        out
    }

    /// Whether the upstream answered for any span of record `seq`.
    pub fn has_deliveries(&self, seq: u64) -> bool {
        self.delivered_records.contains(&seq)
    }

    /// Spans of the trace from record `seq` the upstream answered for.
    pub fn delivered(&self, trace: &TraceId, seq: u64) -> u32 {
        self.delivered.get(&(*trace, seq)).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_round_trip_and_a_torn_mark_ends_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let t: TraceId = [3; 16];
        let marks = [
            Mark::Decided {
                trace: t,
                seq: 5,
                bits: 1 << 63,
                reason: 1,
            },
            Mark::Delivered {
                trace: t,
                seq: 4,
                spans: 2,
            },
            Mark::Delivered {
                trace: t,
                seq: 4,
                spans: 1,
            },
        ];
        let (mut f, len) = rewrite(dir.path(), &marks).unwrap();
        assert_eq!(len as usize, 3 * MARK_BYTES);
        f.write_all(&[1, 2, 3]).unwrap();
        let read = read_marks(&dir.path().join(MARKS_FILE)).unwrap();
        assert_eq!(read, marks);
        let r = ReplayMarks::new(&read);
        assert_eq!(r.decided[&t], (1 << 63, 1, 5));
        assert_eq!(r.delivered(&t, 4), 3);
        assert_eq!(r.delivered(&t, 5), 0);
        assert_eq!(live(read, 5).len(), 1);
    }
}
