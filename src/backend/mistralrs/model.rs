//! A Llama model (GGUF file or Hugging Face folder) as the engine sees it: loading, the
//! prunable structure with the shape constraints stock mistral.rs serves in the output
//! format, calibration, and the pruned weights.

use super::gguf::GgufFile;
use super::hf::{HfDType, HfExtras, HfFolder, ReadError};
use super::llama::{LayerWeights, LlamaConfig, LlamaWeights, QkvBias, Site};
use candle_core::Tensor;
use std::path::{Path, PathBuf};
use ziplm_plugin_api::{
    ActivationSink, AdapterError, AdapterResult, AttentionShape, BlockId, BlockKind, FfnShape,
    GqaPolicy, LayerIndex, ModelStructure, ModuleRemoval, Plan, PrunableBlock, PrunedWeights,
    ShapeConstraints, WeightMatrix,
};

pub use super::options::GgufDType as OutputDType;
pub use super::options::LlmFormat;

pub use super::emit::ggml_dtype;

/// Options for loading a Llama model.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaOptions {
    /// How GQA heads may be removed.
    pub gqa_policy: GqaPolicy,
    /// Type of the emitted projections (GGUF: any; safetensors: F32 or F16).
    pub output_dtype: OutputDType,
    /// Format of the emitted models; `None` = the source's format.
    pub format: Option<LlmFormat>,
    /// A `tokenizer.json` to write into emitted folders of a GGUF source (default: built
    /// from the GGUF metadata).
    pub tokenizer_json: Option<PathBuf>,
}

impl Default for LlamaOptions {
    fn default() -> Self {
        LlamaOptions {
            gqa_policy: GqaPolicy::EqualPerKvGroup,
            output_dtype: OutputDType::F32,
            format: None,
            tokenizer_json: None,
        }
    }
}

/// Where a model was read from.
// One value per loaded model: boxing the large variant would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum Source {
    /// A GGUF file (metadata and stored embeddings are copied into emitted GGUF files).
    Gguf(GgufFile),
    /// A Hugging Face folder.
    Hf(HfFolder),
}

/// A loaded Llama model: f32 weights, the source and calibration samples.
pub struct LlamaModel {
    /// The source file or folder.
    pub path: PathBuf,
    /// What was read.
    pub source: Source,
    /// Dense weights in f32 (GGUF layout: Q/K rows for interleaved RoPE).
    pub weights: LlamaWeights,
    /// Options given at load.
    pub options: LlamaOptions,
    /// The format emitted models are written in.
    pub format: LlmFormat,
    /// Tokenizer files and settings for emitted folders (safetensors output only).
    pub hf_extras: Option<HfExtras>,
    structure: ModelStructure,
    samples: Vec<Vec<u32>>,
}

fn invalid(path: &Path, detail: impl Into<String>) -> AdapterError {
    AdapterError::InvalidModel {
        path: path.into(),
        detail: detail.into(),
    }
}

fn candle_err<'a>(path: &'a Path, what: &str) -> impl Fn(candle_core::Error) -> AdapterError + 'a {
    let what = what.to_string();
    move |e| invalid(path, format!("{what}: {e}"))
}

