//! Input embeddings: patches with the 2-D sin-cos position embedding, the adaLN-single timestep
//! embedding, and the caption projection.

use candle_core::{DType, Device, DeviceLocation, Module, Tensor, D};
use candle_nn::{Conv2dConfig, Linear, VarBuilder};
use pixart_core::activation::gelu_tanh;
use pixart_core::conv::Conv;

/// The fixed 2-D sin-cos position embedding for an `h × w` token grid, `[h·w, dim]` in f32.
///
/// As diffusers' `get_2d_sincos_pos_embed`: positions `p_w(j) = j / (w / base) / scale` (and
/// likewise for rows) in f32, frequencies `ω_k = 1/10000^(k/(dim/4))` and the sines/cosines in
/// f64; the first half of each vector encodes the column, the second the row; tokens row-major.
pub fn sincos_position_embedding(
    dim: usize,
    h: usize,
    w: usize,
    base: usize,
    scale: f64,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let quarter = dim / 4;
    let omega: Vec<f64> = (0..quarter).map(|k| 1.0 / 10000f64.powf(k as f64 / quarter as f64)).collect();
    let positions = |n: usize| -> Vec<f64> {
        let div = (n as f64 / base as f64) as f32;
        (0..n).map(|i| f64::from(i as f32 / div / scale as f32)).collect()
    };
    let (rows, cols) = (positions(h), positions(w));
    let mut out = Vec::with_capacity(h * w * dim);
    let mut push = |p: f64| {
        out.extend(omega.iter().map(|o| (p * o).sin() as f32));
        out.extend(omega.iter().map(|o| (p * o).cos() as f32));
    };
    for &r in &rows {
        for &c in &cols {
            push(c);
            push(r);
        }
    }
    Tensor::from_vec(out, (h * w, dim), device)
}

/// Position embeddings already computed, keyed by grid and where they live, least recently used
/// out first.
type PositionCache = std::sync::Arc<std::sync::Mutex<lru::LruCache<(usize, usize, DType, DeviceLocation), Tensor>>>;

/// How many grids' position embeddings are kept (a server alternating a few sizes reuses them).
const POSITION_CACHE_ENTRIES: std::num::NonZeroUsize = std::num::NonZeroUsize::MIN.saturating_add(3);

/// Patchify (`conv p×p / stride p`) and add the position embedding: `[B,C,H,W] → [B, N, D]`.
/// The embedding is computed once per (grid, dtype, device) and kept: it is the same at every
/// denoising step.
#[derive(Debug, Clone)]
pub struct PatchEmbed {
    proj: Conv,
    patch: usize,
    base: usize,
    interpolation_scale: f64,
    cache: PositionCache,
}

impl PatchEmbed {
    /// `pos_embed.proj.*`.
    pub fn new(
        in_channels: usize,
        dim: usize,
        patch: usize,
        sample_size: usize,
        interpolation_scale: f64,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let cfg = Conv2dConfig { stride: patch, ..Default::default() };
        Ok(Self {
            proj: Conv::new(candle_nn::conv2d(in_channels, dim, patch, cfg, vb.pp("proj"))?),
            patch,
            base: sample_size / patch,
            interpolation_scale,
            cache: std::sync::Arc::new(std::sync::Mutex::new(lru::LruCache::new(POSITION_CACHE_ENTRIES))),
        })
    }

    /// The position embedding `[1, N, D]` of an `h × w` grid, from the cache when present.
    fn position_embedding(&self, dim: usize, h: usize, w: usize, x: &Tensor) -> candle_core::Result<Tensor> {
        let key = (h, w, x.dtype(), x.device().location());
        let mut cache = self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(pos) = cache.get(&key) {
            return Ok(pos.clone());
        }
        let pos = sincos_position_embedding(dim, h, w, self.base, self.interpolation_scale, x.device())?
            .to_dtype(x.dtype())?
            .unsqueeze(0)?;
        cache.put(key, pos.clone());
        Ok(pos)
    }

    /// Returns the tokens `[B, N, D]`, N = (H/p)(W/p).
    pub fn forward(&self, latents: &Tensor) -> candle_core::Result<Tensor> {
        let (_, _, h, w) = latents.dims4()?;
        let x = self.proj.forward(latents)?.flatten_from(2)?.transpose(1, 2)?; // [B, N, D]
        let pos = self.position_embedding(x.dim(2)?, h / self.patch, w / self.patch, &x)?;
        x.broadcast_add(&pos)
    }
}

/// The 256-wide sinusoidal timestep features (`flip_sin_to_cos`, shift 0), in f32: cosines first.
pub fn timestep_features(timesteps: &[f32], device: &Device) -> candle_core::Result<Tensor> {
    const HALF: usize = 128;
    let ln_max = -(10000f64.ln() as f32);
    let freqs: Vec<f32> = (0..HALF).map(|k| (ln_max * k as f32 / HALF as f32).exp()).collect();
    let mut out = Vec::with_capacity(timesteps.len() * 2 * HALF);
    for &t in timesteps {
        out.extend(freqs.iter().map(|f| (t * f).cos()));
        out.extend(freqs.iter().map(|f| (t * f).sin()));
    }
    Tensor::from_vec(out, (timesteps.len(), 2 * HALF), device)
}

