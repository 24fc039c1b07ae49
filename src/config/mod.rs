//! Configuration: the composition of every component's section, loading with
//! `${env:…}` substitution, and validation that reports every problem with its key path
//! and line. Each component's section (schema, defaults, validation) lives beside the
//! component; values every component uses (durations, sizes) in `crate::units`.

use std::path::Path;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_yaml_ng::{Mapping, Value};

mod env;
mod locator;

pub use env::substitute_env;
use locator::Locator;

// The sections, where they are defined, for those who compose or read a whole config.
pub use crate::cluster::config::*;
pub use crate::exporter::config::*;
pub use crate::llm::config::*;
pub use crate::pipeline::limits::*;
pub use crate::receiver::config::*;
pub use crate::sampling::config::*;
pub use crate::storage::{StorageConfig, SyncPolicy};
pub use crate::telemetry::config::*;
pub use crate::units::{ByteSize, Dur};

/// How many problems one section may report before validation stops repairing it.
const MAX_PROBLEMS_PER_SECTION: usize = 64;

/// One problem found in the config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub line: Option<usize>,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            Some(line) => write!(f, "line {line}: {}: {}", self.path, self.message),
            None => write!(f, "{}: {}", self.path, self.message),
        }
    }
}

/// Every problem found in a config file.
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
pub struct ConfigErrors(pub Vec<Problem>);

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Config {
    pub receiver: ReceiverConfig,
    pub sampling: SamplingConfig,
    /// From `exporter:` (one, named "default") or `exporters:` (several, each named).
    pub exporters: Vec<ExporterConfig>,
    pub admin: AdminConfig,
    pub llm: LlmConfig,
    pub limits: LimitsConfig,
    pub cluster: ClusterConfig,
    /// The trace log: where every accepted request is written before it is acknowledged.
    pub storage: StorageConfig,
    /// Longest a graceful shutdown may take to decide and flush everything pending.
    pub shutdown_timeout: Duration,
    /// Keys this release still reads under an old name, each with its replacement: said
    /// at start and by `--validate`, never an error.
    pub warnings: Vec<Problem>,
}

/// `shutdown_timeout`, read on its own.
#[derive(serde::Deserialize)]
struct TopLevelTimeout(Dur);

/// Default for `shutdown_timeout`.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(20);

