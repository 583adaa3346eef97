//! A third backend, written here against the plugin API and ziplm's backend traits
//! only, registered with one line: `refnet`, a tiny pre-norm transformer in a JSON
//! file with a real forward (RMS norm, causal multi-head attention, ReLU FFN). The
//! whole pipeline calibrates it, builds the database, profiles its blocks, searches,
//! emits, times dense against pruned and verifies it through the same code path as
//! tract and mistral.rs; the emitted model is checked against the masked dense one.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use ziplm::backend::{Backend, ProfileRequest};
use ziplm::job::PruneJob;
use ziplm::pipeline::{self, Session};
use ziplm::profile::ProfileSettings;
use ziplm::progress::Progress;
use ziplm::report::PruneReport;
use ziplm::search::Budget;
use ziplm_plugin_api::{
    ActivationSink, AdapterError, AdapterResult, AttentionShape, BlockId, BlockKind, BlockPlan,
    BlockShape, EmitSummary, FfnShape, LatencyProfiler, LatencyTable, LayerIndex, Measured,
    ModelAdapter, ModelStructure, PairedTiming, Plan, PrunableBlock, PrunedWeights,
    ShapeConstraints, TargetFingerprint, TimedRun, WeightMatrix, Workload,
};

// ---- the model and its forward ----

/// Attention of one layer: `heads` heads of `head_dim`; Q/K/V rows `[heads*hd, hidden]`,
/// out-projection `[hidden, heads*hd]` (row-major).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Attn {
    heads: usize,
    head_dim: usize,
    wq: Vec<f32>,
    wk: Vec<f32>,
    wv: Vec<f32>,
    wo: Vec<f32>,
}

/// FFN of one layer: up `[width, hidden]`, down `[hidden, width]`.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Ffn {
    width: usize,
    up: Vec<f32>,
    down: Vec<f32>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Layer {
    attn: Option<Attn>,
    ffn: Option<Ffn>,
}

/// The whole file.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct RefNet {
    vocab: usize,
    hidden: usize,
    embed: Vec<f32>,
    layers: Vec<Layer>,
}

/// `y[r] = sum_c w[r, c] x[c]` for a `rows x cols` matrix.
fn matvec(w: &[f32], rows: usize, cols: usize, x: &[f32]) -> Vec<f32> {
    (0..rows)
        .map(|r| {
            w[r * cols..(r + 1) * cols]
                .iter()
                .zip(x)
                .map(|(a, b)| a * b)
                .sum()
        })
        .collect()
}

fn rms_norm(x: &[f32]) -> Vec<f32> {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let s = 1.0 / (ms + 1e-5).sqrt();
    x.iter().map(|v| v * s).collect()
}

impl Attn {
    /// The per-token inputs of the out-projection (heads concatenated).
    fn mixed(&self, h: &[Vec<f32>], hidden: usize) -> Vec<Vec<f32>> {
        let w = self.heads * self.head_dim;
        let q: Vec<Vec<f32>> = h.iter().map(|t| matvec(&self.wq, w, hidden, t)).collect();
        let k: Vec<Vec<f32>> = h.iter().map(|t| matvec(&self.wk, w, hidden, t)).collect();
        let v: Vec<Vec<f32>> = h.iter().map(|t| matvec(&self.wv, w, hidden, t)).collect();
        let scale = 1.0 / (self.head_dim as f32).sqrt();
        (0..h.len())
            .map(|i| {
                let mut out = vec![0f32; w];
                for hd in 0..self.heads {
                    let r = hd * self.head_dim..(hd + 1) * self.head_dim;
                    let scores: Vec<f32> = (0..=i)
                        .map(|j| {
                            q[i][r.clone()]
                                .iter()
                                .zip(&k[j][r.clone()])
                                .map(|(a, b)| a * b)
                                .sum::<f32>()
                                * scale
                        })
                        .collect();
                    let m = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                    let e: Vec<f32> = scores.iter().map(|s| (s - m).exp()).collect();
                    let z: f32 = e.iter().sum();
                    for (j, ej) in e.iter().enumerate() {
                        for (o, vv) in out[r.clone()].iter_mut().zip(&v[j][r.clone()]) {
                            *o += ej / z * vv;
                        }
                    }
                }
                out
            })
            .collect()
    }
}

