//! Hugging Face model folders (`config.json` + safetensors, Llama / Mistral / Qwen2):
//! reading them into [`LlamaWeights`] and writing pruned models as folders stock
//! mistral.rs loads.
//!
//! Internally every Llama is held in the GGUF layout: Q and K rows permuted for
//! interleaved RoPE, as llama.cpp's `convert_hf_to_gguf.py` stores them. Reading a folder
//! applies that permutation; writing one undoes it, so a folder and its GGUF conversion
//! give the same [`LlamaWeights`].
//!
//! A written folder says `MistralForCausalLM` (model_type `mistral`): mistral.rs's
//! `mistral` loader reads `head_dim` from the config (its `llama` loader derives it from
//! hidden / heads, so pruned heads would not load) and uses Llama's tensor names and
//! forward. `intermediate_size` is one value, so every layer keeps the same FFN width.
//! A Qwen2 model (Q/K/V biases, biases permuted like their rows) is written as
//! `Qwen2ForCausalLM`: that loader derives the head width from hidden / heads, so Qwen2
//! keeps every head (the structure says `fixed_heads`) and prunes FFN width and layers.

use super::gguf::GgufFile;
use super::llama::{LayerWeights, LlamaConfig, LlamaWeights, QkvBias};
use crate::hf_format::{check_safetensors, shard_files, ConfigError, HfLlamaConfig};
use candle_core::safetensors::Load;
use candle_core::{DType, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use ziplm_plugin_api::{AdapterError, AdapterResult};

/// Files copied from a source folder into every emitted folder when present.
pub const COPIED_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
];

/// An opened Hugging Face folder.
#[derive(Clone, Debug)]
pub struct HfFolder {
    /// The folder.
    pub dir: PathBuf,
    /// Its checked config.
    pub config: HfLlamaConfig,
}

/// Element type of the projections in an emitted folder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HfDType {
    /// f32.
    F32,
    /// f16.
    F16,
}

impl HfDType {
    fn candle(self) -> DType {
        match self {
            HfDType::F32 => DType::F32,
            HfDType::F16 => DType::F16,
        }
    }
    fn torch_name(self) -> &'static str {
        match self {
            HfDType::F32 => "float32",
            HfDType::F16 => "float16",
        }
    }
}

/// Why a folder could not be read: unsupported model or broken file (the message names
/// the file).
pub enum ReadError {
    /// A model of a kind the backend does not prune.
    Unsupported(String),
    /// A missing, truncated or inconsistent file.
    Invalid(String),
}

impl From<String> for ReadError {
    fn from(s: String) -> Self {
        ReadError::Invalid(s)
    }
}

/// `[n_head * hd, in]` rows from Hugging Face order (rotate-half pairs `i`, `i + hd/2`)
/// to GGUF order (interleaved pairs `2i`, `2i + 1`).
pub fn to_interleaved(w: &Tensor, n_head: usize) -> candle_core::Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let hd = rows / n_head;
    w.reshape((n_head, 2, hd / 2, cols))?
        .transpose(1, 2)?
        .reshape((rows, cols))?
        .contiguous()
}

/// The inverse of [`to_interleaved`].
pub fn to_rotate_half(w: &Tensor, n_head: usize) -> candle_core::Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let hd = rows / n_head;
    w.reshape((n_head, hd / 2, 2, cols))?
        .transpose(1, 2)?
        .reshape((rows, cols))?
        .contiguous()
}

