//! LoRAs for the transformer, in the layouts PixArt-Σ's trainers write, detected from the keys:
//!
//! | layout | keys | alpha |
//! |---|---|---|
//! | PEFT (`PeftModel.save_pretrained`) | `base_model.model.<layer>.lora_A.weight` / `lora_B.weight` | `adapter_config.json` beside the file |
//! | diffusers `save_lora_weights` | `unet.base_model.model.<layer>.lora_A/B.weight` | none (rank) |
//! | SimpleTuner / diffusers | `transformer.<layer>.lora_A/B.weight` | `.alpha` tensors or none |
//! | PEFT keys without a prefix | `<layer>.lora_A/B.weight` | `.alpha` tensors or none |
//! | OneTrainer (legacy) | `lora_transformer_<layer with _>.lora_down/.lora_up.weight` | `.alpha` |
//! | original PixArt keys (ComfyUI) | `blocks.N.attn.qkv.lora_down/.lora_up.weight` (q/k/v packed) | `.alpha` |
//! | kohya | `lora_unet_<layer with _>.lora_down/.lora_up.weight`, diffusers or original names | `.alpha` |
//!
//! `<layer>` is a diffusers layer name or an original one (packed `attn.qkv` and
//! `cross_attn.kv_linear` are split row-wise onto their diffusers layers). A LoRA adds
//! `scale · alpha / rank · up · down` to each layer's weight (PEFT's merge rule; for a
//! convolution `down` is `[r, in, kh, kw]` and `up` `[out, r, 1, 1]`). Text-encoder tensors
//! (`lora_te_…`, `text_encoder.…`) are set aside, not applied ([`Lora::text_encoder_tensors`]);
//! LyCORIS (LoKr, LoHa) and DoRA are refused by name; a layer this model does not have is an
//! error naming it.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::original_layout::diffusers_layers;
use crate::weights::TransformerWeights;

/// Why a LoRA cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    /// The file cannot be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not a safetensors file, or a truncated one.
    #[error("not a safetensors LoRA: {0}")]
    NotSafetensors(String),
    /// A layout this engine does not apply.
    #[error("{0} is not supported (LoRA, in the layouts of PEFT, diffusers, SimpleTuner, OneTrainer, kohya and the original PixArt keys, is)")]
    Unsupported(&'static str),
    /// Tensors that are none of a LoRA's.
    #[error("not a LoRA: {count} tensors of no LoRA layout, e.g. {examples}")]
    NotLora {
        /// How many.
        count: usize,
        /// A few of their names.
        examples: String,
    },
    /// A LoRA tensor with non-finite values.
    #[error("{0}: NaN or infinite values")]
    NotFinite(String),
    /// A layer's tensors do not fit together or do not fit the model.
    #[error("{layer}: {problem}")]
    Shape {
        /// The layer, as the file names it.
        layer: String,
        /// What does not fit.
        problem: String,
    },
    /// Layers this model does not have.
    #[error("{count} layers of the LoRA are not in this model, e.g. {examples}")]
    UnknownLayers {
        /// How many.
        count: usize,
        /// A few of them.
        examples: String,
    },
    /// `adapter_config.json` is malformed.
    #[error("adapter_config.json: {0}")]
    AdapterConfig(String),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// How the file names layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Naming {
    /// Dotted names, diffusers' or the original repository's.
    Dotted,
    /// Dots written as underscores (OneTrainer, kohya), resolved against the model's layers.
    Underscored,
}

/// One layer's low-rank pair.
#[derive(Debug, Clone)]
struct LoraLayer {
    /// `down` (`A`): `[r, in]` or `[r, in, kh, kw]`, f32 on the CPU.
    down: Tensor,
    /// `up` (`B`): `[out, r]` or `[out, r, 1, 1]`, f32 on the CPU.
    up: Tensor,
    alpha: Option<f64>,
}

