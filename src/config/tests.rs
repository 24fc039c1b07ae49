//! Config loading and validation, end to end on YAML text.
use super::*;

const SHIPPED: &str = include_str!("../../config.yaml");

#[test]
fn shipped_config_is_valid() {
    let cfg = Config::parse(SHIPPED).expect("config.yaml must validate");
    assert!(cfg.exporters[0].file.is_some());
    assert_eq!(cfg.sampling.policies.len(), 3);
    assert!(cfg.warnings.is_empty(), "{:?}", cfg.warnings);
}

#[test]
fn defaults_apply() {
    let cfg = Config::parse("exporter:\n  otlp:\n    endpoint: http://x:4317\n").unwrap();
    assert_eq!(cfg.receiver.grpc.endpoint, "0.0.0.0:4317");
    assert_eq!(cfg.receiver.grpc.max_request_bytes, 16 * 1024 * 1024);
    assert_eq!(cfg.sampling.idle_timeout(), Duration::from_secs(120));
    assert_eq!(cfg.sampling.max_trace_duration.0, Duration::from_secs(1800));
    assert!(cfg.warnings.is_empty());
    assert_eq!(cfg.sampling.root_grace.0, Duration::from_secs(1));
    assert_eq!(cfg.sampling.base_rate, 0.1);
    assert_eq!(cfg.sampling.decision_cache_size, 1_000_000);
    assert_eq!(cfg.admin.endpoint, "0.0.0.0:8888");
    assert_eq!(cfg.shutdown_timeout, Duration::from_secs(20));
    assert_eq!(
        cfg.exporters[0].otlp.as_ref().unwrap().compression,
        Compression::Gzip
    );
    assert_eq!(cfg.exporters[0].name, "default");
    assert!(cfg.receiver.http.enabled);
    assert_eq!(cfg.receiver.http.endpoint, "0.0.0.0:4318");
    assert_eq!(cfg.receiver.http.path, "/v1/traces");
}

#[test]
fn decision_wait_is_read_as_idle_timeout_with_a_warning_naming_it() {
    let text = "exporter:\n  file:\n    path: x\nsampling:\n  decision_wait: 7s\n";
    let cfg = Config::parse(text).unwrap();
    assert_eq!(cfg.sampling.idle_timeout(), Duration::from_secs(7));
    assert_eq!(cfg.warnings.len(), 1);
    assert_eq!(cfg.warnings[0].path, "sampling.decision_wait");
    assert_eq!(cfg.warnings[0].line, Some(5));
    assert!(cfg.warnings[0].message.contains("sampling.idle_timeout"));
    // Both set: the new name wins and the old one is called out as ignored.
    let cfg = Config::parse(&format!("{text}  idle_timeout: 3m\n")).unwrap();
    assert_eq!(cfg.sampling.idle_timeout(), Duration::from_secs(180));
    assert!(cfg.warnings[0].message.contains("ignored"));
}

#[test]
fn every_problem_is_reported_with_path_and_line() {
    let text = "\
receiver:
  grpc:
    endpoint: nowhere
    colour: blue
sampling:
  base_rate: 2
  decision_wait: soon
  policies:
    - name: slow
      type: latency
    - name: pricey
      type: cost
      threshold_usd: 0.1
      bogus: 1
exporter:
  otlp:
    endpoint: http://x:4317
extra: 1
";
    let errs = Config::parse(text).unwrap_err().0;
    let find = |path: &str| {
        errs.iter()
            .find(|p| p.path == path)
            .unwrap_or_else(|| panic!("no problem at {path}: {errs:#?}"))
    };
    assert_eq!(find("receiver.grpc.colour").line, Some(4));
    assert!(find("receiver.grpc.colour").message.contains("endpoint"));
    assert_eq!(find("receiver.grpc.endpoint").line, Some(3));
    assert_eq!(find("sampling.decision_wait").line, Some(7));
    assert_eq!(find("sampling.policies[1].bogus").line, Some(14));
    assert_eq!(find("extra").line, Some(18));
    assert!(find("extra").message.contains("allowed"));
    // decision_wait was removed as invalid, so the rest of the section is still validated
    // with its default.
    assert!(
        find("sampling.base_rate")
            .message
            .contains("between 0 and 1")
    );
    assert_eq!(find("sampling.policies[0].threshold_ms").line, Some(9));
}

