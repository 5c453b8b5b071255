//! Locating, validating and memory-mapping safetensors weights in a diffusers-layout folder.
//!
//! A component folder (`text_encoder/`, `transformer/`, `vae/`) holds either
//! `<stem>.safetensors` or shards `<stem>-0000N-of-0000M.safetensors` described by
//! `<stem>.safetensors.index.json` (`{"weight_map": {tensor name: shard file}}`). The published
//! PixArt-Σ text encoder is sharded, so the index path is the one real users hit.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::config_error::UnsupportedConfig;

/// Errors raised while finding or opening a model's files. Each names the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    /// Neither a single safetensors file nor an index was found.
    #[error("no weights in {dir}: expected {stem}.safetensors or {stem}.safetensors.index.json")]
    NoWeights {
        /// The component folder searched.
        dir: PathBuf,
        /// The file stem looked for (`model`, `diffusion_pytorch_model`).
        stem: String,
    },
    /// A file the model needs does not exist.
    #[error("missing file {path}{}", .referenced_by.as_ref().map(|p| format!(" (listed in {})", p.display())).unwrap_or_default())]
    MissingFile {
        /// The absent file.
        path: PathBuf,
        /// The index that named it, if any.
        referenced_by: Option<PathBuf>,
    },
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A JSON file (config or index) is malformed.
    #[error("malformed JSON in {path}: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The parse error, with line and column.
        source: serde_json::Error,
    },
    /// A safetensors file is corrupt or truncated.
    #[error("corrupt safetensors file {path}: {source}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What candle/safetensors reported.
        source: candle_core::Error,
    },
    /// The index names a tensor that its shard does not contain.
    #[error("{index} says tensor {tensor} is in {shard}, but that file does not contain it")]
    IndexMismatch {
        /// The index file.
        index: PathBuf,
        /// The tensor name.
        tensor: String,
        /// The shard file named for it.
        shard: String,
    },
    /// A tensor the model needs is missing from the weights, or has the wrong shape or dtype.
    #[error("weights in {dir}: {source}")]
    Tensor {
        /// The component folder whose weights were read.
        dir: PathBuf,
        /// What candle reported (it names the tensor and the shapes).
        source: candle_core::Error,
    },
}

impl WeightsError {
    /// A tensor operation that failed while a model was built from the weights in `dir` (a
    /// tensor missing, or of the wrong shape or dtype): the weights' fault, naming the folder.
    pub fn tensor(dir: &Path, source: candle_core::Error) -> Self {
        Self::Tensor { dir: dir.to_path_buf(), source }
    }
}

/// A sharded checkpoint's `<stem>.safetensors.index.json`: which shard holds each tensor.
#[derive(Debug, Clone, Deserialize)]
pub struct ShardIndex {
    /// Tensor name → shard file name.
    pub weight_map: HashMap<String, String>,
}

impl ShardIndex {
    /// The shard files, each once, in a stable order.
    pub fn shards(&self) -> BTreeSet<&String> {
        self.weight_map.values().collect()
    }
}

/// The validated safetensors files of one model component.
#[derive(Debug, Clone)]
pub struct ModelWeights {
    /// The shard files (one entry when the weights are not sharded), in a stable order.
    pub files: Vec<PathBuf>,
    /// The index file, when the weights are sharded.
    pub index: Option<PathBuf>,
}

impl ModelWeights {
    /// Finds the weights `<stem>.safetensors[.index.json]` in `dir`, preferring the index when both
    /// exist (as diffusers and transformers do), and checks that every listed shard exists.
    pub fn find(dir: &Path, stem: &str) -> Result<Self, WeightsError> {
        let index = dir.join(format!("{stem}.safetensors.index.json"));
        if index.is_file() {
            let parsed: ShardIndex = read_json(&index)?;
            let shards = parsed.shards();
            let mut files = Vec::with_capacity(shards.len());
            for shard in shards {
                let path = dir.join(shard);
                if !path.is_file() {
                    return Err(WeightsError::MissingFile { path, referenced_by: Some(index.clone()) });
                }
                files.push(path);
            }
            return Ok(Self { files, index: Some(index) });
        }
        let single = dir.join(format!("{stem}.safetensors"));
        if single.is_file() {
            return Ok(Self { files: vec![single], index: None });
        }
        Err(WeightsError::NoWeights { dir: dir.to_path_buf(), stem: stem.to_string() })
    }