impl HfFolder {
    /// Opens a folder and checks its `config.json`.
    pub fn open(dir: &Path) -> Result<HfFolder, ReadError> {
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| {
            ReadError::Invalid(format!(
                "{}: {e}; a Hugging Face model folder needs config.json and model.safetensors",
                cfg_path.display()
            ))
        })?;
        let config = HfLlamaConfig::parse(&text).map_err(|e| match e {
            ConfigError::Unsupported(m) => {
                ReadError::Unsupported(format!("{}: {m}", cfg_path.display()))
            }
            ConfigError::Invalid(m) => ReadError::Invalid(format!("{}: {m}", cfg_path.display())),
        })?;
        Ok(HfFolder {
            dir: dir.to_path_buf(),
            config,
        })
    }

    /// The weight files: the shards of `model.safetensors.index.json`, else
    /// `model.safetensors`.
    pub fn weight_files(&self) -> Result<Vec<PathBuf>, String> {
        let index = self.dir.join("model.safetensors.index.json");
        if index.is_file() {
            let text =
                std::fs::read_to_string(&index).map_err(|e| format!("{}: {e}", index.display()))?;
            let files = shard_files(&text).map_err(|e| format!("{}: {e}", index.display()))?;
            return Ok(files.into_iter().map(|f| self.dir.join(f)).collect());
        }
        let single = self.dir.join("model.safetensors");
        if single.is_file() {
            return Ok(vec![single]);
        }
        Err(format!(
            "{}: no model.safetensors or model.safetensors.index.json",
            self.dir.display()
        ))
    }

    /// The model's hyper-parameters in the backend's form.
    pub fn llama_config(&self) -> LlamaConfig {
        let c = &self.config;
        LlamaConfig {
            n_layers: c.num_hidden_layers,
            hidden: c.hidden_size,
            n_heads: c.num_attention_heads,
            n_kv_heads: c.kv_heads(),
            head_dim: c.head_width(),
            ffn_width: c.intermediate_size,
            rope_dim: c.head_width(),
            rope_base: c.rope_theta.unwrap_or(10_000.0) as f32,
            rms_eps: c.rms_norm_eps as f32,
            vocab: c.vocab_size,
            context_length: c.exact_context(),
        }
    }

    /// Reads every weight as f32 (F16 / BF16 converted), checks names and shapes against
    /// the config, and permutes Q / K rows to the GGUF layout.
    pub fn read_weights(&self) -> Result<LlamaWeights, String> {
        let mut all: HashMap<String, Tensor> = HashMap::new();
        for file in self.weight_files()? {
            let bytes = std::fs::read(&file).map_err(|e| format!("{}: {e}", file.display()))?;
            check_safetensors(&bytes).map_err(|e| format!("{}: {e}", file.display()))?;
            let st = safetensors::SafeTensors::deserialize(&bytes)
                .map_err(|e| format!("{}: {e}", file.display()))?;
            for (name, view) in st.tensors() {
                let t = view
                    .load(&super::target_device())
                    .and_then(|t| t.to_dtype(DType::F32))
                    .map_err(|e| format!("{}: tensor `{name}`: {e}", file.display()))?;
                all.insert(name, t);
            }
        }
        let cfg = self.llama_config();
        let (h, hd) = (cfg.hidden, cfg.head_dim);
        let has_head = all.contains_key("lm_head.weight");
        let mut take = |name: &str, shape: &[usize]| -> Result<Tensor, String> {
            let t = all.remove(name).ok_or(format!(
                "{}: tensor `{name}` is missing",
                self.dir.display()
            ))?;
            if t.dims() != shape {
                return Err(format!(
                    "{}: tensor `{name}` has shape {:?}, config.json implies {shape:?}",
                    self.dir.display(),
                    t.dims()
                ));
            }
            Ok(t)
        };
        let embed = take("model.embed_tokens.weight", &[cfg.vocab, h])?;
        let norm = take("model.norm.weight", &[h])?;
        let tied = self.config.tie_word_embeddings.unwrap_or(false);
        let ce = |e: candle_core::Error| e.to_string();
        let bias_rows = |b: Tensor, heads: usize| -> candle_core::Result<Tensor> {
            let n = b.dims1()?;
            to_interleaved(&b.reshape((n, 1))?, heads)?.reshape(n)
        };
        let mut layers = vec![];
        for i in 0..cfg.n_layers {
            let p = |n: &str| format!("model.layers.{i}.{n}.weight");
            let width = cfg.ffn_width;
            let qkv_bias = if self.config.qkv_bias() {
                let b = |n: &str| format!("model.layers.{i}.self_attn.{n}.bias");
                let (q, k, v) = (
                    take(&b("q_proj"), &[cfg.n_heads * hd])?,
                    take(&b("k_proj"), &[cfg.n_kv_heads * hd])?,
                    take(&b("v_proj"), &[cfg.n_kv_heads * hd])?,
                );
                Some(QkvBias {
                    q: bias_rows(q, cfg.n_heads).map_err(ce)?,
                    k: bias_rows(k, cfg.n_kv_heads).map_err(ce)?,
                    v,
                })
            } else {
                None
            };
            layers.push(LayerWeights {
                attn_norm: take(&p("input_layernorm"), &[h])?,
                wq: to_interleaved(
                    &take(&p("self_attn.q_proj"), &[cfg.n_heads * hd, h])?,
                    cfg.n_heads,
                )
                .map_err(ce)?,
                wk: to_interleaved(
                    &take(&p("self_attn.k_proj"), &[cfg.n_kv_heads * hd, h])?,
                    cfg.n_kv_heads,
                )
                .map_err(ce)?,
                wv: take(&p("self_attn.v_proj"), &[cfg.n_kv_heads * hd, h])?,
                wo: take(&p("self_attn.o_proj"), &[h, cfg.n_heads * hd])?,
                ffn_norm: take(&p("post_attention_layernorm"), &[h])?,
                gate: take(&p("mlp.gate_proj"), &[width, h])?,
                up: take(&p("mlp.up_proj"), &[width, h])?,
                down: take(&p("mlp.down_proj"), &[h, width])?,
                qkv_bias,
            });
        }
        let output = match (tied, has_head) {
            (false, true) => Some(take("lm_head.weight", &[cfg.vocab, h])?),
            (true, _) => None,
            (false, false) => {
                return Err(format!(
                    "{}: tensor `lm_head.weight` is missing and tie_word_embeddings is false",
                    self.dir.display()
                ))
            }
        };
        Ok(LlamaWeights {
            config: cfg,
            embed,
            norm,
            output,
            layers,
        })
    }

    /// The tokenizer and generation files of the folder, by name, to copy into emitted
    /// folders.
    pub fn assets(&self) -> Result<BTreeMap<String, Vec<u8>>, String> {
        let mut out = BTreeMap::new();
        for name in COPIED_FILES {
            let p = self.dir.join(name);
            if p.is_file() {
                let bytes = std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()))?;
                out.insert(name.to_string(), bytes);
            }
        }
        Ok(out)
    }
}