/// Reads the Llama hyper-parameters from GGUF metadata.
fn config_from(g: &GgufFile) -> Result<LlamaConfig, String> {
    let arch = g
        .string("general.architecture")
        .ok_or("general.architecture is missing")?;
    if arch != "llama" {
        return Err(format!(
            "architecture `{arch}` is not supported: the mistral.rs backend prunes `llama` GGUF models (Llama, SmolLM, TinyLlama, Mistral-style dense models)"
        ));
    }
    let req = |k: &str| {
        g.uint(&format!("llama.{k}"))
            .ok_or(format!("llama.{k} is missing"))
    };
    if g.uint("llama.expert_count").unwrap_or(0) > 0 {
        return Err("mixture-of-experts llama models are not supported".into());
    }
    let n_layers = req("block_count")? as usize;
    let hidden = req("embedding_length")? as usize;
    let n_heads = req("attention.head_count")? as usize;
    let n_kv_heads = g
        .uint("llama.attention.head_count_kv")
        .unwrap_or(n_heads as u64) as usize;
    if n_layers == 0 || hidden == 0 || n_heads == 0 || n_kv_heads == 0 {
        return Err("block_count, embedding_length and head counts must be positive".into());
    }
    if !n_heads.is_multiple_of(n_kv_heads) {
        return Err(format!(
            "{n_heads} query heads are not a multiple of {n_kv_heads} KV heads"
        ));
    }
    let head_dim = g
        .uint("llama.attention.key_length")
        .map(|v| v as usize)
        .unwrap_or(hidden / n_heads);
    let rope_dim = g
        .uint("llama.rope.dimension_count")
        .map(|v| v as usize)
        .unwrap_or(head_dim);
    if rope_dim != head_dim {
        return Err(format!(
            "partial rotary embeddings (rope.dimension_count {rope_dim} != head dim {head_dim}) are not supported"
        ));
    }
    Ok(LlamaConfig {
        n_layers,
        hidden,
        n_heads,
        n_kv_heads,
        head_dim,
        ffn_width: req("feed_forward_length")? as usize,
        rope_dim,
        rope_base: g.float("llama.rope.freq_base").unwrap_or(10_000.0) as f32,
        rms_eps: g
            .float("llama.attention.layer_norm_rms_epsilon")
            .ok_or("llama.attention.layer_norm_rms_epsilon is missing")? as f32,
        vocab: 0,
        context_length: req("context_length")? as usize,
    })
}

/// Loads one tensor as f32 and checks its shape.
fn load(g: &GgufFile, name: &str, shape: &[usize]) -> Result<Tensor, String> {
    let got = g.shape(name).ok_or(format!("tensor `{name}` is missing"))?;
    if got != shape {
        return Err(format!(
            "tensor `{name}` has shape {got:?}, the metadata implies {shape:?}"
        ));
    }
    g.f32_tensor(name)
}

/// Loads and checks every weight of a Llama GGUF file.
fn weights_from(g: &GgufFile, mut cfg: LlamaConfig) -> Result<LlamaWeights, String> {
    let embed_shape = g
        .shape("token_embd.weight")
        .ok_or("tensor `token_embd.weight` is missing")?;
    if embed_shape.len() != 2 || embed_shape[1] != cfg.hidden {
        return Err(format!(
            "token_embd.weight has shape {embed_shape:?}, expected [vocab, {}]",
            cfg.hidden
        ));
    }
    cfg.vocab = embed_shape[0];
    let (h, hd) = (cfg.hidden, cfg.head_dim);
    let embed = g.f32_tensor("token_embd.weight")?;
    let norm = load(g, "output_norm.weight", &[h])?;
    let output = if g.has_tensor("output.weight") {
        Some(load(g, "output.weight", &[cfg.vocab, h])?)
    } else {
        None
    };
    let mut layers = vec![];
    for i in 0..cfg.n_layers {
        let p = |n: &str| format!("blk.{i}.{n}.weight");
        let width = g
            .shape(&p("ffn_gate"))
            .and_then(|s| s.first().copied())
            .ok_or(format!("tensor `{}` is missing", p("ffn_gate")))?;
        layers.push(LayerWeights {
            attn_norm: load(g, &p("attn_norm"), &[h])?,
            wq: load(g, &p("attn_q"), &[cfg.n_heads * hd, h])?,
            wk: load(g, &p("attn_k"), &[cfg.n_kv_heads * hd, h])?,
            wv: load(g, &p("attn_v"), &[cfg.n_kv_heads * hd, h])?,
            wo: load(g, &p("attn_output"), &[h, cfg.n_heads * hd])?,
            ffn_norm: load(g, &p("ffn_norm"), &[h])?,
            gate: load(g, &p("ffn_gate"), &[width, h])?,
            up: load(g, &p("ffn_up"), &[width, h])?,
            down: load(g, &p("ffn_down"), &[h, width])?,
            qkv_bias: None,
        });
    }
    Ok(LlamaWeights {
        config: cfg,
        embed,
        norm,
        output,
        layers,
    })
}

