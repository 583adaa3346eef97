//! The ZipLM database: every block's removal order and per-level errors, built from
//! one calibration pass (ZIPLM.md sections 2-4).
//!
//! `calibrate -> database`: the adapter streams out-projection inputs into Gram
//! accumulators; each block is then pruned greedily once, recording the error at every
//! level of its grid. Weights of a level are rebuilt on demand
//! ([`Database::pruned_weights`]); nothing per level is stored but the order and the
//! errors.

use crate::error::{Error, Result};
use crate::obs::{self, GramAccumulator, PreparedLayer, RemovalTrace};
use crate::progress::Progress;
use crate::search::{BlockCandidates, Candidate, SearchProblem, Selection};
use faer::Mat;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use ziplm_plugin_api::{
    AdapterError, BlockId, BlockKind, BlockPlan, BlockShape, GroupLayout, LatencyTable,
    ModelAdapter, ModelStructure, Plan, PrunableBlock, PrunedWeights, Timing, WeightMatrix,
    FORMAT_VERSION,
};

/// How the database is built.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DatabaseConfig {
    /// Relative dampening of `H` (ZIPLM.md: 0.01).
    pub dampening: f64,
    /// FFN level grid: kept widths are multiples of this, and of the runtime's
    /// `ffn_width_multiple` (the larger of the two wins).
    pub ffn_width_multiple: usize,
    /// Largest fraction of an FFN's neurons removed short of removing it entirely
    /// (the greedy stops there; 1.0 = down to the smallest grid width).
    pub max_ffn_removed_fraction: f64,
    /// Layers calibrated per pass of the adapter's forward (0 = all at once). Fewer
    /// layers per pass bound the Gram memory at the price of more forward passes.
    pub layers_per_pass: usize,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            dampening: obs::DEFAULT_DAMPENING,
            ffn_width_multiple: 32,
            max_ffn_removed_fraction: 1.0,
            layers_per_pass: 0,
        }
    }
}

/// One level of a block.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Level {
    /// Groups removed (a prefix of the removal order).
    pub removed_groups: usize,
    /// Heads (attention) or neurons (FFN) kept; 0 = removed.
    pub kept: usize,
    /// KV heads kept (attention), 0 for FFN.
    pub kept_kv: usize,
    /// Normalised output error `e(l, s)` on the calibration inputs.
    pub error: f64,
}

/// Everything known about one block after the greedy pass.
#[derive(Clone, Debug)]
pub struct BlockDatabase {
    /// The block.
    pub block: PrunableBlock,
    /// Its removable groups.
    pub layout: GroupLayout,
    /// The greedy removal order and scores.
    pub trace: RemovalTrace,
    /// Levels, dense first, ending with full removal.
    pub levels: Vec<Level>,
    /// `W` and `H` of the layer, kept to materialise weights.
    pub layer: PreparedLayer,
}

/// Wall time spent building a database.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DatabaseTimings {
    /// Calibration forward passes and Gram accumulation (seconds).
    pub calibrate_s: f64,
    /// Greedy OBS over all blocks (seconds).
    pub database_s: f64,
}

/// The database of a whole model.
#[derive(Clone, Debug)]
pub struct Database {
    /// Where the build time went.
    pub timings: DatabaseTimings,
    /// The model's structure.
    pub structure: ModelStructure,
    /// Per-block data, in block order.
    pub blocks: Vec<BlockDatabase>,
    /// Calibration tokens seen by each block.
    pub calibration_tokens: u64,
}

/// One block's inputs to [`Database::from_parts`].
pub struct BlockInput {
    /// Removable groups.
    pub layout: GroupLayout,
    /// Out-projection, outputs x inputs.
    pub weights: Mat<f64>,
    /// Gram matrix of its inputs (undampened).
    pub gram: Mat<f64>,
}