/// A LoRA read from a file: its layers' low-rank pairs and how to scale them.
#[derive(Debug, Clone)]
pub struct Lora {
    layout: String,
    naming: Naming,
    /// By the layer name the file uses, prefix removed.
    layers: BTreeMap<String, LoraLayer>,
    text_encoder_tensors: Vec<String>,
    /// What `adapter_config.json` says of alpha, for layers without an `.alpha` tensor.
    adapter: AdapterConfig,
    /// SHA-256 of the file (and of its adapter config), hex: the LoRA's identity.
    digest: String,
}

/// A key's prefix, the layout it shows, and how it names layers.
const PREFIXES: [(&str, &str, Naming); 7] = [
    ("unet.base_model.model.", "diffusers save_lora_weights (unet.base_model.model.)", Naming::Dotted),
    ("base_model.model.", "PEFT (base_model.model.)", Naming::Dotted),
    ("transformer.", "SimpleTuner/diffusers (transformer.)", Naming::Dotted),
    ("diffusion_model.", "ComfyUI (diffusion_model.)", Naming::Dotted),
    ("lora_transformer_", "OneTrainer (lora_transformer_)", Naming::Underscored),
    ("lora_unet_", "kohya (lora_unet_)", Naming::Underscored),
    ("", "keys without a prefix", Naming::Dotted),
];

/// The suffixes of a LoRA's tensors: `(suffix, role)`.
const SUFFIXES: [(&str, &str); 7] = [
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora_A.default.weight", "down"),
    (".lora_B.default.weight", "up"),
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".alpha", "alpha"),
];

fn is_text_encoder(key: &str) -> bool {
    ["lora_te", "text_encoder.", "te.", "t5.", "lora_t5"].iter().any(|p| key.starts_with(p))
}

/// Refuses the layouts of other adapter families by name.
fn refuse_other_families(keys: &[&str]) -> Result<(), LoraError> {
    let has = |needle: &str| keys.iter().any(|k| k.contains(needle));
    if has(".lokr_w1") || has(".lokr_w2") {
        return Err(LoraError::Unsupported("LyCORIS LoKr"));
    }
    if has(".hada_w1") || has(".hada_w2") {
        return Err(LoraError::Unsupported("LyCORIS LoHa"));
    }
    if has(".lora_magnitude_vector") || has(".dora_scale") {
        return Err(LoraError::Unsupported("DoRA"));
    }
    Ok(())
}

fn examples(names: &[String]) -> String {
    let shown: Vec<&str> = names.iter().take(5).map(String::as_str).collect();
    format!("{}{}", shown.join(", "), if names.len() > 5 { ", …" } else { "" })
}

impl Lora {
    /// Reads a LoRA from a `.safetensors` file or a PEFT adapter folder (its
    /// `adapter_model.safetensors`); an `adapter_config.json` beside the file gives alpha.
    pub fn read(path: &Path) -> Result<Self, LoraError> {
        let file = if path.is_dir() { path.join("adapter_model.safetensors") } else { path.to_path_buf() };
        let io = |source| LoraError::Io { path: file.clone(), source };
        let bytes = std::fs::read(&file).map_err(io)?;
        let config_path = file.with_file_name("adapter_config.json");
        let config = std::fs::read_to_string(&config_path).ok();
        Self::from_safetensors(&bytes, config.as_deref())
    }

