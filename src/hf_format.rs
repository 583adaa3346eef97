//! Hugging Face model folders, the parts that need no tensor library: reading and
//! checking `config.json` for the Llama family, and checking a safetensors file's header
//! (every tensor's dtype, shape and byte range) before any weight is converted.
//!
//! The mistral.rs backend reads folders through this module; the fuzz target
//! `hf_format` runs both checks on arbitrary bytes.

use serde::Deserialize;
use std::collections::BTreeMap;

/// Model types whose weights and forward ziplm's Llama backend reads: the same tensor
/// names, RMSNorm, SwiGLU, rotary attention; no biases except Qwen2's Q/K/V biases.
pub const SUPPORTED_MODEL_TYPES: &[&str] = &["llama", "mistral", "qwen2"];

/// The fields of a Hugging Face `config.json` the Llama backend uses.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct HfLlamaConfig {
    /// `llama`, `mistral` or `qwen2`.
    pub model_type: String,
    /// Residual width.
    pub hidden_size: usize,
    /// FFN width (one value for every layer).
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// KV heads (default: as many as query heads).
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Head width (default: hidden / heads).
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// FFN activation (must be SiLU).
    #[serde(default)]
    pub hidden_act: Option<String>,
    /// Longest context.
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base (default 10000).
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// RoPE scaling (must be absent or null).
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    /// Whether the output head is the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Q/K/V/O biases (must be absent or false).
    #[serde(default)]
    pub attention_bias: Option<bool>,
    /// FFN biases (must be absent or false).
    #[serde(default)]
    pub mlp_bias: Option<bool>,
    /// Mistral's sliding attention window (tokens), if any.
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Beginning-of-sequence token id.
    #[serde(default)]
    pub bos_token_id: Option<serde_json::Value>,
    /// End-of-sequence token id(s).
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
}

/// Why a folder's config was refused: `Unsupported` for a real model of another kind,
/// `Invalid` for a broken file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConfigError {
    /// A well-formed config of a model this backend does not prune.
    Unsupported(String),
    /// A config that cannot be read or contradicts itself.
    Invalid(String),
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigError::Unsupported(s) | ConfigError::Invalid(s) => f.write_str(s),
        }
    }
}

impl HfLlamaConfig {
    /// Parses and checks `config.json` text.
    pub fn parse(text: &str) -> Result<HfLlamaConfig, ConfigError> {
        let raw: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| ConfigError::Invalid(format!("not valid JSON: {e}")))?;
        let model_type = raw
            .get("model_type")
            .and_then(|v| v.as_str())
            .ok_or_else(|| ConfigError::Invalid("`model_type` is missing".into()))?;
        if !SUPPORTED_MODEL_TYPES.contains(&model_type) {
            return Err(ConfigError::Unsupported(format!(
                "model_type `{model_type}` is not supported: the mistralrs backend prunes {} models",
                SUPPORTED_MODEL_TYPES.join(", ")
            )));
        }
        let cfg: HfLlamaConfig = serde_json::from_value(raw)
            .map_err(|e| ConfigError::Invalid(format!("a field is missing or mistyped: {e}")))?;
        cfg.check()?;
        Ok(cfg)
    }

    fn check(&self) -> Result<(), ConfigError> {
        let invalid = |s: String| Err(ConfigError::Invalid(s));
        let unsupported = |s: String| Err(ConfigError::Unsupported(s));
        if self.hidden_size == 0
            || self.intermediate_size == 0
            || self.num_hidden_layers == 0
            || self.num_attention_heads == 0
            || self.vocab_size == 0
            || self.max_position_embeddings == 0
        {
            return invalid("hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, vocab_size and max_position_embeddings must be positive".into());
        }
        let kv = self.kv_heads();
        if kv == 0 || !self.num_attention_heads.is_multiple_of(kv) {
            return invalid(format!(
                "{} attention heads are not a multiple of {kv} KV heads",
                self.num_attention_heads
            ));
        }
        let hd = self.head_width();
        if hd == 0 || !hd.is_multiple_of(2) {
            return invalid(format!("head_dim {hd} must be positive and even"));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return invalid(format!(
                "rms_norm_eps {} must be a positive number",
                self.rms_norm_eps
            ));
        }
        if let Some(t) = self.rope_theta {
            if !(t.is_finite() && t > 0.0) {
                return invalid(format!("rope_theta {t} must be a positive number"));
            }
        }
        if let Some(act) = &self.hidden_act {
            if act != "silu" {
                return unsupported(format!(
                    "hidden_act `{act}` is not supported (SwiGLU with silu only)"
                ));
            }
        }
        if self.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            return unsupported(
                "rope_scaling (llama3 / linear / yarn) is not supported: ziplm's forward and mistral.rs's mistral loader use plain RoPE".into(),
            );
        }
        if self.qkv_bias() {
            // mistral.rs's qwen2 loader derives the head width; a config that says
            // otherwise describes a model it would load wrongly.
            if hd.checked_mul(self.num_attention_heads) != Some(self.hidden_size) {
                return unsupported(format!(
                    "a qwen2 config with head_dim {hd} x {} heads != hidden_size {}: mistral.rs's qwen2 loader derives the head width from hidden_size / num_attention_heads",
                    self.num_attention_heads, self.hidden_size
                ));
            }
        } else if self.attention_bias == Some(true) {
            return unsupported(
                "attention biases are not supported outside Qwen2 (Llama's attention_bias also adds an o_proj bias)".into(),
            );
        }
        if self.mlp_bias == Some(true) {
            return unsupported("MLP biases are not supported".into());
        }
        Ok(())
    }

    /// Whether the Q/K/V projections have biases (Qwen2).
    pub fn qkv_bias(&self) -> bool {
        self.model_type == "qwen2"
    }

    /// KV heads.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Head width.
    pub fn head_width(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// The longest sequence ziplm's forward computes exactly: the context, or Mistral's
    /// sliding window when shorter (the forward attends to every earlier token).
    pub fn exact_context(&self) -> usize {
        match self.sliding_window {
            Some(w) if w > 0 => w.min(self.max_position_embeddings),
            _ => self.max_position_embeddings,
        }
    }
}

