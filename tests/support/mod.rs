//! Helpers shared by the workspace integration tests: where the fixtures are, how to read
//! diffusers' goldens, and how to compare tensors.
//!
//! The fixtures (tiny random-weight PixArt-Σ models in the diffusers layout) and the goldens
//! (tensors recorded from diffusers/transformers) are written by `tests/reference/make_fixtures.py`.

pub mod fuzzing;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

/// The names of the committed fixture models.
pub const FIXTURE_MODELS: [&str; 2] = ["tiny-sigma-256", "tiny-sigma-512"];

/// `tests/fixtures/`.
pub fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests").join("fixtures")
}

/// The diffusers-layout folder of a fixture model.
pub fn model_dir(name: &str) -> PathBuf {
    fixtures_dir().join(name)
}

/// A private copy of a fixture model in a fresh temporary folder (for tests that break files).
pub fn fixture_copy(name: &str, tag: &str) -> PathBuf {
    fn copy_dir(from: &std::path::Path, to: &std::path::Path) -> std::io::Result<()> {
        std::fs::create_dir_all(to)?;
        for entry in std::fs::read_dir(from)? {
            let path = entry?.path();
            let target = to.join(path.file_name().unwrap_or_default());
            if path.is_dir() {
                copy_dir(&path, &target)?;
            } else {
                std::fs::copy(&path, &target)?;
            }
        }
        Ok(())
    }
    let dir = std::env::temp_dir().join(format!("pixart-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    copy_dir(&model_dir(name), &dir).unwrap_or_else(|e| panic!("cannot copy {name} to {}: {e}", dir.display()));
    dir
}

/// `tests/fixtures/goldens/`.
pub fn goldens_dir() -> PathBuf {
    fixtures_dir().join("goldens")
}

/// Reads a safetensors golden file (relative to the goldens folder) onto the CPU.
pub fn load_goldens(relative: &str) -> HashMap<String, Tensor> {
    let path = goldens_dir().join(relative);
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("cannot read golden file {}: {e}", path.display()))
}

/// Reads a JSON golden file (relative to the goldens folder).
pub fn load_json(relative: &str) -> serde_json::Value {
    let path = goldens_dir().join(relative);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("malformed {}: {e}", path.display()))
}

/// A named tensor of a golden map, with a clear panic when it is missing.
pub fn golden<'a>(map: &'a HashMap<String, Tensor>, name: &str) -> &'a Tensor {
    map.get(name).unwrap_or_else(|| panic!("golden tensor {name} is missing"))
}

/// The largest absolute difference between two tensors of the same shape (compared in f32).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// The largest absolute value of a tensor.
pub fn max_abs(a: &Tensor) -> f32 {
    a.to_dtype(DType::F32).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// True when every element is finite.
pub fn all_finite(a: &Tensor) -> bool {
    a.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|v| v.is_finite())
}

/// The largest per-byte difference of two 8-bit buffers of the same length.
pub fn max_byte_diff(a: &[u8], b: &[u8]) -> u8 {
    assert_eq!(a.len(), b.len(), "the buffers differ in length");
    a.iter().zip(b).map(|(x, y)| x.abs_diff(*y)).max().unwrap_or(0)
}

/// The largest per-channel difference between 8-bit RGB pixels and a PNG of the same size.
pub fn max_pixel_diff(ours: &[u8], png: &Path) -> u8 {
    let want = image::open(png).unwrap_or_else(|e| panic!("{}: {e}", png.display())).to_rgb8();
    assert_eq!(ours.len(), want.as_raw().len(), "{}: size differs", png.display());
    max_byte_diff(ours, want.as_raw())
}

/// Asserts `max |a - b| <= tol`, printing the measured difference either way.
pub fn assert_close(what: &str, actual: &Tensor, expected: &Tensor, tol: f32) {
    let diff = max_abs_diff(actual, expected);
    eprintln!("{what}: max abs diff {diff:.3e} (tolerance {tol:.1e})");
    assert!(diff <= tol, "{what}: max abs diff {diff:e} exceeds {tol:e}");
}

/// A golden integer tensor (stored as i64 or u8) as `u32` rows.
pub fn to_u32_rows(t: &Tensor) -> Vec<Vec<u32>> {
    t.to_dtype(DType::I64)
        .unwrap()
        .to_vec2::<i64>()
        .unwrap()
        .into_iter()
        .map(|row| row.into_iter().map(|v| u32::try_from(v).unwrap()).collect())
        .collect()
}
