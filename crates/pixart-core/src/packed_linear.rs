//! What the CPU linear ops with a packed half-precision weight ([`crate::linear_bf16`],
//! [`crate::linear_f16`]) share: checking a call's input and shaping its output, the bias.

use candle_core::{CpuStorage, DType, Layout, Shape, Tensor};

/// `[…, in]` f32 input rows of one call: the values, how many rows, and the output's shape
/// `[…, out]`; an input that is not contiguous or not `in` wide is refused, naming `op`.
pub(crate) fn input_rows<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    (in_features, out_features): (usize, usize),
    op: &str,
) -> candle_core::Result<(&'a [f32], usize, Shape)> {
    let Some((start, end)) = layout.contiguous_offsets() else { candle_core::bail!("{op}: input is not contiguous") };
    let x = &storage.as_slice::<f32>()?[start..end];
    let dims = layout.shape().dims();
    if dims.last() != Some(&in_features) {
        candle_core::bail!("{op}: input {dims:?} does not end in {in_features}")
    }
    let mut out_dims = dims.to_vec();
    if let Some(last) = out_dims.last_mut() {
        *last = out_features;
    }
    Ok((x, x.len() / in_features.max(1), Shape::from(out_dims)))
}

/// The bias `[n]` in f32 (empty without one); one of another length is refused, naming `op`.
pub(crate) fn bias_values(bias: Option<&Tensor>, n: usize, op: &str) -> candle_core::Result<Vec<f32>> {
    let bias = match bias {
        Some(b) => b.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
        None => Vec::new(),
    };
    if !bias.is_empty() && bias.len() != n {
        candle_core::bail!("{op}: a bias of {} for {n} outputs", bias.len())
    }
    Ok(bias)
}

/// Whether this CPU has AVX-512 F and BW and the x86 feature `extension` (e.g. `avx512bf16`),
/// checked at run time; false off x86-64.
pub(crate) fn has_avx512_with(extension: Avx512Extension) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let extension = match extension {
            Avx512Extension::Bf16 => std::arch::is_x86_feature_detected!("avx512bf16"),
            Avx512Extension::Fp16 => std::arch::is_x86_feature_detected!("avx512fp16"),
        };
        std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bw") && extension
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = extension;
        false
    }
}

/// The half-precision extensions of AVX-512 the packed ops run on.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Avx512Extension {
    /// AVX512-BF16 (`vdpbf16ps`).
    Bf16,
    /// AVX512-FP16 (`vfmadd231ph`).
    Fp16,
}
