//! `x · Wᵀ` for a q8_0 weight on AVX2 CPUs without AVX-512 VNNI, reading the blocks where they
//! are (no repacked copy), with ggml's integer dot products: the activations are quantized to
//! q8_0 like ggml's (`d = max|x| / 127` rounded to f16, `q = round(x / d)`), each block's 32
//! `i8 × i8` products are summed in integers (`vpmaddubsw` + `vpmaddwd` on `|w|` and
//! `sign(x, w)`: q8_0's full 8-bit range rules out the panel kernel's unsigned activations
//! there), scaled by `d_x · d_w` and accumulated in f32. Four activation rows share each weight
//! block load; weight rows are split across threads. With VNNI the panel kernel
//! (`panel_matmul`) runs instead; without AVX2 the caller uses candle's generic kernel.
//!
//! A q8_0 block as stored (GGUF and candle): an f16 scale `d` (little endian) then 32 `i8`.

use half::f16;
use rayon::prelude::*;

use crate::ggml_blocks::{quantize_activations, BlockFormat};

/// Bytes of one q8_0 block.
pub(crate) const BLOCK_BYTES: usize = 34;
/// Weights per block.
const BLOCK: usize = 32;
/// Activation rows computed together against one weight row.
const ROWS: usize = 4;
/// Weight rows per parallel task.
const COLUMNS_PER_TASK: usize = 16;

/// Whether this CPU runs the kernel (AVX2 + FMA).
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `dst[m × n] = x[m × k] · Wᵀ`, `w` the `n × k/32` q8_0 blocks as bytes; `k` a multiple of 32.
pub(crate) fn matmul((m, k, n): (usize, usize, usize), x: &[f32], w: &[u8], dst: &mut [f32]) {
    if m == 0 || n == 0 {
        return;
    }
    let blocks = k / BLOCK;
    let xq = quantize_activations(BlockFormat::Q8_0, x);
    // Output by weight row (`n × m`), so that tasks write disjoint runs; transposed at the end.
    let mut by_column = vec![0f32; n * m];
    by_column.par_chunks_mut(COLUMNS_PER_TASK * m).enumerate().for_each(|(task, out)| {
        let mut w_scales = vec![0f32; blocks];
        let mut scales = vec![0f32; ROWS * blocks];
        for (c, out) in out.chunks_exact_mut(m).enumerate() {
            let j = task * COLUMNS_PER_TASK + c;
            let row = &w[j * blocks * BLOCK_BYTES..(j + 1) * blocks * BLOCK_BYTES];
            for (s, block) in w_scales.iter_mut().zip(row.chunks_exact(BLOCK_BYTES)) {
                *s = f16::from_le_bytes([block[0], block[1]]).to_f32();
            }
            for r0 in (0..m).step_by(ROWS) {
                let rows = ROWS.min(m - r0);
                let xs = &xq.values[r0 * k..(r0 + rows) * k];
                // d_w · d_x per row and block, read by the kernel as a broadcast load.
                let x_scales = xq.scales[r0 * blocks..(r0 + rows) * blocks].chunks_exact(blocks);
                for (dst, x_scales) in scales.chunks_exact_mut(blocks).zip(x_scales) {
                    dst.iter_mut().zip(x_scales).zip(&w_scales).for_each(|((d, &a), &b)| *d = a * b);
                }
                dot_rows(row, blocks, xs, &scales[..rows * blocks], &mut out[r0..r0 + rows]);
            }
        }
    });
    for (j, column) in by_column.chunks_exact(m).enumerate() {
        for (r, &v) in column.iter().enumerate() {
            dst[r * n + j] = v;
        }
    }
}

/// `out[r] = Σ_b scales[r][b] · Σ_i w[b][i] · x[r][b][i]` over `blocks` blocks, for up to
/// [`ROWS`] rows (`scales[r][b] = d_w[b] · d_x[r][b]`).
fn dot_rows(w: &[u8], blocks: usize, x: &[i8], scales: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: the caller checked `available()`; the slices hold `blocks` whole blocks for
        // `out.len()` rows.
        unsafe {
            if out.len() == ROWS {
                x86::dot_rows_avx2::<ROWS>(w, blocks, x, scales, out)
            } else {
                x86::dot_rows_avx2::<1>(w, blocks, x, scales, out)
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{BLOCK, BLOCK_BYTES};

    /// Sum of the 8 lanes.
    #[inline(always)]
    unsafe fn sum_lanes(v: __m256) -> f32 {
        let pair = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let pair = _mm_add_ps(pair, _mm_movehl_ps(pair, pair));
        _mm_cvtss_f32(_mm_add_ss(pair, _mm_shuffle_ps::<1>(pair, pair)))
    }

    /// The rows `R` at a time (`R` = `out.len()` when below [`super::ROWS`]: then called with
    /// `R = 1` once per row).
    macro_rules! dot_rows {
        ($name:ident, $features:literal, $block_dot:expr) => {
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $name<const R: usize>(
                w: &[u8],
                blocks: usize,
                x: &[i8],
                scales: &[f32],
                out: &mut [f32],
            ) {
                let k = blocks * BLOCK;
                for first in (0..out.len()).step_by(R) {
                    let mut acc = [_mm256_setzero_ps(); R];
                    for b in 0..blocks {
                        let wq = _mm256_loadu_si256(w.as_ptr().add(b * BLOCK_BYTES + 2).cast());
                        let magnitude = _mm256_sign_epi8(wq, wq);
                        for r in 0..R {
                            let row = first + r;
                            let xq = _mm256_loadu_si256(x.as_ptr().add(row * k + b * BLOCK).cast());
                            let signed = _mm256_sign_epi8(xq, wq);
                            let sums: __m256i = $block_dot(magnitude, signed);
                            let scale = _mm256_broadcast_ss(&*scales.as_ptr().add(row * blocks + b));
                            acc[r] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(sums), acc[r]);
                        }
                    }
                    for r in 0..R {
                        out[first + r] = sum_lanes(acc[r]);
                    }
                }
            }
        };
    }

    dot_rows!(dot_rows_avx2, "avx2,fma", |u: __m256i, s: __m256i| _mm256_madd_epi16(
        _mm256_maddubs_epi16(u, s),
        _mm256_set1_epi16(1)
    ));
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::k_quants::{self, GgmlType};
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    /// Against candle's generic q8_0 kernel (the same blocks and activation rounding, ggml's
    /// scalar dot products), with row counts that leave a tail.
    #[test]
    fn equals_candles_q8_0_matmul() {
        if !available() {
            return;
        }
        let (n, k) = (37, 256);
        let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        let bytes = q.data().unwrap();
        let blocks: Vec<k_quants::BlockQ8_0> = {
            let mut out = vec![k_quants::BlockQ8_0::zeros(); n * k / 32];
            let values = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            GgmlType::from_float(&values, &mut out);
            out
        };
        for m in [1, 4, 7] {
            let x: Vec<f32> = (0..m * k).map(|i| ((i * 7919 % 201) as f32 - 100.0) * 0.013).collect();
            let mut want = vec![0f32; m * n];
            k_quants::matmul((m, k, n), &x, &blocks, &mut want).unwrap();
            let mut ours = vec![0f32; m * n];
            matmul((m, k, n), &x, &bytes, &mut ours);
            for (i, (a, b)) in ours.iter().zip(&want).enumerate() {
                assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "m={m} [{i}]: {a} vs {b}");
            }
        }
    }
}
