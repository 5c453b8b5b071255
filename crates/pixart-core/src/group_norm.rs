//! GroupNorm, optionally followed by SiLU, as one pass on the CPU: the statistics of each
//! (batch, group) in f64, then `x · s + t` per channel (`s = γ/σ`, `t = β − μ·s`, torch's form)
//! written once into the output, with SiLU applied in the same pass. candle's composition makes
//! five full-size temporaries (centred, squared, normalised, scaled, shifted) and SiLU a sixth:
//! on the SDXL VAE at 2048² each is 2 GiB. Elsewhere (CUDA, Metal) the composition runs.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Module, Shape, Tensor};
use candle_nn::VarBuilder;

use crate::fast_math::{affine_silu_slice, contiguous_f32};

/// A GroupNorm layer (`weight`, `bias`), with [`GroupNorm::forward_silu`] for the
/// GroupNorm → SiLU pair.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    /// candle's layer: the composition off the CPU.
    inner: candle_nn::GroupNorm,
    /// γ and β in f32, for the CPU op.
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

/// The fused CPU op: input, weight, bias.
struct GroupNormOp {
    groups: usize,
    eps: f64,
    silu: bool,
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "group-norm-cpu"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
        bias: &CpuStorage,
        bias_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (x, weight, bias) = (
            contiguous_f32(x, x_layout, name)?,
            contiguous_f32(weight, weight_layout, name)?,
            contiguous_f32(bias, bias_layout, name)?,
        );
        let dims = x_layout.dims();
        let (channels, spatial) = (dims[1], dims[2..].iter().product::<usize>());
        let per_group = channels / self.groups;
        let group_len = per_group * spatial;
        // SAFETY: a group's channels cover its chunk, and `affine_silu_slice` writes every
        // element of each channel's `dst`.
        let out = unsafe {
            crate::buffers::par_written(x.len(), group_len, |i, dst| {
                let src = &x[i * group_len..i * group_len + dst.len()];
                let first_channel = (i % self.groups) * per_group;
                let (mean, var) = moments(src);
                let rstd = 1.0 / (var + self.eps).sqrt();
                for (c, (dst, src)) in dst.chunks_mut(spatial).zip(src.chunks(spatial)).enumerate() {
                    let scale = rstd * f64::from(weight[first_channel + c]);
                    let shift = f64::from(bias[first_channel + c]) - mean * scale;
                    affine_silu_slice(src, dst, scale as f32, shift as f32, self.silu);
                }
            })
        };
        Ok((CpuStorage::F32(out), x_layout.shape().clone()))
    }
}

/// Mean and (biased) variance of `values`, accumulated in f64 in two passes.
fn moments(values: &[f32]) -> (f64, f64) {
    let n = values.len().max(1) as f64;
    let (mut sum, mut squares) = (0.0, 0.0);
    sum_f64(values, None, &mut sum);
    let mean = sum / n;
    sum_f64(values, Some(mean), &mut squares);
    (mean, squares / n)
}

/// Independent f64 sums per call of [`sum_f64`]: a few vectors of them, so that the additions
/// run in parallel lanes instead of one chain that waits on each addition's latency.
const LANES: usize = 32;

crate::fast_math::dispatch!(
    /// `out = Σ v` over `values` (`centre` None) or `Σ (v − centre)²`, in f64.
    sum_f64, sum_f64_at(values: &[f32], centre: Option<f64>, out: &mut f64) {
        *out = match centre {
            None => interleaved_sum(values, f64::from),
            Some(centre) => interleaved_sum(values, |v| {
                let d = f64::from(v) - centre;
                d * d
            }),
        };
    }
);

/// `Σ term(v)` over `values`: [`LANES`] interleaved partial sums (vectorised by the compiler, at
/// the SIMD level of the function this is inlined into), added up at the end.
#[inline(always)]
fn interleaved_sum(values: &[f32], term: impl Fn(f32) -> f64) -> f64 {
    let mut lanes = [0f64; LANES];
    let chunks = values.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane += term(v);
        }
    }
    for (lane, &v) in lanes.iter_mut().zip(rest) {
        *lane += term(v);
    }
    lanes.iter().sum()
}

impl GroupNorm {
    /// `groups` groups over `channels` channels, weights `weight` and `bias` from `vb`.
    pub fn new(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> candle_core::Result<Self> {
        let (weight, bias) = (vb.get(channels, "weight")?, vb.get(channels, "bias")?);
        Self::from_tensors(weight, bias, groups, eps)
    }

    /// From γ and β `[C]`.
    pub fn from_tensors(weight: Tensor, bias: Tensor, groups: usize, eps: f64) -> candle_core::Result<Self> {
        let channels = weight.dim(0)?;
        let inner = candle_nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, eps)?;
        let as_f32 = |t: Tensor| t.to_dtype(DType::F32)?.contiguous();
        Ok(Self { inner, weight: as_f32(weight)?, bias: as_f32(bias)?, groups, eps })
    }

