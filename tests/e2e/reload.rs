//! Config reload on SIGHUP: policies, base rate and limits change live without losing
//! buffered traces; an invalid config is rejected with its problems and the old one stays.

use std::collections::HashSet;
use std::time::Duration;

use crate::support::*;
use llmtail_tools::loadgen::Kind;

/// Traces sent before the reload wait this long for their decision: long enough that the
/// reload is applied while they are held, however loaded the machine. Those sent after it
/// wait [`AFTER`].
const HOLD: &str = "15s";
const AFTER: &str = "1s";

fn body(sink: &Sink, base_rate: f64, hold: &str, extra: &str) -> String {
    format!(
        "sampling:\n  decision_wait: {hold}\n  root_grace: {hold}\n  base_rate: {base_rate}\n  policies:\n    - {{name: errors, type: error}}\n{extra}exporter:\n  otlp:\n    endpoint: {}\n  batch:\n    timeout: 50ms\n",
        sink.endpoint()
    )
}

async fn send_normal(d: &Daemon, seed: u64, n: usize) -> HashSet<Vec<u8>> {
    let traces = generated(seed, Kind::Normal, n);
    send_traces(d, &traces).await;
    traces.iter().map(|t| t.trace_id.to_vec()).collect()
}

/// Waits for one reload with `result` (however loaded the machine) and returns the
/// metrics that show it.
async fn reloaded(d: &Daemon, result: &str) -> Metrics {
    let count = |m: &Metrics| m.sum("llmtail_config_reloads_total", &[("result", result)]);
    let m = d
        .wait_metrics(Duration::from_secs(15), |m| count(m) == 1.0)
        .await;
    assert_eq!(count(&m), 1.0, "no reload {result}: {}", d.log());
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_a_valid_config_to_buffered_traces_and_rejects_an_invalid_one() {
    let sink = Sink::start(0).await;
    let d = Daemon::start(&body(&sink, 0.0, HOLD, ""));
    // Held under base_rate 0: none of these would be kept.
    let held = send_normal(&d, 21, 30).await;
    let m = d
        .wait_metrics(Duration::from_secs(5), |m| {
            m.sum("llmtail_buffer_traces", &[]) == 30.0
        })
        .await;
    assert_eq!(m.sum("llmtail_buffer_traces", &[]), 30.0);

    // Reload: base_rate 1 and a new policy name. The held traces stay held and are decided
    // under the new rules.
    // (A budget the decision cache reserved at start, ~52 MB, would fill past its soft mark
    // would decide the held traces early: 512 MiB leaves them held.)
    d.reload(&body(&sink, 1.0, AFTER, "    - {name: slow-v2, type: latency, threshold_ms: 100000}\nlimits:\n  max_buffer_bytes: 512MiB\n"));
    let m = reloaded(&d, "applied").await;
    assert_eq!(
        m.sum("llmtail_buffer_traces", &[]),
        30.0,
        "nothing lost by the reload"
    );
    assert_eq!(
        m.sum("llmtail_buffer_limit_bytes", &[]),
        512.0 * 1024.0 * 1024.0
    );
    assert_eq!(sink.wait_for_spans(120, Duration::from_secs(30)).await, 120);
    let got: HashSet<Vec<u8>> = sink.traces().into_keys().collect();
    assert_eq!(got, held);
    assert_eq!(
        d.metrics().sum(
            "llmtail_traces_total",
            &[("decision", "kept"), ("policy", "base_rate")]
        ),
        30.0
    );

    // An invalid config: rejected with its problem named; the running one stays.
    d.reload(&body(&sink, 2.5, AFTER, ""));
    reloaded(&d, "rejected").await;
    assert!(d.log().contains("base_rate"), "{}", d.log());
    let more = send_normal(&d, 22, 10).await;
    assert_eq!(sink.wait_for_spans(160, Duration::from_secs(30)).await, 160);
    let got: HashSet<Vec<u8>> = sink.traces().into_keys().collect();
    assert!(more.is_subset(&got), "base_rate 1.0 still in force");
    assert_eq!(
        d.metrics()
            .sum("llmtail_config_reloads_total", &[("result", "applied")]),
        1.0
    );
}