    /// Reads a LoRA from the bytes of a safetensors file, with the PEFT `adapter_config.json`
    /// that came with it, if any.
    pub fn from_safetensors(bytes: &[u8], adapter_config: Option<&str>) -> Result<Self, LoraError> {
        let tensors = candle_core::safetensors::load_buffer(bytes, &Device::Cpu)
            .map_err(|e| LoraError::NotSafetensors(e.to_string()))?;
        let keys: Vec<&str> = tensors.keys().map(String::as_str).collect();
        refuse_other_families(&keys)?;
        let (text_encoder, model): (Vec<&str>, Vec<&str>) = keys.iter().partition(|k| is_text_encoder(k));
        let (prefix, layout, naming) = PREFIXES
            .into_iter()
            .find(|(prefix, _, _)| !model.is_empty() && model.iter().all(|k| k.starts_with(prefix)))
            .unwrap_or(PREFIXES[PREFIXES.len() - 1]);
        let mut parts: BTreeMap<String, HashMap<&str, Tensor>> = BTreeMap::new();
        let mut strays = Vec::new();
        for key in model {
            let name = &key[prefix.len()..];
            match SUFFIXES.iter().find(|(suffix, _)| name.ends_with(suffix)) {
                Some((suffix, role)) => {
                    let tensor = tensors[key].to_dtype(DType::F32)?;
                    parts.entry(name[..name.len() - suffix.len()].to_string()).or_default().insert(role, tensor);
                }
                None => strays.push(key.to_string()),
            }
        }
        if !strays.is_empty() || parts.is_empty() {
            strays.sort();
            return Err(LoraError::NotLora { count: strays.len(), examples: examples(&strays) });
        }
        let layers: BTreeMap<String, LoraLayer> = parts
            .into_iter()
            .map(|(layer, parts)| Ok((layer.clone(), pair(&layer, parts)?)))
            .collect::<Result<_, LoraError>>()?;
        let layout = format!("{layout}, {}", layer_names(layers.keys()));
        let adapter = AdapterConfig::parse(adapter_config)?;
        let mut text_encoder_tensors: Vec<String> = text_encoder.into_iter().map(str::to_string).collect();
        text_encoder_tensors.sort();
        let digest = {
            use sha2::Digest;
            let mut hasher = sha2::Sha256::new();
            hasher.update(bytes);
            hasher.update(adapter_config.unwrap_or_default().as_bytes());
            hasher.finalize().iter().map(|b| format!("{b:02x}")).collect()
        };
        Ok(Self { layout, naming, layers, text_encoder_tensors, adapter, digest })
    }

    /// The layout the keys showed (for logs): the trainer's prefix and whose layer names.
    pub fn layout(&self) -> &str {
        &self.layout
    }

    /// SHA-256 of its file (and adapter config), hex: two LoRAs with the same digest are the same.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// How many layers it changes.
    pub fn layer_count(&self) -> usize {
        self.layers.len()
    }

    /// Text-encoder tensors in the file, set aside: this engine applies LoRAs to the transformer
    /// only (an image differs from the trainer's samples when its T5 was trained too).
    pub fn text_encoder_tensors(&self) -> &[String] {
        &self.text_encoder_tensors
    }

    /// The changes `scale · alpha / rank · up · down` this LoRA makes to `weights`, by diffusers
    /// tensor name (`<layer>.weight`), f32 on the weights' device. Every layer must be one of
    /// the model's, with matching shapes.
    pub fn deltas(&self, weights: &TransformerWeights, scale: f64) -> Result<HashMap<String, Tensor>, LoraError> {
        let resolver = LayerResolver::new(weights, self.naming);
        let mut deltas: HashMap<String, Tensor> = HashMap::new();
        let mut unknown = Vec::new();
        for (name, layer) in &self.layers {
            let Some(targets) = resolver.resolve(name) else {
                unknown.push(name.clone());
                continue;
            };
            let rank = layer.down.dim(0)?;
            let alpha = layer.alpha.or_else(|| self.adapter.alpha_for(name)).unwrap_or(rank as f64);
            let factor = if self.adapter.rank_stabilized { alpha / (rank as f64).sqrt() } else { alpha / rank as f64 };
            let delta = layer_delta(name, layer, scale * factor)?;
            let rows = delta.dim(0)?;
            if rows % targets.len() != 0 {
                return Err(LoraError::Shape {
                    layer: name.clone(),
                    problem: format!("{rows} rows for {} layers", targets.len()),
                });
            }
            let share = rows / targets.len();
            for (i, target) in targets.iter().enumerate() {
                let tensor = format!("{target}.weight");
                let base = weights.tensors().get(&tensor).ok_or_else(|| LoraError::Shape {
                    layer: name.clone(),
                    problem: format!("{tensor} is not in this model"),
                })?;
                let part = delta.narrow(0, i * share, share)?;
                let part = if part.rank() == 2 && base.rank() == 4 { part.reshape(base.dims())? } else { part };
                if part.dims() != base.dims() {
                    return Err(LoraError::Shape {
                        layer: name.clone(),
                        problem: format!("changes {:?} but {tensor} is {:?} in this model", part.dims(), base.dims()),
                    });
                }
                let part = part.to_device(base.device())?;
                let sum = match deltas.remove(&tensor) {
                    Some(earlier) => (earlier + part)?,
                    None => part,
                };
                deltas.insert(tensor, sum);
            }
        }
        if !unknown.is_empty() {
            return Err(LoraError::UnknownLayers { count: unknown.len(), examples: examples(&unknown) });
        }
        Ok(deltas)
    }
}

