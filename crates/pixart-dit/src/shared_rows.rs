//! Batch rows that enter the transformer identical. Classifier-free guidance runs the same
//! latents at the same timestep under two captions (perturbed-attention guidance under three):
//! until the first cross-attention the rows are the same numbers, so the first block's
//! self-attention (a third of that block's work) is computed once per distinct row and copied.
//! The result is what every row computed alone gives: each row's self-attention depends on that
//! row only.

use candle_core::{DType, Tensor};

/// Which batch rows are copies of which: the distinct rows, and for each row the distinct row
/// it equals.
#[derive(Debug, Clone)]
pub struct SharedRows {
    /// The first row of each group of equal rows, `u32` `[distinct]`.
    distinct: Tensor,
    /// For each batch row, its group's position in `distinct`, `u32` `[B]`.
    copies: Tensor,
}

impl SharedRows {
    /// The groups of equal rows of `latents` `[B, …]` whose timestep rows `t6` (`[1 or B, …]`)
    /// are equal too; `None` when every row differs (nothing to share). Reads one comparison
    /// per row pair to the host.
    pub fn of(latents: &Tensor, t6: &Tensor) -> candle_core::Result<Option<Self>> {
        let b = latents.dim(0)?;
        if b < 2 {
            return Ok(None);
        }
        let latents = latents.flatten_from(1)?;
        let t6 = if t6.dim(0)? == b { Some(t6.flatten_from(1)?) } else { None };
        let equal = |i: usize, j: usize| -> candle_core::Result<bool> {
            let same = |t: &Tensor| -> candle_core::Result<bool> {
                Ok(t.get(i)?.eq(&t.get(j)?)?.to_dtype(DType::F32)?.min(0)?.to_scalar::<f32>()? == 1.0)
            };
            Ok(same(&latents)? && t6.as_ref().map_or(Ok(true), same)?)
        };
        let (mut distinct, mut copies) = (Vec::<usize>::new(), Vec::with_capacity(b));
        for row in 0..b {
            let mut group = None;
            for (g, &first) in distinct.iter().enumerate() {
                if equal(first, row)? {
                    group = Some(g);
                    break;
                }
            }
            copies.push(group.unwrap_or_else(|| {
                distinct.push(row);
                distinct.len() - 1
            }) as u32);
        }
        if distinct.len() == b {
            return Ok(None);
        }
        let (device, count) = (latents.device(), distinct.len());
        let distinct: Vec<u32> = distinct.into_iter().map(|r| r as u32).collect();
        Ok(Some(Self {
            distinct: Tensor::from_vec(distinct, count, device)?,
            copies: Tensor::from_vec(copies, b, device)?,
        }))
    }

    /// The distinct rows of `x` `[B, …]`.
    pub fn distinct(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.index_select(&self.distinct, 0)
    }

    /// `[distinct, …]` results spread back to `[B, …]`, each row its group's.
    pub fn spread(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.index_select(&self.copies, 0)
    }
}
