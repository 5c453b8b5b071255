//! Quantized storage for the encoder's matrices: the types a user can ask for, and the linear
//! and embedding layers that hold either plain or quantized weights.
//!
//! A quantized linear layer runs candle's quantized matmul (`QMatMul`: CPU, CUDA, Metal) on an
//! f32 input and returns the layer's compute dtype, so the rest of the encoder (RMSNorm in f32,
//! the relative position bias, the padding mask, the f16 clamps and `wo` in f32) is unchanged.

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::quantized::k_quants::{self, GgmlType};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Module, Shape, Tensor};
use candle_nn::{Embedding, Linear};

use crate::ggml_blocks::BlockFormat;
use crate::panel_matmul;

/// A quantized type the text encoder's matrices can be stored in (llama.cpp's block formats).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantType {
    /// 8-bit, blocks of 32 (8.5 bits per weight).
    Q8_0,
    /// 6-bit k-quant, super-blocks of 256 (6.56 bits per weight).
    Q6K,
    /// 5-bit k-quant, super-blocks of 256 (5.5 bits per weight).
    Q5K,
    /// 4-bit k-quant, super-blocks of 256 (4.5 bits per weight).
    Q4K,
}

impl QuantType {
    /// Every type, best quality first.
    pub const ALL: [QuantType; 4] = [QuantType::Q8_0, QuantType::Q6K, QuantType::Q5K, QuantType::Q4K];

    /// The allowed names, as the command line and the error messages spell them.
    pub const NAMES: &'static str = "q8_0, q6k, q5k, q4k";

    /// The name used on the command line (`q8_0`, `q6k`, `q5k`, `q4k`).
    pub fn name(self) -> &'static str {
        match self {
            QuantType::Q8_0 => "q8_0",
            QuantType::Q6K => "q6k",
            QuantType::Q5K => "q5k",
            QuantType::Q4K => "q4k",
        }
    }

    /// candle's block format for this type.
    pub fn ggml(self) -> GgmlDType {
        match self {
            QuantType::Q8_0 => GgmlDType::Q8_0,
            QuantType::Q6K => GgmlDType::Q6K,
            QuantType::Q5K => GgmlDType::Q5K,
            QuantType::Q4K => GgmlDType::Q4K,
        }
    }

    /// How many weights one block holds: a matrix's input width must be a multiple of it.
    pub fn block_size(self) -> usize {
        self.ggml().block_size()
    }

    /// Bytes per weight, from the block layout (e.g. 34 bytes per 32 weights for Q8_0).
    pub fn bytes_per_weight(self) -> f64 {
        let ggml = self.ggml();
        ggml.type_size() as f64 / ggml.block_size() as f64
    }
}

impl std::fmt::Display for QuantType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A name that is not one of [`QuantType::NAMES`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown quantization {0:?}: allowed values are {names}", names = QuantType::NAMES)]
pub struct UnknownQuantType(pub String);

impl std::str::FromStr for QuantType {
    type Err = UnknownQuantType;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.trim().to_ascii_lowercase().replace(['-', '_'], "");
        match lower.as_str() {
            "q80" => Ok(QuantType::Q8_0),
            "q6k" => Ok(QuantType::Q6K),
            "q5k" => Ok(QuantType::Q5K),
            "q4k" => Ok(QuantType::Q4K),
            _ => Err(UnknownQuantType(s.to_string())),
        }
    }
}

/// The block format a matrix with rows of `width` weights is stored in when `wanted` is asked
/// for: `wanted` when the width is a multiple of its block, else Q8_0 when it is a multiple of
/// 32 (what llama.cpp's quantizer also falls back to), else `None` (kept unquantized).
pub(crate) fn storage_for(wanted: QuantType, width: usize) -> Option<GgmlDType> {
    if width.is_multiple_of(wanted.block_size()) {
        Some(wanted.ggml())
    } else if width.is_multiple_of(QuantType::Q8_0.block_size()) {
        Some(GgmlDType::Q8_0)
    } else {
        None
    }
}

/// How the encoder's weights are stored: per storage type, how many tensors and bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WeightSummary {
    /// Storage type name (`f32`, `bf16`, `q8_0`, `q4k`, …) → (tensors, bytes).
    pub by_type: BTreeMap<String, (usize, usize)>,
    /// Matrices stored in another type than the one asked for, because their rows are not a
    /// multiple of its block (see [`QuantType::block_size`]).
    pub fallbacks: usize,
}

