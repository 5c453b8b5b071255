//! Where the encoder's tensors come from: a transformers safetensors folder or a GGUF file, and
//! how each tensor is stored once loaded (plain in the compute dtype, or quantized).
//!
//! Tensors are asked for by their transformers name (`encoder.block.0.layer.0.SelfAttention.q.weight`).
//! A GGUF file may use those names or llama.cpp's (`enc.blk.0.attn_q.weight`), as the T5
//! encoder GGUF files for stable-diffusion.cpp and ComfyUI do; see [`llama_cpp_name`].

use std::cell::RefCell;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::{gguf_file, GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};
use candle_nn::{Embedding, Linear, VarBuilder};

use crate::error::{GgufError, T5Error};
use crate::quantized::{ggml_name, storage_for, QuantType, T5Embedding, T5Linear, WeightSummary};

/// llama.cpp's name for a transformers T5 encoder tensor name (`None` for names it has no
/// counterpart for). Mapping as in gguf-py's `tensor_mapping.py` for `T5ENCODER`:
/// `wi_0` → `ffn_gate`, `wi_1` and `wi` → `ffn_up`, `wo` → `ffn_down`.
pub fn llama_cpp_name(name: &str) -> Option<String> {
    match name {
        "shared.weight" | "encoder.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "encoder.final_layer_norm.weight" => return Some("enc.output_norm.weight".into()),
        _ => {}
    }
    let rest = name.strip_prefix("encoder.block.")?;
    let (block, rest) = rest.split_once('.')?;
    block.parse::<usize>().ok()?;
    let part = match rest {
        "layer.0.layer_norm.weight" => "attn_norm",
        "layer.0.SelfAttention.q.weight" => "attn_q",
        "layer.0.SelfAttention.k.weight" => "attn_k",
        "layer.0.SelfAttention.v.weight" => "attn_v",
        "layer.0.SelfAttention.o.weight" => "attn_o",
        "layer.0.SelfAttention.relative_attention_bias.weight" => "attn_rel_b",
        "layer.1.layer_norm.weight" => "ffn_norm",
        "layer.1.DenseReluDense.wi_0.weight" => "ffn_gate",
        "layer.1.DenseReluDense.wi_1.weight" | "layer.1.DenseReluDense.wi.weight" => "ffn_up",
        "layer.1.DenseReluDense.wo.weight" => "ffn_down",
        _ => return None,
    };
    Some(format!("enc.blk.{block}.{part}.weight"))
}

