//! What the CPU linear ops with a packed half-precision weight ([`crate::linear_bf16`],
//! [`crate::linear_f16`]) share: the op that runs one or more layers on one input (their outputs
//! side by side), checking a call's input and shaping its output, the bias, the parallel tasks,
//! and the probe that times an instruction's throughput.

use std::ops::Range;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};

/// A linear layer with a packed weight, as [`SideBySide`] runs it.
pub(crate) trait PackedLayer: Sync {
    /// The op's name (in errors).
    const NAME: &'static str;
    /// The instructions it needs.
    const EXTENSION: Avx512Extension;
    /// `(in, out)`.
    fn features(&self) -> (usize, usize);
    /// Whether `other` reads its input rows as this layer does, so that one rounded copy of
    /// them serves both.
    fn reads_rows_like(&self, other: &Self) -> bool;
    /// `[m, Σ out]`: the rows `x` `[m, in]` through every layer, each layer's outputs after the
    /// previous one's in each row.
    ///
    /// # Safety
    /// The CPU has [`Self::EXTENSION`]; the layers share `in` and read rows alike (as
    /// [`SideBySide`] checks).
    unsafe fn side_by_side(layers: &[&Self], x: &[f32], m: usize) -> Vec<f32>;
}

/// The op of `layers` on one input `[…, in]` → `[…, Σ out]`: one pass over the input rows and
/// one set of parallel tasks for all the layers (e.g. a self-attention's Q, K and V).
pub(crate) struct SideBySide<'a, L>(pub &'a [&'a L]);

impl<L: PackedLayer> CustomOp1 for SideBySide<'_, L> {
    fn name(&self) -> &'static str {
        L::NAME
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        if !has_avx512_with(L::EXTENSION) {
            candle_core::bail!("{}: this CPU has no {}", L::NAME, L::EXTENSION.name())
        }
        let Some(first) = self.0.first() else { candle_core::bail!("{}: no layers", L::NAME) };
        let in_features = first.features().0;
        if self.0.iter().any(|l| l.features().0 != in_features || !l.reads_rows_like(first)) {
            candle_core::bail!("{}: layers side by side must read the same inputs alike", L::NAME)
        }
        let out_features = self.0.iter().map(|l| l.features().1).sum();
        let (x, m, shape) = input_rows(storage, layout, (in_features, out_features), L::NAME)?;
        // SAFETY: the extension and the layers' inputs are checked above.
        Ok((CpuStorage::F32(unsafe { L::side_by_side(self.0, x, m) }), shape))
    }
}

/// `x` `[…, in]` f32 on the CPU through each of `layers` → `[…, Σ out]`, their outputs side by
/// side in `layers`' order.
pub(crate) fn forward_side_by_side<L: PackedLayer>(layers: &[&L], x: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&SideBySide(layers))
}

/// One parallel task of a packed product: some panels of one layer against some input rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Task {
    /// The layer's index.
    pub layer: usize,
    /// Its panels.
    pub panels: Range<usize>,
    /// The input rows.
    pub rows: Range<usize>,
}

/// Tasks covering every panel of each layer (`panels[l]` for layer `l`) against `m` rows, at
/// most `per_task.0` panels and `per_task.1` rows each: enough of them to keep every core busy.
pub(crate) fn tasks(panels: &[usize], m: usize, per_task: (usize, usize)) -> Vec<Task> {
    let (panels_per_task, rows_per_task) = (per_task.0.max(1), per_task.1.max(1));
    let mut tasks = Vec::new();
    for (layer, &count) in panels.iter().enumerate() {
        for first in (0..count).step_by(panels_per_task) {
            for from in (0..m).step_by(rows_per_task) {
                let (panels, rows) = (first..(first + panels_per_task).min(count), from..(from + rows_per_task).min(m));
                tasks.push(Task { layer, panels, rows });
            }
        }
    }
    tasks
}

/// Where each layer's outputs start in a row of [`PackedLayer::side_by_side`]'s result, and the
/// row's length.
pub(crate) fn output_columns(out_features: impl Iterator<Item = usize>) -> (Vec<usize>, usize) {
    let mut starts = Vec::new();
    let mut total = 0;
    for n in out_features {
        starts.push(total);
        total += n;
    }
    (starts, total)
}

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

/// Whether the packed ops on `extension` are offered: the CPU has them ([`has_avx512_with`]) and
/// `PIXART_SIMD` leaves AVX-512 on ([`crate::fast_math::Simd::detected`]: with `avx2` a newer
/// CPU runs what an AVX2-only one does).
pub(crate) fn offered(extension: Avx512Extension) -> bool {
    crate::fast_math::Simd::detected() == crate::fast_math::Simd::Avx512 && has_avx512_with(extension)
}

