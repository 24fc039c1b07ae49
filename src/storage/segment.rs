//! A segment's bytes, mapped read-only: a record's payload is handed out as a slice of the
//! page cache (`Bytes` that hold the segment), so held spans cost the process no copy of
//! their bytes. The kernel keeps what is read often in memory and may evict the rest; it is
//! read back from the file when touched again.

use std::fs::File;
use std::sync::Arc;

use bytes::Bytes;
use memmap2::{Mmap, MmapOptions};

/// A segment, named by its first record's sequence number. Every [`LogPin`](super::LogPin)
/// and every slice of it hold one reference; the writer holds one more and deletes the
/// file when it holds the last.
#[derive(Debug)]
pub(super) struct SegmentId {
    pub(super) first: u64,
    /// The file mapped up to its capacity (none for a pin of no log, in unit tests).
    map: Option<Mmap>,
}

impl SegmentId {
    /// Maps `capacity` bytes of a segment's file, which may be shorter: the writer appends
    /// to it and the mapping sees what is written (one page cache).
    pub(super) fn map(first: u64, file: &File, capacity: usize) -> std::io::Result<SegmentId> {
        // SAFETY: Rust needs the bytes behind a shared slice never to change, and reading
        // a mapped page past the file's end raises SIGBUS. Both hold for every slice
        // handed out (`slice`, called only for records whose write has returned):
        // - the only writer of a segment is this process's writer thread, which appends
        //   with `pwrite` past everything written and never rewrites a byte; it cuts the
        //   file (`set_len`) only past the last record written whole, after a failed
        //   write, so no slice covers bytes that change or vanish;
        // - another llmtail cannot open the directory (its lock); another program
        //   writing or cutting our segments breaks the directory's contract, as it would a
        //   database's files;
        // - mapping past the file's end (`capacity`) is allowed; those pages are read only
        //   once written, and deleting the file keeps the mapping valid until unmapped.
        let map = unsafe { MmapOptions::new().len(capacity.max(1)).map(file)? };
        Ok(SegmentId {
            first,
            map: Some(map),
        })
    }

    /// A segment of no log (pins in unit tests): slices of it are empty.
    #[cfg(test)]
    pub(super) fn unmapped(first: u64) -> SegmentId {
        SegmentId { first, map: None }
    }

    /// The bytes at `start..end` (written whole already), holding the segment while any
    /// slice of them lives.
    pub(super) fn slice(self: &Arc<Self>, start: usize, end: usize) -> Bytes {
        if self.map.is_none() {
            return Bytes::new();
        }
        Bytes::from_owner(Slice {
            segment: self.clone(),
            start,
            end,
        })
    }

    /// Every byte mapped (the segment's file as it was when mapped, for reading back).
    pub(super) fn mapped(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }
}

/// A range of a mapped segment, owning a reference to it.
struct Slice {
    segment: Arc<SegmentId>,
    start: usize,
    end: usize,
}

impl AsRef<[u8]> for Slice {
    fn as_ref(&self) -> &[u8] {
        &self.segment.mapped()[self.start..self.end]
    }
}
