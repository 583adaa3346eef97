//! What a prune run reports: JSON (stable, `--json`), readable text, and an SVG chart.

use crate::database::Database;
use crate::error::{Error, Result};
use crate::pipeline::{Attempt, BudgetOutcome};
use crate::search::Budget;
use serde::{Deserialize, Serialize};
use std::fmt::Write;
use std::path::Path;
use ziplm_plugin_api::{BlockKind, LatencyTable, TargetFingerprint, Workload};

/// Wall time of each stage, in seconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StageTimes {
    /// Loading and recognising the model.
    pub load_s: f64,
    /// Calibration: the samples (reading and tokenising the data, or the model writing
    /// its own chat transcripts), forward passes and Gram accumulation.
    pub calibrate_s: f64,
    /// Greedy OBS database.
    pub database_s: f64,
    /// Latency profiling (0 when a table was reused).
    pub profile_s: f64,
    /// Search (all budgets).
    pub search_s: f64,
    /// Writing the models.
    pub emit_s: f64,
    /// End-to-end timing of dense and pruned models.
    pub verify_s: f64,
    /// Sequential correction (0 when off).
    #[serde(default)]
    pub correct_s: f64,
    /// Recovery by distillation (gradual mode; 0 when one-shot).
    #[serde(default)]
    pub recover_s: f64,
}

impl StageTimes {
    /// Adds another run's stage times to these (a chain's stages).
    pub fn add(&mut self, o: &StageTimes) {
        self.load_s += o.load_s;
        self.calibrate_s += o.calibrate_s;
        self.database_s += o.database_s;
        self.profile_s += o.profile_s;
        self.search_s += o.search_s;
        self.emit_s += o.emit_s;
        self.verify_s += o.verify_s;
        self.correct_s += o.correct_s;
        self.recover_s += o.recover_s;
    }

    /// The pass without verification: load to emit.
    pub fn pass_s(&self) -> f64 {
        self.load_s
            + self.calibrate_s
            + self.database_s
            + self.profile_s
            + self.search_s
            + self.correct_s
            + self.emit_s
    }

    /// The issues' performance goal for the pass: 1.5 x (calibration forward pass +
    /// profiling runs).
    pub fn goal_s(&self) -> f64 {
        1.5 * (self.calibrate_s + self.profile_s)
    }

    /// One line with every stage, the pass and the goal.
    pub fn summary(&self) -> String {
        format!(
            "load {:.2}s calibrate {:.2}s database {:.2}s profile {:.2}s search {:.2}s emit {:.2}s; pass {:.2}s; goal 1.5 x (calibrate + profile) = {:.2}s",
            self.load_s,
            self.calibrate_s,
            self.database_s,
            self.profile_s,
            self.search_s,
            self.emit_s,
            self.pass_s(),
            self.goal_s()
        )
    }
}

/// The shape one layer got.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerShape {
    /// Layer index.
    pub layer: u32,
    /// Query heads kept / original.
    pub heads: (usize, usize),
    /// KV heads kept / original.
    pub kv_heads: (usize, usize),
    /// FFN neurons kept / original.
    pub ffn: (usize, usize),
}

/// A quality figure (STS Spearman x100, perplexity...).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Quality {
    /// Metric name.
    pub metric: String,
    /// Its value.
    pub value: f64,
}

