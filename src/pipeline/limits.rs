//! `limits:` — the memory budget and size limits, and the cgroup memory limit the
//! budget is derived from.

use serde::Deserialize;

use crate::units::ByteSize;

/// Share of the container's memory limit that the memory budget (`max_buffer_bytes`) takes
/// by default; the rest is the process's fixed overhead (code, runtime, connections,
/// allocator slack), measured in docs/operations.md.
pub const BUFFER_SHARE_OF_CGROUP: f64 = 0.4;
/// `max_buffer_bytes` when there is no cgroup memory limit.
pub const DEFAULT_BUFFER_BYTES: usize = 1 << 30;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Hard mark of the memory budget: request buffers held (by held traces, late spans
    /// and queues), encoded export requests, bookkeeping and the decision cache. At it
    /// receivers refuse retryably. `None`: a share of the cgroup limit.
    pub max_buffer_bytes: Option<ByteSize>,
    /// Share of `max_buffer_bytes` past which the oldest traces are decided early.
    pub soft_mark: f64,
    pub max_spans_per_trace: usize,
    pub max_span_bytes: usize,
    pub max_attribute_bytes: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_buffer_bytes: None,
            soft_mark: 0.8,
            max_spans_per_trace: 10_000,
            max_span_bytes: 4 << 20,
            max_attribute_bytes: 1 << 20,
        }
    }
}

impl LimitsConfig {
    /// The hard mark in force: the configured one, or a share of the cgroup memory limit,
    /// or a fixed default.
    pub fn buffer_bytes(&self) -> usize {
        match self.max_buffer_bytes {
            Some(b) => b.0,
            None => cgroup_memory_limit()
                .map(|limit| (limit as f64 * BUFFER_SHARE_OF_CGROUP) as usize)
                .unwrap_or(DEFAULT_BUFFER_BYTES),
        }
    }

    pub fn validate(&self) -> Vec<(String, String)> {
        let mut p = Vec::new();
        if !(self.soft_mark > 0.0 && self.soft_mark <= 1.0) {
            p.push(("soft_mark".into(), "must be in (0, 1]".into()));
        }
        if self.max_buffer_bytes.is_some_and(|b| b.0 < 1 << 20) {
            p.push(("max_buffer_bytes".into(), "must be at least 1MiB".into()));
        }
        if self.max_spans_per_trace == 0 {
            p.push(("max_spans_per_trace".into(), "must be at least 1".into()));
        }
        if self.max_span_bytes < 64 {
            p.push(("max_span_bytes".into(), "must be at least 64".into()));
        }
        if self.max_attribute_bytes == 0 {
            p.push(("max_attribute_bytes".into(), "must be at least 1".into()));
        }
        p
    }
}

/// The memory limit of this process's own cgroup: the tightest `memory.max` (v2) or
/// `memory.limit_in_bytes` (v1) of its group and the groups above it, as mounted in a pod
/// (the group path from `/proc/self/cgroup`, under `/sys/fs/cgroup` or, inside a cgroup
/// namespace, at the mount's root). `None` when no limit is set.
pub fn cgroup_memory_limit() -> Option<u64> {
    let groups = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    cgroup_limit_from(&groups, |p| std::fs::read_to_string(p).ok())
}

/// [`cgroup_memory_limit`] over a `/proc/self/cgroup` text and a file reader (tested with
/// fake hierarchies).
fn cgroup_limit_from(groups: &str, read: impl Fn(&str) -> Option<String>) -> Option<u64> {
    // v1 reports "no limit" as a number near 2^63, v2 as "max".
    let parse = |text: String| text.trim().parse::<u64>().ok().filter(|&l| l < 1 << 60);
    let mut limits = Vec::new();
    for line in groups.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let (root, file) = if controllers.is_empty() {
            ("/sys/fs/cgroup", "memory.max")
        } else if controllers.split(',').any(|c| c == "memory") {
            ("/sys/fs/cgroup/memory", "memory.limit_in_bytes")
        } else {
            continue;
        };
        // The group and every ancestor up to the mount's root.
        let mut dir = path.trim_end_matches('/').to_owned();
        loop {
            limits.extend(read(&format!("{root}{dir}/{file}")).and_then(parse));
            match dir.rfind('/') {
                Some(i) => dir.truncate(i),
                None => break,
            }
        }
        // Inside a cgroup namespace the group is mounted at the root.
        limits.extend(read(&format!("{root}/{file}")).and_then(parse));
    }
    limits.into_iter().min()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cgroup_limit_is_the_tightest_of_the_process_group_and_its_ancestors() {
        let files: std::collections::HashMap<&str, &str> = [
            // v1, as in this pod: the group under the memory controller's mount.
            (
                "/sys/fs/cgroup/memory/kubepods/pod1/memory.limit_in_bytes",
                "402653184\n",
            ),
            (
                "/sys/fs/cgroup/memory/kubepods/memory.limit_in_bytes",
                "9223372036854771712\n",
            ),
            (
                "/sys/fs/cgroup/memory/memory.limit_in_bytes",
                "9223372036854771712\n",
            ),
            // v2: a parent tighter than the group itself.
            ("/sys/fs/cgroup/app/worker/memory.max", "max\n"),
            ("/sys/fs/cgroup/app/memory.max", "268435456\n"),
        ]
        .into_iter()
        .collect();
        let read = |p: &str| files.get(p).map(|s| s.to_string());
        assert_eq!(
            cgroup_limit_from("4:memory:/kubepods/pod1\n3:cpu:/x\n", read),
            Some(402653184)
        );
        assert_eq!(cgroup_limit_from("0::/app/worker\n", read), Some(268435456));
        assert_eq!(cgroup_limit_from("0::/elsewhere\n", read), None);
        assert_eq!(cgroup_limit_from("", read), None);
    }
}