/// Whose layer names a LoRA uses: the original repository's or diffusers'.
fn layer_names<'a>(mut layers: impl Iterator<Item = &'a String>) -> &'static str {
    let original = ["blocks", "x_embedder", "t_embedder", "t_block", "y_embedder", "final_layer"];
    let is_original = |l: &str| original.iter().any(|o| l.strip_prefix(o).is_some_and(|r| r.starts_with(['.', '_'])));
    if layers.any(|l| is_original(l)) {
        "original PixArt names"
    } else {
        "diffusers names"
    }
}

/// A layer's `down`/`up`/`alpha` tensors checked.
fn pair(layer: &str, mut parts: HashMap<&str, Tensor>) -> Result<LoraLayer, LoraError> {
    let missing = |role: &str| LoraError::Shape { layer: layer.to_string(), problem: format!("no {role} matrix") };
    let down = parts.remove("down").ok_or_else(|| missing("down (lora_A)"))?;
    let up = parts.remove("up").ok_or_else(|| missing("up (lora_B)"))?;
    let alpha = parts.remove("alpha").map(|a| a.flatten_all()?.get(0)?.to_scalar::<f32>()).transpose()?.map(f64::from);
    for tensor in [&down, &up] {
        let finite = tensor.flatten_all()?.to_vec1::<f32>()?.iter().all(|v| v.is_finite());
        if !finite || alpha.is_some_and(|a| !a.is_finite()) {
            return Err(LoraError::NotFinite(layer.to_string()));
        }
    }
    let rank = down.dims().first().copied().unwrap_or(0);
    let up_rank = up.dims().get(1).copied().unwrap_or(0);
    let shapes_fit = rank > 0 && rank == up_rank && matches!((down.rank(), up.rank()), (2, 2) | (4, 4) | (4, 2));
    if !shapes_fit {
        return Err(LoraError::Shape {
            layer: layer.to_string(),
            problem: format!("down {:?} and up {:?} are not a low-rank pair", down.dims(), up.dims()),
        });
    }
    Ok(LoraLayer { down, up, alpha })
}

/// `factor · up · down`, `[out, in]` or, for a convolution, `[out, in, kh, kw]`.
fn layer_delta(name: &str, layer: &LoraLayer, factor: f64) -> Result<Tensor, LoraError> {
    let rank = layer.down.dim(0)?;
    let out = layer.up.dim(0)?;
    let down = layer.down.reshape((rank, ()))?;
    let delta = (layer.up.reshape((out, rank))?.matmul(&down)? * factor)?;
    if layer.down.rank() == 4 {
        let (_, input, kh, kw) = layer.down.dims4()?;
        return Ok(delta.reshape((out, input, kh, kw))?);
    }
    if delta.dim(1)? == 0 {
        return Err(LoraError::Shape { layer: name.to_string(), problem: "an empty matrix".into() });
    }
    Ok(delta)
}