impl Ffn {
    fn act(&self, h: &[Vec<f32>], hidden: usize) -> Vec<Vec<f32>> {
        h.iter()
            .map(|t| {
                matvec(&self.up, self.width, hidden, t)
                    .into_iter()
                    .map(|v| v.max(0.0))
                    .collect()
            })
            .collect()
    }
}

/// Where the forward reports the out-projection inputs of block `id`.
type Hook<'a> = &'a mut dyn FnMut(usize, &[Vec<f32>]) -> AdapterResult<()>;

impl RefNet {
    /// Final hidden states of `ids`; `hook` sees every block's out-projection inputs
    /// (block `2l` attention, `2l+1` FFN of layer `l`).
    fn forward(&self, ids: &[i64], hook: Hook) -> AdapterResult<Vec<Vec<f32>>> {
        let d = self.hidden;
        let mut x: Vec<Vec<f32>> = ids
            .iter()
            .map(|&i| {
                let i = (i as usize) % self.vocab;
                self.embed[i * d..(i + 1) * d].to_vec()
            })
            .collect();
        for (l, layer) in self.layers.iter().enumerate() {
            if let Some(a) = &layer.attn {
                let h: Vec<Vec<f32>> = x.iter().map(|t| rms_norm(t)).collect();
                let m = a.mixed(&h, d);
                hook(2 * l, &m)?;
                for (t, mt) in x.iter_mut().zip(&m) {
                    let o = matvec(&a.wo, d, a.heads * a.head_dim, mt);
                    t.iter_mut().zip(o).for_each(|(a, b)| *a += b);
                }
            }
            if let Some(f) = &layer.ffn {
                let h: Vec<Vec<f32>> = x.iter().map(|t| rms_norm(t)).collect();
                let act = f.act(&h, d);
                hook(2 * l + 1, &act)?;
                for (t, at) in x.iter_mut().zip(&act) {
                    let o = matvec(&f.down, d, f.width, at);
                    t.iter_mut().zip(o).for_each(|(a, b)| *a += b);
                }
            }
        }
        Ok(x.iter().map(|t| rms_norm(t)).collect())
    }

    fn output(&self, ids: &[i64]) -> Vec<Vec<f32>> {
        self.forward(ids, &mut |_, _| Ok(()))
            .expect("no hook error")
    }

    fn load(path: &Path) -> AdapterResult<RefNet> {
        let bytes = std::fs::read(path).map_err(|e| AdapterError::Io {
            path: path.into(),
            source: e,
        })?;
        serde_json::from_slice(&bytes).map_err(|e| AdapterError::InvalidModel {
            path: path.into(),
            detail: e.to_string(),
        })
    }