/// The result for one budget.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BudgetReport {
    /// The budget.
    pub budget: Budget,
    /// Budget in predicted milliseconds.
    pub budget_ms: f64,
    /// The emitted file.
    pub output: String,
    /// Its size in bytes.
    pub bytes: u64,
    /// Predicted dense latency.
    pub predicted_dense_ms: f64,
    /// Predicted pruned latency.
    pub predicted_ms: f64,
    /// Measured dense latency (median), same run as `measured_ms`.
    pub measured_dense_ms: Option<f64>,
    /// Measured pruned latency (median).
    pub measured_ms: Option<f64>,
    /// Measured speedup: the median of the paired runs' ratios (dense over pruned,
    /// [`ziplm_plugin_api::PairedTiming::speedup`]).
    pub measured_speedup: Option<f64>,
    /// Whether the measurement met the budget.
    pub met: Option<bool>,
    /// Sum of normalised layer errors.
    pub error_sum: f64,
    /// Prunable parameters before / after.
    pub params: (u64, u64),
    /// Per-layer shapes.
    pub layers: Vec<LayerShape>,
    /// Every search-emit-verify round.
    pub attempts: Vec<Attempt>,
    /// Index in `attempts` of the round that was kept (the loosest that met the
    /// budget, else the last).
    #[serde(default)]
    pub chosen_attempt: usize,
    /// Quality of the pruned model, when evaluated.
    pub quality: Vec<Quality>,
    /// SPDY refinement: loss of the refined selection and of the plain DP's, when
    /// refinement ran.
    #[serde(default)]
    pub refined_loss: Option<(f64, f64)>,
    /// The recovery stage's run (gradual mode), when the job recovers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery: Option<crate::job::RecoverySummary>,
    /// Where this model sits in a chain (`--chain`), when the job chains.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain: Option<ChainStage>,
}

/// One stage of a chain (prune -> recover -> prune, [`crate::pipeline::chain`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChainStage {
    /// The model this stage pruned: the original, or the last stage's model.
    pub pruned_from: String,
    /// The budget the stage searched and verified, against the model it pruned.
    pub stage_budget: Budget,
    /// Speedup over the original as the product of this and every earlier stage's
    /// measured speedup (predicted where a stage was not verified). When the job
    /// verifies, the budget's `measured_*` fields time the model against the original
    /// in one paired run instead.
    pub speedup_over_original: f64,
}

/// A whole run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PruneReport {
    /// ziplm version.
    pub ziplm_version: String,
    /// The source model.
    pub model: String,
    /// Architecture.
    pub architecture: String,
    /// Where latencies were measured.
    pub target: TargetFingerprint,
    /// The workload.
    pub workload: Workload,
    /// Calibration tokens per block.
    pub calibration_tokens: u64,
    /// Profiled shapes and the non-prunable rest.
    pub profiled_shapes: usize,
    /// Non-prunable time (ms).
    pub rest_ms: f64,
    /// Stage wall times.
    pub stages: StageTimes,
    /// Quality of the dense model, when evaluated.
    pub dense_quality: Vec<Quality>,
    /// One entry per budget.
    pub budgets: Vec<BudgetReport>,
    /// Anything the reader should know (unverified results, fallbacks).
    #[serde(default)]
    pub notes: Vec<String>,
}

/// The report note for a budget the dense model already meets, if `outcome` kept the
/// dense model.
pub fn dense_note(db: &Database, outcome: &BudgetOutcome) -> Option<String> {
    (outcome.search.selection == db.dense_selection()).then(|| {
        format!(
            "{}: the dense model already meets this budget (predicted {:.3} ms <= {:.3} ms); emitted it unpruned",
            crate::job::PruneJob::budget_label(&outcome.budget),
            outcome.search.predicted_ms,
            outcome.search.budget_ms
        )
    })
}

impl PruneReport {
    /// A run's report: the job, the model's architecture, the latency table and
    /// database used, stage times, per-budget results and notes.
    pub fn new(
        job: &crate::job::PruneJob,
        architecture: &str,
        table: &LatencyTable,
        db: &Database,
        stages: StageTimes,
        budgets: Vec<BudgetReport>,
        notes: Vec<String>,
    ) -> PruneReport {
        PruneReport {
            ziplm_version: env!("CARGO_PKG_VERSION").into(),
            model: job.model.display().to_string(),
            architecture: architecture.into(),
            target: table.key.target.clone(),
            workload: job.workload,
            calibration_tokens: db.calibration_tokens,
            profiled_shapes: table.entries.len(),
            rest_ms: table.rest.median_ms,
            stages,
            dense_quality: vec![],
            budgets,
            notes,
        }
    }
}

