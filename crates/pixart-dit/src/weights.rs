//! The transformer's weights by diffusers' tensor names, on their device in the compute dtype:
//! read from a diffusers folder or from one file (safetensors, or a PyTorch pickle read without
//! executing anything) in diffusers' or the original PixArt repository's layout, and with LoRA
//! deltas added. A model is built from them ([`crate::PixArtTransformer::from_weights`]); the
//! tensors are shared, so a model with a few layers changed costs only those layers.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use pixart_core::linear_bf16::CpuProducts;
use pixart_core::linear_f32::{column_major, is_column_major, stacked_column_major};
use pixart_core::{ModelWeights, UnsupportedConfig, WeightsError};

use crate::config::DitConfig;
use crate::original_layout::{classify, is_original_layout, OriginalTensor};
use crate::DitError;

/// How a file names the transformer's tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// diffusers' `PixArtTransformer2DModel` names.
    Diffusers,
    /// The original PixArt repository's names (`blocks.N.attn.qkv`, …).
    Original,
}

/// The transformer's tensors by diffusers' names.
#[derive(Debug, Clone)]
pub struct TransformerWeights {
    tensors: HashMap<String, Tensor>,
    /// Where they were read from.
    source: PathBuf,
    /// The layout of the source.
    layout: Layout,
    /// Tokens of the original layout's stored position table (`pos_embed`), when present: the
    /// grid the model was trained at.
    position_tokens: Option<usize>,
    /// Per self-attention (`transformer_blocks.N.attn1`), its Q, K and V weights stacked into
    /// one column-major `[3·inner, in]` weight, of which the `to_q/to_k/to_v` tensors are views
    /// ([`Self::for_cpu_products`] in f32 on the CPU).
    stacked_qkv: HashMap<String, Tensor>,
}

/// The projections a self-attention's stacked weight holds, in its row order.
const STACKED_PROJECTIONS: [&str; 3] = ["to_q", "to_k", "to_v"];

/// Reads every tensor of a single file as `(name, tensor)` on the CPU.
fn read_file(path: &Path) -> Result<Vec<(String, Tensor)>, DitError> {
    let corrupt = |source: candle_core::Error| WeightsError::Corrupt { path: path.to_path_buf(), source };
    if !path.is_file() {
        return Err(WeightsError::MissingFile { path: path.to_path_buf(), referenced_by: None }.into());
    }
    let extension = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    if extension == "safetensors" {
        // SAFETY: read-only mapping; the file must not be truncated while it is read.
        let mapped = unsafe { candle_core::safetensors::MmapedSafetensors::new(path) }.map_err(corrupt)?;
        let names: Vec<String> = mapped.tensors().into_iter().map(|(name, _)| name).collect();
        return names
            .into_iter()
            .map(|name| Ok((name.clone(), mapped.load(&name, &Device::Cpu).map_err(corrupt)?)))
            .collect();
    }
    // A PyTorch checkpoint: the weights under `state_dict`, or at the top.
    match candle_core::pickle::read_all_with_key(path, Some("state_dict")) {
        Ok(tensors) if !tensors.is_empty() => Ok(tensors),
        _ => candle_core::pickle::read_all_with_key(path, None).map_err(|e| corrupt(e).into()),
    }
}

impl TransformerWeights {
    /// The weights of a diffusers `transformer/` folder (`diffusion_pytorch_model.safetensors`,
    /// or its shards).
    pub fn from_folder(dir: &Path, dtype: DType, device: &Device) -> Result<Self, DitError> {
        let tensors = ModelWeights::find(dir, "diffusion_pytorch_model")?.load_all(dtype, device)?;
        Ok(Self {
            tensors,
            source: dir.to_path_buf(),
            layout: Layout::Diffusers,
            position_tokens: None,
            stacked_qkv: HashMap::new(),
        })
    }

