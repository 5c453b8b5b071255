//! Where a model's files come from: a local diffusers-layout folder, or a Hugging Face repo id
//! fetched through the hf-hub cache (`HF_HOME`, `HF_HUB_CACHE`; `HF_HUB_OFFLINE=1` reads the cache
//! only; `HF_ENDPOINT` names another hub).
//!
//! Hub failures are told apart ([`ModelError`]): the network (no answer), authentication (401/403,
//! a gated or private repo), a repo or file that does not exist (404), another HTTP status, and
//! the local cache. A file that is optional in the layout (a shard index, `tokenizer.json`) is
//! skipped only when the hub says it does not exist; any other failure is reported.

use std::path::{Path, PathBuf};

use hf_hub::api::sync::ApiError;
use hf_hub::{Cache, Repo};

/// The published PixArt-Σ 1024 checkpoint, the default model.
pub const DEFAULT_MODEL: &str = "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS";

/// How to resolve a Hugging Face repo id.
#[derive(Debug, Clone, Default)]
pub struct HubOptions {
    /// Read only from the cache, never the network (also set by `HF_HUB_OFFLINE=1`).
    pub offline: bool,
    /// The hub cache folder (default: `HF_HUB_CACHE`, else `$HF_HOME/hub`, else
    /// `~/.cache/huggingface/hub`).
    pub cache_dir: Option<PathBuf>,
    /// The hub's address (default: `HF_ENDPOINT`, else `https://huggingface.co`).
    pub endpoint: Option<String>,
}

impl HubOptions {
    /// Options from the environment: `HF_HUB_OFFLINE`, `HF_HUB_CACHE` and `HF_ENDPOINT`.
    pub fn from_env() -> Self {
        let offline = std::env::var("HF_HUB_OFFLINE")
            .is_ok_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"));
        Self {
            offline,
            cache_dir: std::env::var_os("HF_HUB_CACHE").map(PathBuf::from),
            endpoint: std::env::var("HF_ENDPOINT").ok().filter(|e| !e.is_empty()),
        }
    }

    fn cache(&self) -> Cache {
        match &self.cache_dir {
            Some(dir) => Cache::new(dir.clone()),
            None => Cache::from_env(),
        }
    }
}

/// Why a model could not be found or fetched.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The name is neither an existing folder nor shaped like a repo id.
    #[error("{model} is neither a folder nor a Hugging Face repo id (org/name)")]
    NotAModel {
        /// The name given.
        model: String,
    },
    /// A folder without `model_index.json`.
    #[error("{} has no model_index.json: not a diffusers pipeline folder", .dir.display())]
    NotAPipeline {
        /// The folder.
        dir: PathBuf,
    },
    /// A folder without `config.json`, given as an image classifier.
    #[error("{} has no config.json: not a transformers model folder", .dir.display())]
    NotAClassifier {
        /// The folder.
        dir: PathBuf,
    },
    /// Offline, and the file is not in the cache.
    #[error("{repo}: {file} is not in the hub cache and offline mode is on (--offline or HF_HUB_OFFLINE)")]
    NotCached {
        /// The repo id.
        repo: String,
        /// The file inside the repo.
        file: String,
    },
    /// The hub could not be reached (DNS, connection, TLS, timeout).
    #[error("{repo}: cannot reach the Hugging Face hub to fetch {file} (a network error; check the connection or HF_ENDPOINT, or use --offline with a filled cache)")]
    Network {
        /// The repo id.
        repo: String,
        /// The file inside the repo.
        file: String,
        /// hf-hub's error.
        source: Box<ApiError>,
    },
    /// The hub refused access: a gated or private repo, or a bad token.
    #[error("{repo}: the hub refused access to {file} (HTTP {status}{}): set HF_TOKEN (or run `huggingface-cli login`) with a token that may read this repo, and accept its terms on its page if it is gated", .code.as_ref().map(|c| format!(", {c}")).unwrap_or_default())]
    Authentication {
        /// The repo id.
        repo: String,
        /// The file inside the repo.
        file: String,
        /// 401 or 403.
        status: u16,
        /// The hub's `X-Error-Code`, when given.
        code: Option<String>,
        /// hf-hub's error.
        source: Box<ApiError>,
    },
    /// The repo does not exist (or is private and no token was sent).
    #[error("{repo}: no such repository on the hub (or it is private: set HF_TOKEN)")]
    RepoNotFound {
        /// The repo id.
        repo: String,
        /// hf-hub's error.
        source: Box<ApiError>,
    },
    /// The repo exists but has no such file.
    #[error("{repo}: the repository has no file {file}")]
    FileNotFound {
        /// The repo id.
        repo: String,
        /// The file inside the repo.
        file: String,
        /// hf-hub's error.
        source: Box<ApiError>,
    },
    /// Another HTTP status, or an answer hf-hub could not use.
    #[error("{repo}: the hub failed to serve {file}{}", .status.map(|s| format!(" (HTTP {s})")).unwrap_or_default())]
    Hub {
        /// The repo id.
        repo: String,
        /// The file inside the repo.
        file: String,
        /// The HTTP status, when there was one.
        status: Option<u16>,
        /// hf-hub's error.
        source: Box<ApiError>,
    },
    /// Reading or writing the local hub cache failed.
    #[error("{repo}: cannot store {file} in the hub cache")]
    Cache {
        /// The repo id.
        repo: String,
        /// The file inside the repo.
        file: String,
        /// hf-hub's error.
        source: Box<ApiError>,
    },
    /// The repo ships neither tokenizer file.
    #[error("{repo}: tokenizer/spiece.model and tokenizer/tokenizer.json are both missing")]
    NoTokenizer {
        /// The repo id.
        repo: String,
    },
    /// A shard index in the cache is unreadable.
    #[error(transparent)]
    Index(#[from] pixart_core::WeightsError),
}