/// Per-layer shapes of a plan.
pub fn layer_shapes(db: &Database, outcome: &BudgetOutcome) -> Vec<LayerShape> {
    let mut layers: std::collections::BTreeMap<u32, LayerShape> = Default::default();
    for (b, bp) in db.structure.blocks.iter().zip(&outcome.plan.blocks) {
        let e = layers.entry(b.layer.0).or_insert(LayerShape {
            layer: b.layer.0,
            heads: (0, 0),
            kv_heads: (0, 0),
            ffn: (0, 0),
        });
        match b.kind {
            BlockKind::Attention(a) => {
                e.heads = (bp.kept.len(), a.n_heads);
                e.kv_heads = (bp.kept_kv_heads.len(), a.n_kv_heads);
            }
            BlockKind::Ffn(f) => e.ffn = (bp.kept.len(), f.width),
        }
    }
    layers.into_values().collect()
}

/// Builds the report entry of one budget.
pub fn budget_report(
    db: &Database,
    table: &LatencyTable,
    outcome: &BudgetOutcome,
) -> Result<BudgetReport> {
    let problem = db.search_problem(table)?;
    let last = outcome.chosen_attempt();
    Ok(BudgetReport {
        budget: outcome.budget,
        budget_ms: problem.budget_ms(outcome.budget),
        output: outcome.emitted.path.display().to_string(),
        bytes: outcome.emitted.bytes,
        predicted_dense_ms: outcome.search.dense_ms,
        predicted_ms: outcome.search.predicted_ms,
        measured_dense_ms: last.and_then(|a| a.measured_dense.map(|t| t.median_ms)),
        measured_ms: last.and_then(|a| a.measured.map(|t| t.median_ms)),
        measured_speedup: outcome.measured_speedup(),
        met: outcome.met(),
        error_sum: outcome.search.error_sum,
        params: (outcome.emitted.params_before, outcome.emitted.params_after),
        layers: layer_shapes(db, outcome),
        attempts: outcome.attempts.clone(),
        chosen_attempt: outcome.chosen,
        quality: vec![],
        refined_loss: outcome.refined_loss,
        recovery: outcome.recovery.clone(),
        chain: None,
    })
}

/// " after N searches", and which one was kept when it was not the last.
fn searches_note(b: &BudgetReport) -> String {
    let n = b.attempts.len();
    match n {
        0 | 1 => String::new(),
        _ if b.chosen_attempt + 1 == n => format!(" after {n} searches"),
        _ => format!(
            " after {n} searches (kept search {}, the loosest that met it)",
            b.chosen_attempt + 1
        ),
    }
}

fn budget_label(b: &Budget) -> String {
    match b {
        Budget::LatencyMs(ms) => format!("{ms} ms"),
        Budget::Speedup(s) => format!("{s}x"),
    }
}