    /// A random model (a fixed LCG, so every run writes the same file).
    fn random(
        vocab: usize,
        hidden: usize,
        layers: usize,
        heads: usize,
        hd: usize,
        width: usize,
    ) -> RefNet {
        let mut s = 0x2545_f491_4f6c_dd1du64;
        let mut r = |n: usize, scale: f32| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    s = s
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale
                })
                .collect()
        };
        let w = heads * hd;
        RefNet {
            vocab,
            hidden,
            embed: r(vocab * hidden, 1.0),
            layers: (0..layers)
                .map(|_| Layer {
                    attn: Some(Attn {
                        heads,
                        head_dim: hd,
                        wq: r(w * hidden, 0.5),
                        wk: r(w * hidden, 0.5),
                        wv: r(w * hidden, 0.5),
                        wo: r(hidden * w, 0.3),
                    }),
                    ffn: Some(Ffn {
                        width,
                        up: r(width * hidden, 0.5),
                        down: r(hidden * width, 0.2),
                    }),
                })
                .collect(),
        }
    }

    /// This model with `plan` applied: kept rows of Q/K/V and FFN up, kept columns of
    /// the out-projections (replaced by `weights` where given), removed blocks dropped.
    fn pruned(&self, plan: &Plan, weights: &PrunedWeights) -> AdapterResult<RefNet> {
        let d = self.hidden;
        let mut out = self.clone();
        for bp in &plan.blocks {
            let l = bp.block.index() / 2;
            let cols = bp.kept_columns();
            let new_out = |old: &[f32], n_in: usize| -> Vec<f32> {
                match weights.out_projections.get(&bp.block) {
                    Some(w) => w.data.clone(),
                    None => (0..d)
                        .flat_map(|r| cols.iter().map(move |&c| old[r * n_in + c]))
                        .collect(),
                }
            };
            let rows = |m: &[f32]| -> Vec<f32> {
                cols.iter()
                    .flat_map(|&c| m[c * d..(c + 1) * d].to_vec())
                    .collect()
            };
            let layer = &mut out.layers[l];
            if bp.block.index() % 2 == 0 {
                let a = layer.attn.as_ref().ok_or_else(|| {
                    AdapterError::InvalidRequest("attention already removed".into())
                })?;
                layer.attn = (!bp.kept.is_empty()).then(|| Attn {
                    heads: bp.kept.len(),
                    head_dim: a.head_dim,
                    wq: rows(&a.wq),
                    wk: rows(&a.wk),
                    wv: rows(&a.wv),
                    wo: new_out(&a.wo, a.heads * a.head_dim),
                });
            } else {
                let f = layer
                    .ffn
                    .as_ref()
                    .ok_or_else(|| AdapterError::InvalidRequest("FFN already removed".into()))?;
                layer.ffn = (!bp.kept.is_empty()).then(|| Ffn {
                    width: bp.kept.len(),
                    up: rows(&f.up),
                    down: new_out(&f.down, f.width),
                });
            }
        }
        Ok(out)
    }

    /// The masked dense reference: the same shapes as this model, removed heads and
    /// neurons zeroed in the out-projections, kept columns set to `weights`.
    fn masked(&self, plan: &Plan, weights: &PrunedWeights) -> RefNet {
        let d = self.hidden;
        let mut out = self.clone();
        for bp in &plan.blocks {
            let cols = bp.kept_columns();
            let l = bp.block.index() / 2;
            let (m, n_in) = if bp.block.index() % 2 == 0 {
                let a = out.layers[l].attn.as_mut().unwrap();
                let n = a.heads * a.head_dim;
                (&mut a.wo, n)
            } else {
                let f = out.layers[l].ffn.as_mut().unwrap();
                let n = f.width;
                (&mut f.down, n)
            };
            let w = weights.out_projections.get(&bp.block);
            for r in 0..d {
                for c in 0..n_in {
                    let kept = cols.iter().position(|&k| k == c);
                    m[r * n_in + c] = match (kept, w) {
                        (None, _) => 0.0,
                        (Some(i), Some(w)) => w.get(r, i),
                        (Some(_), None) => m[r * n_in + c],
                    };
                }
            }
        }
        out
    }
}

// ---- the adapter, profiler and session ----

struct RefAdapter {
    net: RefNet,
    structure: ModelStructure,
    calibration: Vec<Vec<i64>>,
}

impl RefAdapter {
    fn new(net: RefNet, ffn_multiple: usize) -> RefAdapter {
        let mut blocks = vec![];
        for (l, layer) in net.layers.iter().enumerate() {
            let (a, f) = (layer.attn.as_ref().unwrap(), layer.ffn.as_ref().unwrap());
            blocks.push(PrunableBlock {
                id: BlockId(2 * l as u32),
                layer: LayerIndex(l as u32),
                kind: BlockKind::Attention(AttentionShape {
                    n_heads: a.heads,
                    n_kv_heads: a.heads,
                    head_dim: a.head_dim,
                }),
                hidden: net.hidden,
                name: format!("layers.{l}.attn"),
            });
            blocks.push(PrunableBlock {
                id: BlockId(2 * l as u32 + 1),
                layer: LayerIndex(l as u32),
                kind: BlockKind::Ffn(FfnShape {
                    width: f.width,
                    gated: false,
                }),
                hidden: net.hidden,
                name: format!("layers.{l}.ffn"),
            });
        }
        let structure = ModelStructure {
            architecture: "refnet".into(),
            blocks,
            constraints: ShapeConstraints {
                ffn_width_multiple: ffn_multiple,
                ..Default::default()
            },
        };
        RefAdapter {
            net,
            structure,
            calibration: vec![],
        }
    }
}

