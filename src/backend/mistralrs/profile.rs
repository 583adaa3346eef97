//! Timing Llama block shapes with candle's kernels, as mistral.rs runs them.
//!
//! mistral.rs's GGUF llama multiplies every projection through candle's `QMatMul` (a
//! plain f32/f16 `matmul` for float tensors, candle's quantised kernels otherwise), on
//! `[batch, tokens, hidden]` activations. Each block shape is timed alone, built from
//! layer 0's weights cut to that shape and stored in the emitted type, on the workload:
//! prefill (`batch x seq_len` tokens from position 0) or decode (`seq_len` new tokens,
//! usually 1, attending to `kv_len` cached keys and values that the step concatenates its
//! own onto, as mistral.rs's cache does): the attention sub-layer (RMSNorm, Q/K/V, RoPE,
//! causal grouped attention, output projection, residual) or the FFN sub-layer (RMSNorm,
//! gate, up, SiLU, down, residual). The rest is the embedding lookup, the final norm
//! and the output head on the last position. This times candle, not mistral.rs itself
//! (whose engine adds scheduling around the same kernels); the end-to-end verification
//! in mistral.rs corrects the difference.

use super::llama::{LayerWeights, LlamaConfig};
use super::model::{LlamaModel, LlmFormat, OutputDType};
use candle_core::quantized::QMatMul;
use candle_core::{DType, Module, Tensor};
use std::time::{Duration, Instant};
use ziplm_plugin_api::{
    AdapterError, AdapterResult, BlockShape, LatencyProfiler, Measured, TargetFingerprint,
    TimedRun, Workload,
};

/// The candle version the backend is built with (the one mistralrs-core 0.8.1 uses).
pub const CANDLE_VERSION: &str = "0.10.2";

/// Threads candle's CPU kernels use (`RAYON_NUM_THREADS`, else every core).
pub fn candle_threads() -> usize {
    candle_core::utils::get_num_threads()
}

/// Times shapes of one Llama model on this CPU with candle.
pub struct CandleProfiler<'m> {
    model: &'m LlamaModel,
    dtype: OutputDType,
}

impl<'m> CandleProfiler<'m> {
    /// A profiler for `model`, timing projections stored as `dtype`.
    pub fn new(model: &'m LlamaModel, dtype: OutputDType) -> Self {
        CandleProfiler { model, dtype }
    }
}

/// The GGUF tensor the output head multiplies by (the embedding when tied).
fn output_head(g: &super::gguf::GgufFile) -> &'static str {
    match g.has_tensor("output.weight") {
        true => "output.weight",
        false => "token_embd.weight",
    }
}

fn ce(e: candle_core::Error) -> AdapterError {
    AdapterError::runtime("timing a block with candle", e)
}

/// A projection as mistral.rs holds it.
fn qmatmul(w: &Tensor, dtype: OutputDType) -> candle_core::Result<QMatMul> {
    QMatMul::from_qtensor(super::emit::quantize(w, super::emit::ggml_dtype(dtype))?)
}

/// The first `n` rows of `t`.
fn head(t: &Tensor, n: usize) -> candle_core::Result<Tensor> {
    t.narrow(0, 0, n)?.contiguous()
}

struct AttentionRun {
    x: Tensor,
    norm: Tensor,
    eps: f32,
    q: QMatMul,
    k: QMatMul,
    v: QMatMul,
    o: QMatMul,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    cos: Tensor,
    sin: Tensor,
    mask: Tensor,
    /// Decode: the cached keys and values `[batch, kv_heads, kv_len, head_dim]` the new
    /// tokens attend to (mistral.rs concatenates the new ones onto its cache each step).
    cache: Option<(Tensor, Tensor)>,
}

impl AttentionRun {
    fn forward(&self) -> candle_core::Result<Tensor> {
        let (b, t, _) = self.x.dims3()?;
        let hd = self.head_dim;
        let h = candle_nn::ops::rms_norm(&self.x, &self.norm, self.eps)?;
        let split = |y: Tensor, n: usize| -> candle_core::Result<Tensor> {
            y.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()
        };
        let q = split(self.q.forward(&h)?, self.heads)?;
        let k = split(self.k.forward(&h)?, self.kv_heads)?;
        let v = split(self.v.forward(&h)?, self.kv_heads)?;
        let q = candle_nn::rotary_emb::rope_i(&q, &self.cos, &self.sin)?;
        let k = candle_nn::rotary_emb::rope_i(&k, &self.cos, &self.sin)?;
        let (k, v) = match &self.cache {
            Some((kc, vc)) => (Tensor::cat(&[kc, &k], 2)?, Tensor::cat(&[vc, &v], 2)?),
            None => (k, v),
        };
        let keys = k.dims()[2];
        let group = self.heads / self.kv_heads;
        let rep = |x: Tensor| -> candle_core::Result<Tensor> {
            if group == 1 {
                return Ok(x);
            }
            x.unsqueeze(2)?
                .expand((b, self.kv_heads, group, keys, hd))?
                .reshape((b, self.heads, keys, hd))
        };
        let (k, v) = (rep(k)?, rep(v)?);
        let scores =
            (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?.broadcast_add(&self.mask)?;
        let y = candle_nn::ops::softmax_last_dim(&scores)?
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, t, self.heads * hd))?;
        &self.x + self.o.forward(&y)?
    }
}

