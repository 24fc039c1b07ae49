//! Upgrading from the separate write-ahead log: what an older llmtail left in
//! `exporter.queue.directory` (kept spans decided before the upgrade, not yet delivered) is
//! moved into the trace log once, as kept traces, and the old files are removed.
//!
//! The old layout, per exporter in `<queue.directory>/<exporter name>/`:
//! - `seg-<first id>.wal`: records `[payload length u32][crc32 u32][id u64][spans u32]
//!   [payload]`, little-endian; the CRC covers id, spans and payload; each payload an
//!   encoded `ExportTraceServiceRequest`.
//! - `acked.log`: ids (u64) of records the upstream answered for.
//!
//! Each record not acknowledged is appended to the trace log, its traces are marked kept
//! there, and its spans are queued for this exporter. A segment is removed only once the
//! log has synced what came from it, so a crash mid-way sends at most that segment's
//! records again (counted in `llmtail_storage_replayed_spans_total` like any replay).

use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;

use super::ExportQueue;
use crate::otlp::reframe::{KeptSpan, spans_in};
use crate::otlp::scan;
use crate::otlp::tracestate::Threshold;
use crate::storage::{Mark, StorageError, TraceLog};

const HEADER: usize = 4 + 4 + 8 + 4;
const ACKED: &str = "acked.log";
/// Largest payload believed (a corrupt length must not allocate more).
const MAX_PAYLOAD: usize = 256 << 20;

/// The old segments in `dir`, oldest first (none when there is no such directory).
pub fn segments(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("seg-") && n.ends_with(".wal"))
        })
        .collect();
    paths.sort();
    Ok(paths)
}

/// Ids of the records the upstream answered for.
pub fn acknowledged(dir: &Path) -> io::Result<HashSet<u64>> {
    match std::fs::read(dir.join(ACKED)) {
        Ok(raw) => Ok(raw
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(HashSet::new()),
        Err(e) => Err(e),
    }
}

/// The payloads of a segment's intact records not acknowledged, in order; a torn or
/// damaged record ends the segment (a crash mid-write).
pub fn unacknowledged(path: &Path, acked: &HashSet<u64>) -> io::Result<Vec<Bytes>> {
    let raw = Bytes::from(std::fs::read(path)?);
    let mut out = Vec::new();
    let mut at = 0;
    while raw.len() - at >= HEADER {
        let word = |r: std::ops::Range<usize>| {
            let mut b = [0u8; 8];
            b[..r.len()].copy_from_slice(&raw[at + r.start..at + r.end]);
            u64::from_le_bytes(b)
        };
        let (len, sum, id) = (word(0..4) as usize, word(4..8) as u32, word(8..16));
        let body = at + 8..at + HEADER + len;
        if len > MAX_PAYLOAD || body.end > raw.len() || crc32fast::hash(&raw[body.clone()]) != sum {
            tracing::warn!(segment = %path.display(), intact_bytes = at, "the old write-ahead log's segment ends in a torn or damaged record; the records before it are taken");
            break;
        }
        if !acked.contains(&id) {
            out.push(raw.slice(at + HEADER..body.end));
        }
        at = body.end;
    }
    Ok(out)
}

/// Moves what the old write-ahead log in `dir` holds into the trace log as kept traces
/// (`decided`: the marks' decision bits and reason), queues it on `queue`, and removes the
/// old files; returns the spans moved. Waits (and says so) while the trace log is full.
pub async fn import(
    dir: &Path,
    log: &TraceLog,
    queue: &ExportQueue,
    decided: (u64, u8),
) -> anyhow::Result<u64> {
    use anyhow::Context;
    let segments = segments(dir)?;
    if segments.is_empty() {
        return Ok(0);
    }
    let acked = acknowledged(dir)?;
    let mut moved = 0u64;
    for path in segments {
        let read = path.clone();
        let acked = acked.clone();
        let records = tokio::task::spawn_blocking(move || unacknowledged(&read, &acked))
            .await?
            .with_context(|| format!("cannot read {}", path.display()))?;
        for payload in records {
            let pin = append(log, payload).await?;
            let Some(spans) = spans_in(&pin.payload(), Some(pin.clone())) else {
                tracing::warn!(segment = %path.display(), "a record of the old write-ahead log does not decode; skipped");
                continue;
            };
            let mut marks: Vec<Mark> = Vec::new();
            for span in &spans {
                let Some(trace) = scan::trace_id(span.bytes()) else {
                    continue;
                };
                if !marks
                    .iter()
                    .any(|m| matches!(m, Mark::Decided { trace: t, .. } if *t == trace.0))
                {
                    marks.push(Mark::Decided {
                        trace: trace.0,
                        seq: pin.seq(),
                        bits: decided.0,
                        reason: decided.1,
                    });
                }
            }
            log.mark(&marks);
            moved += spans.len() as u64;
            // The threshold the old release wrote stays: a kept span's tracestate keeps
            // the higher of its own and this one (p = 1).
            queue.submit(
                spans
                    .into_iter()
                    .map(|s| KeptSpan::new(s, Threshold::ALWAYS))
                    .collect(),
            );
        }
        anyhow::ensure!(
            log.sync().await,
            "cannot sync the trace log; the old write-ahead log is left in {}",
            dir.display()
        );
        std::fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
    }
    let _ = std::fs::remove_file(dir.join(ACKED));
    let _ = std::fs::remove_dir(dir);
    Ok(moved)
}

/// Appends a record, waiting while the log is full or failing.
async fn append(log: &TraceLog, payload: Bytes) -> anyhow::Result<crate::storage::LogPin> {
    let mut said = false;
    loop {
        match log.append(payload.clone()).await {
            Ok(pin) => return Ok(pin),
            Err(StorageError::Stopped) => anyhow::bail!("the trace log stopped"),
            Err(e) => {
                if !said {
                    tracing::warn!(error = %e, "the trace log has no room for the old write-ahead log's records yet; waiting");
                    said = true;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record as the old log wrote it.
    fn record(id: u64, spans: u32, payload: &[u8]) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&id.to_le_bytes());
        body.extend_from_slice(&spans.to_le_bytes());
        body.extend_from_slice(payload);
        let mut out = (payload.len() as u32).to_le_bytes().to_vec();
        out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        out.extend_from_slice(&body);
        out
    }

    #[test]
    fn acknowledged_and_torn_records_are_not_taken() {
        let dir = tempfile::tempdir().unwrap();
        let mut seg = record(0, 1, b"zero");
        seg.extend(record(1, 1, b"one"));
        seg.extend(record(2, 1, b"two"));
        // Torn: a header and half a payload.
        seg.extend(&record(3, 1, b"three")[..HEADER + 2]);
        std::fs::write(dir.path().join("seg-00000000000000000000.wal"), &seg).unwrap();
        std::fs::write(dir.path().join("seg-x.log"), b"not a segment").unwrap();
        std::fs::write(dir.path().join(ACKED), 1u64.to_le_bytes()).unwrap();
        let paths = segments(dir.path()).unwrap();
        assert_eq!(paths.len(), 1);
        let acked = acknowledged(dir.path()).unwrap();
        let taken = unacknowledged(&paths[0], &acked).unwrap();
        assert_eq!(taken, [&b"zero"[..], &b"two"[..]]);
        // A flipped byte ends the segment there.
        seg[HEADER] ^= 1;
        std::fs::write(&paths[0], &seg).unwrap();
        assert!(unacknowledged(&paths[0], &acked).unwrap().is_empty());
        assert!(segments(&dir.path().join("absent")).unwrap().is_empty());
    }
}