    /// GroupNorm of `x` `[B, C, …]`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.apply(x, false)
    }

    /// SiLU(GroupNorm(x)), one output tensor on the CPU.
    pub fn forward_silu(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.apply(x, true)
    }

    fn apply(&self, x: &Tensor, silu: bool) -> candle_core::Result<Tensor> {
        let fits = x.rank() >= 3 && x.dim(1)? % self.groups == 0 && x.elem_count() > 0;
        if !x.device().is_cpu() || !fits {
            let normed = self.inner.forward(x)?;
            return if silu { normed.silu() } else { Ok(normed) };
        }
        let dtype = x.dtype();
        let op = GroupNormOp { groups: self.groups, eps: self.eps, silu };
        let x = x.to_dtype(DType::F32)?.contiguous()?;
        x.apply_op3_no_bwd(&self.weight, &self.bias, &op)?.to_dtype(dtype)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn layer(groups: usize, channels: usize) -> GroupNorm {
        let weight = Tensor::randn(1f32, 0.5, channels, &Device::Cpu).unwrap();
        let bias = Tensor::randn(0f32, 0.5, channels, &Device::Cpu).unwrap();
        GroupNorm::from_tensors(weight, bias, groups, 1e-6).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// Each SIMD level's f64 sums against one plain chain of f64 additions, on lengths that
    /// leave remainders, values with a large common offset.
    #[test]
    fn every_simd_level_sums_alike() {
        use crate::fast_math::Simd;
        for len in [0, 1, 31, 32, 33, 1000, 4099] {
            let values: Vec<f32> = (0..len).map(|i| 40.0 + ((i * 7919) % 1013) as f32 * 0.013).collect();
            let plain: f64 = values.iter().map(|&v| f64::from(v)).sum();
            let centre = plain / len.max(1) as f64;
            let plain_squares: f64 = values.iter().map(|&v| (f64::from(v) - centre).powi(2)).sum();
            for level in Simd::supported() {
                let (mut sum, mut squares) = (f64::NAN, f64::NAN);
                sum_f64_at(level, &values, None, &mut sum);
                sum_f64_at(level, &values, Some(centre), &mut squares);
                assert!((sum - plain).abs() <= 1e-12 * plain.abs().max(1.0), "{level:?} {len}: {sum} vs {plain}");
                let close = (squares - plain_squares).abs() <= 1e-12 * plain_squares.max(1.0);
                assert!(close, "{level:?} {len}: {squares} vs {plain_squares}");
            }
        }
    }

    #[test]
    fn equals_candles_composition() {
        for (groups, channels, b, h, w) in [(4, 8, 1, 7, 5), (32, 64, 2, 9, 16), (1, 3, 1, 1, 1), (2, 4, 3, 1, 300)] {
            let norm = layer(groups, channels);
            // Off-centre values with a large mean: the two-pass statistics keep their precision.
            let x = (Tensor::randn(0f32, 3.0, (b, channels, h, w), &Device::Cpu).unwrap() + 40.0).unwrap();
            let composed = norm.inner.forward(&x).unwrap();
            assert!(max_diff(&norm.forward(&x).unwrap(), &composed) < 1e-4, "{groups}/{channels}");
            let fused = norm.forward_silu(&x).unwrap();
            assert!(max_diff(&fused, &composed.silu().unwrap()) < 1e-4, "{groups}/{channels} + SiLU");
            // A strided input, and bf16 (statistics in f32, one rounding at the end).
            let t = x.transpose(2, 3).unwrap();
            assert!(
                max_diff(&norm.forward(&t).unwrap(), &norm.inner.forward(&t.contiguous().unwrap()).unwrap()) < 1e-4
            );
            let x16 = x.to_dtype(DType::BF16).unwrap();
            let half = norm.forward_silu(&x16).unwrap();
            assert_eq!(half.dtype(), DType::BF16);
            let reference = norm.forward_silu(&x16.to_dtype(DType::F32).unwrap()).unwrap();
            // bf16 keeps 8 significant bits: rounding the output moves it by at most 2⁻⁸ of its
            // magnitude (the inputs are random, so the bound scales with the largest output).
            let largest = reference.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1.0);
            let diff = max_diff(&half, &reference);
            assert!(diff <= largest / 256.0 + 1e-3, "bf16: {diff} for outputs up to {largest}");
        }
    }
}