struct FfnRun {
    x: Tensor,
    norm: Tensor,
    eps: f32,
    gate: QMatMul,
    up: QMatMul,
    down: QMatMul,
}

impl FfnRun {
    fn forward(&self) -> candle_core::Result<Tensor> {
        let h = candle_nn::ops::rms_norm(&self.x, &self.norm, self.eps)?;
        let g = candle_nn::ops::silu(&self.gate.forward(&h)?)?;
        let y = (g * self.up.forward(&h)?)?;
        &self.x + self.down.forward(&y)?
    }
}

struct RestRun {
    ids: Tensor,
    embed: Tensor,
    norm: Tensor,
    eps: f32,
    output: QMatMul,
}

impl RestRun {
    fn forward(&self) -> candle_core::Result<Tensor> {
        let x = self.embed.index_select(&self.ids, 0)?;
        let n = x.dims()[0];
        let last = x.narrow(0, n - 1, 1)?;
        let h = candle_nn::ops::rms_norm(&last, &self.norm, self.eps)?;
        self.output.forward(&h)
    }
}

enum Run {
    Attention(AttentionRun),
    Ffn(FfnRun),
    Rest(RestRun),
}

impl TimedRun for Run {
    fn run(&mut self) -> AdapterResult<Duration> {
        let start = Instant::now();
        let out = match self {
            Run::Attention(a) => a.forward(),
            Run::Ffn(f) => f.forward(),
            Run::Rest(r) => r.forward(),
        }
        .map_err(ce)?;
        // Make sure the work is done (candle's CPU ops are eager; this is a cheap read).
        let _ = out.dims();
        Ok(start.elapsed())
    }
}

fn input(cfg: &LlamaConfig, workload: &Workload) -> candle_core::Result<Tensor> {
    let n = workload.batch * workload.seq_len * cfg.hidden;
    let v: Vec<f32> = (0..n)
        .map(|i| ((i * 7919 % 1000) as f32 / 1000.0) - 0.5)
        .collect();
    Tensor::from_vec(
        v,
        (workload.batch, workload.seq_len, cfg.hidden),
        &super::target_device(),
    )
}

/// Tokens already in the KV cache for a workload (0 for prefill).
fn cached_tokens(workload: &Workload) -> usize {
    match workload.phase {
        ziplm_plugin_api::Phase::Prefill => 0,
        ziplm_plugin_api::Phase::Decode { kv_len } => kv_len,
    }
}

fn attention_run(
    cfg: &LlamaConfig,
    l: &LayerWeights,
    heads: usize,
    kv_heads: usize,
    dtype: OutputDType,
    workload: &Workload,
) -> candle_core::Result<AttentionRun> {
    let hd = cfg.head_dim;
    let t = workload.seq_len;
    let past = cached_tokens(workload);
    let inv: Vec<f32> = (0..hd)
        .step_by(2)
        .map(|i| 1f32 / cfg.rope_base.powf(i as f32 / hd as f32))
        .collect();
    let inv = Tensor::from_vec(inv, (1, hd / 2), &super::target_device())?;
    // The new tokens sit at positions past..past + t.
    let pos = Tensor::arange(past as u32, (past + t) as u32, &super::target_device())?
        .to_dtype(DType::F32)?
        .reshape((t, 1))?;
    let freqs = pos.matmul(&inv)?;
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| {
            (0..past + t).map(move |j| if j > past + i { f32::NEG_INFINITY } else { 0.0 })
        })
        .collect();
    let cache = match past {
        0 => None,
        n => {
            let len = workload.batch * kv_heads * n * hd;
            let v: Vec<f32> = (0..len)
                .map(|i| ((i * 7907 % 1000) as f32 / 1000.0) - 0.5)
                .collect();
            let kc = Tensor::from_vec(
                v,
                (workload.batch, kv_heads, n, hd),
                &super::target_device(),
            )?;
            Some((kc.clone(), kc))
        }
    };
    Ok(AttentionRun {
        x: input(cfg, workload)?,
        norm: l.attn_norm.clone(),
        eps: cfg.rms_eps,
        q: qmatmul(&head(&l.wq, heads * hd)?, dtype)?,
        k: qmatmul(&head(&l.wk, kv_heads * hd)?, dtype)?,
        v: qmatmul(&head(&l.wv, kv_heads * hd)?, dtype)?,
        o: qmatmul(&l.wo.narrow(1, 0, heads * hd)?.contiguous()?, dtype)?,
        heads,
        kv_heads,
        head_dim: hd,
        cos: freqs.cos()?,
        sin: freqs.sin()?,
        mask: Tensor::from_vec(mask, (t, past + t), &super::target_device())?,
        cache,
    })
}

