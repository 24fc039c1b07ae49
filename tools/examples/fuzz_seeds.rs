//! Writes the fuzzers' seed corpus (`fuzz/corpus/<target>/seed-*`): realistic LLM
//! requests from the load generator in protobuf and OTLP/JSON, single spans, and the
//! shipped config. Run from the repository root: `cargo run --example fuzz_seeds`.

use std::path::Path;

use llmtail_tools::loadgen::{self, Kind};
use prost::Message;
use rand::SeedableRng;
use rand::rngs::StdRng;

fn write(target: &str, name: &str, data: &[u8]) {
    let dir = Path::new("fuzz/corpus").join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("seed-{name}")), data).unwrap();
}

fn main() {
    let mut rng = StdRng::seed_from_u64(7);
    let kinds = [
        Kind::Normal,
        Kind::Error,
        Kind::ExpensiveTokens,
        Kind::SlowLatencyAttr,
    ];
    for (i, kind) in kinds.into_iter().enumerate() {
        let trace = loadgen::trace(
            &mut rng,
            kind,
            loadgen::convention_for(i),
            1_700_000_000_000_000_000,
        );
        for (j, span) in trace.spans.iter().enumerate() {
            write("scan_span", &format!("{i}-{j}"), &span.encode_to_vec());
        }
        let request = loadgen::request(trace.spans);
        write("split_reframe", &i.to_string(), &request.encode_to_vec());
        write(
            "otlp_json",
            &i.to_string(),
            &serde_json::to_vec(&request).unwrap(),
        );
    }
    write("config", "shipped", &std::fs::read("config.yaml").unwrap());
    write(
        "config",
        "full",
        b"receiver:\n  auth: {bearer_tokens: [\"0123456789abcdef0\"]}\nsampling:\n  base_rate: 0.5\n  policies:\n    - {name: e, type: error}\n    - {name: s, type: session, window: 1m}\nlimits:\n  max_buffer_bytes: 64MiB\nexporters:\n  - name: a\n    otlp: {endpoint: \"http://x:4317\"}\n    queue: {directory: /tmp/q, max_disk_bytes: 1GiB}\n",
    );
}