/// Removal counts at which a block has a level, ascending (0 first, all last).
pub fn level_removals(
    block: &PrunableBlock,
    layout: &GroupLayout,
    config: &DatabaseConfig,
    multiple: usize,
) -> Vec<usize> {
    let g = layout.groups.len();
    match block.kind {
        BlockKind::Attention(_) => (0..=g).step_by(layout.step()).collect(),
        BlockKind::Ffn(f) => {
            let n = f.width;
            let m = multiple.max(1);
            let frac = config.max_ffn_removed_fraction.clamp(0.0, 1.0);
            let min_width = ((n as f64) * (1.0 - frac)).ceil() as usize;
            let mut ks = vec![0];
            let mut w = (n - 1) / m * m; // largest multiple below n
            while w >= m.max(min_width) && w > 0 {
                ks.push(n - w);
                if w < m {
                    break;
                }
                w -= m;
            }
            ks.push(n);
            // FFN groups are neurons: removals count neurons.
            debug_assert_eq!(g, n);
            ks
        }
    }
}

pub(crate) fn to_faer(m: &WeightMatrix) -> Mat<f64> {
    Mat::from_fn(m.rows, m.cols, |i, j| m.data[i * m.cols + j] as f64)
}

fn to_weight_matrix(m: &Mat<f64>) -> WeightMatrix {
    let (r, c) = (m.nrows(), m.ncols());
    let mut data = Vec::with_capacity(r * c);
    for i in 0..r {
        for j in 0..c {
            data.push(m[(i, j)] as f32);
        }
    }
    WeightMatrix {
        rows: r,
        cols: c,
        data,
    }
}

/// The time the search gives a profiled block: the median of its timed runs
/// (ZIPLM.md section 5).
///
/// The fastest run repeats better from one profile to the next on this shared machine
/// (SmolLM2, prefill 512, 9 runs in 3 passes, six profiles: the half-width FFN saving
/// varied by 6.7% sd/mean as minima against 20.5% as medians;
/// `docs/results/profile-variance.txt`), but a search on minima made all-MiniLM-L6-v2's
/// first 2.0x prediction worse in CI (measured 1.65x; four searches then missed by
/// 0.2%, where the same check on medians met at 2.01x after two searches the same day),
/// so the median stays until whole runs show which predicts the runtime better.
pub fn search_time_ms(t: &Timing) -> f64 {
    t.median_ms
}

impl Database {
    /// Calibrates `adapter` and builds the database.
    pub fn build(
        adapter: &mut dyn ModelAdapter,
        config: &DatabaseConfig,
        progress: &dyn Progress,
    ) -> Result<Database> {
        let structure = adapter.structure().clone();
        structure
            .validate()
            .map_err(|e| Error::Invalid(format!("model structure: {e}")))?;
        let n_layers = structure.n_layers().max(1);
        let per_pass = if config.layers_per_pass == 0 {
            n_layers
        } else {
            config.layers_per_pass
        };
        let mut blocks = Vec::with_capacity(structure.blocks.len());
        let mut tokens = u64::MAX;
        let mut timings = DatabaseTimings::default();
        for first in (0..n_layers).step_by(per_pass) {
            let ids: Vec<BlockId> = structure
                .blocks
                .iter()
                .filter(|b| (first..first + per_pass).contains(&(b.layer.0 as usize)))
                .map(|b| b.id)
                .collect();
            if ids.is_empty() {
                continue;
            }
            let mut grams: BTreeMap<BlockId, GramAccumulator> = ids
                .iter()
                .map(|&id| {
                    (
                        id,
                        GramAccumulator::new(structure.blocks[id.index()].kind.out_proj_inputs()),
                    )
                })
                .collect();
            let t = std::time::Instant::now();
            progress.start("calibrating", 0);
            {
                let mut sink = |id: BlockId,
                                rows: &[f32],
                                width: usize|
                 -> std::result::Result<(), AdapterError> {
                    let acc = grams.get_mut(&id).ok_or_else(|| {
                        AdapterError::InvalidRequest(format!(
                            "activations for {id}, which was not asked for"
                        ))
                    })?;
                    if width != acc.width() {
                        return Err(AdapterError::InvalidRequest(format!(
                            "activations for {id} have width {width}, its out-projection has {} inputs",
                            acc.width()
                        )));
                    }
                    acc.add(rows)
                        .map_err(|e| AdapterError::Calibration(format!("{id}: {e}")))?;
                    progress.advance(0);
                    Ok(())
                };
                adapter.calibrate(&ids, &mut sink)?;
            }
            progress.finish();
            timings.calibrate_s += t.elapsed().as_secs_f64();
            let t = std::time::Instant::now();
            let mut inputs = Vec::with_capacity(ids.len());
            for &id in &ids {
                let acc = &grams[&id];
                let b = &structure.blocks[id.index()];
                tokens = tokens.min(acc.tokens());
                let gram = acc.finish().map_err(|e| match e {
                    Error::Calibration { detail, .. } => Error::Calibration {
                        context: format!("{id} ({})", b.name),
                        detail,
                    },
                    other => other,
                })?;
                let w = adapter.out_projection(id)?;
                if w.rows != b.hidden || w.cols != b.kind.out_proj_inputs() {
                    return Err(Error::Invalid(format!(
                        "{id} ({}): the adapter returned a {}x{} out-projection, expected {}x{}",
                        b.name,
                        w.rows,
                        w.cols,
                        b.hidden,
                        b.kind.out_proj_inputs()
                    )));
                }
                inputs.push((
                    id,
                    BlockInput {
                        layout: adapter.group_layout(id),
                        weights: to_faer(&w),
                        gram,
                    },
                ));
            }
            blocks.extend(Self::process(&structure, inputs, config, progress)?);
            timings.database_s += t.elapsed().as_secs_f64();
        }
        Ok(Database {
            timings,
            structure,
            blocks,
            calibration_tokens: if tokens == u64::MAX { 0 } else { tokens },
        })
    }

