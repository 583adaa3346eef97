//! Reading GGUF files: [`crate::gguf_header::check_header`] first (candle's
//! `gguf_file::Content::read` trusts every length in the file: a corrupt string length
//! allocates that many bytes), then candle's reader and dequantisation.

use crate::gguf_header::check_header;
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Tensor;
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The candle type for a ggml type id (the ids [`ggml_type_layout`] knows).
pub fn candle_dtype(id: u32) -> Option<GgmlDType> {
    Some(match id {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

/// An open GGUF file: its checked header, candle's view of it, and the file to read
/// tensors from.
pub struct GgufFile {
    /// Where it was read from.
    pub path: PathBuf,
    /// candle's parsed header (metadata and tensor infos).
    pub content: Content,
    reader: Mutex<BufReader<File>>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Errors from [`GgufFile`]; the caller adds the path.
pub type GgufResult<T> = std::result::Result<T, String>;

impl GgufFile {
    /// Opens and checks a GGUF file.
    pub fn open(path: &Path) -> GgufResult<GgufFile> {
        let file = File::open(path).map_err(|e| format!("cannot open: {e}"))?;
        let len = file
            .metadata()
            .map_err(|e| format!("cannot read its size: {e}"))?
            .len();
        let mut reader = BufReader::new(file);
        check_header(&mut reader, len).map_err(|e| e.0)?;
        reader
            .seek(SeekFrom::Start(0))
            .map_err(|e| format!("cannot seek: {e}"))?;
        let content = Content::read(&mut reader).map_err(|e| format!("corrupt header: {e}"))?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            content,
            reader: Mutex::new(reader),
        })
    }

    /// The metadata map.
    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    /// A string metadata value.
    pub fn string(&self, key: &str) -> Option<&str> {
        self.metadata()
            .get(key)
            .and_then(|v| v.to_string().ok())
            .map(String::as_str)
    }

    /// An unsigned integer metadata value (any integer type).
    pub fn uint(&self, key: &str) -> Option<u64> {
        let v = self.metadata().get(key)?;
        v.to_u64()
            .ok()
            .or_else(|| v.to_u32().ok().map(u64::from))
            .or_else(|| v.to_i32().ok().and_then(|x| u64::try_from(x).ok()))
            .or_else(|| v.to_i64().ok().and_then(|x| u64::try_from(x).ok()))
            .or_else(|| v.to_u16().ok().map(u64::from))
            .or_else(|| v.to_u8().ok().map(u64::from))
    }

    /// A float metadata value (f32 or f64).
    pub fn float(&self, key: &str) -> Option<f64> {
        let v = self.metadata().get(key)?;
        v.to_f32().ok().map(f64::from).or_else(|| v.to_f64().ok())
    }

    /// Whether a tensor exists.
    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// The stored (ggml) type of a tensor.
    pub fn ggml_type(&self, name: &str) -> Option<candle_core::quantized::GgmlDType> {
        self.content.tensor_infos.get(name).map(|t| t.ggml_dtype)
    }

    /// The type most of the file's attention and FFN projections are stored in (the
    /// type mistral.rs runs their matmuls in; ties go to the first type by name), or
    /// `None` when it has none.
    pub fn projection_type(&self) -> Option<GgmlDType> {
        const PROJECTIONS: &[&str] = &[
            ".attn_q.weight",
            ".attn_k.weight",
            ".attn_v.weight",
            ".attn_output.weight",
            ".ffn_gate.weight",
            ".ffn_up.weight",
            ".ffn_down.weight",
        ];
        let mut counts: HashMap<GgmlDType, usize> = HashMap::new();
        for (name, info) in &self.content.tensor_infos {
            if PROJECTIONS.iter().any(|p| name.ends_with(p)) {
                *counts.entry(info.ggml_dtype).or_default() += 1;
            }
        }
        let name = |t: &GgmlDType| format!("{t:?}");
        counts
            .into_iter()
            .max_by(|a, b| a.1.cmp(&b.1).then_with(|| name(&b.0).cmp(&name(&a.0))))
            .map(|(t, _)| t)
    }

    /// The (outer-first) shape of a tensor.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.content
            .tensor_infos
            .get(name)
            .map(|t| t.shape.dims().to_vec())
    }

    /// A tensor as stored (possibly quantised).
    pub fn qtensor(&self, name: &str) -> GgufResult<QTensor> {
        let mut r = self
            .reader
            .lock()
            .map_err(|_| "reader poisoned".to_string())?;
        self.content
            .tensor(&mut *r, name, &super::target_device())
            .map_err(|e| format!("tensor `{name}`: {e}"))
    }

    /// A tensor dequantised to f32.
    pub fn f32_tensor(&self, name: &str) -> GgufResult<Tensor> {
        self.qtensor(name)?
            .dequantize(&super::target_device())
            .map_err(|e| format!("tensor `{name}`: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf_header::ggml_type_layout;

    #[test]
    fn type_layouts_match_candle() {
        for id in 0..40u32 {
            match (ggml_type_layout(id), candle_dtype(id)) {
                (Some((block, bytes)), Some(dt)) => {
                    assert_eq!(block as usize, dt.block_size(), "type {id}");
                    assert_eq!(bytes as usize, dt.type_size(), "type {id}");
                }
                (None, None) => {}
                other => panic!("type {id}: tables disagree: {other:?}"),
            }
        }
    }
}
