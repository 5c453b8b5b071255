//! Where a request's LoRAs may come from, and how they are read: each `loras[i].path` is an
//! http(s) URL (fetched with the webhook address rules, a size limit and a timeout, and kept on
//! disk), a URL of this server's own `/files/` (read from the storage folder, no network), or a
//! local path the operator allowed (`--lora-dir`; any path on the command line). Parsed LoRAs
//! are kept in memory, bounded, by source and content, so a file is read once. Problems are
//! field errors naming `loras.i.path`.

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use pixart_fal::{FieldError, LoraWeight};
use pixart_pipeline::{Lora, LoraUse};

use super::files::FileStore;
use super::remote_file::{FetchRules, Problem, RemoteFiles};

/// What a LoRA's path may name.
#[derive(Debug, Clone)]
pub struct LoraRules {
    /// Local paths are allowed under this folder only (`None`: no local path).
    pub local_dir: Option<PathBuf>,
    /// Any local path (the command line, where the user names their own files).
    pub any_local_path: bool,
    /// Fetch from loopback and private addresses too.
    pub allow_private: bool,
    /// The largest file, in bytes.
    pub max_bytes: u64,
    /// The longest a download may take.
    pub timeout: Duration,
}

/// Parsed LoRAs kept in memory: at most this many…
const MEMORY_ENTRIES: usize = 32;
/// …and at most this many bytes of files.
const MEMORY_BYTES: u64 = 2 << 30;

/// Reads, fetches and caches LoRAs.
#[derive(Debug)]
pub struct LoraSource {
    rules: LoraRules,
    /// URLs and this server's own files.
    remote: RemoteFiles,
    /// Where downloaded files are kept (`None`: not kept).
    downloads: Option<PathBuf>,
    /// Source (path with its size and time, or URL) → (file bytes, LoRA).
    memory: Mutex<lru::LruCache<String, (u64, Arc<Lora>)>>,
}

impl LoraSource {
    /// A source with these rules, this server's files, and a download folder.
    pub fn new(rules: LoraRules, files: Option<Arc<FileStore>>, downloads: Option<PathBuf>) -> Self {
        let fetch =
            FetchRules { allow_private: rules.allow_private, max_bytes: rules.max_bytes, timeout: rules.timeout };
        let entries = NonZeroUsize::new(MEMORY_ENTRIES).unwrap_or(NonZeroUsize::MIN);
        Self {
            rules,
            remote: RemoteFiles::new(fetch, files),
            downloads,
            memory: Mutex::new(lru::LruCache::new(entries)),
        }
    }

    /// The LoRAs of a request, read (or taken from the cache), with their scales. `base_url` is
    /// the address the request came in on: a URL on it under `/files/` is this server's own file.
    /// Every path that cannot be used is reported, naming `loras.i.path`.
    pub fn resolve(&self, loras: &[LoraWeight], base_url: Option<&str>) -> Result<Vec<LoraUse>, Vec<FieldError>> {
        let mut resolved = Vec::with_capacity(loras.len());
        let mut errors = Vec::new();
        for (i, weight) in loras.iter().enumerate() {
            match self.load(&weight.path, base_url) {
                Ok(lora) => resolved.push(LoraUse { lora, scale: weight.scale }),
                Err(problem) => errors.push(FieldError::value(format!("loras.{i}.path"), problem)),
            }
        }
        if errors.is_empty() {
            Ok(resolved)
        } else {
            Err(errors)
        }
    }

    fn load(&self, path: &str, base_url: Option<&str>) -> Result<Arc<Lora>, Problem> {
        match url::Url::parse(path) {
            Ok(url) if matches!(url.scheme(), "http" | "https") => self.load_url(&url, base_url),
            Ok(url) if url.scheme() == "file" => {
                let local = url.to_file_path().map_err(|()| format!("{path:?} is not a file path"))?;
                self.load_local(&local)
            }
            Ok(url) if url.scheme().len() > 1 => Err(format!("{}: URLs must be http or https", url.scheme())),
            _ => self.load_local(Path::new(path)),
        }
    }

