//! Timing block shapes with tract's optimised plan (what serving runs).
//!
//! Blocks are timed in the real model, not in isolation: for an attention shape with
//! `k` heads the profiler builds (from the original file, with the emitter) a variant
//! where every attention block has `k` heads, and a baseline where every attention
//! block is removed, both with dense FFNs; the block time is their difference divided
//! by the number of attention blocks. Runs of the two alternate, so slow drifts of the
//! machine cancel, and the engine takes the median of many such differences. FFN
//! widths are timed the same way with dense attention. The non-prunable rest is the
//! model with every block removed.

use super::device::{Prepared, TractDevice};
use super::gpu::Placement;
use super::model::TractModel;
use super::onnx;
use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;
use ziplm_plugin_api::{
    AdapterError, AdapterResult, BlockKind, BlockShape, LatencyProfiler, Measured, ModelAdapter,
    Plan, PrunedWeights, TargetFingerprint, TimedRun, Workload,
};

/// Times shapes of one model on a tract target (the CPU or a GPU).
pub struct TractProfiler<'m> {
    model: &'m TractModel,
    device: TractDevice,
    /// Baselines shared by all shapes of a kind (every attention / every FFN removed).
    baselines: HashMap<(bool, Workload), Prepared>,
}

impl<'m> TractProfiler<'m> {
    /// A profiler running tract on `device`.
    pub fn new(model: &'m TractModel, device: TractDevice) -> TractProfiler<'m> {
        TractProfiler {
            model,
            device,
            baselines: HashMap::new(),
        }
    }

    fn vocab(&self) -> usize {
        self.model.vocab().unwrap_or(2)
    }

    fn variant(
        &self,
        shape: Option<&BlockShape>,
        remove_attention: bool,
        remove_ffn: bool,
    ) -> AdapterResult<Vec<u8>> {
        let mut plan = Plan::dense(self.model.structure());
        for bp in plan.blocks.iter_mut() {
            match bp.kind {
                BlockKind::Attention(a) => {
                    if remove_attention {
                        bp.kept.clear();
                        bp.kept_kv_heads.clear();
                    } else if let Some(BlockShape::Attention {
                        heads,
                        kv_heads,
                        head_dim,
                        ..
                    }) = shape
                    {
                        if a.head_dim == *head_dim
                            && *heads <= a.n_heads
                            && *kv_heads <= a.n_kv_heads
                        {
                            // Same shape as a real plan: whole KV groups or equal heads per group.
                            let per = heads / kv_heads.max(&1);
                            bp.kept = (0..*kv_heads)
                                .flat_map(|g| (0..per).map(move |r| g * a.heads_per_kv() + r))
                                .collect();
                            bp.kept_kv_heads = (0..*kv_heads).collect();
                        }
                    }
                }
                BlockKind::Ffn(f) => {
                    if remove_ffn {
                        bp.kept.clear();
                    } else if let Some(BlockShape::Ffn { width, .. }) = shape {
                        bp.kept = (0..(*width).min(f.width)).collect();
                    }
                }
            }
        }
        onnx::emit(self.model, &plan, &PrunedWeights::default())
    }

    fn prepare_bytes(&self, bytes: &[u8], workload: &Workload) -> AdapterResult<Prepared> {
        self.device.prepare(bytes, workload, self.vocab())
    }
}

/// Alternates a variant and its baseline; returns `(variant - baseline) / blocks`.
struct DiffRun<'p> {
    variant: Prepared,
    baseline: &'p mut Prepared,
    blocks: u32,
    device: &'p TractDevice,
}

impl TimedRun for DiffRun<'_> {
    fn run(&mut self) -> AdapterResult<Duration> {
        let v = self.device.time(&mut self.variant)?;
        let b = self.device.time(self.baseline)?;
        Ok(v.saturating_sub(b) / self.blocks.max(1))
    }
}

/// Runs one model.
struct WholeRun<'p> {
    model: Prepared,
    device: &'p TractDevice,
}

