//! deploy/: the alert rules pass `promtool check rules` and their unit tests (`promtool test
//! rules`), and every query of the rules and of the Grafana dashboard names a metric the
//! daemon registers.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use llmtail::telemetry::Metrics;

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(path)
}

/// Metric names in a PromQL expression: identifiers of llmtail's and the GenAI metrics
/// (label names such as `gen_ai_request_model` are not metric names and are skipped).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut ident = String::new();
    for c in expr.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            ident.push(c);
            continue;
        }
        if ident.starts_with("llmtail_") || ident.starts_with("gen_ai_client_") {
            names.insert(std::mem::take(&mut ident));
        }
        ident.clear();
    }
    names
}

/// Checks every name against the registered metrics (a histogram's `_bucket`, `_sum` and
/// `_count` series count as its name).
fn assert_exported(names: &BTreeSet<String>, what: &str) {
    let registered: BTreeSet<String> = Metrics::new().names.iter().cloned().collect();
    for name in names {
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|b| registered.contains(*b)))
            .unwrap_or(name);
        assert!(
            registered.contains(base),
            "{what} queries {name}, which llmtail does not export"
        );
    }
}

fn exprs_in_json(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr", serde_json::Value::String(s)) => out.push(s.clone()),
                    // A variable's query (`label_values(…)`); a datasource variable's query
                    // is only a plugin name.
                    ("query", serde_json::Value::String(s)) if s.contains('(') => {
                        out.push(s.clone())
                    }
                    _ => exprs_in_json(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| exprs_in_json(v, out)),
        _ => {}
    }
}

#[test]
fn every_dashboard_query_names_an_exported_metric() {
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(deploy("grafana/llmtail-dashboard.json")).unwrap(),
    )
    .unwrap();
    let mut exprs = Vec::new();
    exprs_in_json(&dash, &mut exprs);
    assert!(exprs.len() >= 14, "{} queries", exprs.len());
    let mut names = BTreeSet::new();
    for e in &exprs {
        let found = metric_names(e);
        assert!(!found.is_empty(), "query names no llmtail metric: {e}");
        names.extend(found);
    }
    assert_exported(&names, "the dashboard");
    // What the dashboard must show.
    for needed in [
        "llmtail_llm_cost_usd_total",
        "llmtail_llm_user_cost_usd_total",
        "llmtail_llm_tokens_total",
        "llmtail_llm_latency_seconds_bucket",
        "llmtail_llm_requests_total",
        "llmtail_llm_anomalies_total",
        "llmtail_traces_total",
    ] {
        assert!(
            names.contains(needed),
            "the dashboard does not show {needed}"
        );
    }
}

#[test]
fn every_alert_rule_names_an_exported_metric() {
    let rules: serde_yaml_ng::Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(deploy("prometheus/llmtail-rules.yaml")).unwrap(),
    )
    .unwrap();
    let mut names = BTreeSet::new();
    let mut alerts = 0;
    for group in rules["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            alerts += 1;
            let found = metric_names(rule["expr"].as_str().unwrap());
            assert!(
                !found.is_empty(),
                "{:?} names no llmtail metric",
                rule["alert"]
            );
            names.extend(found);
        }
    }
    assert_eq!(alerts, 7);
    assert_exported(&names, "the alert rules");
}

fn promtool(args: &[&str]) {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(deploy("prometheus"))
        .output()
        .expect("promtool runs (tests/install-deps.sh installs Debian's prometheus package)");
    assert!(
        out.status.success(),
        "promtool {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_alert_rules_pass_promtool_check_and_their_unit_tests() {
    promtool(&["check", "rules", "llmtail-rules.yaml"]);
    promtool(&["test", "rules", "llmtail-rules.test.yaml"]);
}