/// Quantizes a CPU matrix `[rows, width]` (any float dtype) onto `device`, the rows split
/// across the machine's cores (candle's quantizer is single-threaded; block formats are per
/// row, so the pieces concatenate to exactly the whole). Each thread quantizes chunks of about
/// 4 MB of f32 straight into its part of one output buffer, so little memory is left behind in
/// per-thread allocator arenas.
fn quantize_rows(t: &Tensor, ggml: GgmlDType, device: &Device) -> candle_core::Result<QTensor> {
    let t = t.to_dtype(DType::F32)?.contiguous()?;
    let (rows, width) = t.dims2()?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(rows);
    if threads <= 1 || rows * width < 1 << 20 || width % ggml.block_size() != 0 {
        return QTensor::quantize_onto(&t, ggml, device);
    }
    let row_bytes = width / ggml.block_size() * ggml.type_size();
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return QTensor::quantize_onto(&t, ggml, device);
    };
    let values = pixart_core::fast_math::contiguous_f32(cpu, layout, "quantize")?;
    let mut bytes = vec![0u8; rows * row_bytes];
    let per_thread = rows.div_ceil(threads);
    let chunk_rows = ((1 << 20) / width).max(1);
    let results: Vec<candle_core::Result<()>> = std::thread::scope(|scope| {
        let handles: Vec<_> = bytes
            .chunks_mut(per_thread * row_bytes)
            .zip(values.chunks(per_thread * width))
            .map(|(out, input)| {
                scope.spawn(move || -> candle_core::Result<()> {
                    for (out, input) in out.chunks_mut(chunk_rows * row_bytes).zip(input.chunks(chunk_rows * width)) {
                        let part = Tensor::from_slice(input, (input.len() / width, width), &Device::Cpu)?;
                        out.copy_from_slice(&QTensor::quantize(&part, ggml)?.data()?);
                    }
                    Ok(())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(candle_core::Error::Msg("a quantizing thread failed".into()))))
            .collect()
    });
    results.into_iter().collect::<candle_core::Result<()>>()?;
    drop(storage);
    let storage = QStorage::from_data(std::borrow::Cow::Owned(bytes), device, ggml)?;
    QTensor::new(storage, (rows, width))
}

/// An opened GGUF file: its header, read once, and the file for the tensor data.
struct GgufFile {
    path: PathBuf,
    content: gguf_file::Content,
    reader: RefCell<BufReader<File>>,
}

impl GgufFile {
    fn open(path: &Path) -> Result<Self, T5Error> {
        let file = File::open(path).map_err(|source| pixart_core::WeightsError::Io { path: path.into(), source })?;
        let mut reader = BufReader::new(file);
        // candle's reader divides by the header's `general.alignment`: refuse 0 before it does.
        if zero_alignment(&mut reader).unwrap_or(false) {
            return Err(gguf_error(path, GgufError::Alignment));
        }
        reader.rewind().map_err(|source| pixart_core::WeightsError::Io { path: path.into(), source })?;
        let content = read_header(&mut reader).map_err(|source| gguf_error(path, source))?;
        Ok(Self { path: path.into(), content, reader: RefCell::new(reader) })
    }

    /// The stored name of `name`: as given, else llama.cpp's.
    fn resolve(&self, name: &str) -> Option<String> {
        if self.content.tensor_infos.contains_key(name) {
            return Some(name.to_string());
        }
        llama_cpp_name(name).filter(|n| self.content.tensor_infos.contains_key(n))
    }

    /// Reads `name` (checking it has `shape`) onto `device`.
    fn read(&self, name: &str, shape: &[usize], device: &Device) -> Result<QTensor, T5Error> {
        let err = |source| gguf_error(&self.path, source);
        let stored = self
            .resolve(name)
            .ok_or_else(|| err(GgufError::MissingTensor { name: name.into(), llama_cpp_name: llama_cpp_name(name) }))?;
        let info = &self.content.tensor_infos[&stored];
        if info.shape.dims() != shape {
            return Err(err(GgufError::Shape {
                name: stored,
                expected: shape.to_vec(),
                found: info.shape.dims().to_vec(),
            }));
        }
        if matches!(info.ggml_dtype, GgmlDType::Q8_1 | GgmlDType::Q8K) {
            return Err(err(GgufError::UnsupportedType { name: stored, ggml_type: ggml_name(info.ggml_dtype) }));
        }
        let block = info.ggml_dtype.block_size();
        if let Some(&width) = shape.last().filter(|&&w| w % block != 0) {
            let ggml_type = ggml_name(info.ggml_dtype);
            return Err(err(GgufError::Blocks { name: stored, width, ggml_type, block }));
        }
        let mut reader = self.reader.borrow_mut();
        self.content
            .tensor(&mut *reader, &stored, device)
            .map_err(|source| err(GgufError::Read { tensor: Some(stored), source }))
    }
}

/// The GGUF header, with the checks candle's reader leaves to its caller.
fn read_header(reader: &mut BufReader<File>) -> Result<gguf_file::Content, GgufError> {
    let content = gguf_file::Content::read(reader).map_err(|source| GgufError::Read { tensor: None, source })?;
    for (name, info) in &content.tensor_infos {
        // Element counts that overflow usize would wrap in candle's size arithmetic.
        let fits = info.shape.dims().iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)).is_some();
        if !fits {
            return Err(GgufError::Shape { name: name.clone(), expected: vec![], found: info.shape.dims().to_vec() });
        }
    }
    Ok(content)
}

fn gguf_error(path: &Path, source: GgufError) -> T5Error {
    T5Error::Gguf { path: path.to_path_buf(), source: Box::new(source) }
}