/// The prunable blocks of a Llama model and what stock mistral.rs serves after pruning:
/// one head count for every layer (GGUF stores a single `head_count`, config.json a single
/// `num_attention_heads`), per-layer FFN widths in whole quantisation blocks for GGUF and
/// one width for every layer for safetensors (`intermediate_size`), and whole layers
/// dropped (not attention or FFN alone).
pub fn structure_of(w: &LlamaWeights, options: &LlamaOptions, format: LlmFormat) -> ModelStructure {
    let cfg = &w.config;
    let mut blocks = vec![];
    for (i, l) in w.layers.iter().enumerate() {
        blocks.push(PrunableBlock {
            id: BlockId(blocks.len() as u32),
            layer: LayerIndex(i as u32),
            kind: BlockKind::Attention(AttentionShape {
                n_heads: l.n_heads(cfg.head_dim),
                n_kv_heads: l.n_kv_heads(cfg.head_dim),
                head_dim: cfg.head_dim,
            }),
            hidden: cfg.hidden,
            name: format!("blk.{i}.attn"),
        });
        blocks.push(PrunableBlock {
            id: BlockId(blocks.len() as u32),
            layer: LayerIndex(i as u32),
            kind: BlockKind::Ffn(FfnShape {
                width: l.ffn_width(),
                gated: true,
            }),
            hidden: cfg.hidden,
            name: format!("blk.{i}.ffn"),
        });
    }
    // Qwen2 (Q/K/V biases): mistral.rs's qwen2 loader derives the head width from
    // hidden_size / num_attention_heads, so every head stays.
    let qwen2 = w.is_qwen2();
    ModelStructure {
        architecture: if qwen2 { "qwen2" } else { "llama" }.into(),
        blocks,
        constraints: ShapeConstraints {
            gqa_policy: options.gqa_policy,
            uniform_heads: true,
            uniform_ffn_width: format == LlmFormat::Safetensors,
            // 32 keeps the number of widths to profile small; K-quants need 256.
            ffn_width_multiple: ggml_dtype(options.output_dtype).block_size().max(32),
            module_removal: ModuleRemoval::WholeLayerOnly,
            fixed_heads: qwen2,
        },
    }
}

impl LlamaModel {
    /// The tensor type a GGUF file stores most of its projections in
    /// ([`GgufFile::projection_type`]); `None` for a folder.
    pub fn projection_type(&self) -> Option<candle_core::quantized::GgmlDType> {
        match &self.source {
            Source::Gguf(g) => g.projection_type(),
            Source::Hf(_) => None,
        }
    }

    /// Loads a Llama GGUF file or Hugging Face folder.
    pub fn load(path: &Path, options: LlamaOptions) -> AdapterResult<LlamaModel> {
        let unsupported = |detail: String, hint: &str| AdapterError::Unsupported {
            what: "model".into(),
            detail,
            hint: hint.into(),
        };
        let (source, weights) = if path.is_dir() {
            let folder = HfFolder::open(path).map_err(|e| match e {
                ReadError::Unsupported(m) => unsupported(
                    m,
                    "give a Llama, Mistral or Qwen2 model folder, or a llama GGUF file",
                ),
                ReadError::Invalid(m) => invalid(path, m),
            })?;
            let weights = folder.read_weights().map_err(|e| invalid(path, e))?;
            (Source::Hf(folder), weights)
        } else if path.is_file() {
            let gguf = GgufFile::open(path).map_err(|e| invalid(path, e))?;
            let cfg = config_from(&gguf).map_err(|e| {
                if e.contains("not supported") {
                    unsupported(
                        format!("{}: {e}", path.display()),
                        "give a llama-architecture GGUF file",
                    )
                } else {
                    invalid(path, e)
                }
            })?;
            let weights = weights_from(&gguf, cfg).map_err(|e| invalid(path, e))?;
            (Source::Gguf(gguf), weights)
        } else {
            return Err(AdapterError::Io {
                path: path.into(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no such model file or folder",
                ),
            });
        };
        check_finite(&weights, matches!(source, Source::Hf(_))).map_err(|e| invalid(path, e))?;
        let format = match (&source, options.format) {
            (_, Some(f)) => f,
            (Source::Gguf(_), None) => LlmFormat::Gguf,
            (Source::Hf(_), None) => LlmFormat::Safetensors,
        };
        let hf_extras = match (&source, format) {
            (Source::Hf(_), LlmFormat::Gguf) => {
                return Err(unsupported(
                    format!("{}: GGUF output needs a GGUF source (its tokenizer and metadata are copied)", path.display()),
                    "write a safetensors folder (output.format = \"safetensors\", --llm-format safetensors), or convert the model to GGUF first",
                ))
            }
            (_, LlmFormat::Gguf) => None,
            (Source::Hf(f), LlmFormat::Safetensors) => {
                Some(HfExtras::from_folder(f, options.tokenizer_json.as_deref()).map_err(|e| invalid(path, e))?)
            }
            (Source::Gguf(g), LlmFormat::Safetensors) => Some(
                HfExtras::from_gguf(g, &weights.config, options.tokenizer_json.as_deref())
                    .map_err(|e| invalid(path, e))?,
            ),
        };
        if format == LlmFormat::Safetensors {
            hf_dtype(options.output_dtype)?;
        }
        let structure = structure_of(&weights, &options, format);
        Ok(LlamaModel {
            path: path.into(),
            source,
            weights,
            options,
            format,
            hf_extras,
            structure,
            samples: vec![],
        })
    }