/// What PEFT's `adapter_config.json` says of alpha.
#[derive(Debug, Clone, Default)]
struct AdapterConfig {
    /// `lora_alpha`.
    alpha: Option<f64>,
    /// `alpha_pattern`: a layer whose name is the key, or ends with `.` and the key, takes its alpha.
    alpha_pattern: Vec<(String, f64)>,
    /// `use_rslora`: alpha / √rank instead of alpha / rank.
    rank_stabilized: bool,
}

impl AdapterConfig {
    fn parse(text: Option<&str>) -> Result<Self, LoraError> {
        let Some(text) = text else { return Ok(Self::default()) };
        let bad = |what: &str| LoraError::AdapterConfig(format!("{what} is not a finite number"));
        let config: serde_json::Value =
            serde_json::from_str(text).map_err(|e| LoraError::AdapterConfig(e.to_string()))?;
        let alpha = config.get("lora_alpha").and_then(serde_json::Value::as_f64);
        if alpha.is_some_and(|a| !a.is_finite()) {
            return Err(bad("lora_alpha"));
        }
        let mut alpha_pattern = Vec::new();
        for (key, value) in config.get("alpha_pattern").and_then(serde_json::Value::as_object).into_iter().flatten() {
            let value =
                value.as_f64().filter(|v| v.is_finite()).ok_or_else(|| bad(&format!("alpha_pattern {key:?}")))?;
            alpha_pattern.push((key.clone(), value));
        }
        let rank_stabilized = config.get("use_rslora").and_then(serde_json::Value::as_bool).unwrap_or(false);
        Ok(Self { alpha, alpha_pattern, rank_stabilized })
    }

    fn alpha_for(&self, layer: &str) -> Option<f64> {
        let pattern = self.alpha_pattern.iter().find(|(key, _)| layer == key || layer.ends_with(&format!(".{key}")));
        pattern.map(|(_, alpha)| *alpha).or(self.alpha)
    }
}

/// Finds the diffusers layers a LoRA layer name stands for in one model.
struct LayerResolver {
    layers: std::collections::BTreeSet<String>,
    /// Underscored names (diffusers' and original ones) → the dotted name.
    underscored: HashMap<String, String>,
    naming: Naming,
}

impl LayerResolver {
    fn new(weights: &TransformerWeights, naming: Naming) -> Self {
        let layers = weights.layers();
        let mut underscored = HashMap::new();
        if naming == Naming::Underscored {
            for layer in &layers {
                underscored.insert(layer.replace('.', "_"), layer.clone());
            }
            for original in original_layer_names(weights.depth()) {
                underscored.insert(original.replace('.', "_"), original);
            }
        }
        Self { layers, underscored, naming }
    }

    /// The diffusers layers `name` changes (several, in row order, for a packed original
    /// layer), or `None` when the model has no such layer.
    fn resolve(&self, name: &str) -> Option<Vec<String>> {
        let dotted = match self.naming {
            Naming::Dotted => name.to_string(),
            Naming::Underscored => self.underscored.get(name)?.clone(),
        };
        if self.layers.contains(&dotted) {
            return Some(vec![dotted]);
        }
        let targets = diffusers_layers(&dotted)?.targets;
        targets.iter().all(|t| self.layers.contains(t)).then_some(targets)
    }
}

/// Every layer name of the original layout for a model of `depth` blocks.
fn original_layer_names(depth: usize) -> Vec<String> {
    let mut names: Vec<String> = [
        "x_embedder.proj",
        "y_embedder.y_proj.fc1",
        "y_embedder.y_proj.fc2",
        "t_embedder.mlp.0",
        "t_embedder.mlp.2",
        "t_block.1",
        "final_layer.linear",
    ]
    .map(String::from)
    .to_vec();
    for n in 0..depth {
        for layer in [
            "attn.qkv",
            "attn.proj",
            "cross_attn.q_linear",
            "cross_attn.kv_linear",
            "cross_attn.proj",
            "mlp.fc1",
            "mlp.fc2",
        ] {
            names.push(format!("blocks.{n}.{layer}"));
        }
    }
    names
}