    /// Builds the database from weights and Gram matrices already at hand (one
    /// [`BlockInput`] per block, in block order).
    pub fn from_parts(
        structure: ModelStructure,
        inputs: Vec<BlockInput>,
        config: &DatabaseConfig,
    ) -> Result<Database> {
        structure
            .validate()
            .map_err(|e| Error::Invalid(format!("model structure: {e}")))?;
        if inputs.len() != structure.blocks.len() {
            return Err(Error::Invalid(format!(
                "{} inputs for {} blocks",
                inputs.len(),
                structure.blocks.len()
            )));
        }
        let tagged = structure.blocks.iter().map(|b| b.id).zip(inputs).collect();
        let blocks = Self::process(&structure, tagged, config, &crate::progress::Quiet)?;
        Ok(Database {
            timings: DatabaseTimings::default(),
            structure,
            blocks,
            calibration_tokens: 0,
        })
    }

    fn process(
        structure: &ModelStructure,
        inputs: Vec<(BlockId, BlockInput)>,
        config: &DatabaseConfig,
        progress: &dyn Progress,
    ) -> Result<Vec<BlockDatabase>> {
        crate::obs::serial_solvers();
        let multiple = config
            .ffn_width_multiple
            .max(structure.constraints.ffn_width_multiple)
            .max(1);
        progress.start("OBS database", inputs.len() as u64);
        // Blocks are independent: process them in parallel. Each block's arithmetic is
        // sequential, so the result does not depend on the thread count.
        let out = inputs
            .into_par_iter()
            .map(|(id, input)| {
                let block = structure.blocks[id.index()].clone();
                let r = Self::process_block(block, input, config, multiple);
                progress.advance(1);
                r
            })
            .collect::<Result<Vec<_>>>();
        progress.finish();
        out
    }

