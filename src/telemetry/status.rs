//! The status page at the admin server's `/`: one self-contained HTML page (embedded in the
//! binary: no CDN, no build step) that polls `GET /api/status` and shows what is coming in
//! and going out, what is kept and why, memory, the export queue, the cluster, LLM spend
//! and the most recent kept traces. `/api/status` is the metrics registry as JSON (so the
//! page and `/metrics` never disagree) plus what only the process knows: members, memory
//! against the container's limit, recent kept traces.

use std::collections::VecDeque;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use prometheus::proto::MetricType;
use serde_json::{Map, Value, json};

use super::Metrics;
use crate::otlp::TraceId;

/// The page itself.
pub const PAGE: &str = include_str!("status.html");

/// Kept traces the page lists.
const RECENT: usize = 50;

/// How often the metrics are sampled for the page's rates, and the window they are taken
/// over: rates come from the server's own samples, so they are right from the first load
/// and whatever the browser's timing.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);
const RATE_WINDOW: Duration = Duration::from_secs(10);
const HISTORY: usize = 12;

/// A kept trace, as the page lists it.
#[derive(Debug, Clone)]
pub struct KeptTrace {
    pub trace_id: TraceId,
    pub policy: &'static str,
    pub reason: &'static str,
    pub service: Arc<str>,
    pub spans: usize,
    pub duration_ms: f64,
    pub error: bool,
    pub calls: u32,
    pub cost_usd: f64,
    pub user: Option<Arc<str>>,
    pub dry_run: bool,
}

/// The last [`RECENT`] kept traces, newest last.
#[derive(Default)]
pub struct RecentKept {
    traces: Mutex<VecDeque<(u64, KeptTrace)>>,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl RecentKept {
    /// Adds a decision tick's kept traces (one lock per tick).
    pub fn add(&self, kept: impl IntoIterator<Item = KeptTrace>) {
        let now = unix_ms();
        let mut traces = self.traces.lock();
        for trace in kept {
            if traces.len() == RECENT {
                traces.pop_front();
            }
            traces.push_back((now, trace));
        }
    }

    fn to_json(&self) -> Value {
        let traces = self.traces.lock();
        Value::Array(
            traces
                .iter()
                .rev()
                .map(|(at, t)| {
                    json!({
                        "at_ms": at,
                        "trace_id": t.trace_id.to_string(),
                        "policy": t.policy,
                        "reason": t.reason,
                        "service": &*t.service,
                        "spans": t.spans,
                        "duration_ms": t.duration_ms,
                        "error": t.error,
                        "llm_calls": t.calls,
                        "cost_usd": t.cost_usd,
                        "user": t.user.as_deref(),
                        "dry_run": t.dry_run,
                    })
                })
                .collect(),
        )
    }
}

/// What the process knows beyond its metrics, set once the pipeline exists.
pub type LiveStatus = Box<dyn Fn() -> Value + Send + Sync>;

/// The status page's state.
pub struct StatusPage {
    pub started: Instant,
    /// `admin.trace_url`: a link to the user's trace backend, `{trace_id}` replaced.
    pub trace_url: Option<String>,
    /// Whether `/debug/traces/{id}` is served (the page links kept traces to it).
    pub debug_traces: bool,
    /// The container's memory limit, read at start.
    pub memory_limit: Option<u64>,
    pub recent: Arc<RecentKept>,
    /// Cluster members and the like, from the pipeline.
    pub live: OnceLock<LiveStatus>,
    /// Samples of the metrics, oldest first: (taken, Unix ms, metrics).
    history: Mutex<VecDeque<(Instant, u64, Arc<Value>)>>,
}

impl StatusPage {
    pub fn new(
        trace_url: Option<String>,
        debug_traces: bool,
        memory_limit: Option<u64>,
    ) -> StatusPage {
        StatusPage {
            started: Instant::now(),
            trace_url,
            debug_traces,
            memory_limit,
            recent: Arc::default(),
            live: OnceLock::new(),
            history: Mutex::default(),
        }
    }

    /// Takes a sample of the metrics (every [`SAMPLE_EVERY`]).
    pub fn sample(&self, metrics: &Metrics) {
        let sample = Arc::new(metrics_json(metrics));
        let mut history = self.history.lock();
        if history.len() == HISTORY {
            history.pop_front();
        }
        history.push_back((Instant::now(), unix_ms(), sample));
    }

    /// The sample rates are taken against: the newest at least [`RATE_WINDOW`] old, else
    /// the oldest.
    fn before(&self) -> Option<Value> {
        let history = self.history.lock();
        let (_, at, metrics) = history
            .iter()
            .rev()
            .find(|(t, _, _)| t.elapsed() >= RATE_WINDOW)
            .or(history.front())?;
        Some(json!({"now_ms": at, "metrics": &**metrics}))
    }

