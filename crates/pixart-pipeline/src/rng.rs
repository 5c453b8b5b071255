//! A reimplementation of PyTorch's CPU random generator, so that a seed gives the same noise as
//! `torch.Generator("cpu").manual_seed(seed)` in diffusers: the initial latents and SA-Solver's
//! per-step noise.
//!
//! * Engine: 32-bit MT19937 seeded like `at::mt19937` (the low 32 bits of the seed).
//! * `torch.randn` of ≥ 16 f32 values (`normal_fill`): first every element gets a uniform
//!   `(u32 & 0xFFFFFF)·2⁻²⁴`; then each block of 16 becomes 8 Box–Muller pairs
//!   (`u1 = 1 − x[j]`, `u2 = x[j+8]`, `x[j] = √(−2 ln u1)·cos 2πu2`, `x[j+8] = …·sin 2πu2`); when
//!   the size is not a multiple of 16, the last 16 values are drawn again and transformed.
//! * Fewer than 16 values: the scalar path, one double-precision normal per element from two
//!   53-bit uniforms (`u1` for the angle, `u2` for the radius), the second value of each pair
//!   cached for the next call, as `at::normal_distribution<double>` does.
//!
//! The uniforms, and so the order of draws, are bit-exact. PyTorch evaluates the Box–Muller
//! transform with vectorised `log`/`sincos` approximations on AVX2 machines; we evaluate it in
//! f64 and round, which agrees to about 1e-7 (see the tests against torch-generated tensors).

use candle_core::{DType, Device, Shape, Tensor};

const N: usize = 624;
const M: usize = 397;

/// PyTorch's CPU generator state: MT19937 plus the cached second normal of the scalar path.
#[derive(Clone)]
pub struct TorchGenerator {
    state: [u32; N],
    index: usize,
    next_double_normal: Option<f64>,
    seed: u64,
}

impl std::fmt::Debug for TorchGenerator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TorchGenerator").field("seed", &self.seed).finish_non_exhaustive()
    }
}

impl TorchGenerator {
    /// `torch.Generator("cpu").manual_seed(seed)`.
    pub fn new(seed: u64) -> Self {
        let mut state = [0u32; N];
        state[0] = seed as u32;
        for j in 1..N {
            state[j] = 1_812_433_253u32.wrapping_mul(state[j - 1] ^ (state[j - 1] >> 30)).wrapping_add(j as u32);
        }
        Self { state, index: N, next_double_normal: None, seed }
    }

    /// The seed this generator was created with.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    fn twist(&mut self) {
        for i in 0..N {
            let y = (self.state[i] & 0x8000_0000) | (self.state[(i + 1) % N] & 0x7fff_ffff);
            let mut next = self.state[(i + M) % N] ^ (y >> 1);
            if y & 1 != 0 {
                next ^= 0x9908_b0df;
            }
            self.state[i] = next;
        }
        self.index = 0;
    }

    /// The next 32 random bits.
    pub fn next_u32(&mut self) -> u32 {
        if self.index >= N {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// 64 random bits, the first draw in the high half (`random64`).
    pub fn next_u64(&mut self) -> u64 {
        let hi = u64::from(self.next_u32());
        let lo = u64::from(self.next_u32());
        (hi << 32) | lo
    }

    /// A float uniform in [0, 1) with 24 random bits.
    fn uniform_f32(&mut self) -> f32 {
        (self.next_u32() & 0x00ff_ffff) as f32 * (1.0 / 16_777_216.0)
    }

    /// A double uniform in [0, 1) with 53 random bits.
    fn uniform_f64(&mut self) -> f64 {
        (self.next_u64() & ((1u64 << 53) - 1)) as f64 * (1.0 / 9_007_199_254_740_992.0)
    }

    /// One standard normal from the scalar path (`at::normal_distribution<double>`).
    fn normal_f64(&mut self) -> f64 {
        if let Some(cached) = self.next_double_normal.take() {
            return cached;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let radius = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.next_double_normal = Some(radius * theta.sin());
        radius * theta.cos()
    }

    /// `torch.randn(n)` as a flat vector of f32.
    pub fn randn_vec(&mut self, n: usize) -> Vec<f32> {
        if n < 16 {
            return (0..n).map(|_| self.normal_f64() as f32).collect();
        }
        let mut data: Vec<f32> = (0..n).map(|_| self.uniform_f32()).collect();
        for block in data.chunks_exact_mut(16) {
            box_muller_16(block);
        }
        if !n.is_multiple_of(16) {
            let tail = &mut data[n - 16..];
            for value in tail.iter_mut() {
                *value = self.uniform_f32();
            }
            box_muller_16(tail);
        }
        data
    }

    /// `torch.randn(shape, generator=self)` as a tensor of `dtype` on `device` (drawn on the CPU
    /// in f32, then moved, as diffusers' `randn_tensor` does with a CPU generator).
    pub fn randn(&mut self, shape: impl Into<Shape>, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        let shape = shape.into();
        let values = self.randn_vec(shape.elem_count());
        Tensor::from_vec(values, shape, &Device::Cpu)?.to_dtype(dtype)?.to_device(device)
    }
}

/// Box–Muller on 16 uniforms in place: pairs (j, j+8).
fn box_muller_16(block: &mut [f32]) {
    for j in 0..8 {
        let u1 = 1.0 - f64::from(block[j]);
        let u2 = f64::from(block[j + 8]);
        let radius = (-2.0 * u1.ln()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u2;
        block[j] = (radius * theta.cos()) as f32;
        block[j + 8] = (radius * theta.sin()) as f32;
    }
}

impl pixart_scheduler::NoiseSource for TorchGenerator {
    fn sample(&mut self, shape: &Shape, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        self.randn(shape.clone(), dtype, device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mt19937_reference_sequence() {
        // The first outputs of std::mt19937 seeded with 5489 (its default seed).
        let mut g = TorchGenerator::new(5489);
        assert_eq!([g.next_u32(), g.next_u32(), g.next_u32()], [3_499_211_612, 581_869_302, 3_890_346_734]);
    }
}
