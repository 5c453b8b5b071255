//! The whole transformer: latents, timestep and caption in, ε and variance out.

use std::path::Path;

use candle_core::{DType, Module, Tensor};
use candle_nn::{Linear, VarBuilder};
use pixart_core::attention::KeyMask;
use pixart_core::{UnsupportedConfig, WeightsError};

use crate::block::{SelfAttentionRows, TransformerBlock};
use crate::config::DitConfig;
use crate::embeddings::{modulated_layer_norm, AdaLayerNormSingle, CaptionProjection, PatchEmbed};
use crate::shared_rows::SharedRows;
use crate::weights::TransformerWeights;
use crate::DitError;

/// The intermediate values of one call, for parity tests and debugging.
#[derive(Debug, Clone)]
pub struct DitTrace {
    /// Patch tokens plus position embedding `[B, N, D]`.
    pub pos_embed: Tensor,
    /// The six modulation vectors `[B, 6D]`.
    pub t6: Tensor,
    /// The embedded timestep `[B, D]`.
    pub embedded_timestep: Tensor,
    /// The projected caption `[B, L, D]`.
    pub caption: Tensor,
    /// The token stream after each block.
    pub blocks: Vec<Tensor>,
}

/// A caption batch projected to the transformer's width, with every block's cross-attention keys
/// and values and the attention bias: what the caption contributes, computed once and attended to
/// at every denoising step.
#[derive(Debug, Clone)]
pub struct PreparedCaption {
    /// `[B, L, D]`: the projected caption (positions padded in every row dropped).
    states: Tensor,
    /// Per block: keys and values `[B, heads, L, head_dim]`.
    keys_values: Vec<(Tensor, Tensor)>,
    /// Which caption tokens each row attends to (bias 0 for tokens, −10000 for padding, and
    /// the token counts); `None` without a mask.
    mask: Option<KeyMask>,
}

/// The adaLN-single outputs of one timestep, shared by every row of a batch (or one per row).
#[derive(Debug, Clone)]
pub struct PreparedTimestep {
    /// `[1 or B, 6D]`: the six modulation vectors.
    t6: Tensor,
    /// `[1 or B, D]`: the embedded timestep (final layer's shift and scale).
    embedded: Tensor,
}

/// The adaLN-single outputs of every timestep of a run, computed in one batch before the loop.
#[derive(Debug, Clone)]
pub struct PreparedTimesteps {
    t6: Tensor,
    embedded: Tensor,
}

impl PreparedTimesteps {
    /// The number of timesteps.
    pub fn len(&self) -> usize {
        self.t6.dims().first().copied().unwrap_or(0)
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The `i`-th timestep's outputs, for every row of a batch (no host work, no upload).
    pub fn get(&self, i: usize) -> Result<PreparedTimestep, DitError> {
        if i >= self.len() {
            return Err(DitError::Input(format!("timestep {i} of {} prepared", self.len())));
        }
        Ok(PreparedTimestep { t6: self.t6.narrow(0, i, 1)?, embedded: self.embedded.narrow(0, i, 1)? })
    }
}

/// Perturbed-attention guidance's perturbation: in `blocks`, the batch rows from `rows_from` on
/// get identity self-attention (`to_out(to_v(x))`, diffusers' PAG processors) instead of
/// attention; every other row and block runs as usual.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Perturbation {
    /// Block indices (`transformer_blocks.{i}`).
    pub blocks: Vec<usize>,
    /// The first perturbed batch row.
    pub rows_from: usize,
}

/// PixArt-Σ's diffusion transformer (diffusers' `PixArtTransformer2DModel`).
#[derive(Debug, Clone)]
pub struct PixArtTransformer {
    config: DitConfig,
    pos_embed: PatchEmbed,
    adaln_single: AdaLayerNormSingle,
    caption_projection: CaptionProjection,
    blocks: Vec<TransformerBlock>,
    scale_shift_table: Tensor,
    proj_out: Linear,
    dtype: DType,
}