/// A little-endian `u32` of a GGUF header.
fn u32_of(r: &mut impl Read) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

/// A GGUF length: `u32` in version 1, `u64` after.
fn len_of(r: &mut impl Read, v1: bool) -> std::io::Result<u64> {
    if v1 {
        return u32_of(r).map(u64::from);
    }
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// Reads a GGUF metadata value of `ty`; returns it when it is an integer, skips it otherwise.
fn gguf_value(r: &mut (impl Read + Seek), ty: u32, v1: bool, depth: usize) -> std::io::Result<Option<u64>> {
    fn fixed(n: usize, r: &mut impl Read) -> std::io::Result<Option<u64>> {
        let mut b = [0u8; 8];
        r.read_exact(&mut b[..n])?;
        Ok(Some(u64::from_le_bytes(b)))
    }
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "malformed GGUF metadata");
    match ty {
        0 | 1 | 7 => fixed(1, r),
        2 | 3 => fixed(2, r),
        4 | 5 => fixed(4, r),
        10 | 11 => fixed(8, r),
        6 => fixed(4, r).map(|_| None),
        12 => fixed(8, r).map(|_| None),
        8 => {
            let n = len_of(r, v1)?;
            r.seek(SeekFrom::Current(i64::try_from(n).map_err(|_| bad())?))?;
            Ok(None)
        }
        9 if depth < 4 => {
            let inner = u32_of(r)?;
            let n = len_of(r, v1)?;
            let size = match inner {
                0 | 1 | 7 => Some(1u64),
                2 | 3 => Some(2),
                4..=6 => Some(4),
                10..=12 => Some(8),
                _ => None,
            };
            match size {
                Some(size) => {
                    let bytes = n.checked_mul(size).and_then(|b| i64::try_from(b).ok()).ok_or_else(bad)?;
                    r.seek(SeekFrom::Current(bytes))?;
                }
                None => {
                    for _ in 0..n {
                        gguf_value(r, inner, v1, depth + 1)?;
                    }
                }
            }
            Ok(None)
        }
        _ => Err(bad()),
    }
}

/// Whether a GGUF header sets `general.alignment` to 0, which candle's reader would divide by.
/// Walks the metadata entries only (the tensor data is never read); anything malformed is left
/// to candle's reader, which reports it.
fn zero_alignment(reader: &mut (impl Read + Seek)) -> std::io::Result<bool> {
    let magic = u32_of(reader)?;
    if magic != 0x4655_4747 && magic != 0x4747_5546 {
        return Ok(false);
    }
    let v1 = u32_of(reader)? == 1;
    let _tensors = len_of(reader, v1)?;
    let entries = len_of(reader, v1)?;
    for _ in 0..entries {
        let key_len = len_of(reader, v1)?;
        if key_len > 1 << 16 {
            return Ok(false);
        }
        let mut key = vec![0u8; key_len as usize];
        reader.read_exact(&mut key)?;
        let ty = u32_of(reader)?;
        let v = gguf_value(reader, ty, v1, 0)?;
        if key == b"general.alignment" {
            return Ok(v == Some(0));
        }
    }
    Ok(false)
}

enum Files {
    Safetensors { dir: Option<PathBuf>, vb: VarBuilder<'static> },
    Gguf(GgufFile),
}

/// The encoder's tensors, stored as asked: plain in the compute dtype, or quantized.
pub(crate) struct TensorSource {
    files: Files,
    /// Compute dtype.
    dtype: DType,
    device: Device,
    /// Quantize unquantized matrices to this type while loading.
    quant: Option<QuantType>,
    /// On the CPU, use candle's repacking quantized matmul (see [`T5Linear`]).
    cpu_repack: bool,
    summary: RefCell<WeightSummary>,
}

impl TensorSource {
    /// A transformers folder (`model.safetensors` or shards). With `quant`, tensors are read in
    /// f32 on the CPU one at a time and quantized onto `device`.
    pub(crate) fn safetensors(
        dir: &Path,
        dtype: DType,
        device: &Device,
        quant: Option<QuantType>,
    ) -> Result<Self, T5Error> {
        let read_device = if quant.is_some() { Device::Cpu } else { device.clone() };
        let vb = pixart_core::var_builder(dir, "model", dtype, &read_device)?;
        Ok(Self::new(Files::Safetensors { dir: Some(dir.into()), vb }, dtype, device, quant))
    }