const TOP_LEVEL_KEYS: &[&str] = &[
    "receiver",
    "sampling",
    "exporter",
    "exporters",
    "admin",
    "llm",
    "limits",
    "cluster",
    "storage",
    "shutdown_timeout",
];

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![Problem {
                path: path.display().to_string(),
                line: None,
                message: format!("cannot read the config file: {e}"),
            }])
        })?;
        Config::parse(&text)
    }

    /// Parses and validates a config; on failure returns every problem found.
    pub fn parse(text: &str) -> Result<Config, ConfigErrors> {
        let (text, mut problems) = substitute_env(text, |name| std::env::var(name).ok());
        let value: Value = match serde_yaml_ng::from_str(&text) {
            Ok(Value::Null) => Value::Mapping(Mapping::new()),
            Ok(v) => v,
            Err(e) => {
                problems.push(Problem {
                    path: "(document)".into(),
                    line: e.location().map(|l| l.line()),
                    message: format!("not valid YAML: {e}"),
                });
                return Err(ConfigErrors(problems));
            }
        };
        let locator = Locator::new(&text);
        let Value::Mapping(top) = value else {
            problems.push(Problem {
                path: "(document)".into(),
                line: Some(1),
                message: "the config must be a mapping of sections".into(),
            });
            return Err(ConfigErrors(problems));
        };
        let report = |path: Vec<String>, message: String, problems: &mut Vec<Problem>| {
            problems.push(Problem {
                line: locator.line(&path),
                path: render(&path),
                message,
            });
        };
        for key in top.keys() {
            let name = key.as_str().unwrap_or("");
            if !TOP_LEVEL_KEYS.contains(&name) {
                report(
                    vec![name.to_owned()],
                    format!("unknown section; allowed: {}", TOP_LEVEL_KEYS.join(", ")),
                    &mut problems,
                );
            }
        }
        let section = |name: &str| {
            top.get(name)
                .cloned()
                .unwrap_or(Value::Mapping(Mapping::new()))
        };
        let mut cfg = Config {
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            ..Config::default()
        };
        // Each section is deserialised and validated on its own, so one bad section does
        // not hide the problems of the others.
        macro_rules! load {
            ($($field:ident),*) => {$(
                let name = stringify!($field);
                if let Some(c) = load_section(vec![name.into()], section(name), &mut problems, &report) {
                    cfg.$field = c;
                }
            )*};
        }
        load!(receiver, sampling, admin, llm, limits, cluster, storage);
        match (top.get("exporter"), top.get("exporters")) {
            (Some(_), Some(_)) => report(
                vec!["exporters".into()],
                "use either exporter (one) or exporters (a list), not both".into(),
                &mut problems,
            ),
            (None, None) => problems.push(Problem {
                path: "exporter".into(),
                line: None,
                message: "required: set exporter.otlp.endpoint, or exporter.file.path when there is no upstream".into(),
            }),
            (Some(one), None) => {
                if let Some(mut c) = load_section::<ExporterConfig>(vec!["exporter".into()], one.clone(), &mut problems, &report) {
                    c.name = DEFAULT_EXPORTER_NAME.into();
                    cfg.exporters = vec![c];
                }
            }
            (None, Some(Value::Sequence(list))) if !list.is_empty() => {
                for (i, item) in list.iter().enumerate() {
                    let path = vec!["exporters".to_owned(), i.to_string()];
                    if item.get("name").is_none() {
                        report(path.clone(), "every entry of exporters needs a name".into(), &mut problems);
                    }
                    if let Some(c) = load_section::<ExporterConfig>(path.clone(), item.clone(), &mut problems, &report) {
                        if cfg.exporters.iter().any(|e| e.name == c.name) {
                            report([path, vec!["name".into()]].concat(), format!("duplicate exporter name {:?}", c.name), &mut problems);
                        }
                        cfg.exporters.push(c);
                    }
                }
            }
            (None, Some(_)) => report(
                vec!["exporters".into()],
                "must be a non-empty list of exporters, each with a name".into(),
                &mut problems,
            ),
        }
        if let Some(v) = top.get("shutdown_timeout") {
            match serde_yaml_ng::from_value::<TopLevelTimeout>(v.clone()) {
                Ok(TopLevelTimeout(d)) => cfg.shutdown_timeout = d.0,
                Err(e) => report(
                    vec!["shutdown_timeout".into()],
                    e.to_string(),
                    &mut problems,
                ),
            }
        }
        if cfg.cluster.enabled() && cfg.receiver.grpc.tls.is_some() && cfg.cluster.tls.is_none() {
            report(
                vec!["cluster".into()],
                "receiver.grpc serves TLS, so peers must be reached over TLS: set cluster.tls (ca_file, and cert_file/key_file for mutual TLS)".into(),
                &mut problems,
            );
        }
        for (i, e) in cfg.exporters.iter().enumerate() {
            if e.queue.directory.is_none() {
                continue;
            }
            let path = match top.get("exporters") {
                Some(_) => vec![
                    "exporters".into(),
                    i.to_string(),
                    "queue".into(),
                    "directory".into(),
                ],
                None => vec!["exporter".into(), "queue".into(), "directory".into()],
            };
            let message = if cfg.storage.memory {
                report(path, "the old write-ahead log's kept spans cannot move into a trace log in memory (storage.memory): set storage.directory, or remove this key once that log is empty".into(), &mut problems);
                continue;
            } else if cfg.storage.directory.is_none() {
                // Upgrading: the old log's directory holds the trace log from now on.
                cfg.storage.directory = e.queue.directory.clone();
                if e.queue.fsync_interval.0.is_zero() {
                    cfg.storage.sync = crate::storage::SyncPolicy::Always;
                }
                "deprecated: the trace log (storage.directory) now lives in this directory, and what the old write-ahead log holds is moved into it at start; set storage.directory instead"
            } else {
                "deprecated: what the old write-ahead log here holds is moved into the trace log (storage.directory) at start; remove this key after that"
            };
            cfg.warnings.push(Problem {
                line: locator.line(&path),
                path: render(&path),
                message: message.into(),
            });
        }
        for (key, message) in cfg.sampling.deprecations() {
            let path = vec!["sampling".to_owned(), key];
            cfg.warnings.push(Problem {
                line: locator.line(&path),
                path: render(&path),
                message,
            });
        }
        if problems.is_empty() {
            Ok(cfg)
        } else {
            // In the order of the file; problems without a line (a missing section) last.
            problems.sort_by_key(|p| p.line.unwrap_or(usize::MAX));
            Err(ConfigErrors(problems))
        }
    }
}

/// A config section that checks its own values.
trait Validate {
    /// Problems as (key path relative to the section, message).
    fn validate(&self) -> Vec<(String, String)>;
}

macro_rules! validated {
    ($($t:ty),*) => {$(
        impl Validate for $t {
            fn validate(&self) -> Vec<(String, String)> {
                <$t>::validate(self)
            }
        }
    )*};
}
validated!(
    ReceiverConfig,
    SamplingConfig,
    ExporterConfig,
    AdminConfig,
    LlmConfig,
    LimitsConfig,
    ClusterConfig,
    StorageConfig
);

/// Deserializes and validates one section, reporting every problem under `path`, once,
/// at the key and item of the file it is about.
fn load_section<T: DeserializeOwned + Validate>(
    path: Vec<String>,
    value: Value,
    problems: &mut Vec<Problem>,
    report: &impl Fn(Vec<String>, String, &mut Vec<Problem>),
) -> Option<T> {
    let (parsed, errs, removed) = deserialize_repairing::<T>(value);
    let reported: Vec<Vec<String>> = errs.iter().map(|(p, _)| p.clone()).collect();
    for (rel, msg) in errs {
        report([path.clone(), rel].concat(), msg, problems);
    }
    let parsed = parsed?;
    for (suffix, msg) in parsed.validate() {
        let rel = removed.original(&split_path(&suffix));
        // A value already reported as unreadable is not reported again as missing.
        if reported.contains(&rel) {
            continue;
        }
        report([path.clone(), rel].concat(), msg, problems);
    }
    Some(parsed)
}