impl ModelError {
    /// Sorts an hf-hub failure for `file` of `repo` into network / authentication / not found /
    /// other HTTP / cache.
    pub fn from_hub(repo: &str, file: &str, error: ApiError) -> Self {
        let (repo, file) = (repo.to_string(), file.to_string());
        let source = Box::new(error);
        match classify(&source) {
            HubFailure::Network => Self::Network { repo, file, source },
            HubFailure::Status { status, code } => match (status, code.as_deref()) {
                (_, Some("RepoNotFound")) => Self::RepoNotFound { repo, source },
                (_, Some("EntryNotFound" | "RevisionNotFound")) | (404, _) => Self::FileNotFound { repo, file, source },
                (401 | 403, _) | (_, Some("GatedRepo")) => Self::Authentication { repo, file, status, code, source },
                _ => Self::Hub { repo, file, status: Some(status), source },
            },
            HubFailure::Cache => Self::Cache { repo, file, source },
            HubFailure::Other => Self::Hub { repo, file, status: None, source },
        }
    }
}

enum HubFailure {
    Network,
    Status { status: u16, code: Option<String> },
    Cache,
    Other,
}

fn classify(error: &ApiError) -> HubFailure {
    match error {
        ApiError::RequestError(inner) => match inner.as_ref() {
            ureq::Error::Status(status, response) => {
                HubFailure::Status { status: *status, code: response.header("x-error-code").map(str::to_string) }
            }
            ureq::Error::Transport(_) => HubFailure::Network,
        },
        ApiError::TooManyRetries(inner) => classify(inner),
        ApiError::IoError(_) | ApiError::LockAcquisition(_) => HubFailure::Cache,
        _ => HubFailure::Other,
    }
}

fn looks_like_repo(name: &str) -> bool {
    name.split('/').count() == 2
        && name.split('/').all(|part| !part.is_empty())
        && !name.starts_with('.')
        && !name.contains('\\')
}

/// Where a model name points.
enum Located {
    /// A local folder that holds the marker file.
    Folder(PathBuf),
    /// A hub repo, to fetch from.
    Repo(Box<Fetcher>),
}

/// A folder holding `marker` (else `not_this_kind(folder)`), or a repo id to fetch from.
fn locate(
    model: &str,
    hub: &HubOptions,
    marker: &str,
    not_this_kind: impl FnOnce(PathBuf) -> ModelError,
) -> Result<Located, ModelError> {
    let path = Path::new(model);
    if path.is_dir() {
        if !path.join(marker).is_file() {
            return Err(not_this_kind(path.to_path_buf()));
        }
        return Ok(Located::Folder(path.to_path_buf()));
    }
    if !looks_like_repo(model) {
        return Err(ModelError::NotAModel { model: model.to_string() });
    }
    Fetcher::new(model, hub).map(|f| Located::Repo(Box::new(f)))
}