    fn process_block(
        block: PrunableBlock,
        input: BlockInput,
        config: &DatabaseConfig,
        multiple: usize,
    ) -> Result<BlockDatabase> {
        let ctx = |e: Error| match e {
            Error::Numerical { context, detail } => Error::Numerical {
                context: format!("{} ({}), {context}", block.id, block.name),
                detail,
            },
            Error::Invalid(d) => Error::Invalid(format!("{} ({}): {d}", block.id, block.name)),
            other => other,
        };
        let n = block.kind.out_proj_inputs();
        if input.weights.nrows() != block.hidden || input.weights.ncols() != n {
            return Err(Error::Invalid(format!(
                "{} ({}): weights are {}x{}, expected {}x{n}",
                block.id,
                block.name,
                input.weights.nrows(),
                input.weights.ncols(),
                block.hidden
            )));
        }
        input
            .layout
            .validate(n)
            .map_err(|e| Error::Invalid(format!("{} group layout: {e}", block.id)))?;
        let layer = PreparedLayer::new(
            input.weights.as_ref(),
            input.gram.as_ref(),
            config.dampening,
        )
        .map_err(ctx)?;
        let removals = level_removals(&block, &input.layout, config, multiple);
        let all = input.layout.groups.len();
        let max_greedy = removals
            .iter()
            .copied()
            .filter(|&k| k < all)
            .max()
            .unwrap_or(0);
        let trace = obs::run_greedy(&layer, &input.layout, max_greedy, &removals).map_err(ctx)?;
        let mut levels = Vec::with_capacity(removals.len());
        for &k in &removals {
            let error = if k == all {
                if layer.energy > 0.0 {
                    1.0
                } else {
                    0.0
                }
            } else {
                trace.error_at(k).ok_or_else(|| {
                    Error::numerical(
                        format!("{}", block.id),
                        format!("no error recorded after {k} removals"),
                    )
                })?
            };
            let (kept, kept_kv) = kept_units(
                &block,
                &input.layout,
                &trace.order[..k.min(trace.order.len())],
                k == all,
            )?;
            levels.push(Level {
                removed_groups: k,
                kept: kept.len(),
                kept_kv: kept_kv.len(),
                error,
            });
        }
        Ok(BlockDatabase {
            block,
            layout: input.layout,
            trace,
            levels,
            layer,
        })
    }

    /// The shape a block has at a level (`None` when removed).
    pub fn level_shape(&self, block: usize, level: usize) -> Option<BlockShape> {
        let b = &self.blocks[block];
        let l = b.levels[level];
        if l.kept == 0 {
            return None;
        }
        Some(match b.block.kind {
            BlockKind::Attention(a) => BlockShape::Attention {
                hidden: b.block.hidden,
                heads: l.kept,
                kv_heads: l.kept_kv,
                head_dim: a.head_dim,
            },
            BlockKind::Ffn(f) => BlockShape::Ffn {
                hidden: b.block.hidden,
                width: l.kept,
                gated: f.gated,
            },
        })
    }

    /// Every distinct block shape any level can take (what must be profiled).
    pub fn shapes(&self) -> Vec<BlockShape> {
        let mut s: Vec<BlockShape> = (0..self.blocks.len())
            .flat_map(|b| {
                (0..self.blocks[b].levels.len()).filter_map(move |l| self.level_shape(b, l))
            })
            .collect();
        s.sort();
        s.dedup();
        s
    }

    /// The search problem with latencies from `table` (see [`search_time_ms`]). Fails
    /// when a shape is missing from the table.
    pub fn search_problem(&self, table: &LatencyTable) -> Result<SearchProblem> {
        let mut blocks = Vec::with_capacity(self.blocks.len());
        for (bi, b) in self.blocks.iter().enumerate() {
            let mut levels = Vec::with_capacity(b.levels.len());
            for (li, l) in b.levels.iter().enumerate() {
                let time_ms = match self.level_shape(bi, li) {
                    None => 0.0,
                    Some(shape) => table
                        .get(&shape)
                        .ok_or_else(|| {
                            Error::Invalid(format!(
                                "the latency table has no timing for {shape:?} ({}); profile again (`ziplm profile`)",
                                b.block.name
                            ))
                        })
                        .map(search_time_ms)?,
                };
                levels.push(Candidate {
                    kept: l.kept,
                    error: l.error,
                    time_ms,
                });
            }
            blocks.push(BlockCandidates {
                block: b.block.id,
                layer: b.block.layer,
                attention: b.block.kind.is_attention(),
                levels,
            });
        }
        Ok(SearchProblem {
            blocks,
            rest_ms: search_time_ms(&table.rest),
            constraints: self.structure.constraints.clone(),
        })
    }