impl ModelAdapter for RefAdapter {
    fn set_calibration(&mut self, samples: Vec<Vec<i64>>) -> AdapterResult<()> {
        self.calibration = samples;
        Ok(())
    }
    fn vocab_size(&self) -> Option<usize> {
        Some(self.net.vocab)
    }
    fn structure(&self) -> &ModelStructure {
        &self.structure
    }
    fn calibrate(
        &mut self,
        capture: &[BlockId],
        sink: &mut dyn ActivationSink,
    ) -> AdapterResult<()> {
        for ids in &self.calibration {
            self.net.forward(ids, &mut |b, rows| {
                if !capture.contains(&BlockId(b as u32)) {
                    return Ok(());
                }
                let width = rows[0].len();
                sink.accept(BlockId(b as u32), &rows.concat(), width)
            })?;
        }
        Ok(())
    }
    fn out_projection(&self, block: BlockId) -> AdapterResult<WeightMatrix> {
        let layer = &self.net.layers[block.index() / 2];
        let (data, cols) = match block.index() % 2 {
            0 => layer
                .attn
                .as_ref()
                .map(|a| (a.wo.clone(), a.heads * a.head_dim)),
            _ => layer.ffn.as_ref().map(|f| (f.down.clone(), f.width)),
        }
        .ok_or_else(|| AdapterError::InvalidRequest(format!("{block} is removed")))?;
        Ok(WeightMatrix::new(self.net.hidden, cols, data).unwrap())
    }
    fn emit(
        &self,
        plan: &Plan,
        weights: &PrunedWeights,
        dest: &Path,
    ) -> AdapterResult<EmitSummary> {
        plan.validate_for(&self.structure)
            .map_err(AdapterError::InvalidRequest)?;
        let pruned = self.net.pruned(plan, weights)?;
        let bytes = serde_json::to_vec(&pruned).unwrap();
        std::fs::write(dest, &bytes).map_err(|e| AdapterError::Io {
            path: dest.into(),
            source: e,
        })?;
        let params = |n: &RefNet| -> u64 {
            n.layers
                .iter()
                .map(|l| {
                    l.attn.as_ref().map_or(0, |a| a.wq.len() * 3 + a.wo.len())
                        + l.ffn.as_ref().map_or(0, |f| f.up.len() + f.down.len())
                })
                .sum::<usize>() as u64
        };
        Ok(EmitSummary {
            path: dest.into(),
            bytes: bytes.len() as u64,
            params_before: params(&self.net),
            params_after: params(&pruned),
        })
    }
}

/// Times one block shape (or the embedding + final norm) on random states.
struct RefProfiler {
    hidden: usize,
}

struct RunBlock(Box<dyn FnMut()>);

impl TimedRun for RunBlock {
    fn run(&mut self) -> AdapterResult<Duration> {
        let t = Instant::now();
        (self.0)();
        Ok(t.elapsed())
    }
}

