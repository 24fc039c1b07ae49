//! llmtail: a tail-sampling OTLP trace processor that understands LLM calls.
//!
//! Data flows one way: `receiver` → `pipeline` (LLM metrics for every span) → `buffer`
//! (held by trace id) → `sampling` (decided) → `exporter` (kept traces upstream), with
//! `cluster` routing each trace to its owner; `app` wires them, `config` composes their
//! sections; `otlp`, `llm`, `telemetry`, `units` and `memory` serve them all.

pub mod app;
pub mod buffer;
pub mod cluster;
pub mod config;
pub mod exporter;
pub mod llm;
pub mod memory;
pub mod otlp;
pub mod pipeline;
pub mod receiver;
pub mod sampling;
pub mod storage;
pub mod telemetry;
pub mod units;

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::Path;

    /// The top-level modules each module refers to (`crate::<module>`), test code aside.
    fn imports() -> BTreeMap<String, BTreeSet<String>> {
        fn walk(dir: &Path, files: &mut Vec<std::path::PathBuf>) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    walk(&path, files);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    files.push(path);
                }
            }
        }
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        walk(&src, &mut files);
        let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for file in files {
            let rel = file.strip_prefix(&src).unwrap();
            let top = rel
                .components()
                .next()
                .unwrap()
                .as_os_str()
                .to_string_lossy();
            let top = top.trim_end_matches(".rs").to_owned();
            let name = rel.file_name().unwrap().to_string_lossy();
            if matches!(top.as_str(), "main" | "lib")
                || name == "tests.rs"
                || name == "proptests.rs"
            {
                continue;
            }
            let text = std::fs::read_to_string(&file).unwrap();
            let code = text.split("#[cfg(test)]").next().unwrap_or_default();
            for (i, _) in code.match_indices("crate::") {
                let module: String = code[i + 7..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .collect();
                if !module.is_empty() && module != top {
                    graph.entry(top.clone()).or_default().insert(module);
                }
            }
        }
        graph
    }

    /// No module imports one that imports it, directly or through others: dependencies go
    /// one way (receiver → pipeline → buffer → sampler …, config composing the sections,
    /// units and memory at the bottom), so each module can be read without its callers.
    #[test]
    fn the_module_graph_has_no_cycles() {
        let graph = imports();
        assert!(graph.contains_key("pipeline") && graph["pipeline"].contains("buffer"));
        fn visit(
            node: &str,
            graph: &BTreeMap<String, BTreeSet<String>>,
            path: &mut Vec<String>,
            done: &mut BTreeSet<String>,
        ) {
            if let Some(at) = path.iter().position(|n| n == node) {
                panic!("import cycle: {} → {node}", path[at..].join(" → "));
            }
            if done.contains(node) {
                return;
            }
            path.push(node.to_owned());
            for next in graph.get(node).into_iter().flatten() {
                visit(next, graph, path, done);
            }
            path.pop();
            done.insert(node.to_owned());
        }
        let mut done = BTreeSet::new();
        for node in graph.keys() {
            visit(node, &graph, &mut Vec::new(), &mut done);
        }
    }
}