    /// What a selection keeps of one block.
    pub fn block_plan(&self, block: usize, level: usize) -> Result<BlockPlan> {
        let b = &self.blocks[block];
        let l = b.levels[level];
        let all = l.removed_groups == b.layout.groups.len();
        let (kept, kept_kv_heads) = kept_units(
            &b.block,
            &b.layout,
            &b.trace.order[..l.removed_groups.min(b.trace.order.len())],
            all,
        )?;
        Ok(BlockPlan {
            block: b.block.id,
            kind: b.block.kind,
            kept,
            kept_kv_heads,
        })
    }

    /// Block `block` at `level` as the database chose it (the same heads or neurons
    /// kept), with the kept columns' weights fitted to `(w, h)` (outputs x inputs, and
    /// the undampened Gram matrix, e.g. sequential correction's `(W*, H~)`); `None`
    /// weights for a removed block.
    pub fn refit(
        &self,
        block: usize,
        level: usize,
        w: &Mat<f64>,
        h: &Mat<f64>,
        dampening: f64,
    ) -> Result<(BlockPlan, Option<WeightMatrix>)> {
        let plan = self.block_plan(block, level)?;
        if plan.kept.is_empty() {
            return Ok((plan, None));
        }
        let layer = PreparedLayer::new(w.as_ref(), h.as_ref(), dampening)?;
        let m = obs::materialize(&layer, &plan.kept_columns())?;
        Ok((plan, Some(to_weight_matrix(&m))))
    }

    /// Block `block` at `level`'s removal count, re-chosen on other statistics: greedy
    /// OBS run on `(w, h)` (outputs x inputs, and the undampened Gram matrix, e.g.
    /// sequential correction's `(W*, H~)`) decides which groups go, and the kept
    /// columns' weights are fitted to them. The shape (and so the latency) is the
    /// level's; `None` weights for a removed block.
    pub fn rechoose(
        &self,
        block: usize,
        level: usize,
        w: &Mat<f64>,
        h: &Mat<f64>,
        dampening: f64,
    ) -> Result<(BlockPlan, Option<WeightMatrix>)> {
        let b = &self.blocks[block];
        let l = *b
            .levels
            .get(level)
            .ok_or_else(|| Error::Invalid(format!("{} has no level {level}", b.block.id)))?;
        if l.kept == 0 {
            return Ok((self.block_plan(block, level)?, None));
        }
        let layer = PreparedLayer::new(w.as_ref(), h.as_ref(), dampening)?;
        let trace = obs::run_greedy(&layer, &b.layout, l.removed_groups, &[])?;
        if trace.order.len() != l.removed_groups {
            return Err(Error::numerical(
                "re-choosing a block",
                format!(
                    "{}: the greedy removed {} groups of the {} the level removes",
                    b.block.id,
                    trace.order.len(),
                    l.removed_groups
                ),
            ));
        }
        let (kept, kept_kv_heads) = kept_units(&b.block, &b.layout, &trace.order, false)?;
        let plan = BlockPlan {
            block: b.block.id,
            kind: b.block.kind,
            kept,
            kept_kv_heads,
        };
        let m = obs::materialize(&layer, &plan.kept_columns())?;
        Ok((plan, Some(to_weight_matrix(&m))))
    }

    /// The plan for a selection.
    pub fn plan(&self, selection: &Selection) -> Result<Plan> {
        self.check_selection(selection)?;
        let blocks = selection
            .levels
            .iter()
            .enumerate()
            .map(|(b, &l)| self.block_plan(b, l))
            .collect::<Result<_>>()?;
        Ok(Plan {
            format_version: FORMAT_VERSION,
            architecture: self.structure.architecture.clone(),
            blocks,
        })
    }

