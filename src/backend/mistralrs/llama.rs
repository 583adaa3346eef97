//! A Llama decoder in candle: the weights ziplm prunes and the forward pass it
//! calibrates with.
//!
//! The forward follows mistral.rs's GGUF `quantized_llama` exactly (RMSNorm, interleaved
//! RoPE as llama.cpp stores Q/K, grouped-query attention with query head `h` reading KV
//! head `h / (heads / kv_heads)`, SwiGLU, tied or separate output head), in f32, so its
//! logits can be compared with mistral.rs on the same file. Hooks see the inputs of
//! every `attn_output` (o_proj) and `ffn_down` (down_proj) multiplication.

use candle_core::{DType, Device, Tensor, D};

/// Shapes and constants of a Llama model.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    /// Decoder layers.
    pub n_layers: usize,
    /// Model (residual) width.
    pub hidden: usize,
    /// Query heads per layer.
    pub n_heads: usize,
    /// Key/value heads per layer.
    pub n_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// FFN width of the original model (per layer widths live in the weights).
    pub ffn_width: usize,
    /// Rotated dimensions per head.
    pub rope_dim: usize,
    /// RoPE frequency base.
    pub rope_base: f32,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
    /// Vocabulary size.
    pub vocab: usize,
    /// Longest context the model supports.
    pub context_length: usize,
}

/// One decoder layer's weights, f32, `[out, in]` like the GGUF and safetensors files.
#[derive(Clone, Debug)]
pub struct LayerWeights {
    /// Pre-attention RMSNorm weight `[hidden]`.
    pub attn_norm: Tensor,
    /// Query projection `[heads * head_dim, hidden]`.
    pub wq: Tensor,
    /// Key projection `[kv_heads * head_dim, hidden]`.
    pub wk: Tensor,
    /// Value projection `[kv_heads * head_dim, hidden]`.
    pub wv: Tensor,
    /// Output projection `[hidden, heads * head_dim]`.
    pub wo: Tensor,
    /// Pre-FFN RMSNorm weight `[hidden]`.
    pub ffn_norm: Tensor,
    /// Gate projection `[width, hidden]`.
    pub gate: Tensor,
    /// Up projection `[width, hidden]`.
    pub up: Tensor,
    /// Down projection `[hidden, width]`.
    pub down: Tensor,
    /// Q/K/V biases (Qwen2); `None` for Llama and Mistral.
    pub qkv_bias: Option<QkvBias>,
}

/// Biases of the query, key and value projections, Q and K in the same interleaved
/// RoPE order as their weight rows.
#[derive(Clone, Debug)]
pub struct QkvBias {
    /// `[heads * head_dim]`.
    pub q: Tensor,
    /// `[kv_heads * head_dim]`.
    pub k: Tensor,
    /// `[kv_heads * head_dim]`.
    pub v: Tensor,
}

impl LayerWeights {
    /// Query heads of this layer.
    pub fn n_heads(&self, head_dim: usize) -> usize {
        self.wq.dims()[0] / head_dim
    }
    /// KV heads of this layer.
    pub fn n_kv_heads(&self, head_dim: usize) -> usize {
        self.wk.dims()[0] / head_dim
    }
    /// FFN width of this layer.
    pub fn ffn_width(&self) -> usize {
        self.gate.dims()[0]
    }
}

/// A whole Llama model in f32.
#[derive(Clone, Debug)]
pub struct LlamaWeights {
    /// Shapes of the original model.
    pub config: LlamaConfig,
    /// Token embeddings `[vocab, hidden]`.
    pub embed: Tensor,
    /// Final RMSNorm `[hidden]`.
    pub norm: Tensor,
    /// Output head `[vocab, hidden]`; `None` when tied to the embeddings.
    pub output: Option<Tensor>,
    /// Decoder layers, in order.
    pub layers: Vec<LayerWeights>,
}

/// Where a hook sees activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Site {
    /// The input of the attention output projection `[tokens, heads * head_dim]`.
    AttnOut,
    /// The input of the FFN down projection `[tokens, width]`.
    FfnDown,
    /// The residual stream after the layer `[tokens, hidden]` (a block boundary).
    LayerOut,
}

/// Which kernels a forward uses. candle's fused CPU kernels (`rms_norm`,
/// `softmax_last_dim`, `rope_i`) have no backward pass: a gradient through them is
/// silently cut (ZIPLM.md section 9). Training uses `train_ops`' versions, which bring
/// their own (`differentiable_forward_matches_finite_differences`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernels {
    /// The fast fused kernels (calibration, evaluation).
    Fused,
    /// Kernels with backward passes (recovery).
    Differentiable,
}