/// The half-precision extensions of AVX-512 the packed ops run on.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Avx512Extension {
    /// AVX512-BF16 (`vdpbf16ps`).
    Bf16,
    /// AVX512-FP16 (`vfmadd231ph`).
    Fp16,
}

impl Avx512Extension {
    /// As Intel names it.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Bf16 => "AVX512-BF16",
            Self::Fp16 => "AVX512-FP16",
        }
    }
}

/// Products per nanosecond of each instruction loop of `loops` (`(run, products)`: `run(rounds)`
/// issues `rounds` × 12 instructions of `products` products each), the best of five alternating
/// timings of each.
#[cfg(target_arch = "x86_64")]
pub(crate) fn products_per_ns<const N: usize>(rounds: u64, loops: [(&dyn Fn(u64), f64); N]) -> [f64; N] {
    let mut best = [f64::MAX; N];
    for _ in 0..5 {
        for ((run, _), best) in loops.iter().zip(&mut best) {
            let start = std::time::Instant::now();
            run(rounds);
            *best = best.min(start.elapsed().as_secs_f64().max(1e-9));
        }
    }
    let instructions = 12.0 * rounds as f64 * 1e-9;
    std::array::from_fn(|i| loops[i].1 * instructions / best[i])
}

/// `$rounds` × twelve `$op zmmN, zmm30, zmm31` (N = 0..11, cleared first: twelve independent
/// chains) in one asm block, `$operand` (`__m512`) in zmm30 and zmm31: an instruction's
/// throughput on registers, for [`products_per_ns`]. Used inside an `unsafe` function with
/// AVX-512 F and the instruction's extension enabled.
#[cfg(target_arch = "x86_64")]
macro_rules! twelve_chains {
    ($op:literal, $rounds:expr, $operand:expr) => {
        std::arch::asm!(
            "vxorps zmm0, zmm0, zmm0", "vxorps zmm1, zmm1, zmm1", "vxorps zmm2, zmm2, zmm2",
            "vxorps zmm3, zmm3, zmm3", "vxorps zmm4, zmm4, zmm4", "vxorps zmm5, zmm5, zmm5",
            "vxorps zmm6, zmm6, zmm6", "vxorps zmm7, zmm7, zmm7", "vxorps zmm8, zmm8, zmm8",
            "vxorps zmm9, zmm9, zmm9", "vxorps zmm10, zmm10, zmm10", "vxorps zmm11, zmm11, zmm11",
            "2:",
            concat!($op, " zmm0, zmm30, zmm31"), concat!($op, " zmm1, zmm30, zmm31"),
            concat!($op, " zmm2, zmm30, zmm31"), concat!($op, " zmm3, zmm30, zmm31"),
            concat!($op, " zmm4, zmm30, zmm31"), concat!($op, " zmm5, zmm30, zmm31"),
            concat!($op, " zmm6, zmm30, zmm31"), concat!($op, " zmm7, zmm30, zmm31"),
            concat!($op, " zmm8, zmm30, zmm31"), concat!($op, " zmm9, zmm30, zmm31"),
            concat!($op, " zmm10, zmm30, zmm31"), concat!($op, " zmm11, zmm30, zmm31"),
            "dec {left}",
            "jnz 2b",
            left = inout(reg) $rounds.max(1) => _,
            in("zmm30") $operand, in("zmm31") $operand,
            out("zmm0") _, out("zmm1") _, out("zmm2") _, out("zmm3") _, out("zmm4") _,
            out("zmm5") _, out("zmm6") _, out("zmm7") _, out("zmm8") _, out("zmm9") _,
            out("zmm10") _, out("zmm11") _,
            options(nomem, nostack),
        )
    };
}
#[cfg(target_arch = "x86_64")]
pub(crate) use twelve_chains;

#[cfg(test)]
mod tests {
    use super::*;

    /// Every panel of every layer against every row, once.
    #[test]
    fn tasks_cover_each_layers_panels_and_rows_once() {
        let (panels, m) = ([3, 0, 5], 300);
        let tasks = tasks(&panels, m, (2, 128));
        let mut seen = vec![vec![vec![0u8; m]; 5]; 3];
        for t in &tasks {
            assert!(t.panels.len() <= 2 && t.rows.len() <= 128 && !t.panels.is_empty() && !t.rows.is_empty());
            for p in t.panels.clone() {
                for r in t.rows.clone() {
                    seen[t.layer][p][r] += 1;
                }
            }
        }
        for (layer, &count) in panels.iter().enumerate() {
            assert!(seen[layer].iter().take(count).all(|rows| rows.iter().all(|&n| n == 1)), "layer {layer}");
            assert!(seen[layer].iter().skip(count).all(|rows| rows.iter().all(|&n| n == 0)), "layer {layer}");
        }
        assert!(super::tasks(&[4], 0, (2, 128)).is_empty());
        assert_eq!(output_columns([3, 0, 5].into_iter()), (vec![0, 3, 3], 8));
    }
}