/// Resolves an image classifier (a transformers folder, or `org/name` on the hub) to a local
/// folder holding `config.json`, `preprocessor_config.json` and the safetensors weights.
pub fn resolve_classifier(model: &str, hub: &HubOptions) -> Result<PathBuf, ModelError> {
    let fetcher = match locate(model, hub, "config.json", |dir| ModelError::NotAClassifier { dir })? {
        Located::Folder(dir) => return Ok(dir),
        Located::Repo(fetcher) => fetcher,
    };
    let config = fetcher.get("config.json")?;
    fetcher.get("preprocessor_config.json")?;
    fetcher.weights("", "model")?;
    match config.parent() {
        Some(dir) => Ok(dir.to_path_buf()),
        None => Err(ModelError::NotAClassifier { dir: config }),
    }
}

/// Resolves `model` (a folder, or `org/name` on the hub) to a local diffusers-layout folder.
pub fn resolve_model(model: &str, hub: &HubOptions) -> Result<PathBuf, ModelError> {
    let fetcher = match locate(model, hub, "model_index.json", |dir| ModelError::NotAPipeline { dir })? {
        Located::Folder(dir) => return Ok(dir),
        Located::Repo(fetcher) => fetcher,
    };
    let index = fetcher.get("model_index.json")?;
    for file in
        ["scheduler/scheduler_config.json", "text_encoder/config.json", "transformer/config.json", "vae/config.json"]
    {
        fetcher.get(file)?;
    }
    // The tokenizer folder ships spiece.model (and maybe tokenizer.json); either is enough.
    let spiece = fetcher.try_get("tokenizer/spiece.model")?;
    let json = fetcher.try_get("tokenizer/tokenizer.json")?;
    if spiece.is_none() && json.is_none() {
        return Err(ModelError::NoTokenizer { repo: model.to_string() });
    }
    fetcher.try_get("tokenizer/tokenizer_config.json")?;
    fetcher.try_get("tokenizer/special_tokens_map.json")?;
    fetcher.weights("text_encoder", "model")?;
    fetcher.weights("transformer", "diffusion_pytorch_model")?;
    fetcher.weights("vae", "diffusion_pytorch_model")?;
    match index.parent() {
        Some(dir) => Ok(dir.to_path_buf()),
        None => Err(ModelError::NotAPipeline { dir: index }),
    }
}

enum Fetcher {
    Offline { repo: String, cache: hf_hub::CacheRepo },
    Online { repo: String, api: hf_hub::api::sync::ApiRepo },
}

impl Fetcher {
    fn new(repo: &str, hub: &HubOptions) -> Result<Self, ModelError> {
        let cache = hub.cache();
        if hub.offline {
            return Ok(Self::Offline { repo: repo.into(), cache: cache.repo(Repo::model(repo.into())) });
        }
        let mut builder = hf_hub::api::sync::ApiBuilder::from_cache(cache).with_progress(true);
        if let Some(endpoint) = &hub.endpoint {
            builder = builder.with_endpoint(endpoint.clone());
        }
        let api = builder.build().map_err(|e| ModelError::from_hub(repo, "", e))?;
        Ok(Self::Online { repo: repo.into(), api: api.model(repo.into()) })
    }

    /// An optional file: `None` when it is not cached (offline) or the hub says it does not exist.
    fn try_get(&self, file: &str) -> Result<Option<PathBuf>, ModelError> {
        match self.get(file) {
            Ok(path) => Ok(Some(path)),
            Err(ModelError::NotCached { .. } | ModelError::FileNotFound { .. }) => Ok(None),
            Err(other) => Err(other),
        }
    }

    fn get(&self, file: &str) -> Result<PathBuf, ModelError> {
        match self {
            Self::Offline { repo, cache } => {
                cache.get(file).ok_or_else(|| ModelError::NotCached { repo: repo.clone(), file: file.to_string() })
            }
            Self::Online { repo, api } => api.get(file).map_err(|e| ModelError::from_hub(repo, file, e)),
        }
    }

    /// A component's weights: the index and every shard it lists, else the single file.
    /// `folder` may be empty (files at the repo's root).
    fn weights(&self, folder: &str, stem: &str) -> Result<(), ModelError> {
        let prefix = if folder.is_empty() { String::new() } else { format!("{folder}/") };
        if let Some(index) = self.try_get(&format!("{prefix}{stem}.safetensors.index.json"))? {
            let parsed: pixart_core::ShardIndex = pixart_core::load_config(&index)?;
            for shard in parsed.shards() {
                self.get(&format!("{prefix}{shard}"))?;
            }
            return Ok(());
        }
        self.get(&format!("{prefix}{stem}.safetensors")).map(|_| ())
    }
}