    /// The weights of one file: `.safetensors`, or a PyTorch checkpoint (`.pth`, `.pt`, `.bin`;
    /// weights under `state_dict` or at the top), in diffusers' layout or the original
    /// repository's (packed `attn.qkv` and `cross_attn.kv_linear` are split; `pos_embed` and the
    /// null caption are not needed). Parts no PixArt-Σ model has are refused naming the tensor.
    pub fn from_file(path: &Path, dtype: DType, device: &Device) -> Result<Self, DitError> {
        let read = read_file(path)?;
        let layout =
            if is_original_layout(read.iter().map(|(n, _)| n.as_str())) { Layout::Original } else { Layout::Diffusers };
        let mut position_tokens = None;
        let mut tensors = HashMap::with_capacity(read.len());
        let mut put = |name: String, tensor: Tensor| -> Result<(), DitError> {
            let tensor = tensor.to_dtype(dtype)?.to_device(device)?;
            tensors.insert(name, tensor);
            Ok(())
        };
        for (name, tensor) in read {
            if layout == Layout::Diffusers {
                put(name, tensor)?;
                continue;
            }
            let unsupported = |why: &str| {
                UnsupportedConfig::new("tensor", &name, format!("PixArt-Σ weights ({why} are not)")).in_file(path)
            };
            match classify(&name) {
                OriginalTensor::Layer { map, suffix } => {
                    let rows = tensor.dim(0)?;
                    let parts = map.targets.len();
                    if rows % parts != 0 {
                        return Err(unsupported("a packed layer whose rows do not split evenly").into());
                    }
                    for (i, target) in map.targets.iter().enumerate() {
                        put(format!("{target}.{suffix}"), tensor.narrow(0, i * rows / parts, rows / parts)?)?;
                    }
                }
                OriginalTensor::Renamed(target) => put(target, tensor)?,
                OriginalTensor::Unused => {
                    if name == "pos_embed" {
                        position_tokens = tensor.dims().get(1).copied();
                    }
                }
                OriginalTensor::Unsupported(why) => return Err(unsupported(why).into()),
                OriginalTensor::Unknown => {
                    return Err(UnsupportedConfig::new("tensor", &name, "a tensor of the original PixArt layout")
                        .in_file(path)
                        .into())
                }
            }
        }
        Ok(Self { tensors, source: path.to_path_buf(), layout, position_tokens, stacked_qkv: HashMap::new() })
    }

    /// These weights laid out for `products`: unless the products run in bf16 or f16 (which
    /// pack their own copy from row-major weights, and run a self-attention's three packed
    /// layers in one op), every linear layer's weight (2-D `*.weight`) in f32 on the CPU is
    /// stored column-major ([`column_major`]), how the f32 product reads it without repacking,
    /// so the model built from them uses them without a copy, and each self-attention's Q, K
    /// and V weights are stored as one stacked weight ([`Self::stacked_qkv`]), which the model
    /// multiplies in one product. LoRA merges ([`Self::with_deltas`]) keep each tensor's layout.
    pub fn for_cpu_products(mut self, products: CpuProducts) -> Result<Self, DitError> {
        if !products.packs_weights() {
            let self_attentions: Vec<String> = self
                .tensors
                .keys()
                .filter_map(|k| k.strip_suffix(".attn1.to_q.weight"))
                .map(|p| format!("{p}.attn1"))
                .collect();
            for attention in self_attentions {
                self.stack_qkv(&attention)?;
            }
            for (name, tensor) in self.tensors.iter_mut() {
                if name.ends_with(".weight") {
                    *tensor = column_major(tensor)?;
                }
            }
        }
        Ok(self)
    }

    /// Stacks `attention`'s `to_q/to_k/to_v` weights (when all three are 2-D f32 on the CPU with
    /// the same shape) and puts views of the stack in their place.
    fn stack_qkv(&mut self, attention: &str) -> Result<(), DitError> {
        let names = STACKED_PROJECTIONS.map(|p| format!("{attention}.{p}.weight"));
        let Some(parts) = names.iter().map(|n| self.tensors.get(n)).collect::<Option<Vec<&Tensor>>>() else {
            return Ok(());
        };
        let stackable = |t: &&Tensor| t.device().is_cpu() && t.dtype() == DType::F32 && t.rank() == 2;
        if !parts.iter().all(stackable) || parts.iter().any(|p| p.dims() != parts[0].dims()) {
            return Ok(());
        }
        let (stacked, views) = stacked_column_major(&parts)?;
        for (name, view) in names.into_iter().zip(views) {
            self.tensors.insert(name, view);
        }
        self.stacked_qkv.insert(attention.to_string(), stacked);
        Ok(())
    }

    /// The stacked `[3·inner, in]` Q/K/V weight of a self-attention (e.g.
    /// `transformer_blocks.0.attn1`), whose rows are its `to_q`, `to_k` and `to_v` weights (the
    /// tensors of those names are views of it); `None` where [`Self::for_cpu_products`] did not
    /// stack them (bf16 or f16 products, another device or dtype).
    pub fn stacked_qkv(&self, attention: &str) -> Option<&Tensor> {
        self.stacked_qkv.get(attention)
    }

    /// Where the weights were read from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// How the source named them.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The tensors by diffusers' names.
    pub fn tensors(&self) -> &HashMap<String, Tensor> {
        &self.tensors
    }

