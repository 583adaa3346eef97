//! The paired streams of sequential correction (ZIPLM.md section 8) for a Llama model:
//! the dense and the pruned hidden states of every calibration sample, block by block
//! ([`ziplm_plugin_api::PairedStreams`]; the fit itself is the engine's,
//! `pipeline::correct`).
//!
//! At block `l`, `X` is its out-projection input computed from the dense stream and
//! `X~` the same input computed from the pruned stream (blocks before `l` as advanced,
//! block `l` dense upstream of its out-projection: heads and neurons are independent,
//! so the kept columns of `X~` are exactly what the pruned block computes). Advancing
//! adds `W X` to the dense stream and `W'_K X~_K` to the pruned one. A capture also
//! gives the two hidden states as the residual streams. Memory: two hidden
//! states and, between a capture and its advance, two out-projection inputs per
//! calibration token.

use super::llama::{attention_core, ffn_core, linear, rope_and_mask, LlamaWeights};
use candle_core::Tensor;
use ziplm_plugin_api::{
    AdapterError, AdapterResult, BlockChoice, BlockId, BlockKind, BlockPlan, ModelStructure,
    PairedSink, PairedStreams, WeightMatrix,
};

fn candle(e: candle_core::Error) -> AdapterError {
    AdapterError::runtime("sequential correction", e)
}

/// Both streams of a Llama model over its calibration samples.
pub struct LlamaStreams<'a> {
    weights: &'a LlamaWeights,
    structure: &'a ModelStructure,
    /// RoPE tables and causal mask per sample.
    tables: Vec<(Tensor, Tensor, Tensor)>,
    dense: Vec<Tensor>,
    pruned: Vec<Tensor>,
    /// The block the streams are at.
    next: usize,
    /// The out-projection inputs of the block `next`, dense and pruned, once computed.
    inputs: Option<(Vec<Tensor>, Vec<Tensor>)>,
}

impl<'a> LlamaStreams<'a> {
    /// Both streams at the embeddings of `samples`.
    pub fn new(
        weights: &'a LlamaWeights,
        structure: &'a ModelStructure,
        samples: &[Vec<u32>],
    ) -> AdapterResult<LlamaStreams<'a>> {
        if samples.is_empty() {
            return Err(AdapterError::Calibration(
                "sequential correction needs the calibration samples".into(),
            ));
        }
        let device = weights.embed.device();
        let mut dense = vec![];
        let mut tables = vec![];
        for s in samples {
            let ids = Tensor::new(s.as_slice(), device).map_err(candle)?;
            dense.push(weights.embed.index_select(&ids, 0).map_err(candle)?);
            tables.push(rope_and_mask(&weights.config, s.len(), device).map_err(candle)?);
        }
        Ok(LlamaStreams {
            weights,
            structure,
            tables,
            pruned: dense.clone(),
            dense,
            next: 0,
            inputs: None,
        })
    }

    fn check(&self, block: BlockId) -> AdapterResult<()> {
        if block.index() != self.next || self.next >= self.structure.blocks.len() {
            return Err(AdapterError::InvalidRequest(format!(
                "the streams are at block {}, not at {block}: blocks go in model order",
                self.next
            )));
        }
        Ok(())
    }

    /// The out-projection inputs of block `next` from both streams.
    fn inputs(&mut self) -> AdapterResult<&(Vec<Tensor>, Vec<Tensor>)> {
        if self.inputs.is_none() {
            let block = &self.structure.blocks[self.next];
            let cfg = &self.weights.config;
            let layer = &self.weights.layers[block.layer.0 as usize];
            let core = |h: &Tensor, (cos, sin, mask): &(Tensor, Tensor, Tensor)| match block.kind {
                BlockKind::Attention(_) => {
                    let n = candle_nn::ops::rms_norm(h, &layer.attn_norm, cfg.rms_eps)?;
                    attention_core(cfg, layer, &n, cos, sin, mask)
                }
                BlockKind::Ffn(_) => {
                    let n = candle_nn::ops::rms_norm(h, &layer.ffn_norm, cfg.rms_eps)?;
                    ffn_core(layer, &n)
                }
            };
            let mut xs = vec![];
            let mut xts = vec![];
            for ((hd, hp), t) in self.dense.iter().zip(&self.pruned).zip(&self.tables) {
                xs.push(core(hd, t).map_err(candle)?);
                xts.push(core(hp, t).map_err(candle)?);
            }
            self.inputs = Some((xs, xts));
        }
        Ok(self.inputs.as_ref().expect("computed above"))
    }

    fn out_weight(&self) -> &Tensor {
        let block = &self.structure.blocks[self.next];
        let layer = &self.weights.layers[block.layer.0 as usize];
        match block.kind {
            BlockKind::Attention(_) => &layer.wo,
            BlockKind::Ffn(_) => &layer.down,
        }
    }
}

impl PairedStreams for LlamaStreams<'_> {
    fn capture(&mut self, block: BlockId, sink: &mut dyn PairedSink) -> AdapterResult<()> {
        self.check(block)?;
        self.inputs()?;
        let (xs, xts) = self.inputs.as_ref().expect("computed above");
        for (i, (x, xt)) in xs.iter().zip(xts).enumerate() {
            // The residual stream the block's output is added to, in both models.
            let hidden = self.dense[i].dims()[1];
            let h = self.dense[i]
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(candle)?;
            let ht = self.pruned[i]
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(candle)?;
            sink.accept_residual(&h, &ht, hidden)?;
            let width = x.dims()[1];
            let d = x
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(candle)?;
            let p = xt
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(candle)?;
            sink.accept(&d, &p, width)?;
        }
        Ok(())
    }

    fn advance(
        &mut self,
        plan: &BlockPlan,
        out_projection: Option<&WeightMatrix>,
    ) -> AdapterResult<()> {
        self.check(plan.block)?;
        let w = self.out_weight().clone();
        let device = w.device().clone();
        let kept = plan.kept_columns();
        let width = w.dims()[1];
        let idx = Tensor::new(
            kept.iter()
                .map(|&c| c as u32)
                .collect::<Vec<_>>()
                .as_slice(),
            &device,
        )
        .map_err(candle)?;
        let w_kept = match out_projection {
            Some(m) => {
                if m.rows != w.dims()[0] || m.cols != kept.len() {
                    return Err(AdapterError::InvalidRequest(format!(
                        "{}: an out-projection of {} x {} for {} outputs and {} kept columns",
                        plan.block,
                        m.rows,
                        m.cols,
                        w.dims()[0],
                        kept.len()
                    )));
                }
                Some(Tensor::from_vec(m.data.clone(), (m.rows, m.cols), &device).map_err(candle)?)
            }
            None if plan.choice() == BlockChoice::Removed => None,
            None if kept.len() == width => Some(w.clone()),
            None => Some(w.index_select(&idx, 1).map_err(candle)?),
        };
        self.inputs()?;
        let (xs, xts) = self.inputs.take().expect("computed above");
        for (i, (x, xt)) in xs.iter().zip(&xts).enumerate() {
            self.dense[i] = (&self.dense[i] + linear(x, &w).map_err(candle)?).map_err(candle)?;
            if let Some(wk) = &w_kept {
                let xk = if kept.len() == width {
                    xt.clone()
                } else {
                    xt.index_select(&idx, 1).map_err(candle)?
                };
                self.pruned[i] =
                    (&self.pruned[i] + linear(&xk, wk).map_err(candle)?).map_err(candle)?;
            }
        }
        self.next += 1;
        Ok(())
    }
}