impl LatencyProfiler for CandleProfiler<'_> {
    fn target(&self) -> TargetFingerprint {
        TargetFingerprint {
            runtime: "mistralrs".into(),
            runtime_version: format!("mistralrs-core 0.8.1 / candle {CANDLE_VERSION}"),
            device: crate::target::cpu_description(),
            threads: candle_threads(),
            dtype: format!("{:?}", self.dtype).to_lowercase(),
        }
    }

    fn model_key(&self) -> String {
        // Only what pruning leaves as it is: the shapes carry heads and widths, and the
        // rest (embeddings, final norm, output head) depends on this alone, so one table
        // serves a model and every model pruned from it (prune -> recover -> prune).
        let c = &self.model.weights.config;
        let output = match (self.model.format, self.model.gguf()) {
            (LlmFormat::Gguf, Some(g)) => g.ggml_type(output_head(g)).map(|t| format!("{t:?}")),
            _ => None,
        }
        .unwrap_or_else(|| format!("{:?}", self.dtype))
        .to_lowercase();
        format!(
            "llama hidden={} head_dim={} vocab={} output={output}",
            c.hidden, c.head_dim, c.vocab
        )
    }

    fn prepare<'a>(
        &'a mut self,
        what: &Measured,
        workload: &Workload,
    ) -> AdapterResult<Box<dyn TimedRun + 'a>> {
        let w = &self.model.weights;
        let cfg = &w.config;
        // Shapes are cut from the widest layer: in a pruned model the first layer may be
        // narrower than a shape another layer has.
        let hd = cfg.head_dim;
        let widest = |key: &dyn Fn(&super::llama::LayerWeights) -> usize| {
            w.layers.iter().max_by_key(|l| key(l)).ok_or_else(|| {
                AdapterError::InvalidRequest("a model without layers has no blocks to time".into())
            })
        };
        let l = match what {
            Measured::Block(BlockShape::Attention { .. }) => widest(&|l| l.n_heads(hd))?,
            Measured::Block(BlockShape::Ffn { .. }) => widest(&|l| l.ffn_width())?,
            _ => widest(&|_| 0)?,
        };
        let run = match what {
            Measured::Block(BlockShape::Attention {
                heads, kv_heads, ..
            }) => Run::Attention(
                attention_run(cfg, l, *heads, *kv_heads, self.dtype, workload).map_err(ce)?,
            ),
            Measured::Block(BlockShape::Ffn { width, .. }) => {
                let (g, u, d) = (
                    head(&l.gate, *width).map_err(ce)?,
                    head(&l.up, *width).map_err(ce)?,
                    l.down
                        .narrow(1, 0, *width)
                        .and_then(|t| t.contiguous())
                        .map_err(ce)?,
                );
                Run::Ffn(FfnRun {
                    x: input(cfg, workload).map_err(ce)?,
                    norm: l.ffn_norm.clone(),
                    eps: cfg.rms_eps,
                    gate: qmatmul(&g, self.dtype).map_err(ce)?,
                    up: qmatmul(&u, self.dtype).map_err(ce)?,
                    down: qmatmul(&d, self.dtype).map_err(ce)?,
                })
            }
            Measured::Rest => {
                let n = workload.batch * workload.seq_len;
                let ids: Vec<u32> = (0..n)
                    .map(|i| ((i * 7919 + 13) % cfg.vocab) as u32)
                    .collect();
                let out = match (self.model.format, self.model.gguf()) {
                    // GGUF output keeps the source's stored head.
                    (LlmFormat::Gguf, Some(g)) => g
                        .qtensor(output_head(g))
                        .map_err(|e| AdapterError::runtime("timing the output head", e))?,
                    // Folders hold the head in the projections' float type.
                    _ => super::emit::quantize(
                        w.output.as_ref().unwrap_or(&w.embed),
                        super::emit::ggml_dtype(self.dtype),
                    )
                    .map_err(ce)?,
                };
                Run::Rest(RestRun {
                    ids: Tensor::new(ids.as_slice(), &super::target_device()).map_err(ce)?,
                    embed: w.embed.clone(),
                    norm: w.norm.clone(),
                    eps: cfg.rms_eps,
                    output: QMatMul::from_qtensor(out).map_err(ce)?,
                })
            }
            Measured::Model(p) => {
                return Err(AdapterError::InvalidRequest(format!(
                    "whole models ({}) are timed in mistral.rs, not by the block profiler",
                    p.display()
                )))
            }
        };
        Ok(Box::new(run))
    }
}
