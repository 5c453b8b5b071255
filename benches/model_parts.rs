//! Baselines for speed work: one transformer step (CFG batch of 2) and one VAE decode, on small
//! random-weight configs that keep the real architectures' shapes and code paths.
//!
//! `cargo bench --bench model_parts` (release). Full-size figures come from `pixart bench`.

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use pixart_dit::{DitConfig, PixArtTransformer};
use pixart_vae::{VaeConfig, VaeDecoder};

fn main() {
    divan::main();
}

fn small_dit() -> PixArtTransformer {
    // XL-2's head width and structure, 6 heads, 4 layers; 32×32 latents = 256 tokens.
    let config: DitConfig = serde_json::from_value(serde_json::json!({
        "num_attention_heads": 6, "attention_head_dim": 72, "in_channels": 4, "out_channels": 8,
        "num_layers": 4, "sample_size": 32, "patch_size": 2, "caption_channels": 512,
        "interpolation_scale": 0.5, "use_additional_conditions": false
    }))
    .unwrap();
    let vars = VarMap::new();
    PixArtTransformer::new(&config, VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu)).unwrap()
}

fn small_vae() -> VaeDecoder {
    let config: VaeConfig = serde_json::from_value(serde_json::json!({
        "block_out_channels": [32, 64, 64, 64], "layers_per_block": 2, "norm_num_groups": 32
    }))
    .unwrap();
    let vars = VarMap::new();
    VaeDecoder::new(&config, VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu)).unwrap()
}

#[divan::bench(sample_count = 10)]
fn transformer_step_cfg_batch(bencher: divan::Bencher) {
    let dit = small_dit();
    let latents = Tensor::randn(0f32, 1.0, (2, 4, 32, 32), &Device::Cpu).unwrap();
    let caption = Tensor::randn(0f32, 1.0, (2, 120, 512), &Device::Cpu).unwrap();
    let mut mask = vec![1u32; 2 * 120];
    mask[120 + 20..].fill(0);
    let mask = Tensor::from_vec(mask, (2, 120), &Device::Cpu).unwrap();
    bencher.bench_local(|| dit.forward(&latents, &[500.0, 500.0], &caption, Some(&mask)).unwrap());
}

#[divan::bench(sample_count = 10)]
fn vae_decode_256px(bencher: divan::Bencher) {
    let vae = small_vae();
    let latents = Tensor::randn(0f32, 1.0, (1, 4, 32, 32), &Device::Cpu).unwrap();
    bencher.bench_local(|| vae.decode_latents(&latents).unwrap());
}

/// The machine's practical f32 matmul peak through candle (gemm crate): 2048³ takes 17.2 GFLOP,
/// so GFLOP/s = 17.2 / seconds. The reference for how close a stage is to what the CPU can do.
#[divan::bench(sample_count = 5)]
fn matmul_2048_f32(bencher: divan::Bencher) {
    let a = Tensor::randn(0f32, 1.0, (2048, 2048), &Device::Cpu).unwrap();
    let b = Tensor::randn(0f32, 1.0, (2048, 2048), &Device::Cpu).unwrap();
    bencher.bench_local(|| a.matmul(&b).unwrap());
}

/// The transformer's feed-forward up-projection at XL-2 width on 1024 tokens × CFG batch 2
/// (`[2048, 1152] · [1152, 4608]ᵀ`, 21.7 GFLOP): f32 (`f32`), and bf16 products by
/// `vdpbf16ps` (`dot`) or by f32 FMAs on the widened operands (`fma`), where the CPU has
/// AVX512-BF16, and f16 products by `vfmadd231ph` (`f16`), where it has AVX512-FP16.
/// GFLOP/s = 21.7 / seconds.
#[divan::bench(sample_count = 10, args = ["f32", "dot", "fma", "f16"])]
fn linear_ff_up(bencher: divan::Bencher, products: &str) {
    use pixart_core::linear_bf16::{Bf16Kernel, LinearBf16};
    use pixart_core::linear_f16::LinearF16;
    use pixart_core::linear_f32::{column_major, LinearF32Cpu};
    let x = Tensor::randn(0f32, 1.0, (2048, 1152), &Device::Cpu).unwrap();
    let w = Tensor::randn(0f32, 0.03, (4608, 1152), &Device::Cpu).unwrap();
    let b = Tensor::randn(0f32, 1.0, 4608, &Device::Cpu).unwrap();
    let kernel = match products {
        "dot" => Bf16Kernel::DotProduct,
        "fma" => Bf16Kernel::WidenedFma,
        "f16" if LinearF16::available() => {
            let linear = LinearF16::new(&w, Some(&b)).unwrap();
            return bencher.bench_local(|| linear.forward(&x).unwrap());
        }
        "f16" => return,
        _ => {
            let (linear, w) = (LinearF32Cpu::new(Some(&b)).unwrap(), column_major(&w).unwrap());
            return bencher.bench_local(|| linear.forward(&x, &w).unwrap());
        }
    };
    if !LinearBf16::available() {
        return;
    }
    let linear = LinearBf16::with_kernel(&w, Some(&b), kernel).unwrap();
    bencher.bench_local(|| linear.forward(&x).unwrap());
}