/// adaLN-single: the timestep MLP and the projection to six modulation vectors per block.
#[derive(Debug, Clone)]
pub struct AdaLayerNormSingle {
    linear_1: Linear,
    linear_2: Linear,
    linear: Linear,
}

impl AdaLayerNormSingle {
    /// `adaln_single.emb.timestep_embedder.linear_{1,2}`, `adaln_single.linear`.
    pub fn new(dim: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let emb = vb.pp("emb").pp("timestep_embedder");
        Ok(Self {
            linear_1: candle_nn::linear(256, dim, emb.pp("linear_1"))?,
            linear_2: candle_nn::linear(dim, dim, emb.pp("linear_2"))?,
            linear: candle_nn::linear(dim, 6 * dim, vb.pp("linear"))?,
        })
    }

    /// Returns `(t6 [B, 6D], embedded timestep [B, D])`.
    pub fn forward(&self, timesteps: &[f32], dtype: DType, device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
        let features = timestep_features(timesteps, device)?.to_dtype(dtype)?;
        let emb = self.linear_2.forward(&self.linear_1.forward(&features)?.silu()?)?;
        let t6 = self.linear.forward(&emb.silu()?)?;
        Ok((t6, emb))
    }
}

/// Caption projection `Linear → GELU(tanh) → Linear`: `[B, L, C_cap] → [B, L, D]`.
#[derive(Debug, Clone)]
pub struct CaptionProjection {
    linear_1: Linear,
    linear_2: Linear,
}

impl CaptionProjection {
    /// `caption_projection.linear_{1,2}`.
    pub fn new(caption_channels: usize, dim: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            linear_1: candle_nn::linear(caption_channels, dim, vb.pp("linear_1"))?,
            linear_2: candle_nn::linear(dim, dim, vb.pp("linear_2"))?,
        })
    }
}

impl Module for CaptionProjection {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.linear_2.forward(&gelu_tanh(&self.linear_1.forward(x)?)?)
    }
}

/// LayerNorm over the last dimension without affine parameters, statistics in f32. On a GPU
/// one fused kernel ([`fused_layer_norm`]); on the CPU the composition below, which this
/// crate's CPU path is tuned for.
pub fn layer_norm(x: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    if x.device().is_cuda() || x.device().is_metal() {
        return fused_layer_norm(x, eps);
    }
    composed_layer_norm(x, eps)
}

/// `layer_norm(x) · (1 + scale) + shift`, adaLN-single's modulation (`scale` and `shift`
/// broadcastable from `[B or 1, 1, D]`). On the CPU in f32 one pass per row
/// (`pixart_core::modulation`); elsewhere [`layer_norm`] and two broadcast ops.
pub fn modulated_layer_norm(x: &Tensor, scale: &Tensor, shift: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    if let Some(out) = pixart_core::modulation::modulated_layer_norm_cpu(x, scale, shift, eps)? {
        return Ok(out);
    }
    layer_norm(x, eps)?.broadcast_mul(&(scale + 1.0)?)?.broadcast_add(shift)
}

/// [`layer_norm`] as candle-nn's fused op (one kernel launch instead of seven; statistics in
/// f32 for half-precision inputs, one rounding at the end, like the composition).
pub fn fused_layer_norm(x: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let dim = x.dim(D::Minus1)?;
    let ones = Tensor::ones(dim, x.dtype(), x.device())?;
    let zeros = Tensor::zeros(dim, x.dtype(), x.device())?;
    candle_nn::ops::layer_norm(&x.contiguous()?, &ones, &zeros, eps as f32)
}

/// [`layer_norm`] from plain tensor ops.
pub fn composed_layer_norm(x: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let mean = x.mean_keepdim(D::Minus1)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    centered.broadcast_div(&(var + eps)?.sqrt()?)?.to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The fused op a GPU runs computes what the composition computes (checked with candle-nn's
    /// CPU implementation of the same op).
    #[test]
    fn fused_layer_norm_matches_the_composition() -> candle_core::Result<()> {
        let x = (Tensor::randn(0f32, 3.0, (2, 77, 1152), &Device::Cpu)? + 0.5)?;
        let diff = |a: &Tensor, b: &Tensor| -> candle_core::Result<f32> {
            (a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
        };
        let f32_diff = diff(&fused_layer_norm(&x, 1e-6)?, &composed_layer_norm(&x, 1e-6)?)?;
        assert!(f32_diff < 2e-5, "f32: {f32_diff}");
        // bf16: both keep statistics in f32 and round once; one bf16 step near 4 is 2^-5.
        let xb = x.to_dtype(DType::BF16)?;
        let bf16_diff = diff(&fused_layer_norm(&xb, 1e-6)?, &composed_layer_norm(&xb, 1e-6)?)?;
        assert!(bf16_diff <= 0.0313, "bf16: {bf16_diff}");
        // A strided input (a transposed view) goes through the same op.
        let t = x.transpose(1, 2)?.transpose(1, 2)?;
        assert!(diff(&fused_layer_norm(&t, 1e-6)?, &composed_layer_norm(&x, 1e-6)?)? < 2e-5);
        Ok(())
    }
}
