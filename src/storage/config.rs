//! `storage:` — where the trace log lives, how often it is synced, and how much disk it
//! may take.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::units::{ByteSize, Dur};

/// Default for `segment_bytes`: small enough that a segment whose spans are done is freed
/// soon, large enough that files stay few.
pub const DEFAULT_SEGMENT_BYTES: usize = 16 << 20;

/// Default for `sync`: a kernel crash or node loss loses at most this much acknowledged.
pub const DEFAULT_SYNC_INTERVAL: Duration = Duration::from_secs(1);

/// Default for `regret_window`: an agent's failure reported minutes after its run was
/// decided still keeps the run.
pub const DEFAULT_REGRET_WINDOW: Duration = Duration::from_secs(10 * 60);
/// Default for `max_regret_traces`: about 300 bytes of memory each.
pub const DEFAULT_MAX_REGRET_TRACES: usize = 100_000;

/// When appended records are flushed to the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncPolicy {
    /// Every `Duration` (the OS writes back in between; a process crash loses nothing).
    Every(Duration),
    /// Before each receiver answers OK (group commit: one flush for all requests waiting).
    Always,
}

impl<'de> Deserialize<'de> for SyncPolicy {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d).map_err(|_| {
            serde::de::Error::custom("expected \"always\" or an interval such as \"1s\"")
        })?;
        if text.trim() == "always" {
            return Ok(SyncPolicy::Always);
        }
        humantime::parse_duration(text.trim())
            .map(SyncPolicy::Every)
            .map_err(|e| {
                serde::de::Error::custom(format!(
                    "invalid sync {text:?} ({e}); use \"always\" or an interval such as \"1s\""
                ))
            })
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// The log's segment files. Without it, nothing is written: what is held is lost
    /// with the process.
    pub directory: Option<PathBuf>,
    /// The log's segments in anonymous memory instead (memfd), through the same code:
    /// spans are held as slices of it, the export queue waits on it; nothing survives
    /// the process. Bounded by `max_disk_bytes`, which it requires.
    pub memory: bool,
    pub sync: SyncPolicy,
    /// The most the log may take on disk, bookkeeping included. Default: 80% of the
    /// filesystem's size; never more than its free space allows (less a margin).
    pub max_disk_bytes: Option<ByteSize>,
    /// A new segment is started past this size.
    pub segment_bytes: ByteSize,
    /// How long a refused write waits before the log tries writing again.
    pub retry_interval: Dur,
    /// How long a dropped trace's spans stay in the log, so a late span that makes it
    /// must-keep turns the decision to keep and exports it whole (`0s`: never).
    pub regret_window: Dur,
    /// Dropped traces remembered for the regret window at most (oldest forgotten first).
    pub max_regret_traces: usize,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            directory: None,
            memory: false,
            sync: SyncPolicy::Every(DEFAULT_SYNC_INTERVAL),
            max_disk_bytes: None,
            segment_bytes: ByteSize(DEFAULT_SEGMENT_BYTES),
            retry_interval: Dur(Duration::from_secs(1)),
            regret_window: Dur(DEFAULT_REGRET_WINDOW),
            max_regret_traces: DEFAULT_MAX_REGRET_TRACES,
        }
    }
}

impl StorageConfig {
    /// Whether there is a trace log (on disk or in memory).
    pub fn enabled(&self) -> bool {
        self.directory.is_some() || self.memory
    }

    pub fn validate(&self) -> Vec<(String, String)> {
        let mut p = Vec::new();
        if self.memory && self.directory.is_some() {
            p.push((
                "memory".into(),
                "set either storage.directory (the log on disk) or storage.memory, not both".into(),
            ));
        }
        if self.memory && self.max_disk_bytes.is_none() {
            p.push((
                "memory".into(),
                "needs storage.max_disk_bytes: the memory the log's segments may take (count it in the container's limit beside limits.max_buffer_bytes)".into(),
            ));
        }
        if let SyncPolicy::Every(d) = self.sync
            && d.is_zero()
        {
            p.push((
                "sync".into(),
                "must be greater than 0; use \"always\" to sync before every answer".into(),
            ));
        }
        if self.segment_bytes.0 < 64 << 10 {
            p.push(("segment_bytes".into(), "must be at least 64KiB".into()));
        }
        if self
            .max_disk_bytes
            .is_some_and(|m| m.0 < 2 * self.segment_bytes.0)
        {
            p.push((
                "max_disk_bytes".into(),
                "must be at least two segments (2 × segment_bytes)".into(),
            ));
        }
        if self.retry_interval.0.is_zero() {
            p.push(("retry_interval".into(), "must be greater than 0".into()));
        }
        if let Some(dir) = &self.directory
            && dir.as_os_str().is_empty()
        {
            p.push(("directory".into(), "must not be empty".into()));
        }
        p
    }
}