    /// One tensor, or an error naming it and the source.
    pub fn get(&self, name: &str) -> Result<&Tensor, DitError> {
        self.tensors.get(name).ok_or_else(|| {
            UnsupportedConfig::new("tensor", name, "present in PixArt-Σ weights (it is missing)")
                .in_file(&self.source)
                .into()
        })
    }

    /// The names of the layers (tensors `<layer>.weight` of rank 2 or 4): what a LoRA can change.
    pub fn layers(&self) -> BTreeSet<String> {
        self.tensors
            .iter()
            .filter(|(_, t)| matches!(t.rank(), 2 | 4))
            .filter_map(|(name, _)| name.strip_suffix(".weight").map(str::to_string))
            .collect()
    }

    /// The transformer blocks these weights have (`transformer_blocks.N`).
    pub fn depth(&self) -> usize {
        let blocks: BTreeSet<usize> = self
            .tensors
            .keys()
            .filter_map(|k| k.strip_prefix("transformer_blocks.")?.split('.').next()?.parse().ok())
            .collect();
        blocks.len()
    }

    /// The config of a model with these weights: depth, width, channels, patch and caption
    /// width from the tensors' shapes; the head width, norms and the rest from `base` (the
    /// model folder's config); the trained grid from the stored position table when the file
    /// has one (then the interpolation scale is the Σ family's, sample size / 64).
    pub fn config(&self, base: &DitConfig) -> Result<DitConfig, DitError> {
        let dims = |name: &str| self.get(name).map(|t| t.dims().to_vec());
        let patch_embed = dims("pos_embed.proj.weight")?;
        let [hidden, in_channels, patch, _] = patch_embed[..] else {
            return Err(UnsupportedConfig::new("pos_embed.proj.weight", format!("{patch_embed:?}"), "4 dimensions")
                .in_file(&self.source)
                .into());
        };
        let out_rows = dims("proj_out.weight")?.first().copied().unwrap_or(0);
        let caption_channels = dims("caption_projection.linear_1.weight")?.get(1).copied().unwrap_or(0);
        let head_dim = base.attention_head_dim;
        if head_dim == 0 || hidden % head_dim != 0 {
            return Err(UnsupportedConfig::new(
                "pos_embed.proj.weight width",
                hidden,
                format!("a multiple of the model's attention_head_dim ({head_dim})"),
            )
            .in_file(&self.source)
            .into());
        }
        let mut config = base.clone();
        config.num_attention_heads = hidden / head_dim;
        config.in_channels = in_channels;
        config.patch_size = patch;
        config.out_channels = Some(out_rows / (patch * patch).max(1));
        config.caption_channels = caption_channels;
        config.num_layers = self.depth();
        if let Some(tokens) = self.position_tokens {
            let side = (tokens as f64).sqrt().round() as usize;
            if side * side == tokens && side * patch != base.sample_size {
                config.sample_size = side * patch;
                config.interpolation_scale = config.sample_size as f64 / 64.0;
            }
        }
        config.validate().map_err(|e| e.in_file(&self.source))?;
        Ok(config)
    }

    /// These weights with `deltas` (f32, by tensor name) added: each changed tensor is computed
    /// in f32 and stored back in its dtype; every other tensor is shared. A self-attention whose
    /// stacked Q/K/V weight ([`Self::stacked_qkv`]) had a part changed is stacked again from its
    /// merged parts.
    pub fn with_deltas(&self, deltas: HashMap<String, Tensor>) -> Result<Self, DitError> {
        let mut changed = self.clone();
        let mut restack = BTreeSet::new();
        for (name, delta) in deltas {
            let attention = STACKED_PROJECTIONS.iter().find_map(|p| name.strip_suffix(&format!(".{p}.weight")));
            let stacked = attention.filter(|a| self.stacked_qkv.contains_key(*a));
            if let Some(attention) = stacked {
                restack.insert(attention.to_string());
            }
            let base = self.get(&name)?;
            if base.dims() != delta.dims() {
                return Err(DitError::Input(format!(
                    "{name}: a change of shape {:?} for a tensor of {:?}",
                    delta.dims(),
                    base.dims()
                )));
            }
            let merged = (base.to_dtype(DType::F32)? + delta.to_device(base.device())?)?.to_dtype(base.dtype())?;
            // A part of a stack is laid out when the stack is built again, below.
            let merged = if is_column_major(base) && stacked.is_none() { column_major(&merged)? } else { merged };
            changed.tensors.insert(name, merged);
        }
        for attention in restack {
            changed.stacked_qkv.remove(&attention);
            changed.stack_qkv(&attention)?;
        }
        Ok(changed)
    }
}