    /// The body of `GET /api/status`.
    pub fn to_json(&self, metrics: &Metrics, ready: bool, healthy: bool) -> Value {
        let mut out = json!({
            "version": env!("CARGO_PKG_VERSION"),
            "now_ms": unix_ms(),
            "uptime_s": self.started.elapsed().as_secs(),
            "ready": ready,
            "healthy": healthy,
            "trace_url": self.trace_url,
            "debug_traces": self.debug_traces,
            "memory": {
                "resident_bytes": resident_bytes(),
                "limit_bytes": self.memory_limit,
            },
            "recent_kept": self.recent.to_json(),
            "metrics": metrics_json(metrics),
            "before": self.before(),
        });
        if let (Some(live), Some(map)) = (self.live.get(), out.as_object_mut())
            && let Value::Object(extra) = live()
        {
            map.extend(extra);
        }
        out
    }
}

/// The process's resident memory, from `/proc/self/statm` (Linux).
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// Every llmtail metric family: `{name: [{labels, value}]}`, histograms as
/// `{labels, count, sum, buckets: [[le, cumulative count], ...]}`.
fn metrics_json(metrics: &Metrics) -> Value {
    let mut out = Map::new();
    for family in metrics.registry.gather() {
        let series: Vec<Value> = family
            .get_metric()
            .iter()
            .map(|m| {
                let labels: Map<String, Value> = m
                    .get_label()
                    .iter()
                    .map(|l| (l.name().to_owned(), Value::from(l.value())))
                    .collect();
                match family.get_field_type() {
                    MetricType::COUNTER => {
                        json!({"labels": labels, "value": m.get_counter().get_value()})
                    }
                    MetricType::GAUGE => {
                        json!({"labels": labels, "value": m.get_gauge().get_value()})
                    }
                    MetricType::HISTOGRAM => {
                        let h = m.get_histogram();
                        let buckets: Vec<Value> = h
                            .get_bucket()
                            .iter()
                            .map(|b| json!([b.upper_bound(), b.cumulative_count()]))
                            .collect();
                        json!({
                            "labels": labels,
                            "count": h.get_sample_count(),
                            "sum": h.get_sample_sum(),
                            "buckets": buckets,
                        })
                    }
                    _ => json!({"labels": labels}),
                }
            })
            .collect();
        out.insert(family.name().to_owned(), Value::Array(series));
    }
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kept(n: u8) -> KeptTrace {
        KeptTrace {
            trace_id: TraceId([n; 16]),
            policy: "errors",
            reason: "root",
            service: Arc::from("chat"),
            spans: 12,
            duration_ms: 1500.0,
            error: true,
            calls: 3,
            cost_usd: 0.02,
            user: Some(Arc::from("u-1")),
            dry_run: false,
        }
    }

    #[test]
    fn recent_kept_traces_are_the_last_ones_newest_first() {
        let recent = RecentKept::default();
        recent.add((0..RECENT as u8 + 10).map(kept));
        let Value::Array(list) = recent.to_json() else {
            panic!("an array")
        };
        assert_eq!(list.len(), RECENT);
        let last = RECENT as u8 + 9;
        assert_eq!(list[0]["trace_id"], TraceId([last; 16]).to_string());
        assert_eq!(list[RECENT - 1]["trace_id"], TraceId([10; 16]).to_string());
        assert_eq!(list[0]["policy"], "errors");
    }

    #[test]
    fn the_status_is_the_registry_as_json() {
        let metrics = Metrics::new();
        metrics
            .traces
            .with_label_values(&["kept", "errors"])
            .inc_by(7);
        metrics.decision_delay.observe(0.5);
        let page = StatusPage::new(Some("https://t/{trace_id}".into()), true, Some(1 << 30));
        let status = page.to_json(&metrics, true, true);
        let traces = status["metrics"]["llmtail_traces_total"]
            .as_array()
            .unwrap();
        let series = traces
            .iter()
            .find(|s| s["labels"]["policy"] == "errors" && s["labels"]["decision"] == "kept")
            .expect("the kept-by-errors series");
        assert_eq!(series["value"], 7.0);
        let delay = &status["metrics"]["llmtail_decision_delay_seconds"][0];
        assert_eq!(delay["count"], 1);
        assert!(delay["buckets"].as_array().unwrap().len() > 3);
        assert_eq!(status["trace_url"], "https://t/{trace_id}");
        // Rates are taken against the server's own samples.
        assert!(status["before"].is_null());
        page.sample(&metrics);
        metrics
            .traces
            .with_label_values(&["kept", "errors"])
            .inc_by(3);
        let status = page.to_json(&metrics, true, true);
        let before = &status["before"]["metrics"]["llmtail_traces_total"];
        assert!(
            before
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s["labels"]["policy"] == "errors" && s["value"] == 7.0),
            "{before}"
        );
        assert!(status["memory"]["resident_bytes"].as_u64().unwrap() > 0);
    }

    #[test]
    fn the_page_is_self_contained() {
        // No script, style or font from anywhere else: the page works without internet.
        for outside in ["src=\"http", "href=\"http", "@import", "url(http", "//cdn"] {
            assert!(!PAGE.contains(outside), "{outside}");
        }
        assert!(PAGE.contains("name=\"viewport\""), "usable on a phone");
        // Relative, so the page also works behind a proxy that serves it under a path.
        assert!(PAGE.contains("new URL(\"api/status\""));
    }
}
