//! ggml's block formats as the CPU kernels read them: a weight row as small integers with one
//! scale (and, for the k-quants with minimums, one offset) per unit of 16 or 32 weights, and
//! activation rows quantized to 8 bits the way ggml pairs them with each format (q8_0 with
//! q8_0, the k-quants with q8_K).
//!
//! Layouts (little endian, as GGUF and candle store them): q8_0 `d: f16, q: [i8; 32]`;
//! q4_K `d, dmin: f16, scales: [u8; 12], qs: [u8; 128]`; q5_K the same with `qh: [u8; 32]`
//! before `qs`; q6_K `ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16`.

use half::f16;

/// Weights per k-quant super-block.
const SUPER_BLOCK: usize = 256;

/// A weight block format the panel kernel decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BlockFormat {
    /// 32 weights `d · q`, `q: i8`.
    Q8_0,
    /// 256 weights in 8 units of 32, `d·sc · q − dmin·m`, `q` in `0..16`.
    Q4K,
    /// As [`Self::Q4K`] with `q` in `0..32`.
    Q5K,
    /// 256 weights in 16 units of 16, `d·sc · (q − 32)`, `q` in `0..64`.
    Q6K,
}

impl BlockFormat {
    /// Weights per stored block.
    pub(crate) fn block_weights(self) -> usize {
        match self {
            BlockFormat::Q8_0 => 32,
            _ => SUPER_BLOCK,
        }
    }

    /// Bytes per stored block.
    pub(crate) fn block_bytes(self) -> usize {
        match self {
            BlockFormat::Q8_0 => 34,
            BlockFormat::Q4K => 144,
            BlockFormat::Q5K => 176,
            BlockFormat::Q6K => 210,
        }
    }

    /// Weights sharing one scale.
    pub(crate) fn unit(self) -> usize {
        match self {
            BlockFormat::Q6K => 16,
            _ => 32,
        }
    }

    /// Whether weights carry a per-unit offset (`mins`).
    pub(crate) fn has_mins(self) -> bool {
        matches!(self, BlockFormat::Q4K | BlockFormat::Q5K)
    }

    /// Weights per activation scale (q8_0: 32; q8_K: 256).
    pub(crate) fn activation_block(self) -> usize {
        self.block_weights()
    }

    /// Calls `unit(u, scale, min)` for every unit `u` of one row (`row`: whole blocks), the
    /// weights of the unit being `scale · q − min` (`min` 0 without minimums); the integers `q`
    /// are read by the kernels from the blocks themselves.
    pub(crate) fn row_scales(self, row: &[u8], mut unit: impl FnMut(usize, f32, f32)) {
        for (b, block) in row.chunks_exact(self.block_bytes()).enumerate() {
            match self {
                BlockFormat::Q8_0 => unit(b, half_at(block, 0), 0.0),
                BlockFormat::Q4K | BlockFormat::Q5K => {
                    let (d, dmin) = (half_at(block, 0), half_at(block, 2));
                    for j in 0..8 {
                        let (sc, m) = scale_min_k4(j, &block[4..16]);
                        unit(8 * b + j, d * sc as f32, dmin * m as f32);
                    }
                }
                BlockFormat::Q6K => {
                    let d = half_at(block, 208);
                    for (j, &sc) in block[192..208].iter().enumerate() {
                        unit(16 * b + j, d * (sc as i8) as f32, 0.0);
                    }
                }
            }
        }
    }
}

/// The f16 at `offset`, as f32.
fn half_at(bytes: &[u8], offset: usize) -> f32 {
    f16::from_le_bytes([bytes[offset], bytes[offset + 1]]).to_f32()
}

/// The 6-bit scale and minimum of unit `j` (0..8) of a q4_K / q5_K super-block.
fn scale_min_k4(j: usize, packed: &[u8]) -> (u8, u8) {
    if j < 4 {
        (packed[j] & 63, packed[j + 4] & 63)
    } else {
        ((packed[j + 4] & 0x0F) | ((packed[j - 4] >> 6) << 4), (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4))
    }
}

/// Activation rows quantized to 8 bits: `x ≈ scales[block] · values`.
pub(crate) struct QuantizedActivations {
    /// `m × k` values in `-128..=127`.
    pub values: Vec<i8>,
    /// One scale per block of [`BlockFormat::activation_block`] values (row major).
    pub scales: Vec<f32>,
}

/// Quantizes `x` (rows of `k`, a multiple of the format's activation block) as ggml pairs it
/// with `format`: q8_0 (`d = max|x| / 127` kept as f16, `q = round(x / d)`) for q8_0 weights,
/// q8_K (`d = max / −127` of the largest-magnitude value, f32) for the k-quants.
pub(crate) fn quantize_activations(format: BlockFormat, x: &[f32]) -> QuantizedActivations {
    let block = format.activation_block();
    let mut values = vec![0i8; x.len()];
    let mut scales = vec![0f32; x.len() / block];
    for ((xs, out), scale) in x.chunks_exact(block).zip(values.chunks_exact_mut(block)).zip(&mut scales) {
        *scale = match format {
            BlockFormat::Q8_0 => quantize_q8_0(xs, out),
            _ => quantize_q8k(xs, out),
        };
    }
    QuantizedActivations { values, scales }
}

/// ggml's q8_0 quantization of one block; returns the scale as stored (rounded to f16).
fn quantize_q8_0(xs: &[f32], out: &mut [i8]) -> f32 {
    let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    for (q, &v) in out.iter_mut().zip(xs) {
        *q = (v * id).round() as i8;
    }
    f16::from_f32(d).to_f32()
}

/// ggml's q8_K quantization of one super-block; returns the scale.
fn quantize_q8k(xs: &[f32], out: &mut [i8]) -> f32 {
    let (mut max, mut amax) = (0f32, 0f32);
    for &v in xs {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    if amax == 0.0 {
        out.fill(0);
        return 0.0;
    }
    let iscale = -127.0 / max;
    for (q, &v) in out.iter_mut().zip(xs) {
        *q = (iscale * v).round().clamp(-128.0, 127.0) as i8;
    }
    1.0 / iscale
}
