//! The status page at the admin server's `/`, in a real browser: Debian's `chromium`,
//! headless, loads it from a daemon under production-shaped load (20 services, 30 models,
//! Zipf users from 10,000, agent traces, prompt-sized spans; `llmtail_tools::mix`) behind
//! `admin.bearer_tokens`, and the test reads the DOM the page's script rendered.

use std::collections::HashSet;
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine;

use crate::support::*;

const TOKEN: &str = "status-page-token-0123456789";

fn chromium() -> &'static str {
    for path in ["/usr/bin/chromium", "/usr/bin/chromium-browser"] {
        if std::path::Path::new(path).exists() {
            return path;
        }
    }
    panic!("chromium is not installed; run tests/install-deps.sh");
}

/// The part of `dom` from the element with `id` to the end of its table (or its closing
/// tag, for a single element).
fn element<'a>(dom: &'a str, id: &str) -> &'a str {
    let start = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no #{id} in the page"));
    let rest = &dom[start..];
    let end = if rest.starts_with(&format!("id=\"{id}\"><thead")) {
        rest.find("</table>").unwrap()
    } else {
        rest.find("</").unwrap()
    };
    &rest[..end]
}

/// Text without tags, entities decoded for the few the page can produce.
fn text(html: &str) -> String {
    let mut out = String::new();
    let mut in_tag = false;
    for c in html.chars() {
        match c {
            '<' => in_tag = true,
            '>' => in_tag = false,
            c if !in_tag => out.push(c),
            _ => {}
        }
    }
    out.replace("&amp;", "&")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
}

/// A single element's text (after its opening tag).
fn value(dom: &str, id: &str) -> String {
    let e = element(dom, id);
    text(&e[e.find('>').unwrap() + 1..])
}

/// The body rows of a table, as cells: (the cell's text, its inner HTML).
fn rows(dom: &str, id: &str) -> Vec<Vec<(String, String)>> {
    let table = element(dom, id);
    let body = &table[table.find("<tbody>").expect("a tbody")..];
    body.split("<tr>")
        .skip(1)
        .map(|row| {
            row.split("<td")
                .skip(1)
                .map(|cell| {
                    let inner = &cell[cell.find('>').unwrap() + 1..];
                    let inner = &inner[..inner.find("</td>").unwrap_or(inner.len())];
                    (text(inner), inner.to_owned())
                })
                .collect()
        })
        .filter(|cells: &Vec<(String, String)>| !cells.is_empty())
        .collect()
}

/// "5.1k" → 5100.
fn number(shown: &str) -> f64 {
    let s = shown.trim().trim_start_matches('$');
    let (n, scale) = match s.strip_suffix('k') {
        Some(n) => (n, 1e3),
        None => match s.strip_suffix('M') {
            Some(n) => (n, 1e6),
            None => (s, 1.0),
        },
    };
    n.parse::<f64>()
        .unwrap_or_else(|_| panic!("not a number: {shown:?}"))
        * scale
}