#[test]
fn llm_and_adaptive_keys_are_validated() {
    let text = "\
sampling:
  target_kept_traces_per_second: -1
  boost: {rate: 2}
  policies:
    - {name: errors, type: error, window: 1m}
    - {name: conv, type: session, triggers: [errors, nope], threshold_ms: 5}
exporter:
  file: {path: x}
llm:
  anomaly: {latency_sigmas: 0}
  privacy:
    mask: {attributes: [a], patterns: [\"(unclosed\"]}
";
    let errs = Config::parse(text).unwrap_err().0;
    let paths: Vec<&str> = errs.iter().map(|p| p.path.as_str()).collect();
    for want in [
        "sampling.target_kept_traces_per_second",
        "sampling.boost.rate",
        "sampling.policies[0].window",
        "sampling.policies[1].triggers",
        "sampling.policies[1].threshold_ms",
        "llm.anomaly.latency_sigmas",
        "llm.privacy.mask.patterns[0]",
    ] {
        assert!(paths.contains(&want), "{want} missing from {paths:?}");
    }
    let ok = "sampling:\n  target_kept_traces_per_second: 50\n  boost: {}\n  policies:\n    - {name: e, type: error}\n    - {name: s, type: session}\nexporter:\n  file: {path: x}\n";
    let cfg = Config::parse(ok).unwrap();
    assert_eq!(cfg.sampling.target().unwrap().kept_traces_per_second, 50.0);
    assert!(cfg.sampling.boost.is_some());
    assert!(cfg.llm.trace_rollup);
}

#[test]
fn limits_security_and_queue_keys_are_validated() {
    let text = "\
receiver:
  auth: {bearer_tokens: [short], api_key_header: \"bad header\"}
  grpc: {tls: {cert_file: /nonexistent/cert.pem, key_file: /nonexistent/key.pem}}
  http: {max_connections: 0}
limits:
  max_buffer_bytes: 12XB
  soft_mark: 1.5
  max_spans_per_trace: 0
exporter:
  file: {path: x}
  queue: {max_disk_bytes: lots}
admin:
  trace_url: https://traces.example.com/trace/
";
    let errs = Config::parse(text).unwrap_err().0;
    let paths: Vec<&str> = errs.iter().map(|p| p.path.as_str()).collect();
    for want in [
        "receiver.auth.bearer_tokens[0]",
        "receiver.auth.api_key_header",
        "receiver.grpc.tls.cert_file",
        "receiver.grpc.tls.key_file",
        "receiver.http.max_connections",
        "limits.max_buffer_bytes",
        "limits.soft_mark",
        "limits.max_spans_per_trace",
        "exporter.queue.max_disk_bytes",
        "admin.trace_url",
    ] {
        assert!(paths.contains(&want), "{want} missing from {paths:?}");
    }
    let ok = "limits:\n  max_buffer_bytes: 512MiB\nexporter:\n  file: {path: x}\n  queue: {directory: /tmp/q, max_disk_bytes: 2GB, fsync_interval: 0s}\n";
    let cfg = Config::parse(ok).unwrap();
    assert_eq!(cfg.limits.buffer_bytes(), 512 << 20);
    assert_eq!(cfg.exporters[0].queue.max_disk_bytes.0, 2_000_000_000);
    assert!(cfg.exporters[0].queue.fsync_interval.0.is_zero());
    // Without a configured value: a share of the cgroup limit, or the fixed default.
    let default = Config::parse("exporter:\n  file: {path: x}\n").unwrap();
    let expected = cgroup_memory_limit().map_or(DEFAULT_BUFFER_BYTES, |l| {
        (l as f64 * BUFFER_SHARE_OF_CGROUP) as usize
    });
    assert_eq!(default.limits.buffer_bytes(), expected);
}

#[test]
fn cluster_keys_are_validated() {
    let errs = |text: &str| -> Vec<String> {
        Config::parse(text)
            .unwrap_err()
            .0
            .into_iter()
            .map(|p| format!("{}: {}", p.path, p.message))
            .collect()
    };
    let e = errs("cluster:\n  peers: [a:1, nope]\n  dns: x:4317\nexporter:\n  file: {path: x}\n");
    assert!(e.iter().any(|m| m.starts_with("cluster.peers[1]")), "{e:?}");
    assert!(
        e.iter().any(|m| m.starts_with("cluster.dns: use either")),
        "{e:?}"
    );
    assert!(
        e.iter().any(|m| m.starts_with("cluster.self: required")),
        "{e:?}"
    );
    let e = errs("cluster:\n  peers: [a:1, b:1]\n  self: c:1\nexporter:\n  file: {path: x}\n");
    assert!(
        e.iter().any(|m| m.contains("must be one of peers")),
        "{e:?}"
    );
    let e = errs(
        "receiver:\n  grpc:\n    tls: {cert_file: Cargo.toml, key_file: Cargo.toml}\ncluster:\n  dns: peers:4317\n  self: 10.0.0.1:4317\nexporter:\n  file: {path: x}\n",
    );
    assert!(
        e.iter()
            .any(|m| m.starts_with("cluster: receiver.grpc serves TLS")),
        "{e:?}"
    );
    let ok = Config::parse(
        "cluster:\n  dns: peers:4317\n  self: 10.0.0.1:4317\nexporter:\n  file: {path: x}\n",
    )
    .unwrap();
    assert!(ok.cluster.enabled());
    assert!(
        !Config::parse("exporter:\n  file: {path: x}\n")
            .unwrap()
            .cluster
            .enabled()
    );
}

#[test]
fn env_substitution() {
    let lookup = |name: &str| (name == "HOST").then(|| "tempo".to_owned());
    let (text, problems) = substitute_env(
        "a: ${env:HOST}:4317\nb: ${env:PORT:-99}\nc: $${env:HOST}\nd: ${env:MISSING}\n",
        lookup,
    );
    assert_eq!(text, "a: tempo:4317\nb: 99\nc: ${env:HOST}\nd: \n");
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].line, Some(4));
}

#[test]
fn missing_exporter_is_reported() {
    let errs = Config::parse("admin:\n  endpoint: 127.0.0.1:1\n")
        .unwrap_err()
        .0;
    assert!(errs.iter().any(|p| p.path == "exporter"), "{errs:?}");
}

/// The keys a section accepts, as the parser itself reports them for an unknown one;
/// `None` when the value at `path` is not a section (a scalar, list or map).
fn keys_of(path: &[String]) -> Option<Vec<String>> {
    let mut yaml = "{zzz: 1}".to_owned();
    for part in path.iter().rev() {
        yaml = format!("{{{part}: {yaml}}}");
    }
    let errors = match Config::parse(&yaml) {
        Ok(_) => return None,
        Err(e) => e.0,
    };
    let want = path
        .iter()
        .map(String::as_str)
        .chain(["zzz"])
        .collect::<Vec<_>>()
        .join(".");
    let p = errors.iter().find(|p| p.path == want)?;
    let list = if path.is_empty() {
        p.message.split_once("allowed: ")?.1.to_owned()
    } else if p.message.contains("unknown field") {
        p.message.split_once("expected ")?.1.to_owned()
    } else {
        return None;
    };
    Some(
        list.split([',', ' '])
            .map(|w| w.trim_matches('`'))
            .filter(|w| !w.is_empty() && *w != "or" && *w != "one" && *w != "of")
            .map(str::to_owned)
            .collect(),
    )
}

/// docs/configuration.md documents every key the parser accepts: in its own row, as a
/// sibling in a row (`a.b.c`, `d`), or inside its section's row (`{x: 1, y: 2}`).
#[test]
fn docs_configuration_lists_every_key() {
    let docs = include_str!("../../docs/configuration.md");
    let rows: Vec<&str> = docs.lines().filter(|l| l.starts_with("| `")).collect();
    let documented = |key: &str| {
        let (parent, last) = key.rsplit_once('.').unwrap_or(("", key));
        docs.contains(&format!("`{key}`"))
            || rows.iter().any(|row| {
                let first = row.split('|').nth(1).unwrap_or_default();
                (first.contains(&format!("`{parent}.")) && first.contains(&format!("`{last}`")))
                    || (!parent.is_empty()
                        && first.contains(&format!("`{parent}`"))
                        && row.contains(last))
            })
    };
    let mut missing = Vec::new();
    let mut stack: Vec<Vec<String>> = vec![Vec::new()];
    let mut seen = 0;
    while let Some(path) = stack.pop() {
        for key in keys_of(&path).unwrap_or_default() {
            let mut child = path.clone();
            child.push(key);
            seen += 1;
            // Sections are documented through their keys.
            if keys_of(&child).is_none() && !documented(&child.join(".")) {
                missing.push(child.join("."));
            }
            stack.push(child);
        }
    }
    assert!(
        seen > 80,
        "only {seen} keys found: the enumeration is broken"
    );
    assert!(
        missing.is_empty(),
        "docs/configuration.md lacks {missing:?}"
    );
}

#[test]
fn each_mistake_is_reported_once_at_its_own_item_and_line_in_file_order() {
    let text = "\
sampling:
  policies:
    - {name: a, type: eror}
    - name: b
      type: latency
      threshold_ms: fast
    - {name: c, type: cost}
exporter:
  file: {path: x}
receiver:
  grpc: {colour: blue}
";
    let errs = Config::parse(text).unwrap_err().0;
    let got: Vec<(String, Option<usize>)> = errs.iter().map(|p| (p.path.clone(), p.line)).collect();
    assert_eq!(
        got,
        [
            ("sampling.policies[0].type".to_owned(), Some(3)),
            ("sampling.policies[1].threshold_ms".to_owned(), Some(6)),
            ("sampling.policies[2].threshold_usd".to_owned(), Some(7)),
            ("receiver.grpc.colour".to_owned(), Some(11)),
        ],
        "{errs:#?}"
    );
}

#[test]
fn storage_in_memory_needs_a_bound_and_excludes_a_directory_and_the_old_queue() {
    let ok = Config::parse(
        "exporter:\n  file: {path: x}\nstorage:\n  memory: true\n  max_disk_bytes: 256MiB\n",
    )
    .unwrap();
    assert!(ok.storage.enabled() && ok.storage.directory.is_none());
    let errs = Config::parse("exporter:\n  file: {path: x}\nstorage:\n  memory: true\n")
        .unwrap_err()
        .0;
    assert!(
        errs.iter()
            .any(|p| p.path == "storage.memory" && p.message.contains("max_disk_bytes")),
        "{errs:?}"
    );
    let errs = Config::parse(
        "exporter:\n  file: {path: x}\n  queue: {directory: /tmp/q}\nstorage:\n  memory: true\n  directory: /tmp/l\n  max_disk_bytes: 1GiB\n",
    )
    .unwrap_err()
    .0;
    assert!(
        errs.iter()
            .any(|p| p.path == "storage.memory" && p.message.contains("not both")),
        "{errs:?}"
    );
    assert!(
        errs.iter().any(|p| p.path == "exporter.queue.directory"),
        "{errs:?}"
    );
}

#[test]
fn the_old_queue_directory_becomes_the_trace_logs_or_is_moved_into_it() {
    // Alone: the trace log lives there, synced as the old log was.
    let cfg = Config::parse(
        "exporter:\n  file: {path: x}\n  queue: {directory: /tmp/q, fsync_interval: 0s}\n",
    )
    .unwrap();
    assert_eq!(
        cfg.storage.directory.as_deref(),
        Some(std::path::Path::new("/tmp/q"))
    );
    assert_eq!(cfg.storage.sync, crate::storage::SyncPolicy::Always);
    assert!(
        cfg.warnings
            .iter()
            .any(|w| w.path == "exporter.queue.directory" && w.message.contains("deprecated")),
        "{:?}",
        cfg.warnings
    );
    // Beside storage.directory: the trace log stays where it is; a warning, no error.
    let cfg = Config::parse(
        "exporter:\n  file: {path: x}\n  queue: {directory: /tmp/q}\nstorage:\n  directory: /tmp/l\n",
    )
    .unwrap();
    assert_eq!(
        cfg.storage.directory.as_deref(),
        Some(std::path::Path::new("/tmp/l"))
    );
    assert_ne!(cfg.storage.sync, crate::storage::SyncPolicy::Always);
    assert!(
        cfg.warnings
            .iter()
            .any(|w| w.message.contains("moved into the trace log"))
    );
}
