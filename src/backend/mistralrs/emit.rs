//! Writing a pruned Llama as a GGUF file stock mistral.rs loads.
//!
//! Every metadata entry of the source is copied (tokenizer, chat template, RoPE...), in
//! sorted key order so the same inputs give the same bytes; the shape keys are
//! rewritten (`block_count`, head counts, `key_length` / `value_length` so the head
//! width is explicit, `feed_forward_length` = the widest layer; each layer's real width
//! is its tensors' shape, which mistral.rs reads). Token embeddings and a separate output
//! head are copied as stored; norms are F32; projections are written in the requested
//! type (a projection whose input width is not a whole number of that type's blocks is
//! written in F32 and counted in the returned summary).

use super::gguf::GgufFile;
use super::llama::LlamaWeights;
use super::options::GgufDType as OutputDType;
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use std::path::Path;
use ziplm_plugin_api::{AdapterError, AdapterResult};

/// The candle type of an output type.
pub fn ggml_dtype(d: OutputDType) -> candle_core::quantized::GgmlDType {
    use candle_core::quantized::GgmlDType as G;
    match d {
        OutputDType::F32 => G::F32,
        OutputDType::F16 => G::F16,
        OutputDType::Q8_0 => G::Q8_0,
        OutputDType::Q4K => G::Q4K,
    }
}

/// The output type that writes `d`, when the emitter writes it.
pub fn output_dtype_of(d: GgmlDType) -> Option<OutputDType> {
    [
        OutputDType::F32,
        OutputDType::F16,
        OutputDType::Q8_0,
        OutputDType::Q4K,
    ]
    .into_iter()
    .find(|o| ggml_dtype(*o) == d)
}

/// Metadata keys the emitter writes itself.
const REWRITTEN: &[&str] = &[
    "llama.block_count",
    "llama.attention.head_count",
    "llama.attention.head_count_kv",
    "llama.attention.key_length",
    "llama.attention.value_length",
    "llama.feed_forward_length",
    "general.alignment",
    "general.file_type",
    "ziplm.version",
];

/// `t` stored as `dtype`, or as F32 when its rows are not a whole number of `dtype`'s
/// blocks.
pub fn quantize(t: &candle_core::Tensor, dtype: GgmlDType) -> candle_core::Result<QTensor> {
    let cols = *t.dims().last().unwrap_or(&0);
    let dtype = if cols.is_multiple_of(dtype.block_size()) {
        dtype
    } else {
        GgmlDType::F32
    };
    // candle's quantize reads the whole backing storage: a view (a narrowed tensor,
    // contiguous but at an offset) must be copied into its own storage first.
    let owned =
        candle_core::Tensor::from_vec(t.flatten_all()?.to_vec1::<f32>()?, t.shape(), t.device())?;
    QTensor::quantize(&owned, dtype)
}

/// The tensors and metadata of the GGUF file for `w` (in file order).
#[allow(clippy::type_complexity)]
pub fn gguf_parts(
    src: &GgufFile,
    w: &LlamaWeights,
    dtype: OutputDType,
) -> AdapterResult<(Vec<(String, Value)>, Vec<(String, QTensor)>)> {
    let ce = |e: candle_core::Error| AdapterError::runtime("preparing GGUF tensors", e);
    let cfg = &w.config;
    let first = w.layers.first().ok_or_else(|| {
        AdapterError::InvalidRequest("a model without layers cannot be written".into())
    })?;
    let (heads, kv_heads) = (first.n_heads(cfg.head_dim), first.n_kv_heads(cfg.head_dim));
    let widest = w.layers.iter().map(|l| l.ffn_width()).max().unwrap_or(0);
    let mut meta: Vec<(String, Value)> = src
        .metadata()
        .iter()
        .filter(|(k, _)| !REWRITTEN.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    meta.extend([
        (
            "llama.block_count".into(),
            Value::U32(w.layers.len() as u32),
        ),
        (
            "llama.attention.head_count".into(),
            Value::U32(heads as u32),
        ),
        (
            "llama.attention.head_count_kv".into(),
            Value::U32(kv_heads as u32),
        ),
        (
            "llama.attention.key_length".into(),
            Value::U32(cfg.head_dim as u32),
        ),
        (
            "llama.attention.value_length".into(),
            Value::U32(cfg.head_dim as u32),
        ),
        (
            "llama.feed_forward_length".into(),
            Value::U32(widest as u32),
        ),
        ("general.alignment".into(), Value::U32(32)),
        (
            "ziplm.version".into(),
            Value::String(env!("CARGO_PKG_VERSION").into()),
        ),
    ]);
    meta.sort_by(|a, b| a.0.cmp(&b.0));

    let stored = |name: &str| -> AdapterResult<QTensor> {
        src.qtensor(name).map_err(|e| AdapterError::InvalidModel {
            path: src.path.clone(),
            detail: e,
        })
    };
    let f32q = |t: &candle_core::Tensor| quantize(t, GgmlDType::F32).map_err(ce);
    let proj = |t: &candle_core::Tensor| quantize(t, ggml_dtype(dtype)).map_err(ce);
    let mut tensors = vec![(
        "token_embd.weight".to_string(),
        stored("token_embd.weight")?,
    )];
    for (i, l) in w.layers.iter().enumerate() {
        let p = |n: &str| format!("blk.{i}.{n}.weight");
        tensors.extend([
            (p("attn_norm"), f32q(&l.attn_norm)?),
            (p("attn_q"), proj(&l.wq)?),
            (p("attn_k"), proj(&l.wk)?),
            (p("attn_v"), proj(&l.wv)?),
            (p("attn_output"), proj(&l.wo)?),
            (p("ffn_norm"), f32q(&l.ffn_norm)?),
            (p("ffn_gate"), proj(&l.gate)?),
            (p("ffn_up"), proj(&l.up)?),
            (p("ffn_down"), proj(&l.down)?),
        ]);
    }
    tensors.push(("output_norm.weight".into(), f32q(&w.norm)?));
    if src.has_tensor("output.weight") {
        tensors.push(("output.weight".into(), stored("output.weight")?));
    }
    Ok((meta, tensors))
}

/// Writes `w` as a GGUF file at `dest`, atomically. Returns the bytes written.
pub fn write_gguf(
    src: &GgufFile,
    w: &LlamaWeights,
    dtype: OutputDType,
    dest: &Path,
) -> AdapterResult<u64> {
    let (meta, tensors) = gguf_parts(src, w, dtype)?;
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    crate::fsutil::write_atomic_with(dest, |f| {
        let mut buf = std::io::BufWriter::new(f);
        gguf_file::write(&mut buf, &meta_refs, &tensor_refs).map_err(std::io::Error::other)?;
        use std::io::Write;
        buf.flush()
    })
    .map_err(|e| match e {
        crate::Error::Io { path, source } => AdapterError::Io { path, source },
        other => AdapterError::runtime("writing the GGUF file", other),
    })?;
    std::fs::metadata(dest)
        .map(|m| m.len())
        .map_err(|e| AdapterError::io(dest, e))
}
