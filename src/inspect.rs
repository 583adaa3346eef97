//! `ziplm inspect`: a stable, diff-friendly summary of a model's prunable structure.

use serde::Serialize;
use ziplm_plugin_api::{BlockKind, ModelStructure};

/// One layer in the summary.
#[derive(Serialize, Debug, PartialEq)]
pub struct LayerSummary {
    /// Layer index.
    pub layer: u32,
    /// Query heads (0 = no attention).
    pub heads: usize,
    /// KV heads.
    pub kv_heads: usize,
    /// Head width.
    pub head_dim: usize,
    /// FFN width (0 = no FFN).
    pub ffn: usize,
    /// Gated FFN.
    pub gated: bool,
    /// Prunable weights in the layer.
    pub params: u64,
}

/// The summary.
#[derive(Serialize, Debug, PartialEq)]
pub struct Summary {
    /// Architecture.
    pub architecture: String,
    /// Model width.
    pub hidden: usize,
    /// Layers.
    pub layers: Vec<LayerSummary>,
    /// Total prunable weights.
    pub params: u64,
}

/// Builds the summary of a structure.
pub fn summary(s: &ModelStructure) -> Summary {
    let mut layers: std::collections::BTreeMap<u32, LayerSummary> = Default::default();
    for b in &s.blocks {
        let l = layers.entry(b.layer.0).or_insert(LayerSummary {
            layer: b.layer.0,
            heads: 0,
            kv_heads: 0,
            head_dim: 0,
            ffn: 0,
            gated: false,
            params: 0,
        });
        match b.kind {
            BlockKind::Attention(a) => {
                l.heads = a.n_heads;
                l.kv_heads = a.n_kv_heads;
                l.head_dim = a.head_dim;
                l.params += (b.hidden * a.head_dim * 2 * (a.n_heads + a.n_kv_heads)) as u64;
            }
            BlockKind::Ffn(f) => {
                l.ffn = f.width;
                l.gated = f.gated;
                l.params += (b.hidden * f.width * if f.gated { 3 } else { 2 }) as u64;
            }
        }
    }
    let layers: Vec<LayerSummary> = layers.into_values().collect();
    Summary {
        architecture: s.architecture.clone(),
        hidden: s.blocks.first().map(|b| b.hidden).unwrap_or(0),
        params: layers.iter().map(|l| l.params).sum(),
        layers,
    }
}

/// The text form: one line per layer, then totals.
pub fn inspect_text(s: &ModelStructure) -> String {
    let sum = summary(s);
    let mut out = format!(
        "architecture: {}\nhidden: {}\nlayers: {}\n",
        sum.architecture,
        sum.hidden,
        sum.layers.len()
    );
    out.push_str("layer  heads  kv  head_dim  ffn    gated  params\n");
    for l in &sum.layers {
        out.push_str(&format!(
            "{:<5}  {:<5}  {:<2}  {:<8}  {:<5}  {:<5}  {}\n",
            l.layer,
            l.heads,
            l.kv_heads,
            l.head_dim,
            l.ffn,
            if l.gated { "yes" } else { "no" },
            l.params
        ));
    }
    let heads: usize = sum.layers.iter().map(|l| l.heads).sum();
    let ffn: usize = sum.layers.iter().map(|l| l.ffn).sum();
    out.push_str(&format!(
        "total: {heads} heads, {ffn} FFN neurons, {} prunable params\n",
        sum.params
    ));
    out
}