    /// The GGUF source, if the model was read from one.
    pub fn gguf(&self) -> Option<&GgufFile> {
        match &self.source {
            Source::Gguf(g) => Some(g),
            Source::Hf(_) => None,
        }
    }

    /// Sets the calibration samples (token ids below the vocabulary size).
    pub fn set_calibration(&mut self, samples: Vec<Vec<i64>>) -> AdapterResult<()> {
        let out = self.token_windows(&samples)?;
        if out.is_empty() {
            return Err(AdapterError::Calibration(
                "no calibration samples; give calibration text".into(),
            ));
        }
        self.samples = out;
        Ok(())
    }

    /// Windows of token ids checked against the model (below the vocabulary size, within
    /// the context) as the forward takes them; empty windows are dropped.
    pub fn token_windows(&self, samples: &[Vec<i64>]) -> AdapterResult<Vec<Vec<u32>>> {
        let vocab = self.weights.config.vocab as i64;
        let mut out = vec![];
        for s in samples {
            if let Some(bad) = s.iter().find(|&&t| t < 0 || t >= vocab) {
                return Err(AdapterError::Calibration(format!(
                    "token id {bad} is outside the vocabulary (0..{vocab}); the tokenizer does not match the model"
                )));
            }
            if s.len() > self.weights.config.context_length {
                return Err(AdapterError::Calibration(format!(
                    "a sample of {} tokens is longer than the model's context ({})",
                    s.len(),
                    self.weights.config.context_length
                )));
            }
            if !s.is_empty() {
                out.push(s.iter().map(|&t| t as u32).collect());
            }
        }
        Ok(out)
    }

    /// The calibration samples.
    pub fn calibration_samples(&self) -> &[Vec<u32>] {
        &self.samples
    }

    /// The f32 weights of the model a plan describes, with compensated out-projections.
    pub fn pruned_weights(
        &self,
        plan: &Plan,
        compensated: &PrunedWeights,
    ) -> AdapterResult<LlamaWeights> {
        plan.validate_for(&self.structure)
            .map_err(AdapterError::InvalidRequest)?;
        prune(&self.weights, &self.structure, plan, compensated)
    }
}

/// The safetensors element type for an output type (quantised types are GGUF only).
pub fn hf_dtype(d: OutputDType) -> AdapterResult<HfDType> {
    match d {
        OutputDType::F32 => Ok(HfDType::F32),
        OutputDType::F16 => Ok(HfDType::F16),
        other => Err(AdapterError::InvalidRequest(format!(
            "{other:?} is a GGUF tensor type: safetensors folders are written in f32 or f16 (--gguf-dtype f32|f16)"
        ))),
    }
}