/// What an emitted folder needs besides the weights: the original model's settings
/// that the f32 [`LlamaConfig`] rounds (epsilon and RoPE base as written in the source),
/// special token ids, and the tokenizer files.
#[derive(Clone, Debug, Default)]
pub struct HfExtras {
    /// `rms_norm_eps` as the source states it.
    pub rms_norm_eps: f64,
    /// `rope_theta` as the source states it.
    pub rope_theta: f64,
    /// `max_position_embeddings`.
    pub max_position_embeddings: usize,
    /// Mistral's sliding window, kept as the source states it.
    pub sliding_window: Option<usize>,
    /// `bos_token_id` as JSON.
    pub bos_token_id: Option<serde_json::Value>,
    /// `eos_token_id` as JSON.
    pub eos_token_id: Option<serde_json::Value>,
    /// Files written next to the weights (tokenizer.json, tokenizer_config.json...).
    pub files: BTreeMap<String, Vec<u8>>,
}

impl HfExtras {
    /// The extras of a Hugging Face folder; `tokenizer_json` replaces (or supplies) its
    /// `tokenizer.json`, which mistral.rs needs to load a folder.
    pub fn from_folder(f: &HfFolder, tokenizer_json: Option<&Path>) -> Result<HfExtras, String> {
        let c = &f.config;
        let mut files = f.assets()?;
        if let Some(p) = tokenizer_json {
            let bytes = std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?;
            files.insert("tokenizer.json".into(), bytes);
        }
        if !files.contains_key("tokenizer.json") {
            return Err(format!(
                "{}: no tokenizer.json; mistral.rs needs one to load the pruned folder: pass the model's tokenizer.json with --tokenizer",
                f.dir.display()
            ));
        }
        Ok(HfExtras {
            rms_norm_eps: c.rms_norm_eps,
            rope_theta: c.rope_theta.unwrap_or(10_000.0),
            max_position_embeddings: c.max_position_embeddings,
            sliding_window: c.sliding_window,
            bos_token_id: c.bos_token_id.clone(),
            eos_token_id: c.eos_token_id.clone(),
            files,
        })
    }