fn get(
    d: &Daemon,
    path: &str,
    auth: Option<&str>,
) -> (u16, std::collections::HashMap<String, String>, String) {
    let headers: Vec<(&str, &str)> = auth.map(|a| ("authorization", a)).into_iter().collect();
    let (status, headers, body) = http_request(d.admin, "GET", path, &headers, b"");
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_a_loaded_daemon_in_a_real_browser() {
    let browser = chromium();
    // Port 0: the kernel picks, so nothing can take it between a check and the bind.
    let sink = Sink::start(0).await;
    let daemon = Daemon::start(&format!(
        "  debug_traces: true\n  bearer_tokens: [\"{TOKEN}\"]\n  trace_url: \"https://traces.example.com/trace/{{trace_id}}?from=llmtail\"\nsampling:\n  decision_wait: 2s\n  root_grace: 300ms\n  base_rate: 0.1\n  policies:\n    - {{name: errors, type: error}}\n    - {{name: slow, type: latency, threshold_ms: 5000}}\n    - {{name: expensive, type: cost, threshold_usd: 0.05}}\nexporter:\n  otlp:\n    endpoint: {}\n  batch:\n    timeout: 100ms\n",
        sink.endpoint()
    ));

    // Behind the admin tokens: a browser is asked for them (basic), a script is told how.
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("admin:{TOKEN}"))
    );
    let wrong = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("admin:not-the-token-at-all")
    );
    for (path, auth) in [
        ("/", None),
        ("/", Some(wrong.as_str())),
        ("/api/status", None),
    ] {
        let (status, headers, body) = get(&daemon, path, auth);
        assert_eq!(status, 401, "{path} {auth:?}: {body}");
        assert!(
            headers
                .get("www-authenticate")
                .is_some_and(|h| h.starts_with("Basic realm=")),
            "{headers:?}"
        );
        assert!(body.contains("admin.bearer_tokens"), "{body}");
    }
    let (status, headers, page) = get(&daemon, "/", Some(&basic));
    assert_eq!(status, 200);
    assert!(headers["content-type"].starts_with("text/html"));
    assert!(page.contains("<title>llmtail status</title>"));
    assert_eq!(get(&daemon, "/metrics", None).0, 200, "/metrics stays open");

    // Production-shaped load, bounded: 512-span requests every 100 ms for at most 90 s.
    let load = MixLoad::start(daemon.endpoint(), 18, false);

    // Wait until the server has a sample of the metrics taken under load at least 4 s
    // before now (the page's rates are taken against it) and kept traces to list.
    let bearer = format!("Bearer {TOKEN}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, _, body) = get(&daemon, "/api/status", Some(&bearer));
        assert_eq!(status, 200, "{body}");
        let s: serde_json::Value = serde_json::from_str(&body).unwrap();
        let received = |m: &serde_json::Value| -> f64 {
            m["llmtail_spans_received_total"]
                .as_array()
                .map_or(0.0, |a| {
                    a.iter().map(|s| s["value"].as_f64().unwrap()).sum()
                })
        };
        let ready = s["before"]["now_ms"]
            .as_u64()
            .is_some_and(|at| s["now_ms"].as_u64().unwrap() >= at + 4_000)
            && received(&s["before"]["metrics"]) > 0.0
            && received(&s["metrics"]) > received(&s["before"]["metrics"])
            && s["recent_kept"].as_array().unwrap().len() >= 10;
        if ready {
            break;
        }
        assert!(Instant::now() < deadline, "no usable status: {body:.2000}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // The browser: credentials in the URL become basic authentication for the page and
    // its own requests.
    let profile = tempfile::tempdir().unwrap();
    let url = format!("http://admin:{TOKEN}@{}/", daemon.admin);
    let out = tokio::task::spawn_blocking({
        let browser = browser.to_owned();
        let profile = profile.path().to_owned();
        move || {
            Command::new(browser)
                .args([
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--no-first-run",
                    "--disable-extensions",
                    "--virtual-time-budget=7000",
                    "--dump-dom",
                ])
                .arg(format!("--user-data-dir={}", profile.display()))
                .arg(&url)
                .output()
                .expect("chromium runs")
        }
    })
    .await
    .unwrap();
    let dom = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && dom.contains("data-polls"),
        "chromium: {}\n{dom:.3000}",
        String::from_utf8_lossy(&out.stderr)
    );
    // LLMTAIL_STATUS_SCREENSHOTS=DIR keeps what the page looked like, on a desktop and a
    // phone (desktop.png, phone.png).
    if let Ok(dir) = std::env::var("LLMTAIL_STATUS_SCREENSHOTS") {
        for (name, size) in [("desktop", "1280,2000"), ("phone", "390,3000")] {
            let shot = std::path::Path::new(&dir).join(format!("{name}.png"));
            let status = Command::new(browser)
                .args([
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--hide-scrollbars",
                ])
                .args([
                    "--virtual-time-budget=5000",
                    "--force-device-scale-factor=1",
                ])
                .arg(format!("--window-size={size}"))
                .arg(format!("--user-data-dir={}", profile.path().display()))
                .arg(format!("--screenshot={}", shot.display()))
                .arg(format!("http://admin:{TOKEN}@{}/", daemon.admin))
                .output()
                .expect("chromium runs");
            assert!(status.status.success());
        }
    }
    let (sent, _) = load.finish().await;
    assert!(sent > 100, "{sent} traces sent");

    // The page refreshed itself, reached llmtail every time, and says it is healthy.
    let polls: u32 = dom
        .split("data-polls=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap()
        .parse()
        .unwrap();
    assert!(polls >= 2, "{polls} refreshes");
    assert!(
        element(&dom, "error").contains("display: none"),
        "{}",
        element(&dom, "error")
    );
    assert_eq!(value(&dom, "health"), "healthy");

    // Traffic: spans in and out per second, from the server's samples.
    for id in ["in-rate", "out-rate", "kept-rate", "dropped-rate"] {
        let rate = number(&value(&dom, id));
        assert!(rate > 0.0, "#{id} {rate}");
    }
    assert_eq!(value(&dom, "lost"), "0");

    // Kept and dropped by policy.
    let policies: HashSet<(String, String)> = rows(&dom, "policies")
        .into_iter()
        .map(|r| (r[0].0.clone(), r[1].0.clone()))
        .collect();
    for want in [
        ("errors", "kept"),
        ("base_rate", "kept"),
        ("base_rate", "dropped"),
    ] {
        assert!(
            policies.contains(&(want.0.to_owned(), want.1.to_owned())),
            "{want:?} not in {policies:?}"
        );
    }
    // Decision delay: decision_wait (2 s) or sooner after the root (300 ms grace).
    let delay = value(&dom, "delay-avg");
    assert!(delay.ends_with(" s") || delay.ends_with(" ms"), "{delay}");

    // Memory against its limits.
    let memory = value(&dom, "mem-buffer");
    assert!(memory.contains(" of ") && memory.contains('%'), "{memory}");
    assert!(value(&dom, "mem-process").contains("MiB"));

    // The export queue and the upstream, healthy.
    let exporters = rows(&dom, "exporters");
    assert_eq!(exporters.len(), 1, "{exporters:?}");
    assert_eq!(exporters[0][1].0, "ok", "{exporters:?}");

    // A single replica.
    assert!(value(&dom, "cluster-summary").starts_with("Single replica"));

    // LLM spend by model and by service: the mix's spread, costliest first.
    for (table, prefix) in [("models", ""), ("services", "svc-")] {
        let spend = rows(&dom, table);
        assert!(spend.len() >= 8, "{table}: {} rows", spend.len());
        assert!(
            spend.iter().all(|r| r[0].0.starts_with(prefix)),
            "{spend:?}"
        );
        let names: HashSet<&str> = spend.iter().map(|r| r[0].0.as_str()).collect();
        assert_eq!(names.len(), spend.len(), "{table}: one row each");
        let usd: Vec<f64> = spend.iter().map(|r| number(&r[4].0)).collect();
        assert!(usd.windows(2).all(|w| w[0] >= w[1]), "{table}: {usd:?}");
        assert!(usd[0] > 0.0 && number(&spend[0][1].0) > 0.0, "{spend:?}");
    }
    assert!(number(&value(&dom, "spend-total")) > 0.0);

    // Top users: ten of the mix's users, by spend, as /metrics has them.
    let users = rows(&dom, "users");
    assert_eq!(users.len(), 10, "{users:?}");
    let metrics = daemon.metrics();
    for user in &users {
        assert!(user[0].0.starts_with("user-"), "{user:?}");
        assert!(
            metrics.sum("llmtail_llm_user_cost_usd_total", &[("user", &user[0].0)]) > 0.0,
            "{user:?} not in /metrics"
        );
    }
    let spend: Vec<f64> = users.iter().map(|u| number(&u[1].0)).collect();
    assert!(spend.windows(2).all(|w| w[0] >= w[1]), "{spend:?}");

    // Anomalies: a table, rows or the empty note.
    assert!(!rows(&dom, "anomalies").is_empty());

    // The most recent kept traces, each with its policy, linked to the decision lookup and
    // to the trace backend.
    let recent = rows(&dom, "recent");
    assert!(recent.len() >= 10, "{} rows", recent.len());
    for row in &recent {
        let trace_cell = &row[1].1;
        let id = trace_cell
            .split("title=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap_or_else(|| panic!("no trace id in {trace_cell}"));
        assert_eq!(id.len(), 32, "{id}");
        assert!(
            trace_cell.contains(&format!("href=\"debug/traces/{id}\"")),
            "{trace_cell}"
        );
        assert!(
            row[10].1.contains(&format!(
                "href=\"https://traces.example.com/trace/{id}?from=llmtail\""
            )),
            "{}",
            row[10].1
        );
        assert!(
            ["errors", "slow", "expensive", "base_rate"].contains(&row[2].0.as_str()),
            "{row:?}"
        );
    }
    // The decision lookup the first row links to agrees.
    let first = recent[0][1]
        .1
        .split("title=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap()
        .to_owned();
    let (status, _, body) = get(&daemon, &format!("/debug/traces/{first}"), Some(&basic));
    assert_eq!(status, 200, "{body}");
    let lookup: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(lookup["decision"], "kept");
    assert_eq!(lookup["policy"].as_str().unwrap(), recent[0][2].0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_is_open_without_tokens_and_gone_when_turned_off() {
    let body = "exporter:\n  file:\n    path: /dev/null\n";
    let open = Daemon::start(body);
    let (status, _, page) = get(&open, "/", None);
    assert_eq!(status, 200);
    assert!(page.contains("<title>llmtail status</title>"));
    let (status, _, json) = get(&open, "/api/status", None);
    assert_eq!(status, 200);
    let s: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(s["ready"], true);
    assert!(s["cluster"].is_null() && s["metrics"]["llmtail_buffer_traces"].is_array());
    let off = Daemon::start(&format!("  status_page: false\n{body}"));
    assert_eq!(get(&off, "/", None).0, 404);
    assert_eq!(get(&off, "/api/status", None).0, 404);
    assert_eq!(get(&off, "/metrics", None).0, 200);
}
