//! Output buffers for the CPU ops, initialised by the cores that then write them: a
//! `vec![0f32; n]` of megabytes is a memset (and page faults) on the calling thread alone, while
//! the other cores wait — a few percent of a transformer step.

use std::mem::MaybeUninit;

use rayon::prelude::*;

/// Elements each task of [`par_zeroed`] clears.
const ZERO_CHUNK: usize = 1 << 16;

/// `len` zeros, cleared in parallel.
pub(crate) fn par_zeroed(len: usize) -> Vec<f32> {
    par_filled(len, ZERO_CHUNK, |_, _| {})
}

/// `len` f32s computed in parallel chunks of `chunk` elements (the last one shorter):
/// `fill(i, dst)` writes chunk `i`, which is zeroed just before (in cache) so that `fill` sees
/// initialised memory.
pub(crate) fn par_filled(len: usize, chunk: usize, fill: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    let mut out: Vec<f32> = Vec::with_capacity(len);
    out.spare_capacity_mut()[..len].par_chunks_mut(chunk.max(1)).enumerate().for_each(|(i, dst)| {
        dst.iter_mut().for_each(|x| {
            x.write(0.0);
        });
        // SAFETY: every element of `dst` was just initialised, and `MaybeUninit<f32>` has the
        // layout of `f32`.
        let dst = unsafe { &mut *(dst as *mut [MaybeUninit<f32>] as *mut [f32]) };
        fill(i, dst);
    });
    // SAFETY: the chunks above cover the first `len` elements and initialised every one.
    unsafe { out.set_len(len) };
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_chunk_is_filled_and_the_rest_is_zero() {
        let v = par_filled(1000, 64, |i, dst| {
            if i % 2 == 0 {
                dst.iter_mut().for_each(|x| *x = i as f32);
            }
        });
        assert_eq!(v.len(), 1000);
        for (n, &x) in v.iter().enumerate() {
            let i = n / 64;
            assert_eq!(x, if i % 2 == 0 { i as f32 } else { 0.0 }, "element {n}");
        }
        assert_eq!(par_zeroed(200_001), vec![0f32; 200_001]);
        assert!(par_zeroed(0).is_empty());
    }
}