    /// The extras of a GGUF file: settings from its metadata, `tokenizer.json` built from
    /// its `tokenizer.ggml.*` entries (or `tokenizer_json` when given), and a
    /// `tokenizer_config.json` with its chat template and special tokens.
    pub fn from_gguf(
        g: &GgufFile,
        cfg: &LlamaConfig,
        tokenizer_json: Option<&Path>,
    ) -> Result<HfExtras, String> {
        let tok_bytes = match tokenizer_json {
            Some(p) => std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?,
            None => super::tokenizer::from_gguf(g)?
                .to_string(false)
                .map_err(|e| format!("writing tokenizer.json: {e}"))?
                .into_bytes(),
        };
        let tokens: Vec<String> = g
            .metadata()
            .get("tokenizer.ggml.tokens")
            .and_then(|v| v.to_vec().ok())
            .map(|v| {
                v.iter()
                    .map(|x| x.to_string().cloned().unwrap_or_default())
                    .collect()
            })
            .unwrap_or_default();
        let bos = g.uint("tokenizer.ggml.bos_token_id");
        let eos = g.uint("tokenizer.ggml.eos_token_id");
        let name = |id: Option<u64>| -> Option<serde_json::Value> {
            id.and_then(|i| tokens.get(i as usize))
                .map(|s| serde_json::Value::String(s.clone()))
        };
        let mut tc = BTreeMap::new();
        if let Some(t) = g.string("tokenizer.chat_template") {
            tc.insert("chat_template", serde_json::Value::String(t.to_string()));
        }
        if let Some(b) = name(bos) {
            tc.insert("bos_token", b);
        }
        if let Some(e) = name(eos) {
            tc.insert("eos_token", e);
        }
        let mut files = BTreeMap::new();
        files.insert("tokenizer.json".to_string(), tok_bytes);
        files.insert(
            "tokenizer_config.json".to_string(),
            serde_json::to_vec_pretty(&tc).map_err(|e| e.to_string())?,
        );
        Ok(HfExtras {
            rms_norm_eps: g
                .float("llama.attention.layer_norm_rms_epsilon")
                .unwrap_or(cfg.rms_eps as f64),
            rope_theta: g
                .float("llama.rope.freq_base")
                .unwrap_or(cfg.rope_base as f64),
            max_position_embeddings: cfg.context_length,
            sliding_window: None,
            bos_token_id: bos.map(Into::into),
            eos_token_id: eos.map(Into::into),
            files,
        })
    }
}

/// The `config.json` of a pruned model (keys sorted).
pub fn config_json(w: &LlamaWeights, extras: &HfExtras, dtype: HfDType) -> Result<Vec<u8>, String> {
    let cfg = &w.config;
    let first = w
        .layers
        .first()
        .ok_or("a model without layers cannot be written")?;
    let width = first.ffn_width();
    if let Some((i, l)) = w
        .layers
        .iter()
        .enumerate()
        .find(|(_, l)| l.ffn_width() != width)
    {
        return Err(format!(
            "layer {i} keeps {} FFN neurons, layer 0 keeps {width}: a safetensors config.json has one intermediate_size (write GGUF for per-layer widths)",
            l.ffn_width()
        ));
    }
    use serde_json::Value as V;
    let mut m: BTreeMap<&str, V> = BTreeMap::new();
    if w.is_qwen2() {
        let heads = first.n_heads(cfg.head_dim);
        if heads * cfg.head_dim != cfg.hidden {
            return Err(format!(
                "{heads} heads of width {} != hidden size {}: mistral.rs's qwen2 loader derives the head width from the hidden size, so a Qwen2 folder keeps every head",
                cfg.head_dim, cfg.hidden
            ));
        }
        m.insert("architectures", V::Array(vec!["Qwen2ForCausalLM".into()]));
        m.insert("model_type", "qwen2".into());
        m.insert("use_sliding_window", false.into());
    } else {
        m.insert("architectures", V::Array(vec!["MistralForCausalLM".into()]));
        m.insert("model_type", "mistral".into());
    }
    m.insert("vocab_size", cfg.vocab.into());
    m.insert("hidden_size", cfg.hidden.into());
    m.insert("intermediate_size", width.into());
    m.insert("num_hidden_layers", w.layers.len().into());
    m.insert("num_attention_heads", first.n_heads(cfg.head_dim).into());
    m.insert("num_key_value_heads", first.n_kv_heads(cfg.head_dim).into());
    m.insert("head_dim", cfg.head_dim.into());
    m.insert("hidden_act", "silu".into());
    m.insert(
        "max_position_embeddings",
        extras.max_position_embeddings.into(),
    );
    m.insert("rms_norm_eps", extras.rms_norm_eps.into());
    m.insert("rope_theta", extras.rope_theta.into());
    m.insert("sliding_window", extras.sliding_window.into());
    m.insert("tie_word_embeddings", w.output.is_none().into());
    m.insert("attention_dropout", 0.0.into());
    m.insert("use_cache", true.into());
    m.insert("torch_dtype", dtype.torch_name().into());
    m.insert("ziplm_version", env!("CARGO_PKG_VERSION").into());
    if let Some(b) = &extras.bos_token_id {
        m.insert("bos_token_id", b.clone());
    }
    if let Some(e) = &extras.eos_token_id {
        m.insert("eos_token_id", e.clone());
    }
    serde_json::to_vec_pretty(&m).map_err(|e| e.to_string())
}