impl LatencyProfiler for RefProfiler {
    fn target(&self) -> TargetFingerprint {
        TargetFingerprint {
            runtime: "refnet".into(),
            runtime_version: "1".into(),
            device: "cpu".into(),
            threads: 1,
            dtype: "f32".into(),
        }
    }
    fn model_key(&self) -> String {
        format!("refnet-h{}", self.hidden)
    }
    fn prepare<'a>(
        &'a mut self,
        what: &Measured,
        workload: &Workload,
    ) -> AdapterResult<Box<dyn TimedRun + 'a>> {
        let d = self.hidden;
        let x: Vec<Vec<f32>> = (0..workload.seq_len)
            .map(|i| (0..d).map(|j| ((i * d + j) as f32 * 0.37).sin()).collect())
            .collect();
        let net = |layer: Layer| RefNet {
            vocab: 1,
            hidden: d,
            embed: vec![0.1; d],
            layers: vec![layer],
        };
        let run: Box<dyn FnMut()> = match *what {
            Measured::Block(BlockShape::Attention {
                heads, head_dim, ..
            }) => {
                let a = RefNet::random(1, d, 1, heads, head_dim, 1)
                    .layers
                    .remove(0)
                    .attn;
                let n = net(Layer { attn: a, ffn: None });
                Box::new(move || {
                    let a = n.layers[0].attn.as_ref().unwrap();
                    std::hint::black_box(a.mixed(&x, d));
                })
            }
            Measured::Block(BlockShape::Ffn { width, .. }) => {
                let f = RefNet::random(1, d, 1, 1, 1, width)
                    .layers
                    .remove(0)
                    .ffn
                    .unwrap();
                Box::new(move || {
                    let act = f.act(&x, d);
                    for a in &act {
                        std::hint::black_box(matvec(&f.down, d, f.width, a));
                    }
                })
            }
            _ => Box::new(move || {
                std::hint::black_box(x.iter().map(|t| rms_norm(t)).collect::<Vec<_>>());
            }),
        };
        Ok(Box::new(RunBlock(run)))
    }
}

/// The backend's state for a job: nothing beyond the model.
struct RefSession;

impl Session for RefSession {
    type Model = RefAdapter;
    fn profiler<'a>(
        &'a self,
        model: &'a RefAdapter,
        _: &PruneJob,
    ) -> Box<dyn LatencyProfiler + 'a> {
        Box::new(RefProfiler {
            hidden: model.net.hidden,
        })
    }
    fn output_name(&self, _: &RefAdapter, stem: &str) -> String {
        format!("{stem}.refnet")
    }
    fn measure(
        &mut self,
        _: &RefAdapter,
        job: &PruneJob,
        emitted: &EmitSummary,
    ) -> ziplm::Result<PairedTiming> {
        let dense = RefNet::load(&job.model)?;
        let pruned = RefNet::load(&emitted.path)?;
        let ids: Vec<i64> = (0..job.workload.seq_len as i64).collect();
        let time = |n: &RefNet| -> Result<Duration, ziplm::Error> {
            let t = Instant::now();
            std::hint::black_box(n.output(&ids));
            Ok(t.elapsed())
        };
        ziplm::profile::time_alternating(&job.verify_settings, || time(&dense), || time(&pruned))
    }
}

/// The backend's registry entry.
struct RefBackend;

impl Backend for RefBackend {
    fn name(&self) -> &'static str {
        "refnet"
    }
    fn takes(&self, model: &Path) -> bool {
        model.extension().and_then(|e| e.to_str()) == Some("refnet")
    }
    fn profile_settings(&self) -> ProfileSettings {
        ProfileSettings::new(1, 5)
    }
    fn models(&self) -> &'static str {
        "refnet files"
    }
    fn run(&self, job: &PruneJob, progress: &dyn Progress) -> ziplm::Result<PruneReport> {
        let open = |job: &PruneJob| -> ziplm::Result<(RefAdapter, RefSession)> {
            let net = RefNet::load(&job.model)?;
            Ok((
                RefAdapter::new(net, job.database.ffn_width_multiple),
                RefSession,
            ))
        };
        Ok(pipeline::run(job, open, progress)?.report)
    }
    fn structure(&self, model: &Path, _: &Workload) -> ziplm::Result<ModelStructure> {
        Ok(RefAdapter::new(RefNet::load(model)?, 8).structure)
    }
    fn profile(
        &self,
        model: &Path,
        request: &ProfileRequest,
        progress: &dyn Progress,
    ) -> ziplm::Result<LatencyTable> {
        let a = RefAdapter::new(RefNet::load(model)?, request.grid.ffn_width_multiple);
        let shapes = ziplm::database::grid_shapes(&a.structure, request.grid);
        let mut p = RefProfiler {
            hidden: a.net.hidden,
        };
        ziplm::profile::build_table(
            &mut p,
            &request.workload,
            &shapes,
            &request.settings,
            request.reuse,
            progress,
        )
    }
    fn time_files(
        &self,
        _: &Path,
        _: &[PathBuf],
        _: &Workload,
        _: ziplm::job::Device,
        _: &ProfileSettings,
        _: &dyn Progress,
    ) -> ziplm::Result<Vec<ziplm::backend::TimedFile>> {
        Err(ziplm::Error::Invalid("refnet: no speedup timing".into()))
    }
}

