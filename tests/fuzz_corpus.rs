//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/`) through the fuzz targets' bodies,
//! so every seed and every input the fuzzer kept is checked on each test run (the fuzzer itself
//! runs with `cargo fuzz`; see `fuzz/README.md`).

use std::path::PathBuf;

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() >= 5, "{} holds only {} inputs", dir.display(), files.len());
    files.into_iter().map(|p| (p.clone(), std::fs::read(&p).unwrap())).collect()
}

fn replay(target: &str, body: fn(&[u8])) {
    for (path, data) in corpus(target) {
        if std::panic::catch_unwind(|| body(&data)).is_err() {
            panic!("{target}: {} fails", path.display());
        }
    }
}

#[test]
fn request_json_corpus() {
    replay("request_json", pixart_suite::fuzzing::request_json);
}

#[test]
fn tokenizer_corpus() {
    replay("tokenizer", pixart_suite::fuzzing::tokenizer);
}

#[test]
fn spiece_model_corpus() {
    replay("spiece_model", pixart_suite::fuzzing::spiece_model);
}

#[test]
fn gguf_corpus() {
    replay("gguf", pixart_suite::fuzzing::gguf);
}