    /// A GGUF file. Its quantized tensors are used as stored; its f32/f16/bf16 matrices are
    /// converted to the compute dtype, or quantized to `quant`.
    pub(crate) fn gguf(path: &Path, dtype: DType, device: &Device, quant: Option<QuantType>) -> Result<Self, T5Error> {
        Ok(Self::new(Files::Gguf(GgufFile::open(path)?), dtype, device, quant))
    }

    /// Tensors already opened by a VarBuilder (stored in its dtype, on its device).
    pub(crate) fn var_builder(vb: VarBuilder<'static>) -> Self {
        let (dtype, device) = (vb.dtype(), vb.device().clone());
        Self::new(Files::Safetensors { dir: None, vb }, dtype, &device, None)
    }

    fn new(files: Files, dtype: DType, device: &Device, quant: Option<QuantType>) -> Self {
        Self { files, dtype, device: device.clone(), quant, cpu_repack: false, summary: Default::default() }
    }

    /// Lets candle repack quantized weights for its fast CPU kernels (a second copy is kept).
    pub(crate) fn with_cpu_repack(mut self, on: bool) -> Self {
        self.cpu_repack = on;
        self
    }

    /// The compute dtype.
    pub(crate) fn dtype(&self) -> DType {
        self.dtype
    }

    /// What was loaded so far, by storage type.
    pub(crate) fn summary(&self) -> WeightSummary {
        self.summary.borrow().clone()
    }

    /// Whether the source holds `name` (under either naming scheme for GGUF).
    pub(crate) fn contains(&self, name: &str) -> bool {
        match &self.files {
            Files::Safetensors { vb, .. } => vb.contains_tensor(name),
            Files::Gguf(file) => file.resolve(name).is_some(),
        }
    }

    fn safetensors_error(dir: &Option<PathBuf>, source: candle_core::Error) -> T5Error {
        match dir {
            Some(dir) => pixart_core::WeightsError::tensor(dir, source).into(),
            None => source.into(),
        }
    }

