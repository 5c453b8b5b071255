//! Helpers shared by the CLI's integration tests (`cli.rs`, `serve.rs`).

use std::path::{Path, PathBuf};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("repository root")
}

/// Fills `dir` with a copy of the tiny safety checker whose labels are swapped: the class its
/// bias favours is `nsfw`, so every image is flagged.
pub fn write_flagging_checker(dir: &Path) {
    let from = repo_root().join("tests/fixtures/tiny-safety-checker");
    std::fs::create_dir_all(dir).expect("checker folder");
    for file in ["preprocessor_config.json", "model.safetensors"] {
        std::fs::copy(from.join(file), dir.join(file)).expect("copying the checker");
    }
    let config = std::fs::read_to_string(from.join("config.json")).expect("checker config");
    let swapped =
        config.replace("\"normal\"", "\"tmp\"").replace("\"nsfw\"", "\"normal\"").replace("\"tmp\"", "\"nsfw\"");
    assert_ne!(config, swapped, "the labels were not found");
    std::fs::write(dir.join("config.json"), swapped).expect("writing the checker config");
}