/// The weights of `w` under Hugging Face names, Q / K rows back in rotate-half order;
/// norms f32, everything else in `dtype`.
pub fn hf_tensors(w: &LlamaWeights, dtype: HfDType) -> candle_core::Result<Vec<(String, Tensor)>> {
    let hd = w.config.head_dim;
    let d = dtype.candle();
    let mut out = vec![
        (
            "model.embed_tokens.weight".to_string(),
            w.embed.to_dtype(d)?,
        ),
        ("model.norm.weight".to_string(), w.norm.clone()),
    ];
    for (i, l) in w.layers.iter().enumerate() {
        let p = |n: &str| format!("model.layers.{i}.{n}.weight");
        out.extend([
            (p("input_layernorm"), l.attn_norm.clone()),
            (
                p("self_attn.q_proj"),
                to_rotate_half(&l.wq, l.n_heads(hd))?.to_dtype(d)?,
            ),
            (
                p("self_attn.k_proj"),
                to_rotate_half(&l.wk, l.n_kv_heads(hd))?.to_dtype(d)?,
            ),
            (p("self_attn.v_proj"), l.wv.to_dtype(d)?),
            (p("self_attn.o_proj"), l.wo.to_dtype(d)?),
            (p("post_attention_layernorm"), l.ffn_norm.clone()),
            (p("mlp.gate_proj"), l.gate.to_dtype(d)?),
            (p("mlp.up_proj"), l.up.to_dtype(d)?),
            (p("mlp.down_proj"), l.down.to_dtype(d)?),
        ]);
        if let Some(b) = &l.qkv_bias {
            let bias = |n: &str| format!("model.layers.{i}.self_attn.{n}.bias");
            let rotate_half = |t: &Tensor, heads: usize| -> candle_core::Result<Tensor> {
                let n = t.dims1()?;
                to_rotate_half(&t.reshape((n, 1))?, heads)?.reshape(n)
            };
            out.extend([
                (
                    bias("q_proj"),
                    rotate_half(&b.q, l.n_heads(hd))?.to_dtype(d)?,
                ),
                (
                    bias("k_proj"),
                    rotate_half(&b.k, l.n_kv_heads(hd))?.to_dtype(d)?,
                ),
                (bias("v_proj"), b.v.to_dtype(d)?),
            ]);
        }
    }
    if let Some(o) = &w.output {
        out.push(("lm_head.weight".to_string(), o.to_dtype(d)?));
    }
    // candle's `View` reads a tensor's storage as laid out: make each contiguous.
    out.into_iter()
        .map(|(n, t)| Ok((n, t.contiguous()?)))
        .collect()
}

/// Writes `w` as a model folder at `dest` (`config.json`, `model.safetensors` and the
/// extras' files), atomically: the folder is built beside `dest` and renamed into place.
/// Returns the bytes written.
pub fn write_folder(
    w: &LlamaWeights,
    extras: &HfExtras,
    dtype: HfDType,
    dest: &Path,
) -> AdapterResult<u64> {
    let config = config_json(w, extras, dtype).map_err(AdapterError::InvalidRequest)?;
    let tensors = hf_tensors(w, dtype)
        .map_err(|e| AdapterError::runtime("preparing safetensors tensors", e))?;
    let weights = safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), None)
        .map_err(|e| AdapterError::runtime("writing safetensors", e))?;
    let mut files: Vec<(&str, &[u8])> =
        vec![("config.json", &config), ("model.safetensors", &weights)];
    files.extend(extras.files.iter().map(|(n, b)| (n.as_str(), b.as_slice())));
    crate::fsutil::write_dir_atomic(dest, &files).map_err(|e| match e {
        crate::Error::Io { path, source } => AdapterError::Io { path, source },
        other => AdapterError::runtime("writing the model folder", other),
    })?;
    Ok(files.iter().map(|(_, b)| b.len() as u64).sum())
}