    /// Memory-maps every file (naming the one that fails to parse) and checks the index against
    /// the shards' contents.
    fn open(&self) -> Result<MmapedSafetensors, WeightsError> {
        // Open each file on its own first so a corrupt shard is reported by name.
        for path in &self.files {
            // SAFETY: the files are opened read-only; like every mmap-based loader we rely on them
            // not being truncated while the model is alive.
            unsafe { MmapedSafetensors::new(path) }
                .map_err(|source| WeightsError::Corrupt { path: path.clone(), source: without_path(source) })?;
        }
        let first = self.files.first().cloned().unwrap_or_default();
        // SAFETY: as above.
        let tensors = unsafe { MmapedSafetensors::multi(&self.files) }
            .map_err(|source| WeightsError::Corrupt { path: first, source })?;
        if let Some(index) = &self.index {
            let parsed: ShardIndex = read_json(index)?;
            for (tensor, shard) in &parsed.weight_map {
                if tensors.get(tensor).is_err() {
                    return Err(WeightsError::IndexMismatch {
                        index: index.clone(),
                        tensor: tensor.clone(),
                        shard: shard.clone(),
                    });
                }
            }
        }
        Ok(tensors)
    }

    /// A [`VarBuilder`] over the files that converts tensors to `dtype` on `device` as they are
    /// asked for.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> Result<VarBuilder<'static>, WeightsError> {
        Ok(VarBuilder::from_backend(Box::new(self.open()?), dtype, device.clone()))
    }

    /// Every tensor of the files, converted to `dtype` on `device`, by name.
    pub fn load_all(&self, dtype: DType, device: &Device) -> Result<HashMap<String, Tensor>, WeightsError> {
        let tensors = self.open()?;
        let dir = self.files.first().and_then(|f| f.parent()).unwrap_or(Path::new("."));
        let names: Vec<String> = tensors.tensors().into_iter().map(|(name, _)| name).collect();
        names
            .into_iter()
            .map(|name| {
                let tensor = tensors.load(&name, device).and_then(|t| t.to_dtype(dtype));
                Ok((name, tensor.map_err(|source| WeightsError::tensor(dir, source))?))
            })
            .collect()
    }
}

/// candle attaches the file path to its errors; ours already names the file.
fn without_path(error: candle_core::Error) -> candle_core::Error {
    match error {
        candle_core::Error::WithPath { inner, .. } => without_path(*inner),
        other => other,
    }
}

/// Shorthand for [`ModelWeights::find`] followed by [`ModelWeights::var_builder`].
pub fn var_builder(dir: &Path, stem: &str, dtype: DType, device: &Device) -> Result<VarBuilder<'static>, WeightsError> {
    ModelWeights::find(dir, stem)?.var_builder(dtype, device)
}

/// Reads and parses a component's `config.json` (or any JSON file), naming the file on error.
pub fn load_config<T: DeserializeOwned>(path: &Path) -> Result<T, WeightsError> {
    if !path.is_file() {
        return Err(WeightsError::MissingFile { path: path.to_path_buf(), referenced_by: None });
    }
    read_json(path)
}

/// A component's `config.json` (or another JSON config), read and checked by `check`: a
/// malformed file names the file, a value out of range names the file and the field.
pub fn load_checked_config<C, E>(path: &Path, check: impl FnOnce(&C) -> Result<(), UnsupportedConfig>) -> Result<C, E>
where
    C: DeserializeOwned,
    E: From<WeightsError> + From<UnsupportedConfig>,
{
    let config: C = load_config(path)?;
    check(&config).map_err(|e| e.in_file(path))?;
    Ok(config)
}

fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, WeightsError> {
    let text = std::fs::read_to_string(path).map_err(|source| WeightsError::Io { path: path.to_path_buf(), source })?;
    serde_json::from_str(&python_json(&text)).map_err(|source| WeightsError::Json { path: path.to_path_buf(), source })
}

/// Python's `json` writes `Infinity`, `-Infinity` and `NaN` (diffusers does, e.g.
/// `"lambda_min_clipped": -Infinity`); standard JSON has no such numbers. This turns those bare
/// words into the strings `"Infinity"`, `"-Infinity"`, `"NaN"` so serde can read the file, and
/// leaves everything else (including string contents) untouched.
pub fn python_json(text: &str) -> std::borrow::Cow<'_, str> {
    if !(text.contains("Infinity") || text.contains("NaN")) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
            rest = &rest[c.len_utf8()..];
            continue;
        }
        if let Some(word) = ["-Infinity", "Infinity", "NaN"].into_iter().find(|w| rest.starts_with(w)) {
            out.push('"');
            out.push_str(word);
            out.push('"');
            rest = &rest[word.len()..];
            continue;
        }
        if c == '"' {
            in_string = true;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_json_quotes_non_finite_numbers_outside_strings() {
        let text = r#"{"a": -Infinity, "b": [Infinity, NaN], "c": "NaN -Infinity \" x", "d": 1.5}"#;
        let value: serde_json::Value = serde_json::from_str(&python_json(text)).unwrap();
        assert_eq!(value["a"], "-Infinity");
        assert_eq!(value["b"][1], "NaN");
        assert_eq!(value["c"], "NaN -Infinity \" x");
        assert_eq!(value["d"], 1.5);
    }
}