static REFNET: RefBackend = RefBackend;

#[test]
fn a_backend_registered_with_one_line_runs_the_whole_pipeline() {
    ziplm::backend::register(&REFNET);

    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.refnet");
    let dense = RefNet::random(50, 32, 2, 4, 8, 64);
    std::fs::write(&model, serde_json::to_vec(&dense).unwrap()).unwrap();

    // Resolved like any model: the path picks the backend, the backend its defaults.
    let mut job = PruneJob::new(&model);
    assert_eq!(job.backend.name(), "refnet");
    assert_eq!(job.profile, ProfileSettings::new(1, 5));
    job.out_dir = dir.path().join("out");
    job.workload = Workload::prefill(1, 16);
    job.random_samples = 16;
    job.database.ffn_width_multiple = 8;
    job.search.refine = None;
    job.budgets = vec![Budget::Speedup(1.5)];
    job.verify_settings = ProfileSettings::new(2, 9);
    let report = ziplm::backend::run_job(&job, &ziplm::progress::Quiet).unwrap();

    // Calibrated (a database with errors), profiled on this backend's target, searched,
    // emitted and timed end to end in this runtime.
    assert_eq!(report.architecture, "refnet");
    assert_eq!(report.target.runtime, "refnet");
    assert_eq!(report.calibration_tokens, 16 * 16);
    let b = &report.budgets[0];
    assert!(b.measured_dense_ms.unwrap() > 0.0 && b.measured_ms.unwrap() > 0.0);
    assert!(b.met.is_some() && !b.attempts.is_empty());
    assert!(b.params.1 < b.params.0, "{:?}", b.params);
    let emitted = job.out_dir.join("tiny.speedup-1.5.refnet");
    assert_eq!(Path::new(&b.output), emitted);
    for f in [
        "tiny.speedup-1.5.plan.json",
        "tiny.report.json",
        "tiny.report.txt",
        "tiny.manifest.json",
    ] {
        assert!(job.out_dir.join(f).exists(), "{f}");
    }
    // No scratch folder is left behind.
    let left: Vec<_> = std::fs::read_dir(&job.out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.') && n != ziplm::outputs::LOCK_FILE)
        .collect();
    assert!(left.is_empty(), "{left:?}");

    // The emitted model is the masked dense model with the compensated weights: the
    // plan and weights went through the emit contract intact.
    let plan: Plan = serde_json::from_slice(
        &std::fs::read(job.out_dir.join("tiny.speedup-1.5.plan.json")).unwrap(),
    )
    .unwrap();
    assert!(plan
        .blocks
        .iter()
        .any(|p| p.kept.len() < BlockPlan::dense(p.block, p.kind).kept.len()));
    let pruned = RefNet::load(&emitted).unwrap();
    let weights = PrunedWeights {
        out_projections: plan
            .blocks
            .iter()
            .filter(|p| !p.kept.is_empty())
            .map(|p| {
                let l = &pruned.layers[p.block.index() / 2];
                let (data, cols) = if p.block.index() % 2 == 0 {
                    let a = l.attn.as_ref().unwrap();
                    (a.wo.clone(), a.heads * a.head_dim)
                } else {
                    let f = l.ffn.as_ref().unwrap();
                    (f.down.clone(), f.width)
                };
                (
                    p.block,
                    WeightMatrix::new(dense.hidden, cols, data).unwrap(),
                )
            })
            .collect(),
        ..Default::default()
    };
    let reference = dense.masked(&plan, &weights);
    let ids: Vec<i64> = (0..12).map(|i| (i * 7) % 50).collect();
    let (a, b) = (pruned.output(&ids), reference.output(&ids));
    let diff = a
        .iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(diff < 1e-4, "pruned vs masked dense: max |diff| {diff}");
    // ... and the compensation changed the kept weights (OBS ran).
    let changed = plan.blocks.iter().filter(|p| !p.kept.is_empty()).any(|p| {
        let orig = dense.masked(&plan, &PrunedWeights::default());
        let l = p.block.index() / 2;
        let (o, n) = if p.block.index() % 2 == 0 {
            (
                &orig.layers[l].attn.as_ref().unwrap().wo,
                &reference.layers[l].attn.as_ref().unwrap().wo,
            )
        } else {
            (
                &orig.layers[l].ffn.as_ref().unwrap().down,
                &reference.layers[l].ffn.as_ref().unwrap().down,
            )
        };
        o.iter().zip(n).any(|(x, y)| (x - y).abs() > 1e-6)
    });
    assert!(changed, "no out-projection was compensated");

    // An adapter without paired streams: sequential correction is refused by name,
    // and nothing of the failed run reaches its output folder.
    job.sequential = true;
    job.out_dir = dir.path().join("out-sequential");
    let e = ziplm::backend::run_job(&job, &ziplm::progress::Quiet)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("sequential correction") && e.contains("prune without --sequential"),
        "{e}"
    );
    assert!(!job.out_dir.join("tiny.speedup-1.5.refnet").exists());
}