impl Kernels {
    fn rms_norm(self, x: &Tensor, alpha: &Tensor, eps: f32) -> candle_core::Result<Tensor> {
        match self {
            Kernels::Fused => candle_nn::ops::rms_norm(x, alpha, eps),
            Kernels::Differentiable => super::train_ops::rms_norm(x, alpha, eps),
        }
    }
    /// `softmax(scale * scores + mask)` over the last dimension; `mask: [tq, tk]`.
    fn attention_softmax(
        self,
        scores: &Tensor,
        mask: &Tensor,
        scale: f64,
    ) -> candle_core::Result<Tensor> {
        match self {
            Kernels::Fused => {
                candle_nn::ops::softmax_last_dim(&(scores * scale)?.broadcast_add(mask)?)
            }
            Kernels::Differentiable => super::train_ops::masked_softmax(scores, mask, scale),
        }
    }
    fn rope_i(self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Kernels::Fused => candle_nn::rotary_emb::rope_i(x, cos, sin),
            Kernels::Differentiable => super::train_ops::rope_i(x, cos, sin),
        }
    }
}

/// Called with (layer, site, activation rows); an error stops the forward.
pub type Hook<'a> = dyn FnMut(usize, Site, &Tensor) -> candle_core::Result<()> + 'a;

/// cos / sin tables `[len, rope_dim / 2]` of positions `0..len` for interleaved RoPE,
/// as mistral.rs builds them.
pub fn rope_tables(
    cfg: &LlamaConfig,
    len: usize,
    device: &Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    let inv: Vec<f32> = (0..cfg.rope_dim)
        .step_by(2)
        .map(|i| 1f32 / cfg.rope_base.powf(i as f32 / cfg.rope_dim as f32))
        .collect();
    let n = inv.len();
    let inv = Tensor::from_vec(inv, (1, n), device)?;
    let t = Tensor::arange(0u32, len as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((len, 1))?;
    let freqs = t.matmul(&inv)?;
    Ok((freqs.cos()?, freqs.sin()?))
}

/// The RoPE tables and the causal mask in `dtype` (f64 for gradient checks).
fn tables_in(
    cfg: &LlamaConfig,
    len: usize,
    device: &Device,
    dtype: DType,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let (cos, sin) = rope_tables(cfg, len, device)?;
    let mask = causal_mask(len, device)?;
    Ok((
        cos.to_dtype(dtype)?,
        sin.to_dtype(dtype)?,
        mask.to_dtype(dtype)?,
    ))
}

/// The RoPE tables and the causal mask of a `len`-token sequence: `(cos, sin, mask)`.
pub fn rope_and_mask(
    cfg: &LlamaConfig,
    len: usize,
    device: &Device,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let (cos, sin) = rope_tables(cfg, len, device)?;
    Ok((cos, sin, causal_mask(len, device)?))
}

/// `x @ w^T` for `x: [t, in]`, `w: [out, in]`.
pub fn linear(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    x.matmul(&w.t()?)
}

/// Additive causal mask `[t, t]`: 0 on and below the diagonal, -inf above.
fn causal_mask(t: usize, device: &Device) -> candle_core::Result<Tensor> {
    let v: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(v, (t, t), device)
}

/// The attention sub-layer on normed input `h: [t, hidden]`; returns the o_proj input
/// `[t, heads * head_dim]`.
pub fn attention_core(
    cfg: &LlamaConfig,
    layer: &LayerWeights,
    h: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    mask: &Tensor,
) -> candle_core::Result<Tensor> {
    attention_with(cfg, layer, h, (cos, sin, mask), Kernels::Fused)
}

/// [`attention_core`] with the given kernels; `tables` = `(cos, sin, mask)`.
fn attention_with(
    cfg: &LlamaConfig,
    layer: &LayerWeights,
    h: &Tensor,
    (cos, sin, mask): (&Tensor, &Tensor, &Tensor),
    kernels: Kernels,
) -> candle_core::Result<Tensor> {
    let t = h.dims()[0];
    let (q, k, v) = attention_inputs(layer, h, (1, t), cfg.head_dim, (cos, sin), kernels)?;
    attend(&q, &k, &v, mask, kernels)
}

/// Grouped-query attention of queries `[rows, heads, tq, head_dim]` over keys and values
/// `[rows, kv_heads, tk, head_dim]` (query head `h` reads KV head `h / group`), with the
/// additive `mask` broadcast onto the scores; returns `[rows * tq, heads * head_dim]`
/// (the o_proj input).
pub fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    kernels: Kernels,
) -> candle_core::Result<Tensor> {
    let (rows, nh, tq, hd) = q.dims4()?;
    let (_, nkv, tk, _) = k.dims4()?;
    // The query heads of a group are stacked along the query axis, so every KV head is
    // read once (no copy of the keys and values per query head): [rows, nkv, group *
    // tq, hd], the same memory as [rows, nh, tq, hd] since heads are KV-head-major.
    let group = nh / nkv.max(1);
    let q = q.reshape((rows, nkv, group * tq, hd))?;
    let scale = 1.0 / (hd as f64).sqrt();
    let scores = q.matmul(&k.t()?)?.reshape((rows, nh, tq, tk))?;
    let probs =
        kernels
            .attention_softmax(&scores, mask, scale)?
            .reshape((rows, nkv, group * tq, tk))?;
    probs
        .matmul(v)?
        .reshape((rows, nh, tq, hd))?
        .transpose(1, 2)?
        .reshape((rows * tq, nh * hd))?
        .contiguous()
}