/// Self-attention at `benches/cpu_vs_diffusers.py`'s transformer shape: `[2, 6, 1024, 64]`
/// (CFG batch 2, 6 heads, 32² latent patches), 3.22 GFLOP (two 2·6·1024²·64 products):
/// GFLOP/s = 3.22 / seconds. Q, K and V as the model reads them, heads split in place: from
/// three `[2, 1024, 384]` projections (`separate`) or from one `[2, 1024, 1152]` stacked
/// product (`stacked`, each token's Q, K and V side by side); `contiguous`, each its own
/// `[2, 6, 1024, 64]` tensor.
#[divan::bench(sample_count = 20, args = ["separate", "stacked", "contiguous"])]
fn attention_self_1024(bencher: divan::Bencher, layout: &str) {
    let heads = |t: Tensor| t.reshape((2, 1024, 6, 64)).unwrap().transpose(1, 2).unwrap();
    let qkv: Vec<Tensor> = match layout {
        "separate" => (0..3).map(|_| heads(Tensor::randn(0f32, 1.0, (2, 1024, 384), &Device::Cpu).unwrap())).collect(),
        "stacked" => {
            let all = Tensor::randn(0f32, 1.0, (2, 1024, 3, 6, 64), &Device::Cpu).unwrap();
            (0..3).map(|i| all.narrow(2, i, 1).unwrap().squeeze(2).unwrap().transpose(1, 2).unwrap()).collect()
        }
        _ => (0..3).map(|_| Tensor::randn(0f32, 1.0, (2, 6, 1024, 64), &Device::Cpu).unwrap()).collect(),
    };
    bencher.bench_local(|| {
        pixart_core::attention::scaled_dot_product_attention(&qkv[0], &qkv[1], &qkv[2], None, 0.125).unwrap()
    });
}

/// The f32 linear layers of `benches/cpu_vs_diffusers.py`'s transformer (384 wide) on its 2048
/// rows (1024 tokens × CFG batch 2): `k×n` as 384×384 (Q, K, V, out, cross Q and out), 384×1152
/// (what one fused Q/K/V product would be), 384×1536 (FF up) and 1536×384 (FF down).
/// GFLOP = 2·2048·k·n / 1e9 (1.21 for 384×384, 3.62 for 384×1152, 4.83 for the others). The
/// model's op (`pixart_core::linear_f32`: output rows first set to the bias, the product
/// accumulated onto them) with the weight as loaded from a file, row-major (`bias`), or stored
/// column-major as the model keeps it on the CPU (`bias-column-major`: the `gemm` crate then
/// does not repack it on the calling thread at each call); `plain`, the row-major case without a
/// bias (what folding the bias into the next op would leave). Measures what the bias rows and
/// the weight's layout cost on this CPU. `xl`: PixArt-Σ XL's width (1152) on its 8192 rows at
/// 1024² (4096 tokens × 2), column-major with the bias: `1152x3456` is its one Q/K/V product,
/// `1152x1152` each of three (21.7 and 65.2 GFLOP).
#[divan::bench(sample_count = 30, args = [
    "384x384/bias", "384x384/plain", "384x384/bias-column-major", "384x1152/bias", "384x1152/bias-column-major",
    "384x1536/bias", "384x1536/bias-column-major", "1536x384/bias", "1536x384/bias-column-major",
    "1152x1152/xl", "1152x3456/xl", "384x384/f16", "384x1152/f16", "384x1536/f16", "1536x384/f16",
])]
fn linear_f32_384_wide(bencher: divan::Bencher, case: &str) {
    use pixart_core::linear_f32::{column_major, LinearF32Cpu};
    let (shape, how) = case.split_once('/').unwrap();
    let (k, n): (usize, usize) = shape.split_once('x').map(|(k, n)| (k.parse().unwrap(), n.parse().unwrap())).unwrap();
    let tokens = if how == "xl" { 4096 } else { 1024 };
    let x = Tensor::randn(0f32, 1.0, (2, tokens, k), &Device::Cpu).unwrap();
    let mut w = Tensor::randn(0f32, 0.05, (n, k), &Device::Cpu).unwrap();
    if how.ends_with("column-major") || how == "xl" {
        w = column_major(&w).unwrap();
    }
    let b = Tensor::randn(0f32, 1.0, n, &Device::Cpu).unwrap();
    if how == "f16" {
        if !pixart_core::linear_f16::LinearF16::available() {
            return;
        }
        let linear = pixart_core::linear_f16::LinearF16::new(&w, Some(&b)).unwrap();
        return bencher.bench_local(|| linear.forward(&x).unwrap());
    }
    let linear = LinearF32Cpu::new((how != "plain").then_some(&b)).unwrap();
    bencher.bench_local(|| linear.forward(&x, &w).unwrap());
}