#[test]
fn several_calibration_sources_share_the_samples_in_turn() {
    use ziplm::data::{CalibrationData, CalibrationSource};
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = dir.path().join("tokenizer.json");
    let vocab: serde_json::Map<String, serde_json::Value> = ["[UNK]", "a", "b", "x", "y"]
        .iter()
        .enumerate()
        .map(|(i, w)| (w.to_string(), i.into()))
        .collect();
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": { "type": "Whitespace" }, "post_processor": null,
        "decoder": null, "model": { "type": "WordLevel", "unk_token": "[UNK]", "vocab": vocab }
    });
    std::fs::write(&tokenizer, json.to_string()).unwrap();
    let (ab, xy) = (dir.path().join("ab.txt"), dir.path().join("xy.txt"));
    std::fs::write(&ab, "a a b b a a b b a a b b").unwrap();
    std::fs::write(&xy, "x y x y x y x y").unwrap();
    let file = |path: &Path| CalibrationSource::File {
        path: path.to_path_buf(),
        format: None,
    };
    let mut job = PruneJob::new(dir.path().join("m.refnet"));
    job.tokenizer = Some(tokenizer);
    job.calibration = Some(CalibrationData {
        sources: vec![file(&ab), file(&xy)],
        samples: 5,
        seq_len: 4,
    });
    let model = RefAdapter::new(RefNet::random(8, 8, 1, 2, 4, 8), 4);
    let samples =
        pipeline::calibration::samples(&job, &model, &RefSession, &ziplm::progress::Quiet).unwrap();
    // Three windows of the first file, two of the second, one of each in turn.
    let (a, x) = (vec![1, 1, 2, 2], vec![3, 4, 3, 4]);
    assert_eq!(samples, [a.clone(), x.clone(), a.clone(), x, a]);
    // A source the backend cannot give fails the stage with its reason.
    job.calibration.as_mut().unwrap().sources[1] = CalibrationSource::SelfChat { tokens: 64 };
    let e = pipeline::calibration::samples(&job, &model, &RefSession, &ziplm::progress::Quiet)
        .unwrap_err()
        .to_string();
    assert!(e.contains("do not chat"), "{e}");
}