/// Refuses NaN / infinite projection weights, naming the tensor as the source names it.
fn check_finite(w: &LlamaWeights, hf_names: bool) -> Result<(), String> {
    let bad = |t: &Tensor| -> bool {
        t.flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .map(|v| v.iter().any(|x| !x.is_finite()))
            .unwrap_or(true)
    };
    for (i, l) in w.layers.iter().enumerate() {
        for (gguf_name, hf_name, t) in [
            ("attn_q", "self_attn.q_proj", &l.wq),
            ("attn_k", "self_attn.k_proj", &l.wk),
            ("attn_v", "self_attn.v_proj", &l.wv),
            ("attn_output", "self_attn.o_proj", &l.wo),
            ("ffn_gate", "mlp.gate_proj", &l.gate),
            ("ffn_up", "mlp.up_proj", &l.up),
            ("ffn_down", "mlp.down_proj", &l.down),
        ] {
            if bad(t) {
                let name = match hf_names {
                    true => format!("model.layers.{i}.{hf_name}.weight"),
                    false => format!("blk.{i}.{gguf_name}.weight"),
                };
                return Err(format!("tensor `{name}` holds NaN or infinite values"));
            }
        }
    }
    Ok(())
}

fn rows(t: &Tensor, idx: &[usize]) -> candle_core::Result<Tensor> {
    let idx: Vec<u32> = idx.iter().map(|&i| i as u32).collect();
    t.index_select(&Tensor::new(idx.as_slice(), t.device())?, 0)
}

fn cols(t: &Tensor, idx: &[usize]) -> candle_core::Result<Tensor> {
    let idx: Vec<u32> = idx.iter().map(|&i| i as u32).collect();
    t.index_select(&Tensor::new(idx.as_slice(), t.device())?, 1)?
        .contiguous()
}

fn matrix(m: &WeightMatrix) -> candle_core::Result<Tensor> {
    Tensor::from_slice(&m.data, (m.rows, m.cols), &super::target_device())
}

