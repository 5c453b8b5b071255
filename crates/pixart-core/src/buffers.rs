//! Output buffers for the CPU ops, left unwritten until the op's own kernels write them, on the
//! cores that compute them: clearing first (`vec![0f32; n]`, a memset of megabytes) is a pass
//! over the output that the kernel then overwrites. (Measured on an AMD EPYC: the memset was 5%
//! of a transformer step's profile, but most of that cost moved to the kernels' own first
//! writes; the VAE decode got ~2% faster.)

use std::mem::{ManuallyDrop, MaybeUninit};

use rayon::prelude::*;

/// `len` unwritten values (f32s, or an op's packed operands), for an op that writes every one
/// of them before [`assume_written`] turns them into its output.
pub(crate) fn unwritten<T: Copy>(len: usize) -> Vec<MaybeUninit<T>> {
    let mut out = Vec::with_capacity(len);
    // SAFETY: `MaybeUninit` needs no initialisation, and the capacity is `len`.
    unsafe { out.set_len(len) };
    out
}

/// The values of `buffer`, once written.
///
/// # Safety
/// Every element of `buffer` was written.
pub(crate) unsafe fn assume_written<T: Copy>(buffer: Vec<MaybeUninit<T>>) -> Vec<T> {
    let mut buffer = ManuallyDrop::new(buffer);
    let (ptr, len, capacity) = (buffer.as_mut_ptr(), buffer.len(), buffer.capacity());
    // SAFETY: same allocation, element layout (`MaybeUninit<T>` is `T`'s), length and
    // capacity; the caller guarantees every element is initialised.
    unsafe { Vec::from_raw_parts(ptr.cast::<T>(), len, capacity) }
}

/// `len` f32s written in parallel chunks of `chunk` elements (the last one shorter):
/// `fill(i, dst)` writes chunk `i`.
///
/// # Safety
/// `fill` writes every element of each chunk it is given.
pub(crate) unsafe fn par_written(
    len: usize,
    chunk: usize,
    fill: impl Fn(usize, &mut [MaybeUninit<f32>]) + Sync,
) -> Vec<f32> {
    let mut out = unwritten(len);
    out.par_chunks_mut(chunk.max(1)).enumerate().for_each(|(i, dst)| fill(i, dst));
    // SAFETY: the chunks cover the buffer, and the caller guarantees `fill` wrote each one.
    unsafe { assume_written(out) }
}

/// Test buffers that show an element a kernel failed to write: every element starts as NaN.
#[cfg(test)]
pub(crate) mod canary {
    use std::mem::MaybeUninit;

    /// `len` NaNs, to be written through `&mut [MaybeUninit<f32>]`.
    pub(crate) fn nans(len: usize) -> Vec<MaybeUninit<f32>> {
        vec![MaybeUninit::new(f32::NAN); len]
    }

    /// The values of a buffer from [`nans`].
    pub(crate) fn values(buffer: &[MaybeUninit<f32>]) -> Vec<f32> {
        // SAFETY: [`nans`] initialised every element and a `MaybeUninit::write` stores an
        // initialised f32.
        buffer.iter().map(|v| unsafe { v.assume_init() }).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_chunk_is_written_in_place() {
        // SAFETY: the closure writes every element of its chunk.
        let v = unsafe {
            par_written(1000, 64, |i, dst| {
                dst.iter_mut().enumerate().for_each(|(j, x)| {
                    x.write((i * 64 + j) as f32);
                })
            })
        };
        assert_eq!(v, (0..1000).map(|n| n as f32).collect::<Vec<_>>());
        // SAFETY: nothing to write.
        assert!(unsafe { par_written(0, 64, |_, _| {}) }.is_empty());
    }
}