/// A problem at a path (segments) of a section.
type PathProblem = (Vec<String>, String);

/// Items taken out of sequences while repairing a section: (the sequence's path, the
/// item's index), both as in the file.
#[derive(Default)]
struct Removed(Vec<(Vec<String>, usize)>);

impl Removed {
    /// A path into the repaired value as a path into the file: an index in a sequence
    /// that lost items counts the items removed before it.
    fn original(&self, path: &[String]) -> Vec<String> {
        let mut out: Vec<String> = Vec::with_capacity(path.len());
        for seg in path {
            match seg.parse::<usize>() {
                Ok(i) if self.0.iter().any(|(p, _)| *p == out) => {
                    let mut gone: Vec<usize> = self
                        .0
                        .iter()
                        .filter(|(p, _)| *p == out)
                        .map(|(_, r)| *r)
                        .collect();
                    gone.sort_unstable();
                    let mut j = i;
                    for r in gone {
                        if r <= j {
                            j += 1;
                        }
                    }
                    out.push(j.to_string());
                }
                _ => out.push(seg.clone()),
            }
        }
        out
    }
}

/// Deserializes `value` as `T`; on an error, records it, removes the offending key and
/// tries again, so one pass reports every unknown key and every bad value of a section.
/// Paths are as in the file (see [`Removed`]); a `missing field` that is only the
/// consequence of removing a bad value of that field is not reported again.
fn deserialize_repairing<T: DeserializeOwned>(
    mut value: Value,
) -> (Option<T>, Vec<PathProblem>, Removed) {
    let mut errors: Vec<PathProblem> = Vec::new();
    let mut removed = Removed::default();
    for _ in 0..MAX_PROBLEMS_PER_SECTION * 2 {
        if errors.len() >= MAX_PROBLEMS_PER_SECTION {
            break;
        }
        match serde_path_to_error::deserialize::<_, T>(value.clone()) {
            Ok(parsed) => return (Some(parsed), errors, removed),
            Err(e) => {
                let path: Vec<String> = e
                    .path()
                    .iter()
                    .filter_map(|seg| match seg {
                        serde_path_to_error::Segment::Seq { index } => Some(index.to_string()),
                        serde_path_to_error::Segment::Map { key } => Some(key.clone()),
                        serde_path_to_error::Segment::Enum { variant } => Some(variant.clone()),
                        serde_path_to_error::Segment::Unknown => None,
                    })
                    .collect();
                let message = e.into_inner().to_string();
                let original = removed.original(&path);
                let consequence = message
                    .strip_prefix("missing field `")
                    .and_then(|m| m.split('`').next())
                    .is_some_and(|field| {
                        let mut key = original.clone();
                        key.push(field.to_owned());
                        errors.iter().any(|(p, _)| *p == key)
                    });
                let removal = remove_at(&mut value, &path);
                if !consequence {
                    errors.push((original.clone(), message));
                }
                match removal {
                    None => return (None, errors, removed),
                    Some(Removal::Item(index)) => {
                        let parent = original[..original.len() - 1].to_vec();
                        let index = original
                            .last()
                            .and_then(|s| s.parse().ok())
                            .unwrap_or(index);
                        removed.0.push((parent, index));
                    }
                    Some(Removal::Key) => {}
                }
            }
        }
    }
    (None, errors, removed)
}

/// What [`remove_at`] took out.
enum Removal {
    Key,
    /// An item of a sequence, at this index of the repaired value.
    Item(usize),
}

/// Removes the node at `path` (a key of a mapping or an item of a sequence).
fn remove_at(value: &mut Value, path: &[String]) -> Option<Removal> {
    let (last, parents) = path.split_last()?;
    let mut node = value;
    for seg in parents {
        node = match node {
            Value::Mapping(m) => m.get_mut(seg.as_str())?,
            Value::Sequence(s) => seg.parse::<usize>().ok().and_then(|i| s.get_mut(i))?,
            _ => return None,
        };
    }
    match node {
        Value::Mapping(m) => m.remove(last.as_str()).map(|_| Removal::Key),
        Value::Sequence(s) => match last.parse::<usize>() {
            Ok(i) if i < s.len() => {
                s.remove(i);
                Some(Removal::Item(i))
            }
            _ => None,
        },
        _ => None,
    }
}

fn split_path(suffix: &str) -> Vec<String> {
    suffix
        .split(['.', '[', ']'])
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// `["sampling", "policies", "0", "rate"]` → `sampling.policies[0].rate`.
fn render(path: &[String]) -> String {
    let mut out = String::new();
    for seg in path {
        if seg.parse::<usize>().is_ok() {
            out.push_str(&format!("[{seg}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(seg);
        }
    }
    out
}

#[cfg(test)]
mod tests;