impl PixArtTransformer {
    /// Loads `transformer/` (`config.json` + `diffusion_pytorch_model.safetensors`, or shards).
    pub fn load(dir: &Path, dtype: DType, device: &candle_core::Device) -> Result<Self, DitError> {
        let config: DitConfig =
            pixart_core::load_checked_config::<_, DitError>(&dir.join("config.json"), DitConfig::validate)?;
        let weights = TransformerWeights::from_folder(dir, dtype, device)?.for_cpu_products(config.cpu_products)?;
        Self::from_weights(&config, &weights)
    }

    /// Builds the model from weights read by [`TransformerWeights`] (a folder, a single file, or
    /// either with LoRAs merged); a tensor missing or of the wrong shape names the source.
    pub fn from_weights(config: &DitConfig, weights: &TransformerWeights) -> Result<Self, DitError> {
        let (dtype, device) = match weights.tensors().values().next() {
            Some(t) => (t.dtype(), t.device().clone()),
            None => {
                return Err(
                    WeightsError::NoWeights { dir: weights.source().to_path_buf(), stem: "transformer".into() }.into()
                )
            }
        };
        let vb = VarBuilder::from_tensors(weights.tensors().clone(), dtype, &device);
        let source = weights.source();
        let mut model = Self::new(config, vb).map_err(|e| match e {
            DitError::Unsupported(e) => DitError::Unsupported(e.in_file(source)),
            DitError::Candle(error) => WeightsError::tensor(source, error).into(),
            other => other,
        })?;
        for (i, block) in model.blocks.iter_mut().enumerate() {
            if let Some(stacked) = weights.stacked_qkv(&format!("transformer_blocks.{i}.attn1")) {
                block.stack_self_attention_projections(stacked)?;
            }
        }
        Ok(model)
    }

    /// How many blocks multiply their self-attention's Q, K and V in one product (on the CPU,
    /// weights from [`TransformerWeights::for_cpu_products`] in f32, or products in bf16 or f16
    /// where the CPU has them: every block).
    pub fn blocks_with_stacked_qkv(&self) -> usize {
        self.blocks.iter().filter(|b| b.has_stacked_self_attention_projections()).count()
    }