    /// A cached LoRA for `key`, or one read by `read` (returning the file's size) and kept.
    fn cached(&self, key: String, read: impl FnOnce() -> Result<(u64, Lora), Problem>) -> Result<Arc<Lora>, Problem> {
        let memory = || self.memory.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((_, lora)) = memory().get(&key) {
            return Ok(lora.clone());
        }
        let (bytes, lora) = read()?;
        let lora = Arc::new(lora);
        let mut memory = memory();
        memory.put(key, (bytes, lora.clone()));
        while memory.iter().map(|(_, (b, _))| *b).sum::<u64>() > MEMORY_BYTES && memory.len() > 1 {
            memory.pop_lru();
        }
        Ok(lora)
    }

    fn load_local(&self, path: &Path) -> Result<Arc<Lora>, Problem> {
        let allowed = if self.rules.any_local_path {
            path.canonicalize().map_err(|e| format!("{}: {e}", path.display()))?
        } else {
            let Some(dir) = &self.rules.local_dir else {
                return Err(
                    "local paths are not accepted here: give an http(s) URL (the server's --lora-dir allows a folder)"
                        .into(),
                );
            };
            let dir = dir.canonicalize().map_err(|e| format!("the LoRA folder {}: {e}", dir.display()))?;
            let full = dir
                .join(path)
                .canonicalize()
                .map_err(|_| format!("{}: no such LoRA in the LoRA folder", path.display()))?;
            if !full.starts_with(&dir) {
                return Err(format!("{}: outside the LoRA folder", path.display()));
            }
            full
        };
        let file = if allowed.is_dir() { allowed.join("adapter_model.safetensors") } else { allowed.clone() };
        let meta = std::fs::metadata(&file).map_err(|e| format!("{}: {e}", file.display()))?;
        if meta.len() > self.rules.max_bytes {
            return Err(format!("{} bytes: larger than the LoRA limit ({} bytes)", meta.len(), self.rules.max_bytes));
        }
        let stamp =
            meta.modified().ok().and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok()).unwrap_or_default();
        let key = format!("{}\u{0}{}\u{0}{}", allowed.display(), meta.len(), stamp.as_nanos());
        self.cached(key, || Lora::read(&allowed).map(|l| (meta.len(), l)).map_err(|e| e.to_string()))
    }

    fn load_url(&self, url: &url::Url, base_url: Option<&str>) -> Result<Arc<Lora>, Problem> {
        if let Some(local) = self.remote.own_file(url, base_url) {
            return self.cached(format!("file\u{0}{}", local.display()), || {
                let bytes = self.remote.read_local(&local)?;
                Lora::from_safetensors(&bytes, None).map(|l| (bytes.len() as u64, l)).map_err(|e| e.to_string())
            });
        }
        let key = format!("url\u{0}{url}");
        self.cached(key, || {
            let bytes = self.fetch(url)?;
            let lora = Lora::from_safetensors(&bytes, None).map_err(|e| e.to_string())?;
            Ok((bytes.len() as u64, lora))
        })
    }

    /// The bytes at `url`: from the download folder, or fetched (within the size limit and the
    /// timeout) and kept there.
    fn fetch(&self, url: &url::Url) -> Result<Vec<u8>, Problem> {
        let kept = self.downloads.as_ref().map(|dir| {
            use sha2::Digest;
            let digest: String =
                sha2::Sha256::digest(url.as_str().as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
            dir.join(format!("{digest}.safetensors"))
        });
        if let Some(bytes) = kept.as_ref().and_then(|path| std::fs::read(path).ok()) {
            return Ok(bytes);
        }
        let bytes = self.remote.fetch(url)?;
        if let Some(path) = kept {
            // Through a temporary name, so a reader never sees half of it.
            let partial = path.with_extension("partial");
            let written =
                path.parent().map_or(Ok(()), std::fs::create_dir_all).and_then(|()| std::fs::write(&partial, &bytes));
            if written.and_then(|()| std::fs::rename(&partial, &path)).is_err() {
                let _ = std::fs::remove_file(&partial);
            }
        }
        Ok(bytes)
    }
}