/// Queries, keys and values `[rows, heads, t, head_dim]` of normed input `h: [rows * t,
/// hidden]` (row-major), RoPE applied with the tables' rows for these `t` positions.
pub fn attention_inputs(
    layer: &LayerWeights,
    h: &Tensor,
    (rows, t): (usize, usize),
    hd: usize,
    (cos, sin): (&Tensor, &Tensor),
    kernels: Kernels,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let bias = layer.qkv_bias.as_ref();
    let project = |w: &Tensor, b: Option<&Tensor>, heads: usize| -> candle_core::Result<Tensor> {
        let y = linear(h, w)?;
        let y = match b {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        y.reshape((rows, t, heads, hd))?
            .transpose(1, 2)?
            .contiguous()
    };
    let q = project(&layer.wq, bias.map(|b| &b.q), layer.n_heads(hd))?;
    let k = project(&layer.wk, bias.map(|b| &b.k), layer.n_kv_heads(hd))?;
    let v = project(&layer.wv, bias.map(|b| &b.v), layer.n_kv_heads(hd))?;
    Ok((
        kernels.rope_i(&q, cos, sin)?,
        kernels.rope_i(&k, cos, sin)?,
        v,
    ))
}

/// The SwiGLU core on normed input `h`: the down_proj input `[t, width]`.
pub fn ffn_core(layer: &LayerWeights, h: &Tensor) -> candle_core::Result<Tensor> {
    let g = candle_nn::ops::silu(&linear(h, &layer.gate)?)?;
    let u = linear(h, &layer.up)?;
    g * u
}

impl LlamaWeights {
    /// Whether this is a Qwen2 model (Q/K/V biases).
    pub fn is_qwen2(&self) -> bool {
        self.layers.iter().any(|l| l.qkv_bias.is_some())
    }

    /// Runs `ids` (one sequence, positions from 0) through the model. Returns the logits
    /// `[t, vocab]` of every position when `logits`, else the final hidden states.
    pub fn forward(
        &self,
        ids: &[u32],
        logits: bool,
        hook: &mut Hook<'_>,
    ) -> candle_core::Result<Tensor> {
        self.forward_with(ids, logits, Kernels::Fused, hook)
    }

    /// [`LlamaWeights::forward`] with the given kernels (in the weights' dtype).
    pub fn forward_with(
        &self,
        ids: &[u32],
        logits: bool,
        kernels: Kernels,
        hook: &mut Hook<'_>,
    ) -> candle_core::Result<Tensor> {
        let cfg = &self.config;
        let t = ids.len();
        let device = self.embed.device();
        let ids_t = Tensor::new(ids, device)?;
        let mut x = self.embed.index_select(&ids_t, 0)?;
        let (cos, sin, mask) = tables_in(cfg, t, device, self.embed.dtype())?;
        let eps = cfg.rms_eps;
        for (i, layer) in self.layers.iter().enumerate() {
            let h = kernels.rms_norm(&x, &layer.attn_norm, eps)?;
            let a = attention_with(cfg, layer, &h, (&cos, &sin, &mask), kernels)?;
            hook(i, Site::AttnOut, &a)?;
            x = (&x + linear(&a, &layer.wo)?)?;
            let h = kernels.rms_norm(&x, &layer.ffn_norm, eps)?;
            let f = ffn_core(layer, &h)?;
            hook(i, Site::FfnDown, &f)?;
            x = (&x + linear(&f, &layer.down)?)?;
            hook(i, Site::LayerOut, &x)?;
        }
        let x = kernels.rms_norm(&x, &self.norm, eps)?;
        if !logits {
            return Ok(x);
        }
        linear(&x, self.output.as_ref().unwrap_or(&self.embed))
    }

    /// Multiply-add FLOPs (2 per multiply-add) of [`LlamaWeights::forward`] without the
    /// output head on one sequence of `t` tokens: every projection at this model's
    /// (possibly pruned) widths, and the causal attention products (`t (t + 1) / 2`
    /// query-key pairs per head, scores and values). Norms, RoPE and softmax are not
    /// counted: they are not matrix products.
    pub fn forward_flops(&self, t: usize) -> u64 {
        let (t, d) = (t as u64, self.config.hidden as u64);
        let hd = self.config.head_dim as u64;
        self.layers
            .iter()
            .map(|l| {
                let q = l.wq.dims()[0] as u64;
                let kv = l.wk.dims()[0] as u64;
                let width = l.ffn_width() as u64;
                let projections = d * (q + 2 * kv) + q * d + 3 * d * width;
                let pairs = t * (t + 1) / 2;
                let attention = 2 * (q / hd.max(1)) * pairs * hd;
                2 * (t * projections + attention)
            })
            .sum()
    }

    /// FLOPs of the Gram updates calibration makes for `t` tokens when it captures
    /// every out-projection input: the lower triangle of `X X^T` for each o_proj and
    /// down_proj input (`t * w (w + 1) / 2` multiply-adds for a width `w`).
    pub fn gram_flops(&self, t: usize) -> u64 {
        let t = t as u64;
        self.layers
            .iter()
            .map(|l| {
                let (a, f) = (l.wo.dims()[1] as u64, l.down.dims()[1] as u64);
                t * (a * (a + 1) + f * (f + 1))
            })
            .sum()
    }

    /// Log-probabilities of each next token for one window of ids: `[len - 1, vocab]`
    /// (the last position predicts nothing inside the window).
    pub fn window_log_probs(&self, ids: &[u32]) -> candle_core::Result<Tensor> {
        let logits = self.forward(ids, true, &mut |_, _, _| Ok(()))?;
        let logits = logits.narrow(0, 0, ids.len().saturating_sub(1))?;
        candle_nn::ops::log_softmax(&logits, D::Minus1)
    }

    /// Sum of negative log-likelihoods of each next token and their count, for one
    /// window of ids (position 0 is not predicted).
    pub fn window_nll(&self, ids: &[u32]) -> candle_core::Result<(f64, usize)> {
        if ids.len() < 2 {
            return Ok((0.0, 0));
        }
        let logits = self.forward(ids, true, &mut |_, _, _| Ok(()))?;
        let n = ids.len() - 1;
        let logits = logits.narrow(0, 0, n)?;
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let target = Tensor::new(&ids[1..], logp.device())?.unsqueeze(1)?;
        let picked = logp.gather(&target, 1)?.sum_all()?.to_scalar::<f32>()?;
        Ok((-(picked as f64), n))
    }
}

/// The shapes of the unit tests' tiny GQA Llama: width 16, 4 query heads over 2 KV
/// heads of 4, FFN 8.
#[cfg(test)]
pub(crate) fn tiny_config(n_layers: usize, vocab: usize) -> LlamaConfig {
    LlamaConfig {
        n_layers,
        hidden: 16,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 4,
        ffn_width: 8,
        rope_dim: 4,
        rope_base: 10000.0,
        rms_eps: 1e-5,
        vocab,
        context_length: 64,
    }
}

/// Entries uniform in [-0.5, 0.5), the same for the same seed.
#[cfg(test)]
pub(crate) fn random_tensor(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| r.random_range(-0.5f64..0.5)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// A tiny GQA Llama of [`tiny_config`] (2 layers, vocab 11) with random weights in
/// `dtype`, the same for the same seed.
#[cfg(test)]
pub(crate) fn tiny_weights(seed: u64, dtype: DType) -> LlamaWeights {
    let rand = |shape: &[usize], seed: u64| random_tensor(shape, seed, dtype);
    let norm = |s: u64| (rand(&[16], s) + 1.0).unwrap();
    let layer = |s: u64| LayerWeights {
        attn_norm: norm(s),
        wq: rand(&[16, 16], s + 1),
        wk: rand(&[8, 16], s + 2),
        wv: rand(&[8, 16], s + 3),
        wo: rand(&[16, 16], s + 4),
        ffn_norm: norm(s + 5),
        gate: rand(&[8, 16], s + 6),
        up: rand(&[8, 16], s + 7),
        down: rand(&[16, 8], s + 8),
        qkv_bias: None,
    };
    LlamaWeights {
        config: tiny_config(2, 11),
        embed: rand(&[11, 16], seed),
        norm: norm(seed + 1),
        output: Some(rand(&[11, 16], seed + 2)),
        layers: vec![layer(seed + 10), layer(seed + 20)],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| r.random_range(-0.3f32..0.3)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// A reference attention written head by head with explicit loops.
    #[test]
    fn gqa_attention_matches_a_per_head_reference() {
        let cfg = tiny_config(1, 10);
        let layer = LayerWeights {
            attn_norm: Tensor::ones(16, DType::F32, &Device::Cpu).unwrap(),
            wq: rand(&[16, 16], 1),
            wk: rand(&[8, 16], 2),
            wv: rand(&[8, 16], 3),
            wo: rand(&[16, 16], 4),
            ffn_norm: Tensor::ones(16, DType::F32, &Device::Cpu).unwrap(),
            gate: rand(&[8, 16], 5),
            up: rand(&[8, 16], 6),
            down: rand(&[16, 8], 7),
            qkv_bias: None,
        };
        let t = 5;
        let model = LlamaWeights {
            config: cfg.clone(),
            embed: rand(&[10, 16], 9),
            norm: Tensor::ones(16, DType::F32, &Device::Cpu).unwrap(),
            output: None,
            layers: vec![layer.clone()],
        };
        // q/k/v/o 16x(16+8+8) + 16x16, gate/up/down 3x16x8, per token; 4 heads of 4
        // over 15 causal pairs, scores and values.
        assert_eq!(
            model.forward_flops(t),
            2 * (5 * (512 + 256 + 384) + 2 * 4 * 15 * 4)
        );
        assert_eq!(model.gram_flops(t), 5 * (16 * 17 + 8 * 9));
        let h = rand(&[t, 16], 8);
        let (cos, sin) = rope_tables(&cfg, t, &Device::Cpu).unwrap();
        let mask = causal_mask(t, &Device::Cpu).unwrap();
        let got = attention_core(&cfg, &layer, &h, &cos, &sin, &mask)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        // Reference: rotate pairs (2i, 2i+1) by angle pos * base^(-2i/d).
        let q = linear(&h, &layer.wq).unwrap().to_vec2::<f32>().unwrap();
        let k = linear(&h, &layer.wk).unwrap().to_vec2::<f32>().unwrap();
        let v = linear(&h, &layer.wv).unwrap().to_vec2::<f32>().unwrap();
        let rot = |row: &[f32], pos: usize| -> Vec<f32> {
            let mut o = row.to_vec();
            for i in 0..2 {
                let th = pos as f32 * 10000f32.powf(-((2 * i) as f32) / 4.0);
                let (a, b) = (row[2 * i], row[2 * i + 1]);
                o[2 * i] = a * th.cos() - b * th.sin();
                o[2 * i + 1] = a * th.sin() + b * th.cos();
            }
            o
        };
        for head in 0..4 {
            let kv = head / 2;
            for i in 0..t {
                let qi = rot(&q[i][head * 4..head * 4 + 4], i);
                let mut w: Vec<f32> = (0..=i)
                    .map(|j| {
                        let kj = rot(&k[j][kv * 4..kv * 4 + 4], j);
                        qi.iter().zip(&kj).map(|(a, b)| a * b).sum::<f32>() / 2.0
                    })
                    .collect();
                let m = w.iter().cloned().fold(f32::MIN, f32::max);
                let s: f32 = w
                    .iter_mut()
                    .map(|x| {
                        *x = (*x - m).exp();
                        *x
                    })
                    .sum();
                for d in 0..4 {
                    let want: f32 = (0..=i).map(|j| w[j] / s * v[j][kv * 4 + d]).sum();
                    assert!((got[i][head * 4 + d] - want).abs() < 1e-5);
                }
            }
        }
    }
}
