//! Greedy generation with ziplm's own forward ([`LlamaWeights`], candle, f32), many
//! conversations at once with a KV cache: what lets a model write its own calibration
//! text ([`super::self_chat`]) several times faster than mistral.rs serving one
//! request at a time (66 against about 12 tokens/s on the 2-core machine).
//!
//! The prompts are left-padded to one length and the padding is masked out of every
//! attention. All rows share the positions `0..`: a row's real tokens then sit at
//! positions shifted by its padding, which RoPE attention does not see (the score of a
//! query and a key depends only on the distance between their positions).

use super::llama::{attend, attention_inputs, linear, Kernels, LlamaWeights};
use candle_core::{DType, Device, Tensor, D};

/// The greedy continuations of `prompts`, each at most `max_new` tokens and ending
/// before the first token of `stop` (which is left out). Rows are independent: each
/// gets what it would get alone, up to float rounding.
pub fn greedy(
    weights: &LlamaWeights,
    prompts: &[Vec<u32>],
    max_new: usize,
    stop: &[u32],
) -> candle_core::Result<Vec<Vec<u32>>> {
    let b = prompts.len();
    let p = prompts.iter().map(Vec::len).max().unwrap_or(0);
    if b == 0 || max_new == 0 {
        return Ok(vec![vec![]; b]);
    }
    if prompts.iter().any(Vec::is_empty) {
        candle_core::bail!("greedy generation needs a prompt of at least one token per row");
    }
    let device = weights.embed.device().clone();
    let pads: Vec<usize> = prompts.iter().map(|q| p - q.len()).collect();
    let (cos, sin) = super::llama::rope_tables(&weights.config, p + max_new, &device)?;
    let mut cache = Cache::new(weights.layers.len());

    // Prefill: every prompt, left-padded (pad id 0, masked).
    let ids: Vec<u32> = prompts
        .iter()
        .zip(&pads)
        .flat_map(|(q, &pad)| std::iter::repeat_n(0, pad).chain(q.iter().copied()))
        .collect();
    let mask = prefill_mask(&pads, p, &device)?;
    let mut next = step(weights, &ids, b, 0, (&cos, &sin), &mask, &mut cache)?;

    let mut out = vec![vec![]; b];
    let mut done = vec![false; b];
    for s in 0..max_new {
        for (row, &tok) in next.iter().enumerate() {
            if done[row] {
                continue;
            }
            if stop.contains(&tok) {
                done[row] = true;
            } else {
                out[row].push(tok);
                done[row] = out[row].len() == max_new;
            }
        }
        if done.iter().all(|&d| d) || s + 1 == max_new {
            break;
        }
        let mask = decode_mask(&pads, p + s + 1, &device)?;
        next = step(weights, &next, b, p + s, (&cos, &sin), &mask, &mut cache)?;
    }
    Ok(out)
}

/// Keys and values of every layer so far, `[rows, kv_heads, positions, head_dim]`.
struct Cache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl Cache {
    fn new(n: usize) -> Cache {
        Cache {
            layers: vec![None; n],
        }
    }

    /// Appends `k`, `v` (the new positions) to layer `i`; returns the whole of it.
    fn append(&mut self, i: usize, k: Tensor, v: Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let kv = match self.layers[i].take() {
            None => (k, v),
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
        };
        self.layers[i] = Some(kv.clone());
        Ok(kv)
    }
}

/// Additive mask `[rows, 1, t, t]` of the prefill: causal, and no row's query sees its
/// padding. A padding query sees itself, so that no row of scores is all `-inf`.
fn prefill_mask(pads: &[usize], t: usize, device: &Device) -> candle_core::Result<Tensor> {
    let mut v = Vec::with_capacity(pads.len() * t * t);
    for &pad in pads {
        for i in 0..t {
            for j in 0..t {
                let seen = (j <= i && j >= pad) || j == i;
                v.push(if seen { 0f32 } else { f32::NEG_INFINITY });
            }
        }
    }
    Tensor::from_vec(v, (pads.len(), 1, t, t), device)
}