impl TimedRun for WholeRun<'_> {
    fn run(&mut self) -> AdapterResult<Duration> {
        self.device.time(&mut self.model)
    }
}

impl LatencyProfiler for TractProfiler<'_> {
    fn target(&self) -> TargetFingerprint {
        self.device.fingerprint()
    }

    fn model_key(&self) -> String {
        let s = self.model.structure();
        let attn = s.blocks.iter().filter(|b| b.kind.is_attention()).count();
        format!(
            "{} blocks={} attention={} hidden={} vocab={} first={:?}",
            s.architecture,
            s.blocks.len(),
            attn,
            s.blocks.first().map(|b| b.hidden).unwrap_or(0),
            self.model.vocab().unwrap_or(0),
            s.blocks.first().map(|b| b.kind),
        )
    }

    fn prepare<'a>(
        &'a mut self,
        what: &Measured,
        workload: &Workload,
    ) -> AdapterResult<Box<dyn TimedRun + 'a>> {
        match what {
            Measured::Rest => {
                let bytes = self.variant(None, true, true)?;
                Ok(Box::new(WholeRun {
                    model: self.prepare_bytes(&bytes, workload)?,
                    device: &self.device,
                }))
            }
            Measured::Model(path) => {
                let bytes = std::fs::read(path).map_err(|e| AdapterError::io(path, e))?;
                Ok(Box::new(WholeRun {
                    model: self.prepare_bytes(&bytes, workload)?,
                    device: &self.device,
                }))
            }
            Measured::Block(shape) => {
                let attention = matches!(shape, BlockShape::Attention { .. });
                let blocks = self
                    .model
                    .structure()
                    .blocks
                    .iter()
                    .filter(|b| b.kind.is_attention() == attention)
                    .count() as u32;
                let variant_bytes = self.variant(Some(shape), false, false)?;
                let variant = self.prepare_bytes(&variant_bytes, workload)?;
                if !self.baselines.contains_key(&(attention, *workload)) {
                    let bytes = self.variant(None, attention, !attention)?;
                    let p = self.prepare_bytes(&bytes, workload)?;
                    self.baselines.insert((attention, *workload), p);
                }
                let baseline = self
                    .baselines
                    .get_mut(&(attention, *workload))
                    .expect("inserted");
                Ok(Box::new(DiffRun {
                    variant,
                    baseline,
                    blocks,
                    device: &self.device,
                }))
            }
        }
    }
}

/// Two models timed end to end, alternating runs, and where the second one's nodes ran
/// (GPU targets only).
pub struct PairTiming {
    /// The second model (the pruned one) timed against the first (the dense one).
    pub timing: ziplm_plugin_api::PairedTiming,
    /// Where the second model's nodes ran on a GPU.
    pub placement: Option<Placement>,
}

/// Times two model files end to end at a workload on `device`, alternating runs;
/// returns the second's timing against the first (medians, spreads and the rounds'
/// median ratio over `runs` after `warmup`).
pub fn time_pair(
    model: &TractModel,
    a: &Path,
    b: &Path,
    workload: &Workload,
    device: &TractDevice,
    settings: &crate::profile::ProfileSettings,
) -> AdapterResult<PairTiming> {
    let profiler = TractProfiler::new(model, device.clone());
    let read = |p: &Path| std::fs::read(p).map_err(|e| AdapterError::io(p, e));
    // A file that is not ONNX is named as such (the runner sees only bytes).
    let prepare = |p: &Path| {
        let bytes = read(p)?;
        onnx::OnnxFile::from_bytes(&bytes, p)?;
        profiler.prepare_bytes(&bytes, workload)
    };
    let mut pa = prepare(a)?;
    let mut pb = prepare(b)?;
    let placement = pb.placement.take();
    let timing = crate::profile::time_alternating(
        settings,
        || device.time(&mut pa),
        || device.time(&mut pb),
    )?;
    Ok(PairTiming { timing, placement })
}