impl WeightSummary {
    /// Total bytes of all weights.
    pub fn total_bytes(&self) -> usize {
        self.by_type.values().map(|(_, bytes)| bytes).sum()
    }

    pub(crate) fn record_dense(&mut self, t: &Tensor) {
        let name = format!("{:?}", t.dtype()).to_lowercase();
        self.add(name, t.elem_count() * t.dtype().size_in_bytes());
    }

    pub(crate) fn record_quantized(&mut self, q: &QTensor) {
        self.add(ggml_name(q.dtype()).to_string(), q.storage_size_in_bytes());
    }

    fn add(&mut self, name: String, bytes: usize) {
        let entry = self.by_type.entry(name).or_default();
        entry.0 += 1;
        entry.1 += bytes;
    }
}

impl std::fmt::Display for WeightSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self
            .by_type
            .iter()
            .map(|(name, (count, bytes))| format!("{count} {name} ({:.1} MiB)", *bytes as f64 / 1048576.0))
            .collect();
        write!(f, "{} tensors: {}", self.by_type.values().map(|(c, _)| c).sum::<usize>(), parts.join(", "))?;
        if self.fallbacks > 0 {
            write!(f, "; {} matrices kept in a wider type (rows not a multiple of the block)", self.fallbacks)?;
        }
        Ok(())
    }
}

/// llama.cpp's spelling of a block format.
pub(crate) fn ggml_name(dtype: GgmlDType) -> &'static str {
    match dtype {
        GgmlDType::F32 => "f32",
        GgmlDType::F16 => "f16",
        GgmlDType::BF16 => "bf16",
        GgmlDType::Q4_0 => "q4_0",
        GgmlDType::Q4_1 => "q4_1",
        GgmlDType::Q5_0 => "q5_0",
        GgmlDType::Q5_1 => "q5_1",
        GgmlDType::Q8_0 => "q8_0",
        GgmlDType::Q8_1 => "q8_1",
        GgmlDType::Q2K => "q2k",
        GgmlDType::Q3K => "q3k",
        GgmlDType::Q4K => "q4k",
        GgmlDType::Q5K => "q5k",
        GgmlDType::Q6K => "q6k",
        GgmlDType::Q8K => "q8k",
    }
}

/// `x · Wᵀ` with a quantized `W` on the CPU through ggml's block dot products, reading the
/// blocks where they are: q8_0 and the k-quants through this crate's panel kernel
/// (`panel_matmul`: AVX-512 VNNI, or AVX2), the rest (and every type on CPUs without AVX2)
/// through candle's.
///
/// candle's own CPU path (`QMatMul`) repacks q8_0, q4k and q6k weights into an interleaved
/// layout on first use and keeps that copy beside the original for the tensor's lifetime (on
/// x86 with AVX-512 VNNI, AVX-VNNI or AVX2): the resident size of a quantized text encoder
/// doubles (measured on T5 XXL q8_0: 5.06 GB after loading, 10.0 GB after the first encode).
/// This op keeps the memory the file promises; see the README for the time it costs.
#[derive(Debug, Clone)]
struct CompactQuantizedMatmul(Arc<QTensor>);

/// The tensor's blocks, reinterpreted in place.
fn blocks<T: GgmlType>(bytes: &[u8]) -> candle_core::Result<&[T]> {
    let size = std::mem::size_of::<T>();
    if !bytes.len().is_multiple_of(size) || bytes.as_ptr().align_offset(std::mem::align_of::<T>()) != 0 {
        candle_core::bail!("quantized storage of {} bytes is not a whole, aligned number of blocks", bytes.len())
    }
    // SAFETY: the bytes are the `Vec<T>` candle allocated for this tensor's blocks (size and
    // alignment checked above); block types are plain old data.
    Ok(unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<T>(), bytes.len() / size) })
}

