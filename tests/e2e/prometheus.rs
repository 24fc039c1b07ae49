//! A real Prometheus (Debian's `prometheus` server) scrapes llmtail every second while
//! production-shaped load runs (`llmtail_tools::mix`: 20 services, 30 models, Zipf users,
//! agent traces), with one healthy upstream and one that is down. Every Grafana panel
//! query and every alert expression of `deploy/` is then evaluated through Prometheus's
//! HTTP API: each returns series where this scenario says it must (and the alerts that must
//! stay quiet return none), the rule file loads with every rule healthy, and
//! `promtool check metrics` finds nothing to say about `/metrics`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::*;

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(path)
}

/// The Prometheus server, killed on drop.
struct Prometheus {
    child: Child,
    addr: std::net::SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Scrapes `target` every second and evaluates the rule file every second.
    fn start(target: std::net::SocketAddr) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: llmtail\n    static_configs:\n      - targets: ['{target}']\n",
                deploy("prometheus/llmtail-rules.yaml").display()
            ),
        )
        .unwrap();
        let port = free_port();
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("prometheus.log")).unwrap())
            .spawn()
            .expect("prometheus runs (Debian's prometheus package; run tests/install-deps.sh)");
        Prometheus {
            child,
            addr,
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// GET `path` of the HTTP API; the `data` of a successful answer.
    fn api(&self, path: &str) -> Result<Value, String> {
        let (status, _, body) = http_request(self.addr, "GET", path, &[], b"");
        let body: Value = serde_json::from_slice(&body)
            .map_err(|e| format!("{path}: {status}: {e}: {}", String::from_utf8_lossy(&body)))?;
        if status != 200 || body["status"] != "success" {
            return Err(format!("{path}: {status}: {body}"));
        }
        Ok(body["data"].clone())
    }

    /// An instant query's result vector.
    fn query(&self, expr: &str) -> Vec<Value> {
        let path = format!("/api/v1/query?query={}", urlencode(expr));
        match self.api(&path) {
            Ok(data) => data["result"].as_array().cloned().unwrap_or_default(),
            Err(e) => panic!("{expr}: {e}"),
        }
    }

    /// Waits until `done` holds, querying Prometheus (at most `timeout`).
    async fn wait(&self, what: &str, timeout: Duration, done: impl Fn(&Prometheus) -> bool) {
        let end = Instant::now() + timeout;
        loop {
            let up = http_get(self.addr, "/-/ready").is_some_and(|(code, _)| code == 200);
            if up && done(self) {
                return;
            }
            assert!(
                Instant::now() < end,
                "Prometheus never saw {what}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Every panel's queries in the dashboard: (panel title, PromQL).
fn dashboard_queries() -> Vec<(String, String)> {
    fn walk(v: &Value, out: &mut Vec<(String, String)>) {
        if let Some(panels) = v["panels"].as_array() {
            for p in panels {
                for t in p["targets"].as_array().into_iter().flatten() {
                    if let Some(expr) = t["expr"].as_str() {
                        out.push((
                            p["title"].as_str().unwrap_or("").to_owned(),
                            expr.to_owned(),
                        ));
                    }
                }
                walk(p, out);
            }
        }
    }
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(deploy("grafana/llmtail-dashboard.json")).unwrap(),
    )
    .unwrap();
    let mut out = Vec::new();
    walk(&dashboard, &mut out);
    out
}

/// Every alert of the rule file: (name, expression).
fn alert_rules() -> Vec<(String, String)> {
    let rules: serde_yaml_ng::Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(deploy("prometheus/llmtail-rules.yaml")).unwrap(),
    )
    .unwrap();
    rules["groups"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_sequence().unwrap().iter())
        .map(|r| {
            (
                r["alert"].as_str().unwrap().to_owned(),
                r["expr"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn label<'a>(series: &'a Value, name: &str) -> &'a str {
    series["metric"][name].as_str().unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_evaluates_every_dashboard_query_and_alert_against_a_loaded_daemon() {
    let sink = Sink::start_counting(0).await;
    // Nothing listens there: the "down" upstream refuses every connection.
    let dead = free_port();
    let daemon = Daemon::start(&format!(
        "sampling:\n  decision_wait: 2s\n  root_grace: 300ms\n  base_rate: 0.1\n  policies:\n    - {{name: errors, type: error}}\n    - {{name: slow, type: latency, threshold_ms: 5000}}\n    - {{name: expensive, type: cost, threshold_usd: 0.05}}\nexporters:\n  - name: tempo\n    otlp:\n      endpoint: {}\n    batch:\n      timeout: 100ms\n  - name: down\n    otlp:\n      endpoint: http://127.0.0.1:{dead}\n    batch:\n      timeout: 100ms\n    retry:\n      initial_interval: 100ms\n      max_interval: 200ms\n      max_elapsed: 1s\n",
        sink.endpoint()
    ));

    // `promtool check metrics`: the exposition is clean (names, units, help, types).
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs (tests/install-deps.sh)");

    let prometheus = Prometheus::start(daemon.admin);

    // Production-shaped load for as long as the checks need (at most 90 s), plus one
    // malformed span per request (a 5-byte trace id), which llmtail rejects alone.
    let load = MixLoad::start(daemon.endpoint(), 7, true);

    // Scraped, with samples enough for every rate() window, and the rules loaded.
    prometheus
        .wait("15 s of scrapes under load", Duration::from_secs(60), |p| {
            p.query("count_over_time(llmtail_spans_received_total[5m])")
                .iter()
                .any(|s| s["value"][1].as_str().unwrap().parse::<f64>().unwrap() >= 15.0)
                && !p
                    .query("llmtail_spans_lost_total{exporter=\"down\"}")
                    .is_empty()
        })
        .await;
    let targets = prometheus.api("/api/v1/targets").unwrap();
    let target = &targets["activeTargets"][0];
    assert_eq!(target["health"], "up", "{target}");

    let metrics_text = http_get(daemon.admin, "/metrics").unwrap().1;
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(metrics_text.as_bytes())
        .unwrap();
    let lint = promtool.wait_with_output().unwrap();
    assert!(
        lint.status.success() && lint.stdout.is_empty() && lint.stderr.is_empty(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&lint.stdout),
        String::from_utf8_lossy(&lint.stderr)
    );

    // The dashboard's service variable, then every panel query with "All" and with one
    // service: each returns series.
    let services = prometheus
        .api("/api/v1/label/service/values?match[]=llmtail_llm_requests_total")
        .unwrap();
    let services: Vec<&str> = services
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert!(services.len() >= 10, "{services:?}");
    let queries = dashboard_queries();
    assert!(queries.len() >= 20, "{} queries", queries.len());
    let mut empty = Vec::new();
    for (title, expr) in &queries {
        for service in [".*", services[0]] {
            let expr = expr.replace("$service", service);
            let result = prometheus.query(&expr);
            if result.is_empty() {
                empty.push(format!("{title}: {expr}"));
            }
            // A NaN (0/0) or a missing bucket says the panel shows nothing useful.
            for series in &result {
                let value = series["value"][1].as_str().unwrap();
                assert!(
                    value != "NaN" || expr.contains("histogram_quantile") || expr.contains(" / "),
                    "{title}: {expr} = {value}"
                );
            }
        }
    }
    assert!(
        empty.is_empty(),
        "panels without data:\n{}",
        empty.join("\n")
    );

    // Alerts. The pipeline's: the down upstream loses spans and exports nothing, the
    // healthy one neither; nothing is refused and the buffer is far from its limit.
    let alerts: std::collections::HashMap<String, String> = alert_rules().into_iter().collect();
    assert_eq!(alerts.len(), 7, "{:?}", alerts.keys());
    let fired = |name: &str| prometheus.query(&alerts[name]);
    let lost = fired("LLMTailSpansLost");
    assert!(!lost.is_empty());
    assert!(
        lost.iter()
            .all(|s| label(s, "exporter") == "down" && label(s, "reason") == "retries_exhausted"),
        "{lost:?}"
    );
    let failing = fired("LLMTailExportFailing");
    assert_eq!(failing.len(), 1, "{failing:?}");
    assert_eq!(label(&failing[0], "exporter"), "down");
    assert!(fired("LLMTailOverloaded").is_empty());
    assert!(fired("LLMTailBufferNearLimit").is_empty());
    // All the spend is in the last hour, so it is a spike against the day's average, for
    // every service that spent more than $1.
    let spike = fired("LLMCostSpike");
    assert!(!spike.is_empty());
    assert!(spike.iter().all(|s| !label(s, "service").is_empty()));
    // The LLM alerts' ratios (the expression before its threshold) have a series for every
    // service and model with calls; the thresholds themselves depend on the draw.
    for (name, ratio) in [
        (
            "LLMLatencyAnomalies",
            alerts["LLMLatencyAnomalies"].rsplit_once(" > "),
        ),
        (
            "LLMErrorRateHigh",
            alerts["LLMErrorRateHigh"].rsplit_once(" > "),
        ),
    ] {
        let (ratio, _) = ratio.unwrap_or_else(|| panic!("{name}: no threshold"));
        let series = prometheus.query(ratio);
        assert!(series.len() >= 10, "{name}: {} series", series.len());
        assert!(
            series
                .iter()
                .all(|s| !label(s, "service").is_empty() && !label(s, "model").is_empty()),
            "{name}: {series:?}"
        );
        prometheus.query(&alerts[name]);
    }

    // The rule groups loaded, and every rule evaluates without error.
    let rules = prometheus.api("/api/v1/rules").unwrap();
    let loaded: Vec<&Value> = rules["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .collect();
    assert_eq!(loaded.len(), alerts.len());
    for rule in &loaded {
        assert_eq!(rule["health"], "ok", "{rule}");
    }

    let (_, rejected) = load.finish().await;
    assert!(rejected > 0, "the malformed spans were rejected alone");
    assert!(sink.distinct_spans() > 0);
}