/// Element types of safetensors weights the backend converts to f32.
pub const SUPPORTED_DTYPES: &[&str] = &["F32", "F16", "BF16"];

/// One tensor in a checked safetensors header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SafetensorsEntry {
    /// Element type (`F32`, `F16`, `BF16`).
    pub dtype: String,
    /// Shape.
    pub shape: Vec<usize>,
}

/// Checks a whole safetensors file: its header (length, JSON, every tensor's byte range
/// inside the file and matching its dtype and shape, no overlaps; the `safetensors`
/// crate's own validation) and that every tensor is F32, F16 or BF16. Returns the
/// tensors by name.
pub fn check_safetensors(bytes: &[u8]) -> Result<BTreeMap<String, SafetensorsEntry>, String> {
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| describe(&e))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let dtype = format!("{:?}", view.dtype());
        if !SUPPORTED_DTYPES.contains(&dtype.as_str()) {
            return Err(format!(
                "tensor `{name}` is {dtype}; only {} weights are read (dequantise or convert the checkpoint first)",
                SUPPORTED_DTYPES.join(", ")
            ));
        }
        out.insert(
            name,
            SafetensorsEntry {
                dtype,
                shape: view.shape().to_vec(),
            },
        );
    }
    Ok(out)
}

fn describe(e: &safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::HeaderTooSmall | E::HeaderTooLarge | E::InvalidHeaderLength => {
            format!("truncated or corrupt header ({e:?})")
        }
        E::MetadataIncompleteBuffer => {
            "truncated: the tensor data is shorter than the header says".into()
        }
        other => format!("corrupt header: {other}"),
    }
}