/// Applies a plan: rows of Q/K/V and gate/up removed, out-projection columns kept or
/// replaced by the compensated ones, layers with nothing kept dropped. Refuses plans
/// stock mistral.rs cannot load (attention or FFN removed alone, differing head counts,
/// a head that no longer reads its own KV head).
pub fn prune(
    dense: &LlamaWeights,
    structure: &ModelStructure,
    plan: &Plan,
    compensated: &PrunedWeights,
) -> AdapterResult<LlamaWeights> {
    let hd = dense.config.head_dim;
    let ce = |e: candle_core::Error| AdapterError::runtime("pruning weights", e);
    use ziplm_plugin_api::{ROLE_GATE, ROLE_K, ROLE_Q, ROLE_UP, ROLE_V};
    let writes = |b: BlockId, role: &str| match structure.block(b).map(|b| b.kind) {
        Some(BlockKind::Attention(_)) => [ROLE_Q, ROLE_K, ROLE_V].contains(&role),
        Some(BlockKind::Ffn(_)) => [ROLE_GATE, ROLE_UP].contains(&role),
        None => false,
    };
    if let Some((b, role)) = compensated.unwritable(writes) {
        return Err(AdapterError::InvalidRequest(format!(
            "{b}: the mistralrs backend cannot write a replaced `{role}` tensor (it writes q_proj, k_proj, v_proj for attention and gate_proj, up_proj for FFNs)"
        )));
    }
    // A stage's replacement of a sliced tensor, which must have the sliced shape.
    let replaced = |b: BlockId, role: &str, sliced: Tensor| -> AdapterResult<Tensor> {
        let Some(m) = compensated.tensor(b, role) else {
            return Ok(sliced);
        };
        let (r, c) = sliced.dims2().map_err(ce)?;
        if (m.rows, m.cols) != (r, c) {
            return Err(AdapterError::InvalidRequest(format!(
                "{b}: the replaced `{role}` is {}x{}, the pruned tensor is {r}x{c}",
                m.rows, m.cols
            )));
        }
        matrix(m).map_err(ce)
    };
    let mut layers = vec![];
    let mut heads: Option<(usize, usize)> = None;
    for (i, layer) in dense.layers.iter().enumerate() {
        let find = |attn: bool| {
            structure
                .blocks
                .iter()
                .find(|b| b.layer.0 as usize == i && b.kind.is_attention() == attn)
                .map(|b| &plan.blocks[b.id.index()])
                .ok_or_else(|| AdapterError::InvalidRequest(format!("layer {i} has no blocks")))
        };
        let (pa, pf) = (find(true)?, find(false)?);
        match (pa.kept.is_empty(), pf.kept.is_empty()) {
            (true, true) => continue,
            (false, false) => {}
            _ => {
                return Err(AdapterError::InvalidRequest(format!(
                    "layer {i}: removing only its attention or only its FFN cannot be served by mistral.rs (whole layers only)"
                )))
            }
        }
        let BlockKind::Attention(a) = pa.kind else {
            return Err(AdapterError::InvalidRequest(
                "block kinds out of order".into(),
            ));
        };
        let (nh, nkv) = (pa.kept.len(), pa.kept_kv_heads.len());
        if nh % nkv != 0 {
            return Err(AdapterError::InvalidRequest(format!(
                "layer {i}: {nh} heads over {nkv} KV heads"
            )));
        }
        // mistral.rs maps new head j to new KV head j / (nh / nkv): that must be the KV
        // head it used before.
        for (j, &h) in pa.kept.iter().enumerate() {
            if pa.kept_kv_heads[j / (nh / nkv)] != h / a.heads_per_kv() {
                return Err(AdapterError::InvalidRequest(format!(
                    "layer {i}: kept heads {:?} do not keep the same number of heads in every KV group",
                    pa.kept
                )));
            }
        }
        match heads {
            None => heads = Some((nh, nkv)),
            Some(h) if h != (nh, nkv) => {
                return Err(AdapterError::InvalidRequest(format!(
                    "layer {i} keeps {nh} heads / {nkv} KV heads, an earlier layer {} / {}: GGUF has one head count for all layers",
                    h.0, h.1
                )))
            }
            _ => {}
        }
        let head_rows = |hs: &[usize]| -> Vec<usize> {
            hs.iter().flat_map(|&h| h * hd..(h + 1) * hd).collect()
        };
        let q_rows = head_rows(&pa.kept);
        let kv_rows = head_rows(&pa.kept_kv_heads);
        let wo = match compensated.out_projections.get(&pa.block) {
            Some(m) => matrix(m).map_err(ce)?,
            None => cols(&layer.wo, &q_rows).map_err(ce)?,
        };
        let down = match compensated.out_projections.get(&pf.block) {
            Some(m) => matrix(m).map_err(ce)?,
            None => cols(&layer.down, &pf.kept).map_err(ce)?,
        };
        layers.push(LayerWeights {
            attn_norm: layer.attn_norm.clone(),
            wq: replaced(pa.block, ROLE_Q, rows(&layer.wq, &q_rows).map_err(ce)?)?,
            wk: replaced(pa.block, ROLE_K, rows(&layer.wk, &kv_rows).map_err(ce)?)?,
            wv: replaced(pa.block, ROLE_V, rows(&layer.wv, &kv_rows).map_err(ce)?)?,
            wo,
            ffn_norm: layer.ffn_norm.clone(),
            gate: replaced(
                pf.block,
                ROLE_GATE,
                rows(&layer.gate, &pf.kept).map_err(ce)?,
            )?,
            up: replaced(pf.block, ROLE_UP, rows(&layer.up, &pf.kept).map_err(ce)?)?,
            down,
            qkv_bias: match &layer.qkv_bias {
                Some(b) => Some(QkvBias {
                    q: rows(&b.q, &q_rows).map_err(ce)?,
                    k: rows(&b.k, &kv_rows).map_err(ce)?,
                    v: rows(&b.v, &kv_rows).map_err(ce)?,
                }),
                None => None,
            },
        });
    }
    if layers.is_empty() {
        return Err(AdapterError::InvalidRequest(
            "the plan removes every layer".into(),
        ));
    }
    Ok(LlamaWeights {
        config: dense.config.clone(),
        embed: dense.embed.clone(),
        norm: dense.norm.clone(),
        output: dense.output.clone(),
        layers,
    })
}