    /// Compensated out-projections for every pruned (not dense, not removed) block.
    pub fn pruned_weights(&self, selection: &Selection) -> Result<PrunedWeights> {
        self.check_selection(selection)?;
        let jobs: Vec<(usize, usize)> = selection
            .levels
            .iter()
            .enumerate()
            .filter(|&(b, &l)| {
                let lv = self.blocks[b].levels[l];
                lv.removed_groups > 0 && lv.kept > 0
            })
            .map(|(b, &l)| (b, l))
            .collect();
        let mats = jobs
            .par_iter()
            .map(|&(b, l)| {
                let plan = self.block_plan(b, l)?;
                let m = obs::materialize(&self.blocks[b].layer, &plan.kept_columns())?;
                Ok((self.blocks[b].block.id, to_weight_matrix(&m)))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(PrunedWeights {
            out_projections: mats.into_iter().collect(),
            ..Default::default()
        })
    }

    fn check_selection(&self, selection: &Selection) -> Result<()> {
        if selection.levels.len() != self.blocks.len()
            || selection
                .levels
                .iter()
                .zip(&self.blocks)
                .any(|(&l, b)| l >= b.levels.len())
        {
            return Err(Error::Invalid(
                "the selection does not fit this database".into(),
            ));
        }
        Ok(())
    }

    /// The selection with every block dense.
    pub fn dense_selection(&self) -> Selection {
        Selection {
            levels: vec![0; self.blocks.len()],
        }
    }
}

/// Kept heads (or neurons) and kept KV heads after removing `removed` groups.
fn kept_units(
    block: &PrunableBlock,
    layout: &GroupLayout,
    removed: &[usize],
    all: bool,
) -> Result<(Vec<usize>, Vec<usize>)> {
    if all {
        return Ok((Vec::new(), Vec::new()));
    }
    let n = block.kind.out_proj_inputs();
    let mut gone = vec![false; n];
    for &g in removed {
        for &c in &layout.groups[g] {
            gone[c] = true;
        }
    }
    match block.kind {
        BlockKind::Ffn(_) => Ok(((0..n).filter(|&c| !gone[c]).collect(), Vec::new())),
        BlockKind::Attention(a) => {
            let mut heads = Vec::new();
            for h in 0..a.n_heads {
                let cols = &gone[h * a.head_dim..(h + 1) * a.head_dim];
                let n_gone = cols.iter().filter(|&&g| g).count();
                if n_gone == 0 {
                    heads.push(h);
                } else if n_gone != a.head_dim {
                    return Err(Error::Invalid(format!(
                        "{} ({}): the group layout removes part of head {h}; groups must hold whole heads",
                        block.id, block.name
                    )));
                }
            }
            let per_kv = a.heads_per_kv();
            let mut kv: Vec<usize> = heads.iter().map(|h| h / per_kv).collect();
            kv.dedup();
            Ok((heads, kv))
        }
    }
}

/// Every block shape the level grid can produce, from the structure alone (what
/// `ziplm profile` measures before any calibration).
pub fn grid_shapes(structure: &ModelStructure, config: &DatabaseConfig) -> Vec<BlockShape> {
    let multiple = config
        .ffn_width_multiple
        .max(structure.constraints.ffn_width_multiple)
        .max(1);
    let mut out = vec![];
    for b in &structure.blocks {
        let layout = GroupLayout::for_kind(&b.kind, structure.constraints.gqa_policy);
        for k in level_removals(b, &layout, config, multiple) {
            match b.kind {
                BlockKind::Attention(a) => {
                    // Columns removed after k groups: whole groups are removed in order,
                    // every group has the same number of heads.
                    let per_group = a.n_heads / layout.groups.len().max(1);
                    let heads = a.n_heads - k * per_group;
                    if heads == 0 {
                        continue;
                    }
                    let kv_heads =
                        match (structure.constraints.gqa_policy, a.n_kv_heads == a.n_heads) {
                            (_, true) => heads,
                            (ziplm_plugin_api::GqaPolicy::WholeKvGroups, false) => {
                                heads / a.heads_per_kv()
                            }
                            (ziplm_plugin_api::GqaPolicy::EqualPerKvGroup, false) => a.n_kv_heads,
                        };
                    out.push(BlockShape::Attention {
                        hidden: b.hidden,
                        heads,
                        kv_heads,
                        head_dim: a.head_dim,
                    });
                }
                BlockKind::Ffn(f) => {
                    if k < f.width {
                        out.push(BlockShape::Ffn {
                            hidden: b.hidden,
                            width: f.width - k,
                            gated: f.gated,
                        });
                    }
                }
            }
        }
    }
    out.sort();
    out.dedup();
    out
}
