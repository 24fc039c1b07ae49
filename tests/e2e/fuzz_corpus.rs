//! Replays the fuzzers' corpus (`fuzz/corpus/<target>/`) and any saved crash inputs
//! (`fuzz/regressions/<target>/`) through the same checks the fuzz targets run, on stable
//! Rust: whatever a fuzzing run found interesting stays covered in CI.

use std::path::Path;

use llmtail_tools::fuzzing::TARGETS;

#[test]
fn every_corpus_input_passes_its_target() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut total = 0;
    for (name, run) in TARGETS {
        let mut inputs = 0;
        for dir in ["corpus", "regressions"] {
            let Ok(entries) = std::fs::read_dir(root.join(dir).join(name)) else {
                continue;
            };
            for entry in entries {
                let path = entry.unwrap().path();
                let data = std::fs::read(&path).unwrap();
                let outcome = std::panic::catch_unwind(|| run(&data));
                assert!(outcome.is_ok(), "{name}: {} fails", path.display());
                inputs += 1;
            }
        }
        assert!(inputs > 0, "no corpus for the {name} target");
        total += inputs;
    }
    eprintln!("{total} corpus inputs replayed");
}
