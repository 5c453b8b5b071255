//! Where a model's files come from: a local diffusers-layout folder, or a Hugging Face repo id
//! fetched through the hf-hub cache (`HF_HOME`, `HF_HUB_CACHE`; `HF_HUB_OFFLINE=1` reads the cache
//! only).

use std::path::{Path, PathBuf};

use hf_hub::{Cache, Repo};
use serde::Deserialize;

use crate::PipelineError;

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
}

impl HubOptions {
    /// Options from the environment: `HF_HUB_OFFLINE` and `HF_HUB_CACHE`.
    pub fn from_env() -> Self {
        let offline = std::env::var("HF_HUB_OFFLINE")
            .is_ok_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"));
        Self { offline, cache_dir: std::env::var_os("HF_HUB_CACHE").map(PathBuf::from) }
    }

    fn cache(&self) -> Cache {
        match &self.cache_dir {
            Some(dir) => Cache::new(dir.clone()),
            None => Cache::from_env(),
        }
    }
}

#[derive(Deserialize)]
struct Index {
    weight_map: std::collections::HashMap<String, String>,
}

/// Resolves `model` (a folder, or `org/name` on the hub) to a local diffusers-layout folder.
pub fn resolve_model(model: &str, hub: &HubOptions) -> Result<PathBuf, PipelineError> {
    let path = Path::new(model);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    let looks_like_repo =
        model.split('/').count() == 2 && !model.starts_with('.') && !model.starts_with('/') && !model.contains('\\');
    if !looks_like_repo {
        return Err(PipelineError::Model(format!("{model} is neither a folder nor a Hugging Face repo id (org/name)")));
    }
    let fetcher = Fetcher::new(model, hub)?;
    let index = fetcher.get("model_index.json")?;
    for file in
        ["scheduler/scheduler_config.json", "text_encoder/config.json", "transformer/config.json", "vae/config.json"]
    {
        fetcher.get(file)?;
    }
    // The tokenizer folder ships spiece.model (and maybe tokenizer.json); either is enough.
    let spiece = fetcher.try_get("tokenizer/spiece.model");
    let json = fetcher.try_get("tokenizer/tokenizer.json");
    if spiece.is_none() && json.is_none() {
        return Err(PipelineError::Model(format!(
            "{model}: tokenizer/spiece.model and tokenizer/tokenizer.json are both missing"
        )));
    }
    fetcher.try_get("tokenizer/tokenizer_config.json");
    fetcher.try_get("tokenizer/special_tokens_map.json");
    fetcher.weights("text_encoder", "model")?;
    fetcher.weights("transformer", "diffusion_pytorch_model")?;
    fetcher.weights("vae", "diffusion_pytorch_model")?;
    Ok(index.parent().expect("a file in a snapshot folder").to_path_buf())
}

enum Fetcher {
    Offline { repo: String, cache: hf_hub::CacheRepo },
    Online { repo: String, api: hf_hub::api::sync::ApiRepo },
}

impl Fetcher {
    fn new(repo: &str, hub: &HubOptions) -> Result<Self, PipelineError> {
        let cache = hub.cache();
        if hub.offline {
            return Ok(Self::Offline { repo: repo.into(), cache: cache.repo(Repo::model(repo.into())) });
        }
        let api = hf_hub::api::sync::ApiBuilder::from_cache(cache)
            .with_progress(true)
            .build()
            .map_err(|e| PipelineError::Model(format!("cannot reach the Hugging Face hub: {e}")))?;
        Ok(Self::Online { repo: repo.into(), api: api.model(repo.into()) })
    }

    fn try_get(&self, file: &str) -> Option<PathBuf> {
        match self {
            Self::Offline { cache, .. } => cache.get(file),
            Self::Online { api, .. } => api.get(file).ok(),
        }
    }

    fn get(&self, file: &str) -> Result<PathBuf, PipelineError> {
        match self {
            Self::Offline { repo, cache } => cache.get(file).ok_or_else(|| {
                PipelineError::Model(format!(
                    "{repo}: {file} is not in the hub cache and offline mode is on (--offline or HF_HUB_OFFLINE)"
                ))
            }),
            Self::Online { repo, api } => {
                api.get(file).map_err(|e| PipelineError::Model(format!("{repo}: cannot download {file}: {e}")))
            }
        }
    }

    /// A component's weights: the index and every shard it lists, else the single file.
    fn weights(&self, folder: &str, stem: &str) -> Result<(), PipelineError> {
        if let Some(index) = self.try_get(&format!("{folder}/{stem}.safetensors.index.json")) {
            let parsed: Index = pixart_core::load_config(&index)?;
            let shards: std::collections::BTreeSet<String> = parsed.weight_map.into_values().collect();
            for shard in shards {
                self.get(&format!("{folder}/{shard}"))?;
            }
            return Ok(());
        }
        self.get(&format!("{folder}/{stem}.safetensors")).map(|_| ())
    }
}