/// Additive mask `[rows, 1, 1, keys]` of one decode step: every key but the padding.
fn decode_mask(pads: &[usize], keys: usize, device: &Device) -> candle_core::Result<Tensor> {
    let v: Vec<f32> = pads
        .iter()
        .flat_map(|&pad| (0..keys).map(move |j| if j < pad { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(v, (pads.len(), 1, 1, keys), device)
}

/// Runs `ids` (`rows x t`, row-major, at positions `start..start + t`) through the
/// model with the cache; returns each row's greedy next token.
fn step(
    w: &LlamaWeights,
    ids: &[u32],
    rows: usize,
    start: usize,
    (cos, sin): (&Tensor, &Tensor),
    mask: &Tensor,
    cache: &mut Cache,
) -> candle_core::Result<Vec<u32>> {
    let cfg = &w.config;
    let t = ids.len() / rows;
    let device = w.embed.device();
    let mut x = w.embed.index_select(&Tensor::new(ids, device)?, 0)?; // [rows * t, hidden]
    let (cos, sin) = (cos.narrow(0, start, t)?, sin.narrow(0, start, t)?);
    let hd = cfg.head_dim;
    for (i, layer) in w.layers.iter().enumerate() {
        let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, cfg.rms_eps)?;
        let (q, k, v) = attention_inputs(layer, &h, (rows, t), hd, (&cos, &sin), Kernels::Fused)?;
        let (k, v) = cache.append(i, k, v)?;
        let a = attend(&q, &k, &v, mask, Kernels::Fused)?;
        x = (&x + linear(&a, &layer.wo)?)?;
        let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, cfg.rms_eps)?;
        let f = super::llama::ffn_core(layer, &h)?;
        x = (&x + linear(&f, &layer.down)?)?;
    }
    // Only each row's last position needs logits.
    let last = x
        .reshape((rows, t, cfg.hidden))?
        .narrow(1, t - 1, 1)?
        .squeeze(1)?;
    let last = candle_nn::ops::rms_norm(&last.contiguous()?, &w.norm, cfg.rms_eps)?;
    let logits = linear(&last, w.output.as_ref().unwrap_or(&w.embed))?;
    logits
        .to_dtype(DType::F32)?
        .argmax(D::Minus1)?
        .to_vec1::<u32>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::mistralrs::llama::tiny_weights;

    /// Generation without a cache: the whole sequence through the forward, argmax of
    /// the last row, again and again.
    fn reference(w: &LlamaWeights, prompt: &[u32], max_new: usize, stop: &[u32]) -> Vec<u32> {
        let mut seq = prompt.to_vec();
        let mut out = vec![];
        for _ in 0..max_new {
            let logits = w.forward(&seq, true, &mut |_, _, _| Ok(())).unwrap();
            let last = logits.get(seq.len() - 1).unwrap();
            let tok = last.argmax(0).unwrap().to_scalar::<u32>().unwrap();
            if stop.contains(&tok) {
                break;
            }
            out.push(tok);
            seq.push(tok);
        }
        out
    }

    #[test]
    fn batched_cached_generation_matches_each_prompt_alone_without_a_cache() {
        let w = tiny_weights(3, DType::F32);
        let prompts = vec![vec![1, 2, 3, 4, 5, 6, 7], vec![9], vec![4, 4, 2]];
        let got = greedy(&w, &prompts, 12, &[]).unwrap();
        for (p, g) in prompts.iter().zip(&got) {
            assert_eq!(g, &reference(&w, p, 12, &[]), "prompt {p:?}");
            assert_eq!(g.len(), 12);
        }
        // A stop token ends a row there and is left out; the other rows go on.
        let stop = got[0][3];
        let stopped = greedy(&w, &prompts, 12, &[stop]).unwrap();
        for (p, s) in prompts.iter().zip(&stopped) {
            assert_eq!(s, &reference(&w, p, 12, &[stop]), "prompt {p:?}");
        }
        assert_eq!(
            stopped[0],
            got[0][..got[0].iter().position(|&t| t == stop).unwrap()]
        );
        assert_eq!(
            greedy(&w, &prompts, 0, &[]).unwrap(),
            vec![Vec::<u32>::new(); 3]
        );
        assert!(greedy(&w, &[vec![]], 3, &[]).is_err());
    }
}