    /// Reads `name` with `shape` as a plain tensor in `dtype` on the device.
    pub(crate) fn dense(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor, T5Error> {
        let t = match &self.files {
            Files::Safetensors { dir, vb } => vb
                .get_with_hints_dtype(shape, name, Default::default(), dtype)
                .and_then(|t| t.to_device(&self.device))
                .map_err(|e| Self::safetensors_error(dir, e))?,
            Files::Gguf(file) => {
                let q = file.read(name, shape, &Device::Cpu)?;
                q.dequantize(&Device::Cpu)
                    .and_then(|t| t.to_dtype(dtype))
                    .and_then(|t| t.to_device(&self.device))
                    .map_err(|source| gguf_error(&file.path, GgufError::Read { tensor: Some(name.into()), source }))?
            }
        };
        self.summary.borrow_mut().record_dense(&t);
        Ok(t)
    }

    /// Reads a matrix `[rows, width]`: stored quantized (as in the file, or quantized now), or
    /// plain in `dtype`. `Ok(Err(t))` is the plain tensor.
    fn matrix(&self, name: &str, rows: usize, width: usize, dtype: DType) -> Result<Result<QTensor, Tensor>, T5Error> {
        let target = self.quant.and_then(|q| storage_for(q, width));
        if self.quant.is_some_and(|q| target != Some(q.ggml())) {
            self.summary.borrow_mut().fallbacks += 1;
        }
        match &self.files {
            Files::Gguf(file) => {
                let stored = file.resolve(name).map(|n| file.content.tensor_infos[&n].ggml_dtype);
                let plain = matches!(stored, Some(GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16));
                if stored.is_some() && !plain {
                    // Already quantized: used as stored, on the device.
                    let q = file.read(name, &[rows, width], &self.device)?;
                    self.summary.borrow_mut().record_quantized(&q);
                    return Ok(Ok(q));
                }
                match target {
                    None => self.dense(name, &[rows, width], dtype).map(Err),
                    Some(ggml) => {
                        let q = file.read(name, &[rows, width], &Device::Cpu)?;
                        let quantize = |q: QTensor| -> candle_core::Result<QTensor> {
                            quantize_rows(&q.dequantize(&Device::Cpu)?, ggml, &self.device)
                        };
                        let q = quantize(q).map_err(|source| {
                            gguf_error(&file.path, GgufError::Read { tensor: Some(name.into()), source })
                        })?;
                        self.summary.borrow_mut().record_quantized(&q);
                        Ok(Ok(q))
                    }
                }
            }
            Files::Safetensors { dir, vb } => match target {
                None => self.dense(name, &[rows, width], dtype).map(Err),
                Some(ggml) => {
                    let q = vb
                        .get_with_hints_dtype((rows, width), name, Default::default(), DType::F32)
                        .and_then(|t| quantize_rows(&t, ggml, &self.device))
                        .map_err(|e| Self::safetensors_error(dir, e))?;
                    self.summary.borrow_mut().record_quantized(&q);
                    Ok(Ok(q))
                }
            },
        }
    }

    /// A linear layer `[out, in]` that takes and returns `dtype`.
    pub(crate) fn linear(&self, name: &str, out: usize, inp: usize, dtype: DType) -> Result<T5Linear, T5Error> {
        Ok(match self.matrix(name, out, inp, dtype)? {
            Ok(q) => T5Linear::quantized(q, dtype, self.cpu_repack)?,
            Err(w) => T5Linear::Dense(Linear::new(w, None)),
        })
    }

    /// The token embedding `[vocab, d_model]`.
    pub(crate) fn embedding(&self, name: &str, vocab: usize, d_model: usize) -> Result<T5Embedding, T5Error> {
        Ok(match self.matrix(name, vocab, d_model, self.dtype)? {
            Ok(q) => T5Embedding::Quantized(Arc::new(q)),
            Err(w) => T5Embedding::Dense(Embedding::new(w, d_model)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantizing_rows_in_parallel_gives_candles_blocks() {
        let t = Tensor::randn(0f32, 1.0, (4100, 512), &Device::Cpu).unwrap(); // two chunks per thread
        for ggml in [GgmlDType::Q8_0, GgmlDType::Q4K] {
            let whole = QTensor::quantize(&t, ggml).unwrap();
            let parallel = quantize_rows(&t, ggml, &Device::Cpu).unwrap();
            assert_eq!(parallel.shape().dims(), [4100, 512]);
            assert_eq!(parallel.data().unwrap(), whole.data().unwrap(), "{ggml:?}");
        }
    }

    #[test]
    fn llama_cpp_names_follow_gguf_py() {
        let n = |s: &str| llama_cpp_name(s);
        assert_eq!(n("shared.weight").as_deref(), Some("token_embd.weight"));
        assert_eq!(n("encoder.final_layer_norm.weight").as_deref(), Some("enc.output_norm.weight"));
        assert_eq!(n("encoder.block.11.layer.0.SelfAttention.o.weight").as_deref(), Some("enc.blk.11.attn_o.weight"));
        assert_eq!(
            n("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight").as_deref(),
            Some("enc.blk.0.attn_rel_b.weight")
        );
        assert_eq!(
            n("encoder.block.3.layer.1.DenseReluDense.wi_0.weight").as_deref(),
            Some("enc.blk.3.ffn_gate.weight")
        );
        assert_eq!(n("encoder.block.3.layer.1.DenseReluDense.wi_1.weight").as_deref(), Some("enc.blk.3.ffn_up.weight"));
        assert_eq!(n("encoder.block.3.layer.1.DenseReluDense.wo.weight").as_deref(), Some("enc.blk.3.ffn_down.weight"));
        assert_eq!(n("encoder.block.x.layer.1.DenseReluDense.wo.weight"), None);
        assert_eq!(n("decoder.block.0.layer.0.SelfAttention.q.weight"), None);
    }
}