impl PruneReport {
    /// Readable multi-line summary.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "ziplm {} — {} ({})",
            self.ziplm_version, self.model, self.architecture
        );
        let _ = writeln!(s, "target: {}", self.target);
        let _ = writeln!(s, "workload: {}", self.workload);
        let _ = writeln!(
            s,
            "calibration: {} tokens per block; {} shapes profiled; rest {:.3} ms",
            self.calibration_tokens, self.profiled_shapes, self.rest_ms
        );
        let st = &self.stages;
        let _ = writeln!(
            s,
            "stages: load {:.2}s, calibrate {:.2}s, database {:.2}s, profile {:.2}s, search {:.2}s, {}emit {:.2}s, verify {:.2}s{}",
            st.load_s, st.calibrate_s, st.database_s, st.profile_s, st.search_s,
            if st.correct_s > 0.0 { format!("correct {:.2}s, ", st.correct_s) } else { String::new() },
            st.emit_s, st.verify_s,
            if st.recover_s > 0.0 { format!(", recover {:.2}s", st.recover_s) } else { String::new() }
        );
        for n in &self.notes {
            let _ = writeln!(s, "note: {n}");
        }
        for q in &self.dense_quality {
            let _ = writeln!(s, "dense {}: {:.3}", q.metric, q.value);
        }
        for b in &self.budgets {
            let _ = writeln!(s);
            let _ = writeln!(s, "budget {} -> {}", budget_label(&b.budget), b.output);
            if let Some(c) = &b.chain {
                let _ = writeln!(
                    s,
                    "  chain: pruned {} to {} of it (predicted figures and layers below are against it); {:.2}x the original as the stages' speedups multiplied",
                    c.pruned_from,
                    budget_label(&c.stage_budget),
                    c.speedup_over_original
                );
            }
            let _ = writeln!(
                s,
                "  predicted: {:.3} ms (dense {:.3} ms, {:.2}x)",
                b.predicted_ms,
                b.predicted_dense_ms,
                b.predicted_dense_ms / b.predicted_ms.max(f64::MIN_POSITIVE)
            );
            match (
                b.measured_ms,
                b.measured_dense_ms,
                b.measured_speedup,
                b.met,
            ) {
                (Some(m), Some(d), Some(sp), Some(met)) => {
                    let _ = writeln!(
                        s,
                        "  measured:  {m:.3} ms (dense {d:.3} ms; {sp:.2}x, the median of the paired runs' ratios) — {}{}",
                        if met { "budget met" } else { "BUDGET MISSED" },
                        searches_note(b)
                    );
                }
                _ => {
                    let _ = writeln!(s, "  measured:  not verified");
                }
            }
            let _ = writeln!(
                s,
                "  error sum {:.4}; prunable params {} -> {}",
                b.error_sum, b.params.0, b.params.1
            );
            for (i, a) in b.attempts.iter().enumerate() {
                if let Some(f) = &a.refit {
                    let _ = writeln!(
                        s,
                        "  runtime refit after search {}: {:.1} ms + {:.3} x attention + {:.3} x FFN",
                        i + 1,
                        f.rest_ms,
                        f.attention_scale,
                        f.ffn_scale
                    );
                }
            }
            if let Some((refined, plain)) = b.refined_loss {
                let _ = writeln!(
                    s,
                    "  SPDY refinement: output loss {refined:.5} (plain DP {plain:.5})"
                );
            }
            for q in &b.quality {
                let _ = writeln!(s, "  {}: {:.3}", q.metric, q.value);
            }
            let _ = writeln!(s, "  layer  heads     kv       ffn");
            for l in &b.layers {
                let _ = writeln!(
                    s,
                    "  {:>5}  {:>3}/{:<3}  {:>3}/{:<3}  {:>5}/{:<5}",
                    l.layer, l.heads.0, l.heads.1, l.kv_heads.0, l.kv_heads.1, l.ffn.0, l.ffn.1
                );
            }
        }
        s
    }

    /// Writes the JSON, text and SVG forms as `stem.json`, `stem.txt`, `stem.svg` in
    /// `dir` (atomically).
    pub fn write(&self, dir: &Path, stem: &str) -> Result<()> {
        crate::fsutil::write_json_atomic(&dir.join(format!("{stem}.json")), self)?;
        crate::fsutil::write_atomic(&dir.join(format!("{stem}.txt")), self.to_text().as_bytes())?;
        crate::fsutil::write_atomic(&dir.join(format!("{stem}.svg")), self.to_svg()?.as_bytes())
    }

    /// An SVG chart: kept heads and FFN width per layer for each budget (left), and
    /// predicted against measured latency per budget (right).
    pub fn to_svg(&self) -> Result<String> {
        use plotters::prelude::*;
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, (1000, 420)).into_drawing_area();
            let err = |e: &dyn std::fmt::Display| {
                Error::Invalid(format!("drawing the report chart: {e}"))
            };
            root.fill(&WHITE).map_err(|e| err(&e))?;
            let (left, right) = root.split_horizontally(560);
            let n_layers = self
                .budgets
                .first()
                .map(|b| b.layers.len())
                .unwrap_or(0)
                .max(1);
            let mut chart = ChartBuilder::on(&left)
                .caption(
                    "kept fraction per layer (solid: heads, dashed: FFN)",
                    ("sans-serif", 16),
                )
                .margin(10)
                .x_label_area_size(30)
                .y_label_area_size(40)
                .build_cartesian_2d(0f64..(n_layers as f64 - 0.5).max(0.5), 0f64..1.05)
                .map_err(|e| err(&e))?;
            chart
                .configure_mesh()
                .x_desc("layer")
                .y_desc("kept / original")
                .draw()
                .map_err(|e| err(&e))?;
            for (i, b) in self.budgets.iter().enumerate() {
                let color = Palette99::pick(i).to_rgba();
                let frac = |k: (usize, usize)| {
                    if k.1 == 0 {
                        0.0
                    } else {
                        k.0 as f64 / k.1 as f64
                    }
                };
                chart
                    .draw_series(LineSeries::new(
                        b.layers.iter().map(|l| (l.layer as f64, frac(l.heads))),
                        color.stroke_width(2),
                    ))
                    .map_err(|e| err(&e))?
                    .label(budget_label(&b.budget))
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                    });
                chart
                    .draw_series(DashedLineSeries::new(
                        b.layers.iter().map(|l| (l.layer as f64, frac(l.ffn))),
                        6,
                        4,
                        color.stroke_width(2),
                    ))
                    .map_err(|e| err(&e))?;
            }
            chart
                .configure_series_labels()
                .border_style(BLACK)
                .background_style(WHITE)
                .draw()
                .map_err(|e| err(&e))?;

            let max_ms = self
                .budgets
                .iter()
                .flat_map(|b| {
                    [
                        Some(b.predicted_dense_ms),
                        Some(b.predicted_ms),
                        b.measured_ms,
                        b.measured_dense_ms,
                    ]
                })
                .flatten()
                .fold(1e-9, f64::max)
                * 1.1;
            let n = self.budgets.len().max(1);
            let mut bars = ChartBuilder::on(&right)
                .caption(
                    "latency per budget (ms): predicted vs measured",
                    ("sans-serif", 16),
                )
                .margin(10)
                .x_label_area_size(30)
                .y_label_area_size(50)
                .build_cartesian_2d(0f64..n as f64, 0f64..max_ms)
                .map_err(|e| err(&e))?;
            bars.configure_mesh()
                .disable_x_mesh()
                .x_labels(n)
                .x_label_formatter(&|x| {
                    self.budgets
                        .get(x.floor() as usize)
                        .map(|b| budget_label(&b.budget))
                        .unwrap_or_default()
                })
                .y_desc("ms")
                .draw()
                .map_err(|e| err(&e))?;
            for (i, b) in self.budgets.iter().enumerate() {
                let x = i as f64;
                bars.draw_series(std::iter::once(Rectangle::new(
                    [(x + 0.15, 0.0), (x + 0.45, b.predicted_ms)],
                    BLUE.mix(0.6).filled(),
                )))
                .map_err(|e| err(&e))?;
                if let Some(m) = b.measured_ms {
                    bars.draw_series(std::iter::once(Rectangle::new(
                        [(x + 0.5, 0.0), (x + 0.8, m)],
                        RED.mix(0.6).filled(),
                    )))
                    .map_err(|e| err(&e))?;
                }
                bars.draw_series(std::iter::once(Rectangle::new(
                    [
                        (x + 0.1, b.budget_ms),
                        (x + 0.85, b.budget_ms + max_ms * 0.004),
                    ],
                    BLACK.filled(),
                )))
                .map_err(|e| err(&e))?;
            }
            root.present().map_err(|e| err(&e))?;
        }
        Ok(svg)
    }
}