impl CustomOp1 for CompactQuantizedMatmul {
    fn name(&self) -> &'static str {
        "compact-quantized-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, k) = self.0.shape().dims2()?;
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("compact-quantized-matmul: input is not contiguous")
        };
        let x = &storage.as_slice::<f32>()?[start..end];
        let dims = layout.shape().dims();
        if dims.last() != Some(&k) {
            candle_core::bail!("compact-quantized-matmul: input {:?} does not end in {k}", dims)
        }
        let m = x.len() / k;
        let bytes = self.0.data()?;
        let mut dst = vec![0f32; m * n];
        let mkn = (m, k, n);
        let panel_format = match self.0.dtype() {
            GgmlDType::Q8_0 => Some(BlockFormat::Q8_0),
            GgmlDType::Q4K => Some(BlockFormat::Q4K),
            GgmlDType::Q5K => Some(BlockFormat::Q5K),
            GgmlDType::Q6K => Some(BlockFormat::Q6K),
            _ => None,
        };
        if let Some(format) = panel_format {
            let whole =
                k % format.block_weights() == 0 && bytes.len() == n * k / format.block_weights() * format.block_bytes();
            if let (Some(kernel), true) = (panel_matmul::Kernel::detected(format), whole) {
                panel_matmul::matmul(kernel, format, mkn, x, &bytes, &mut dst);
                return Ok((CpuStorage::F32(dst), output_shape(dims, n)));
            }
        }
        match self.0.dtype() {
            GgmlDType::Q8_0 => k_quants::matmul(mkn, x, blocks::<k_quants::BlockQ8_0>(&bytes)?, &mut dst)?,
            GgmlDType::Q6K => k_quants::matmul(mkn, x, blocks::<k_quants::BlockQ6K>(&bytes)?, &mut dst)?,
            GgmlDType::Q5K => k_quants::matmul(mkn, x, blocks::<k_quants::BlockQ5K>(&bytes)?, &mut dst)?,
            GgmlDType::Q4K => k_quants::matmul(mkn, x, blocks::<k_quants::BlockQ4K>(&bytes)?, &mut dst)?,
            GgmlDType::Q3K => k_quants::matmul(mkn, x, blocks::<k_quants::BlockQ3K>(&bytes)?, &mut dst)?,
            GgmlDType::Q2K => k_quants::matmul(mkn, x, blocks::<k_quants::BlockQ2K>(&bytes)?, &mut dst)?,
            GgmlDType::Q4_0 => k_quants::matmul(mkn, x, blocks::<k_quants::BlockQ4_0>(&bytes)?, &mut dst)?,
            GgmlDType::Q4_1 => k_quants::matmul(mkn, x, blocks::<k_quants::BlockQ4_1>(&bytes)?, &mut dst)?,
            GgmlDType::Q5_0 => k_quants::matmul(mkn, x, blocks::<k_quants::BlockQ5_0>(&bytes)?, &mut dst)?,
            GgmlDType::Q5_1 => k_quants::matmul(mkn, x, blocks::<k_quants::BlockQ5_1>(&bytes)?, &mut dst)?,
            other => candle_core::bail!("compact-quantized-matmul: unsupported block type {other:?}"),
        }
        Ok((CpuStorage::F32(dst), output_shape(dims, n)))
    }
}

/// The input's shape with its last dimension replaced by `n`.
fn output_shape(dims: &[usize], n: usize) -> Shape {
    let mut out_dims = dims.to_vec();
    if let Some(last) = out_dims.last_mut() {
        *last = n;
    }
    Shape::from(out_dims)
}

/// A linear layer without bias whose weight `[out, in]` is plain or quantized.
#[derive(Debug, Clone)]
pub(crate) enum T5Linear {
    /// A plain weight in the compute dtype.
    Dense(Linear),
    /// A quantized weight; `dtype` is the dtype the layer takes and returns.
    /// On the CPU, `cpu_repack` runs candle's `QMatMul` (a repacked copy of the weight is kept)
    /// instead of [`CompactQuantizedMatmul`].
    Quantized { weight: Arc<QTensor>, gpu: QMatMul, dtype: DType, cpu_repack: bool },
}

impl T5Linear {
    /// A quantized layer taking and returning `dtype`.
    pub(crate) fn quantized(weight: QTensor, dtype: DType, cpu_repack: bool) -> candle_core::Result<Self> {
        let weight = Arc::new(weight);
        Ok(T5Linear::Quantized { gpu: QMatMul::from_arc(weight.clone())?, weight, dtype, cpu_repack })
    }

    /// The dtype the layer takes and returns.
    pub(crate) fn dtype(&self) -> DType {
        match self {
            T5Linear::Dense(linear) => linear.weight().dtype(),
            T5Linear::Quantized { dtype, .. } => *dtype,
        }
    }