    /// Builds the model from its config and weights.
    pub fn new(config: &DitConfig, vb: VarBuilder) -> Result<Self, DitError> {
        config.validate()?;
        if vb.contains_tensor("adaln_single.emb.resolution_embedder.linear_1.weight") {
            return Err(UnsupportedConfig::new(
                "weights",
                "resolution/aspect-ratio embedders (PixArt-α)",
                "PixArt-Σ weights without additional conditions",
            )
            .into());
        }
        let d = config.hidden_size();
        let p = config.patch_size;
        let blocks = (0..config.num_layers)
            .map(|i| TransformerBlock::new(config, vb.pp(format!("transformer_blocks.{i}"))))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            pos_embed: PatchEmbed::new(
                config.in_channels,
                d,
                p,
                config.sample_size,
                config.interpolation_scale,
                vb.pp("pos_embed"),
            )?,
            adaln_single: AdaLayerNormSingle::new(d, vb.pp("adaln_single"))?,
            caption_projection: CaptionProjection::new(config.caption_channels, d, vb.pp("caption_projection"))?,
            blocks,
            scale_shift_table: vb.get((2, d), "scale_shift_table")?,
            proj_out: candle_nn::linear(d, p * p * config.out_channels(), vb.pp("proj_out"))?,
            dtype: vb.dtype(),
            config: config.clone(),
        })
    }

    /// The model's config.
    pub fn config(&self) -> &DitConfig {
        &self.config
    }

    /// The weights' dtype (inputs are converted to it).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Predicts `[B, out_channels, H, W]` from latents `[B, in_channels, H, W]`, one timestep per
    /// batch row, caption states `[B, L, caption_channels]` and their mask `[B, L]` (1 = token).
    pub fn forward(
        &self,
        latents: &Tensor,
        timesteps: &[f32],
        caption: &Tensor,
        caption_mask: Option<&Tensor>,
    ) -> Result<Tensor, DitError> {
        let timestep = self.timestep_per_row(latents, timesteps)?;
        Ok(self.run(latents, &timestep, &self.prepare_caption(caption, caption_mask)?, None, false)?.0)
    }

    /// [`Self::forward`], also returning the intermediate values when `trace` is set.
    pub fn forward_traced(
        &self,
        latents: &Tensor,
        timesteps: &[f32],
        caption: &Tensor,
        caption_mask: Option<&Tensor>,
        trace: bool,
    ) -> Result<(Tensor, Option<DitTrace>), DitError> {
        let timestep = self.timestep_per_row(latents, timesteps)?;
        self.run(latents, &timestep, &self.prepare_caption(caption, caption_mask)?, None, trace)
    }

    /// One timestep per batch row.
    fn timestep_per_row(&self, latents: &Tensor, timesteps: &[f32]) -> Result<PreparedTimestep, DitError> {
        let b = latents.dims().first().copied().unwrap_or(0);
        if timesteps.len() != b {
            return Err(DitError::Input(format!("batch sizes differ: latents {b}, timesteps {}", timesteps.len())));
        }
        let (t6, embedded) = self.adaln_single.forward(timesteps, self.dtype, latents.device())?;
        Ok(PreparedTimestep { t6, embedded })
    }

    /// The adaLN-single outputs of every timestep of a run at once (the timestep MLP as one small
    /// batch before the denoising loop, instead of host work and an upload at every step).
    pub fn prepare_timesteps(
        &self,
        timesteps: &[f32],
        device: &candle_core::Device,
    ) -> Result<PreparedTimesteps, DitError> {
        let (t6, embedded) = self.adaln_single.forward(timesteps, self.dtype, device)?;
        Ok(PreparedTimesteps { t6, embedded })
    }

    /// Projects a caption batch and builds its attention bias once, for reuse at every denoising
    /// step (the caption does not change between steps; the result is identical to
    /// [`Self::forward`]'s).
    pub fn prepare_caption(
        &self,
        caption: &Tensor,
        caption_mask: Option<&Tensor>,
    ) -> Result<PreparedCaption, DitError> {
        let (caption, mask) = self.caption_and_mask(caption, caption_mask)?;
        let states = self.caption_projection.forward(&caption.to_dtype(self.dtype)?)?;
        let keys_values =
            self.blocks.iter().map(|block| block.caption_keys_values(&states)).collect::<candle_core::Result<_>>()?;
        Ok(PreparedCaption { states, keys_values, mask })
    }

    /// [`Self::forward`] with the timestep's and the caption's parts prepared by
    /// [`Self::prepare_timesteps`] and [`Self::prepare_caption`]: one denoising step.
    pub fn forward_prepared(
        &self,
        latents: &Tensor,
        timestep: &PreparedTimestep,
        caption: &PreparedCaption,
    ) -> Result<Tensor, DitError> {
        Ok(self.run(latents, timestep, caption, None, false)?.0)
    }

    /// [`Self::forward_prepared`] with the self-attention of some blocks perturbed for some rows
    /// (perturbed-attention guidance's extra branch).
    pub fn forward_perturbed(
        &self,
        latents: &Tensor,
        timestep: &PreparedTimestep,
        caption: &PreparedCaption,
        perturbation: &Perturbation,
    ) -> Result<Tensor, DitError> {
        if let Some(&block) = perturbation.blocks.iter().find(|&&i| i >= self.blocks.len()) {
            return Err(DitError::Input(format!("no block {block}: the model has {}", self.blocks.len())));
        }
        Ok(self.run(latents, timestep, caption, Some(perturbation), false)?.0)
    }

    fn run(
        &self,
        latents: &Tensor,
        timestep: &PreparedTimestep,
        prepared: &PreparedCaption,
        perturbation: Option<&Perturbation>,
        trace: bool,
    ) -> Result<(Tensor, Option<DitTrace>), DitError> {
        let (b, c, h, w) = latents.dims4()?;
        let p = self.config.patch_size;
        if c != self.config.in_channels || h % p != 0 || w % p != 0 || h == 0 || w == 0 {
            return Err(DitError::Input(format!(
                "latents must be [B, {}, H, W] with H and W positive multiples of {p}, got {:?}",
                self.config.in_channels,
                latents.dims()
            )));
        }
        let rows = timestep.t6.dim(0)?;
        if (rows != 1 && rows != b) || prepared.states.dim(0)? != b {
            return Err(DitError::Input(format!(
                "batch sizes differ: latents {b}, timesteps {rows}, caption {}",
                prepared.states.dim(0)?
            )));
        }
        let (t6, embedded) = (&timestep.t6, &timestep.embedded);
        let mask = prepared.mask.as_ref();
        let x = self.pos_embed.forward(&latents.to_dtype(self.dtype)?)?;
        let mut tokens = x.clone();
        let mut block_outputs = Vec::new();
        let perturbed = |i: usize| perturbation.filter(|p| p.blocks.contains(&i));
        // Until the first cross-attention, rows with equal latents and timesteps stay equal.
        let shared = if perturbed(0).is_none() { SharedRows::of(latents, t6)? } else { None };
        for (i, (block, caption_kv)) in self.blocks.iter().zip(&prepared.keys_values).enumerate() {
            let rows = match (perturbed(i), &shared) {
                (Some(p), _) => SelfAttentionRows::IdentityFrom(p.rows_from),
                (None, Some(shared)) if i == 0 => SelfAttentionRows::Shared(shared),
                _ => SelfAttentionRows::Each,
            };
            tokens = block.forward(&tokens, t6, caption_kv, mask, rows)?;
            if trace {
                block_outputs.push(tokens.clone());
            }
        }
        // Final layer: shift and scale from the embedded timestep (shift first).
        let modulation = self.scale_shift_table.unsqueeze(0)?.broadcast_add(&embedded.unsqueeze(1)?)?; // [B, 2, D]
        let (shift, scale) = (modulation.narrow(1, 0, 1)?, modulation.narrow(1, 1, 1)?);
        let out = modulated_layer_norm(&tokens, &scale, &shift, self.config.norm_eps)?;
        let out = self.proj_out.forward(&out)?; // [B, N, p·p·C_out]
                                                // Unpatchify: n h w p q c → n c (h p) (w q).
        let c_out = self.config.out_channels();
        let (gh, gw) = (h / p, w / p);
        let image = out.reshape((b, gh, gw, p, p, c_out))?.permute((0, 5, 1, 3, 2, 4))?.reshape((b, c_out, h, w))?;
        let traced = trace.then(|| DitTrace {
            pos_embed: x,
            t6: t6.clone(),
            embedded_timestep: embedded.clone(),
            caption: prepared.states.clone(),
            blocks: block_outputs,
        });
        Ok((image, traced))
    }

    /// Trims caption positions that are padding in every row (their keys get weight exactly 0
    /// under the −10000 bias), and builds the key mask (bias `(1 − mask)·(−10000)`) for the rest.
    /// The mask is read to the host here, once per caption, never inside a denoising step.
    fn caption_and_mask(&self, caption: &Tensor, mask: Option<&Tensor>) -> Result<(Tensor, Option<KeyMask>), DitError> {
        let caption_channels = self.config.caption_channels;
        let well_formed = matches!(caption.dims(), &[_, _, c] if c == caption_channels);
        if !well_formed {
            return Err(DitError::Input(format!(
                "caption must be [B, L, {caption_channels}] (the T5 width in caption_channels), got {:?}",
                caption.dims()
            )));
        }
        let Some(mask) = mask else { return Ok((caption.clone(), None)) };
        let (b, l) =
            mask.dims2().map_err(|_| DitError::Input(format!("caption mask must be [B, L], got {:?}", mask.dims())))?;
        if caption.dims()[..2] != [b, l] {
            return Err(DitError::Input(format!(
                "caption mask {:?} does not match caption {:?}",
                mask.dims(),
                caption.dims()
            )));
        }
        let rows = mask.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let used =
            rows.iter().map(|r| r.iter().rposition(|&m| m != 0.0).map_or(0, |i| i + 1)).max().unwrap_or(0).max(1);
        let caption = caption.narrow(1, 0, used)?;
        let rows: Vec<Vec<f32>> = rows.iter().map(|r| r.iter().take(used).copied().collect()).collect();
        Ok((caption, Some(KeyMask::from_rows(&rows, mask.device())?)))
    }
}
