//! Fetching a model from a Hugging Face hub, against a small HTTP server on loopback that speaks
//! the hub's `resolve` protocol (ETag, X-Repo-Commit, Content-Range, X-Error-Code) over the tiny
//! fixture: a full download and generation, and each kind of failure told apart — network,
//! authentication, missing repo, missing file, other HTTP status — including a failure on an
//! optional file, which must not read as "the next file is missing".

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};

use pixart_pipeline::{resolve_model, HubOptions, ModelError};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-sigma-256")
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pixart-hub-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// What the fake hub does for one repo.
fn answer(repo: &str, file: &str) -> Option<(u16, Option<&'static str>)> {
    match repo {
        "org/private" => Some((401, None)),
        "org/gated" => Some((403, Some("GatedRepo"))),
        "org/missing" => Some((401, Some("RepoNotFound"))),
        "org/broken" => Some((500, None)),
        "org/flaky" if file == "text_encoder/model.safetensors.index.json" => Some((0, None)), // drop
        _ => None,
    }
}

fn serve_one(mut stream: TcpStream) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    let mut range_start = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        if let Some(value) = line.to_ascii_lowercase().strip_prefix("range: bytes=") {
            range_start = value.split('-').next().and_then(|s| s.trim().parse().ok()).unwrap_or(0);
        }
    }
    // GET /org/name/resolve/main/path/to/file HTTP/1.1
    let path = request_line.split_whitespace().nth(1).unwrap_or("");
    let parts: Vec<&str> = path.trim_start_matches('/').splitn(5, '/').collect();
    let (repo, file) = match parts.as_slice() {
        [org, name, "resolve", "main", file] => (format!("{org}/{name}"), file.to_string()),
        _ => (String::new(), String::new()),
    };
    let respond = |stream: &mut TcpStream, status: u16, headers: &[(&str, String)], body: &[u8]| {
        let mut head = format!("HTTP/1.1 {status} X\r\nconnection: close\r\ncontent-length: {}\r\n", body.len());
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        let _ = stream.write_all(head.as_bytes());
        let _ = stream.write_all(body);
    };
    match answer(&repo, &file) {
        Some((0, _)) => {} // close without answering: a network failure
        Some((status, code)) => {
            let headers: Vec<(&str, String)> = code.map(|c| ("x-error-code", c.to_string())).into_iter().collect();
            respond(&mut stream, status, &headers, b"{}");
        }
        None => match std::fs::read(fixture().join(&file)) {
            Ok(bytes) if !file.contains("..") => {
                let start = range_start.min(bytes.len());
                let end = bytes.len().saturating_sub(1);
                let headers = [
                    ("etag", format!("\"{:x}-{}\"", bytes.len(), file.len())),
                    ("x-repo-commit", "0123456789abcdef0123456789abcdef01234567".to_string()),
                    ("content-range", format!("bytes {start}-{end}/{}", bytes.len())),
                ];
                respond(&mut stream, 206, &headers, &bytes[start..]);
            }
            _ => respond(&mut stream, 404, &[("x-error-code", "EntryNotFound".into())], b"{}"),
        },
    }
    let _ = stream.flush();
    let mut rest = Vec::new();
    let _ = stream.set_read_timeout(Some(std::time::Duration::from_millis(10)));
    let _ = stream.read_to_end(&mut rest);
}

/// Starts the fake hub on a free loopback port; returns its endpoint.
fn fake_hub() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || serve_one(stream));
        }
    });
    format!("http://{address}")
}

fn hub(endpoint: &str, cache: &Path) -> HubOptions {
    HubOptions { offline: false, cache_dir: Some(cache.to_path_buf()), endpoint: Some(endpoint.to_string()) }
}

#[test]
fn a_repo_downloads_into_the_cache_and_generates() {
    let endpoint = fake_hub();
    let cache = temp_dir("download");
    let dir = resolve_model("org/tiny", &hub(&endpoint, &cache)).unwrap();
    assert!(dir.starts_with(&cache), "{}", dir.display());
    for file in
        ["model_index.json", "text_encoder/model.safetensors.index.json", "vae/diffusion_pytorch_model.safetensors"]
    {
        assert_eq!(std::fs::read(dir.join(file)).unwrap(), std::fs::read(fixture().join(file)).unwrap(), "{file}");
    }
    // Offline afterwards: everything comes from the cache.
    let offline = HubOptions { offline: true, ..hub("http://127.0.0.1:1", &cache) };
    let mut options = pixart_pipeline::LoadOptions::default();
    options.hub = offline;
    let pipeline = pixart_pipeline::Pipeline::load("org/tiny", &options).unwrap();
    let request = pixart_pipeline::GenerationParams::new("a cat").with_size(32, 32).unwrap().with_steps(1);
    assert_eq!(pipeline.generate(&request).unwrap().images.len(), 1);
    std::fs::remove_dir_all(cache).unwrap();
}

#[test]
fn hub_failures_are_told_apart() {
    let endpoint = fake_hub();
    let cache = temp_dir("failures");
    let options = hub(&endpoint, &cache);
    let error = |repo: &str| resolve_model(repo, &options).unwrap_err();

    let e = error("org/private");
    assert!(matches!(e, ModelError::Authentication { status: 401, .. }), "{e:?}");
    assert!(e.to_string().contains("HF_TOKEN"), "{e}");
    let e = error("org/gated");
    assert!(matches!(&e, ModelError::Authentication { status: 403, code: Some(c), .. } if c == "GatedRepo"), "{e:?}");
    let e = error("org/missing");
    assert!(matches!(e, ModelError::RepoNotFound { .. }), "{e:?}");
    assert!(e.to_string().contains("no such repository"), "{e}");
    let e = error("org/broken");
    assert!(matches!(e, ModelError::Hub { status: Some(500), .. }), "{e:?}");
    // An optional file whose download fails is a network error naming that file, not a
    // "missing model.safetensors" (the next file tried).
    let e = error("org/flaky");
    assert!(
        matches!(&e, ModelError::Network { file, .. } if file == "text_encoder/model.safetensors.index.json"),
        "{e:?}"
    );
    // Nothing listening: a network error, with hf-hub's error kept as the source.
    let e = resolve_model("org/tiny", &hub("http://127.0.0.1:1", &cache)).unwrap_err();
    assert!(matches!(e, ModelError::Network { .. }), "{e:?}");
    assert!(std::error::Error::source(&e).is_some());
    assert!(e.to_string().contains("cannot reach"), "{e}");
    std::fs::remove_dir_all(cache).unwrap();
}

#[test]
fn names_that_are_neither_folders_nor_repo_ids_are_refused() {
    let options = HubOptions { offline: true, ..HubOptions::default() };
    for name in ["/nonexistent/folder", "a/b/c", "/x", "org/", "./rel"] {
        assert!(matches!(resolve_model(name, &options), Err(ModelError::NotAModel { .. })), "{name}");
    }
    let empty = temp_dir("not-a-pipeline");
    assert!(matches!(resolve_model(empty.to_str().unwrap(), &options), Err(ModelError::NotAPipeline { .. })));
    std::fs::remove_dir_all(empty).unwrap();
}