impl ziplm_plugin_api::ModelAdapter for LlamaModel {
    fn set_calibration(&mut self, samples: Vec<Vec<i64>>) -> AdapterResult<()> {
        LlamaModel::set_calibration(self, samples)
    }

    fn vocab_size(&self) -> Option<usize> {
        Some(self.weights.config.vocab)
    }

    fn structure(&self) -> &ModelStructure {
        &self.structure
    }

    fn paired_streams(&self) -> AdapterResult<Box<dyn ziplm_plugin_api::PairedStreams + '_>> {
        Ok(Box::new(super::sequential::LlamaStreams::new(
            &self.weights,
            &self.structure,
            &self.samples,
        )?))
    }

    fn calibrate(
        &mut self,
        capture: &[BlockId],
        sink: &mut dyn ActivationSink,
    ) -> AdapterResult<()> {
        if self.samples.is_empty() {
            return Err(AdapterError::Calibration(
                "no calibration samples were set".into(),
            ));
        }
        let wanted = |layer: usize, site: Site| -> Option<BlockId> {
            if site == Site::LayerOut {
                return None;
            }
            capture.iter().copied().find(|b| {
                let blk = &self.structure.blocks[b.index()];
                blk.layer.0 as usize == layer && blk.kind.is_attention() == (site == Site::AttnOut)
            })
        };
        let mut failure: Option<AdapterError> = None;
        for s in &self.samples {
            let mut hook = |layer: usize, site: Site, x: &Tensor| -> candle_core::Result<()> {
                let Some(b) = wanted(layer, site) else {
                    return Ok(());
                };
                let width = x.dims()[1];
                let v = x.flatten_all()?.to_vec1::<f32>()?;
                if let Err(e) = sink.accept(b, &v, width) {
                    failure = Some(e);
                    return Err(candle_core::Error::Msg("calibration stopped".into()));
                }
                Ok(())
            };
            let r = self.weights.forward(s, false, &mut hook);
            if let Some(e) = failure.take() {
                return Err(e);
            }
            r.map_err(|e| AdapterError::runtime("the calibration forward pass", e))?;
        }
        Ok(())
    }

    fn out_projection(&self, block: BlockId) -> AdapterResult<WeightMatrix> {
        let b = self
            .structure
            .block(block)
            .ok_or_else(|| AdapterError::InvalidRequest(format!("no {block}")))?;
        let l = &self.weights.layers[b.layer.0 as usize];
        let t = if b.kind.is_attention() {
            &l.wo
        } else {
            &l.down
        };
        let (r, c) = t.dims2().map_err(candle_err(&self.path, "weights"))?;
        let data = t
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(candle_err(&self.path, "weights"))?;
        Ok(WeightMatrix {
            rows: r,
            cols: c,
            data,
        })
    }

    fn emit(
        &self,
        plan: &Plan,
        weights: &PrunedWeights,
        dest: &Path,
    ) -> AdapterResult<ziplm_plugin_api::EmitSummary> {
        let pruned = self.pruned_weights(plan, weights)?;
        let bytes = match (&self.source, &self.hf_extras) {
            (_, Some(extras)) => super::hf::write_folder(
                &pruned,
                extras,
                hf_dtype(self.options.output_dtype)?,
                dest,
            )?,
            (Source::Gguf(g), None) => {
                super::emit::write_gguf(g, &pruned, self.options.output_dtype, dest)?
            }
            (Source::Hf(_), None) => {
                return Err(AdapterError::InvalidRequest(
                    "a folder source is written as a folder".into(),
                ))
            }
        };
        let params = |w: &LlamaWeights| -> u64 {
            w.layers
                .iter()
                .map(|l| {
                    [&l.wq, &l.wk, &l.wv, &l.wo, &l.gate, &l.up, &l.down]
                        .iter()
                        .map(|t| t.elem_count() as u64)
                        .sum::<u64>()
                })
                .sum()
        };
        Ok(ziplm_plugin_api::EmitSummary {
            path: dest.into(),
            bytes,
            params_before: params(&self.weights),
            params_after: params(&pruned),
        })
    }
}