    /// `x`: `[..., in]` in [`Self::dtype`]; returns `[..., out]` in the same dtype.
    pub(crate) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            T5Linear::Dense(linear) => linear.forward(x),
            T5Linear::Quantized { weight, gpu, dtype, cpu_repack } => {
                let x = x.to_dtype(DType::F32)?.contiguous()?;
                let y = if x.device().is_cpu() && !cpu_repack {
                    x.apply_op1_no_bwd(&CompactQuantizedMatmul(weight.clone()))?
                } else {
                    gpu.forward(&x)?
                };
                y.to_dtype(*dtype)
            }
        }
    }
}

/// The token embedding, plain or quantized (a quantized table dequantizes only the rows used).
#[derive(Debug, Clone)]
pub(crate) enum T5Embedding {
    /// A plain table in the compute dtype.
    Dense(Embedding),
    /// A quantized `[vocab, d_model]` table.
    Quantized(Arc<QTensor>),
}

impl T5Embedding {
    /// `ids`: `[B, L]` u32; returns `[B, L, d_model]` in `dtype`.
    pub(crate) fn forward(&self, ids: &Tensor, dtype: DType) -> candle_core::Result<Tensor> {
        match self {
            T5Embedding::Dense(embedding) => embedding.forward(ids)?.to_dtype(dtype),
            T5Embedding::Quantized(table) => table.embedding(ids)?.to_dtype(dtype),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_round_trip() {
        for q in QuantType::ALL {
            assert_eq!(q.name().parse::<QuantType>(), Ok(q));
        }
        assert_eq!("Q8_0".parse::<QuantType>(), Ok(QuantType::Q8_0));
        assert_eq!("q4_k".parse::<QuantType>(), Ok(QuantType::Q4K));
        let err = "q3k".parse::<QuantType>().unwrap_err().to_string();
        assert!(err.contains("\"q3k\"") && err.contains("q8_0, q6k, q5k, q4k"), "{err}");
    }

    #[test]
    fn storage_falls_back_to_q8_0_then_to_plain() {
        assert_eq!(storage_for(QuantType::Q4K, 4096), Some(GgmlDType::Q4K));
        assert_eq!(storage_for(QuantType::Q4K, 64), Some(GgmlDType::Q8_0));
        assert_eq!(storage_for(QuantType::Q8_0, 48), None);
        assert!((QuantType::Q8_0.bytes_per_weight() - 34.0 / 32.0).abs() < 1e-12);
        assert!((QuantType::Q4K.bytes_per_weight() - 144.0 / 256.0).abs() < 1e-12);
    }

    #[test]
    fn quantized_linear_tracks_the_plain_one() {
        // Q8_0 keeps 8 bits per weight with one scale per 32: relative error ≲ 1/127 per weight,
        // and the activations are quantized the same way; a 256-wide dot product of random
        // values lands within 2% of its magnitude.
        let dev = candle_core::Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (8, 256), &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (3, 256), &dev).unwrap();
        let plain = T5Linear::Dense(Linear::new(w.clone(), None)).forward(&x).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        let quant = T5Linear::quantized(q, DType::F32, false).unwrap();
        let out = quant.forward(&x).unwrap();
        let err = (out - &plain).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let scale = plain.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(err < 0.02 * scale, "{err} vs {scale}");
    }

    #[test]
    fn the_compact_cpu_op_equals_candles_quantized_matmul() {
        // Same blocks, same activation rounding, same dot products: equal up to the order of
        // f32 sums inside the two kernels (1e-4 relative), for every type and a ragged batch.
        let dev = candle_core::Device::Cpu;
        for ggml in [GgmlDType::Q8_0, GgmlDType::Q6K, GgmlDType::Q5K, GgmlDType::Q4K] {
            let w = Tensor::randn(0f32, 1.0, (36, 512), &dev).unwrap();
            let x = Tensor::randn(0f32, 1.0, (2, 5, 512), &dev).unwrap();
            let q = Arc::new(QTensor::quantize(&w, ggml).unwrap());
            let ours = x.apply_op1_no_bwd(&CompactQuantizedMatmul(q.clone())).unwrap();
            let candle = QMatMul::from_arc(q).unwrap().forward(&x).unwrap();
            assert_eq!(ours.dims(), [2, 5, 36]);
            let err = (&ours - &candle).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let scale = candle.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(err <= 1e-4 * scale, "{ggml:?}: {err} vs {scale}");
        }
    }
}