/// The shard files of a sharded checkpoint, from `model.safetensors.index.json` text
/// (`weight_map`: tensor name -> file name), sorted and without duplicates. File names
/// must be plain names in the same folder.
pub fn shard_files(index_json: &str) -> Result<Vec<String>, String> {
    #[derive(Deserialize)]
    struct Index {
        weight_map: BTreeMap<String, String>,
    }
    let index: Index =
        serde_json::from_str(index_json).map_err(|e| format!("not a safetensors index: {e}"))?;
    let mut files: Vec<String> = index.weight_map.into_values().collect();
    files.sort();
    files.dedup();
    for f in &files {
        if f.is_empty() || f.contains('/') || f.contains('\\') || f == ".." {
            return Err(format!(
                "shard `{f}` is not a file name in the model folder"
            ));
        }
    }
    if files.is_empty() {
        return Err("the index names no shard files".into());
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TINY: &str = r#"{"model_type":"llama","hidden_size":64,"intermediate_size":128,
        "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"head_dim":16,
        "hidden_act":"silu","max_position_embeddings":64,"rms_norm_eps":1e-6,
        "rope_theta":10000.0,"rope_scaling":null,"tie_word_embeddings":true,"vocab_size":128}"#;

    #[test]
    fn reads_a_llama_config() {
        let c = HfLlamaConfig::parse(TINY).unwrap();
        assert_eq!(
            (c.kv_heads(), c.head_width(), c.exact_context()),
            (2, 16, 64)
        );
    }

    #[test]
    fn refuses_other_families_and_broken_configs() {
        let with = |k: &str, v: &str| {
            let mut j: serde_json::Value = serde_json::from_str(TINY).unwrap();
            j[k] = serde_json::from_str(v).unwrap();
            HfLlamaConfig::parse(&j.to_string())
        };
        assert!(with("model_type", "\"qwen2\"").unwrap().qkv_bias());
        assert!(
            matches!(with("model_type", "\"gpt2\""), Err(ConfigError::Unsupported(m)) if m.contains("llama, mistral, qwen2"))
        );
        // Qwen2 with a head width mistral.rs's qwen2 loader would not derive.
        let mut j: serde_json::Value = serde_json::from_str(TINY).unwrap();
        j["model_type"] = "qwen2".into();
        j["head_dim"] = 8.into();
        assert!(
            matches!(HfLlamaConfig::parse(&j.to_string()), Err(ConfigError::Unsupported(m)) if m.contains("derives the head width"))
        );
        assert!(matches!(
            with("attention_bias", "true"),
            Err(ConfigError::Unsupported(m)) if m.contains("outside Qwen2")
        ));
        assert!(matches!(
            with("rope_scaling", r#"{"rope_type":"llama3"}"#),
            Err(ConfigError::Unsupported(_))
        ));
        assert!(
            matches!(with("num_key_value_heads", "3"), Err(ConfigError::Invalid(m)) if m.contains("multiple"))
        );
        assert!(
            matches!(with("hidden_size", "\"64\""), Err(ConfigError::Invalid(m)) if m.contains("mistyped"))
        );
        assert!(matches!(
            HfLlamaConfig::parse("{"),
            Err(ConfigError::Invalid(_))
        ));
    }

    #[test]
    fn sliding_window_bounds_the_exact_context() {
        let mut j: serde_json::Value = serde_json::from_str(TINY).unwrap();
        j["sliding_window"] = 16.into();
        assert_eq!(
            HfLlamaConfig::parse(&j.to_string())
                .unwrap()
                .exact_context(),
            16
        );
    }

    #[test]
    fn safetensors_headers_are_checked() {
        let data: Vec<u8> = (0..24u8).collect();
        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2, 3], &data)
            .unwrap();
        let bytes = safetensors::serialize([("w", view)], None).unwrap();
        let t = check_safetensors(&bytes).unwrap();
        assert_eq!(t["w"].shape, vec![2, 3]);
        let cut = check_safetensors(&bytes[..bytes.len() - 1]).unwrap_err();
        assert!(cut.contains("truncated"), "{cut}");
        assert!(check_safetensors(&bytes[..4])
            .unwrap_err()
            .contains("truncated"));
        let i8s =
            safetensors::tensor::TensorView::new(safetensors::Dtype::I8, vec![24], &data).unwrap();
        let bytes = safetensors::serialize([("q", i8s)], None).unwrap();
        assert!(check_safetensors(&bytes).unwrap_err().contains("only F32"));
    }

    #[test]
    fn shard_index_names_files_in_the_folder() {
        let ok = r#"{"weight_map":{"a":"model-2.safetensors","b":"model-1.safetensors","c":"model-1.safetensors"}}"#;
        assert_eq!(
            shard_files(ok).unwrap(),
            vec!["model-1.safetensors", "model-2.safetensors"]
        );
        assert!(shard_files(r#"{"weight_map":{"a":"../x.safetensors"}}"#).is_err());
        assert!(shard_files(r#"{"weight_map":{}}"#).is_err());
    }
}
