//! Recovery by distillation (ZIPLM.md section 9, the gradual mode) in candle.
//!
//! The pruned model (the student) keeps its shapes; every kept projection (Q, K, V, O,
//! gate, up, down) trains, norms and embeddings stay. The loss of one window is the
//! token-mean KL(teacher || student) of the next-token distributions plus
//! `hidden_weight` times the mean over the student's layers of
//! `||h_s - h_t||^2 / ||h_t||^2` at each layer's output (token by token, against the
//! dense layer it came from). AdamW (own, so its moments checkpoint), linear warm-up and
//! cosine decay, global-norm clipping. The held-out windows (kept out of the
//! calibration, so out of every fit, by the pipeline) are never trained on; their
//! perplexity is measured every `eval_every`
//! steps, the best weights are kept and training stops after `patience` evaluations
//! without improvement. Data order comes from the job's seed, so a run is
//! deterministic on one machine and thread count. A checkpoint (weights, moments,
//! best weights, position) is written at every evaluation and resumed when the same
//! job runs again.
//!
//! The student's forward uses [`Kernels::Differentiable`]: candle's fused CPU kernels
//! have no backward pass, and a projection that gets no gradient is an error here
//! rather than silently left untrained.

use super::llama::{Kernels, LayerWeights, LlamaWeights, Site};
use super::train_ops;
use crate::error::{Error, Result};
use crate::job::recovery::{LearningRateTrial, RecoveryPoint, RecoverySettings, RecoverySummary};
use crate::progress::Progress;
use candle_core::{DType, Tensor, Var};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;
use ziplm_plugin_api::{
    ModelStructure, Plan, PrunedWeights, WeightMatrix, ROLE_GATE, ROLE_K, ROLE_Q, ROLE_UP, ROLE_V,
};

const CONTEXT: &str = "recovery";

fn ce(e: candle_core::Error) -> Error {
    Error::numerical(CONTEXT, e.to_string())
}

/// Names of the trained tensors of one layer, in [`Student`] order.
pub const TRAINED: [&str; 7] = ["wq", "wk", "wv", "wo", "gate", "up", "down"];

/// The trained tensors of a layer, in [`TRAINED`] order.
fn trained_mut(l: &mut LayerWeights) -> [&mut Tensor; 7] {
    [
        &mut l.wq,
        &mut l.wk,
        &mut l.wv,
        &mut l.wo,
        &mut l.gate,
        &mut l.up,
        &mut l.down,
    ]
}

/// A pruned model whose projections are candle `Var`s.
pub struct Student {
    /// The model; its projection tensors share storage with `vars`.
    pub weights: LlamaWeights,
    vars: Vec<Var>,
}

impl Student {
    /// A trainable copy of `pruned`.
    pub fn new(pruned: &LlamaWeights) -> candle_core::Result<Student> {
        let mut weights = pruned.clone();
        let mut vars = vec![];
        for l in &mut weights.layers {
            for t in trained_mut(l) {
                let v = Var::from_tensor(t)?;
                *t = v.as_tensor().clone();
                vars.push(v);
            }
        }
        Ok(Student { weights, vars })
    }

    /// Trained values.
    pub fn parameters(&self) -> usize {
        self.vars.iter().map(|v| v.elem_count()).sum()
    }

    /// The trained tensors' name (`layer.{j}.{wq|...}`) of index `i`.
    fn name(i: usize) -> String {
        format!("layer.{}.{}", i / TRAINED.len(), TRAINED[i % TRAINED.len()])
    }

    /// Copies of the current values (not tracked).
    fn snapshot(&self) -> candle_core::Result<Vec<Tensor>> {
        self.vars
            .iter()
            .map(|v| v.as_tensor().detach().copy())
            .collect()
    }

    fn restore(&self, values: &[Tensor]) -> candle_core::Result<()> {
        for (v, t) in self.vars.iter().zip(values) {
            v.set(t)?;
        }
        Ok(())
    }

    /// The model with plain (untracked) tensors.
    pub fn into_weights(self) -> candle_core::Result<LlamaWeights> {
        let mut w = self.weights;
        for l in &mut w.layers {
            for t in trained_mut(l) {
                *t = t.detach().copy()?;
            }
        }
        Ok(w)
    }
}

/// What the teacher says about one window: next-token logits and the hidden states at
/// the outputs of the layers the student kept.
struct TeacherWindow {
    logits: Tensor,
    hidden: Vec<Tensor>,
}

fn teacher_window(
    teacher: &LlamaWeights,
    ids: &[u32],
    kept: &[usize],
) -> candle_core::Result<TeacherWindow> {
    let mut hidden = vec![];
    // candle's fused kernels are f32 only (the f64 gradient checks compose them).
    let kernels = if teacher.embed.dtype() == DType::F32 {
        Kernels::Fused
    } else {
        Kernels::Differentiable
    };
    let logits = teacher.forward_with(ids, true, kernels, &mut |layer, site, x| {
        if site == Site::LayerOut && kept.contains(&layer) {
            hidden.push(x.detach());
        }
        Ok(())
    })?;
    Ok(TeacherWindow {
        logits: logits.detach(),
        hidden,
    })
}

/// The distillation loss of one window and its two terms `(loss, kl, hidden)`.
fn window_loss(
    student: &LlamaWeights,
    teacher: &TeacherWindow,
    ids: &[u32],
    hidden_weight: f64,
) -> candle_core::Result<(Tensor, f64, f64)> {
    let mut hs = vec![];
    let logits = student.forward_with(ids, true, Kernels::Differentiable, &mut |_, site, x| {
        if site == Site::LayerOut {
            hs.push(x.clone());
        }
        Ok(())
    })?;
    let t = ids.len() as f64;
    let kl = (train_ops::kl_rows(&logits, &teacher.logits)?.sum_all()? / t)?;
    let mut hidden = Tensor::zeros((), kl.dtype(), kl.device())?;
    for (s, d) in hs.iter().zip(&teacher.hidden) {
        let err = (s - d)?.sqr()?.sum_keepdim(1)?;
        let norm = d.sqr()?.sum_keepdim(1)?;
        hidden = (hidden + err.broadcast_div(&norm)?.mean_all()?)?;
    }
    let hidden = (hidden / hs.len().max(1) as f64)?;
    let loss = (&kl + (&hidden * hidden_weight)?)?;
    Ok((
        loss,
        kl.to_dtype(DType::F64)?.to_scalar::<f64>()?,
        hidden.to_dtype(DType::F64)?.to_scalar::<f64>()?,
    ))
}

/// The distillation loss of `student` on `windows` (no training): `(loss, kl, hidden)`
/// averaged over windows. `kept[j]` is the dense layer of student layer `j`.
pub fn distillation_loss(
    teacher: &LlamaWeights,
    student: &LlamaWeights,
    kept: &[usize],
    windows: &[Vec<u32>],
    hidden_weight: f64,
) -> Result<(f64, f64, f64)> {
    let mut sums = (0.0, 0.0, 0.0);
    for ids in windows {
        let tw = teacher_window(teacher, ids, kept).map_err(ce)?;
        let (l, kl, h) = window_loss(student, &tw, ids, hidden_weight).map_err(ce)?;
        sums.0 += l
            .to_dtype(DType::F64)
            .and_then(|l| l.to_scalar::<f64>())
            .map_err(ce)?;
        sums.1 += kl;
        sums.2 += h;
    }
    let n = windows.len().max(1) as f64;
    Ok((sums.0 / n, sums.1 / n, sums.2 / n))
}

/// Gradients of the loss of `windows` (mean over windows) with respect to every
/// trained tensor, in [`Student`] order. A tensor the gradient does not reach is an
/// error: an op without a backward pass cut it.
pub fn gradients(
    teacher: &LlamaWeights,
    student: &Student,
    kept: &[usize],
    windows: &[&[u32]],
    hidden_weight: f64,
) -> Result<(Vec<Tensor>, Terms)> {
    let mut acc: Vec<Option<Tensor>> = vec![None; student.vars.len()];
    let mut terms = Terms::default();
    let scale = 1.0 / windows.len().max(1) as f64;
    for ids in windows {
        let tw = teacher_window(teacher, ids, kept).map_err(ce)?;
        let (loss, kl, hidden) =
            window_loss(&student.weights, &tw, ids, hidden_weight).map_err(ce)?;
        terms.loss += scale
            * loss
                .to_dtype(DType::F64)
                .and_then(|l| l.to_scalar::<f64>())
                .map_err(ce)?;
        terms.kl += scale * kl;
        terms.hidden += scale * hidden;
        let grads = (loss * scale).and_then(|l| l.backward()).map_err(ce)?;
        for (i, v) in student.vars.iter().enumerate() {
            let g = grads.get(v.as_tensor()).ok_or_else(|| {
                Error::numerical(
                    CONTEXT,
                    format!(
                        "no gradient reached {} (an op without a backward pass)",
                        Student::name(i)
                    ),
                )
            })?;
            acc[i] = Some(match acc[i].take() {
                Some(a) => (a + g).map_err(ce)?,
                None => g.clone(),
            });
        }
    }
    Ok((acc.into_iter().flatten().collect(), terms))
}

/// A distillation loss and its two terms (KL of the logits, the hidden-state term).
#[derive(Clone, Copy, Debug, Default)]
pub struct Terms {
    /// `kl + hidden_weight * hidden`.
    pub loss: f64,
    /// Token-mean KL(teacher || student), nats.
    pub kl: f64,
    /// Mean relative squared error of the layer outputs.
    pub hidden: f64,
}

impl Terms {
    fn add(&mut self, o: Terms) {
        self.loss += o.loss;
        self.kl += o.kl;
        self.hidden += o.hidden;
    }
    fn mean(self, n: usize) -> Terms {
        let n = n.max(1) as f64;
        Terms {
            loss: self.loss / n,
            kl: self.kl / n,
            hidden: self.hidden / n,
        }
    }
}

/// AdamW with decoupled weight decay (β = 0.9, 0.999; ε = 1e-8).
struct AdamW {
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    step: usize,
}

impl AdamW {
    const B1: f64 = 0.9;
    const B2: f64 = 0.999;
    const EPS: f64 = 1e-8;

    fn new(student: &Student) -> candle_core::Result<AdamW> {
        let zeros = || -> candle_core::Result<Vec<Tensor>> {
            student
                .vars
                .iter()
                .map(|v| v.as_tensor().zeros_like())
                .collect()
        };
        Ok(AdamW {
            m: zeros()?,
            v: zeros()?,
            step: 0,
        })
    }

    fn update(
        &mut self,
        student: &Student,
        grads: &[Tensor],
        lr: f64,
        decay: f64,
    ) -> candle_core::Result<()> {
        self.step += 1;
        let c1 = 1.0 - Self::B1.powi(self.step as i32);
        let c2 = 1.0 - Self::B2.powi(self.step as i32);
        for (i, (var, g)) in student.vars.iter().zip(grads).enumerate() {
            self.m[i] = ((&self.m[i] * Self::B1)? + (g * (1.0 - Self::B1))?)?;
            self.v[i] = ((&self.v[i] * Self::B2)? + (g.sqr()? * (1.0 - Self::B2))?)?;
            let mhat = (&self.m[i] / c1)?;
            let vhat = (&self.v[i] / c2)?;
            let step = (mhat / (vhat.sqrt()? + Self::EPS)?)?;
            let w = var.as_tensor().detach();
            let next = ((&w * (1.0 - lr * decay))? - (step * lr)?)?;
            var.set(&next)?;
        }
        Ok(())
    }
}

/// Scales `grads` so that their global L2 norm is at most `clip`; returns the norm.
fn clip_gradients(grads: &mut [Tensor], clip: f64) -> candle_core::Result<f64> {
    let mut sq = 0.0;
    for g in grads.iter() {
        sq += g
            .sqr()?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
    }
    let norm = sq.sqrt();
    if norm > clip {
        let s = clip / (norm + 1e-6);
        for g in grads.iter_mut() {
            *g = (&*g * s)?;
        }
    }
    Ok(norm)
}

/// Perplexity of `model` on `windows` (fused kernels).
fn perplexity(model: &LlamaWeights, windows: &[Vec<u32>]) -> Result<f64> {
    let (mut nll, mut n) = (0.0, 0usize);
    for w in windows {
        let (a, b) = model.window_nll(w).map_err(ce)?;
        nll += a;
        n += b;
    }
    Ok((nll / n.max(1) as f64).exp())
}

/// Peak resident memory of this process so far, in bytes (Linux; `None` elsewhere).
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// What recovery needs in memory beyond the loaded dense model, in bytes, for a pruned
/// model `shapes` with `params` trained values: those values with their gradients,
/// AdamW moments and the best copy (5 f32 values each; 10 with learning-rate `trials`,
/// which hold a trial's state and the best trial's beside them), and one window's activations
/// kept for the backward pass (per layer about 16 hidden-width, 6 FFN-width and 5
/// attention-score values per token; 8 vocabulary-width values per token for the two
/// models' logits).
pub fn memory_estimate(shapes: &LlamaWeights, params: usize, window: usize, trials: bool) -> u64 {
    let cfg = &shapes.config;
    let t = window as u64;
    let per_token: u64 = shapes
        .layers
        .iter()
        .map(|l| {
            16 * cfg.hidden as u64
                + 6 * l.ffn_width() as u64
                + 5 * l.n_heads(cfg.head_dim) as u64 * t
        })
        .sum::<u64>()
        + 8 * cfg.vocab as u64;
    let values = if trials { 10 } else { 5 };
    4 * (values * params as u64 + t * per_token)
}

/// Where a recovery run resumes: written at every held-out evaluation.
struct Checkpoint<'a> {
    path: &'a Path,
    key: String,
}

/// The position a run reached (the checkpoint's metadata).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct Position {
    key: String,
    step: usize,
    best_perplexity: f64,
    bad_evaluations: usize,
    history: Vec<RecoveryPoint>,
    /// The learning rate chosen by the trials (none without trials).
    #[serde(default)]
    learning_rate: Option<f64>,
    #[serde(default)]
    trials: Vec<LearningRateTrial>,
}

impl Checkpoint<'_> {
    fn save(
        &self,
        student: &Student,
        adam: &AdamW,
        best: &[Tensor],
        position: &Position,
    ) -> Result<()> {
        let mut map: HashMap<String, Tensor> = HashMap::new();
        for (i, v) in student.vars.iter().enumerate() {
            map.insert(format!("w.{i}"), v.as_tensor().detach());
            map.insert(format!("m.{i}"), adam.m[i].clone());
            map.insert(format!("v.{i}"), adam.v[i].clone());
            map.insert(format!("best.{i}"), best[i].clone());
        }
        let meta = HashMap::from([(
            "position".to_string(),
            serde_json::to_string(position)
                .map_err(|e| Error::numerical(CONTEXT, e.to_string()))?,
        )]);
        let tmp = self.path.with_extension("safetensors.tmp");
        safetensors::serialize_to_file(&map, Some(meta), &tmp)
            .map_err(|e| Error::numerical(CONTEXT, format!("writing the checkpoint: {e}")))?;
        std::fs::rename(&tmp, self.path).map_err(|e| Error::io(self.path, e))
    }

    /// The saved state when it belongs to this run (same key), else `None`.
    fn load(
        &self,
        student: &Student,
        adam: &mut AdamW,
        best: &mut [Tensor],
    ) -> Result<Option<Position>> {
        let Ok(bytes) = std::fs::read(self.path) else {
            return Ok(None);
        };
        let Ok((_, meta)) = safetensors::SafeTensors::read_metadata(&bytes) else {
            return Ok(None);
        };
        let Some(position) = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("position"))
            .and_then(|p| serde_json::from_str::<Position>(p).ok())
        else {
            return Ok(None);
        };
        if position.key != self.key {
            return Ok(None);
        }
        let device = student.weights.embed.device();
        let tensors = candle_core::safetensors::load_buffer(&bytes, device).map_err(ce)?;
        let get = |name: String| {
            tensors
                .get(&name)
                .cloned()
                .ok_or_else(|| Error::numerical(CONTEXT, format!("checkpoint lacks {name}")))
        };
        for (i, v) in student.vars.iter().enumerate() {
            v.set(&get(format!("w.{i}"))?).map_err(ce)?;
            adam.m[i] = get(format!("m.{i}"))?;
            adam.v[i] = get(format!("v.{i}"))?;
            best[i] = get(format!("best.{i}"))?;
        }
        adam.step = position.step;
        Ok(Some(position))
    }
}

/// The run's identity for resuming: the settings, the data and the starting weights.
fn run_key(
    settings: &RecoverySettings,
    seed: u64,
    (train, held): (&[Vec<u32>], &[Vec<u32>]),
    student: &Student,
) -> Result<String> {
    let mut h = Sha256::new();
    h.update(serde_json::to_vec(settings).unwrap_or_default());
    h.update(seed.to_le_bytes());
    for windows in [train, held] {
        h.update((windows.len() as u64).to_le_bytes());
        for w in windows {
            h.update((w.len() as u64).to_le_bytes());
            for id in w {
                h.update(id.to_le_bytes());
            }
        }
    }
    for v in &student.vars {
        let data = v
            .as_tensor()
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(ce)?;
        for x in data {
            h.update(x.to_le_bytes());
        }
    }
    Ok(format!("{:x}", h.finalize()))
}

/// What every optimizer step of one recovery run shares.
struct Run<'a> {
    teacher: &'a LlamaWeights,
    kept: &'a [usize],
    train: &'a [Vec<u32>],
    settings: &'a RecoverySettings,
    seed: u64,
    per_step: usize,
    steps: usize,
}

impl Run<'_> {
    /// The training windows of step `step`: one shuffle per pass over them, from the
    /// seed.
    fn batch(&self, step: usize) -> Vec<&[u32]> {
        let (train, per_step) = (self.train, self.per_step);
        let first = step * per_step;
        let mut out = Vec::with_capacity(per_step);
        let mut epoch = usize::MAX;
        let mut perm: Vec<usize> = vec![];
        for k in first..first + per_step {
            let e = k / train.len();
            if e != epoch {
                epoch = e;
                perm = (0..train.len()).collect();
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(
                    self.seed ^ (e as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                );
                perm.shuffle(&mut rng);
            }
            out.push(train[perm[k % train.len()]].as_slice());
        }
        out
    }

    /// Optimizer step `step` (0-based) of the schedule peaking at `peak`; returns the
    /// step's loss terms, or `None` (and no update) when the loss is not finite.
    fn step(
        &self,
        student: &Student,
        adam: &mut AdamW,
        step: usize,
        peak: f64,
    ) -> Result<Option<Terms>> {
        let (mut grads, terms) = gradients(
            self.teacher,
            student,
            self.kept,
            &self.batch(step),
            self.settings.hidden_weight,
        )?;
        if !terms.loss.is_finite() {
            return Ok(None);
        }
        clip_gradients(&mut grads, self.settings.clip).map_err(ce)?;
        let lr = self
            .settings
            .with_peak(peak)
            .learning_rate_at(step, self.steps);
        adam.update(student, &grads, lr, self.settings.weight_decay)
            .map_err(ce)?;
        Ok(Some(terms))
    }
}

/// Distils `pruned` towards `teacher` on `train` (the calibration windows), keeping the
/// weights that read the lowest perplexity on `held` (windows no fit has seen,
/// [`crate::pipeline::calibration::hold_out`]). `kept[j]` is the dense layer of pruned
/// layer `j`.
/// With `checkpoint`, the state is saved there at every evaluation and a run with the
/// same inputs resumes from it; the file is removed when the run ends.
#[allow(clippy::too_many_arguments)] // each is one input of the run; a struct would only rename them
pub fn recover(
    teacher: &LlamaWeights,
    pruned: &LlamaWeights,
    kept: &[usize],
    train: &[Vec<u32>],
    held: &[Vec<u32>],
    settings: &RecoverySettings,
    seed: u64,
    checkpoint: Option<&Path>,
    progress: &dyn Progress,
) -> Result<(LlamaWeights, RecoverySummary)> {
    settings.check().map_err(Error::Invalid)?;
    let started = Instant::now();
    if train.is_empty() || held.is_empty() {
        return Err(Error::Invalid(format!(
            "recovery trains on the calibration windows and stops early on held-out ones, but it was given {} and {}: give more calibration data (--samples) and recovery.held_out >= 1",
            train.len(),
            held.len()
        )));
    }
    let window = train.iter().map(|w| w.len()).max().unwrap_or(1).max(1);
    let per_step = (settings.step_tokens / window).max(1);
    let steps = (settings.tokens as usize)
        .div_ceil(per_step * window)
        .max(1);

    let student = Student::new(pruned).map_err(ce)?;
    let mut adam = AdamW::new(&student).map_err(ce)?;
    let mut best = student.snapshot().map_err(ce)?;
    let key = run_key(settings, seed, (train, held), &student)?;
    let checkpoint = checkpoint.map(|path| Checkpoint {
        path,
        key: key.clone(),
    });
    let before = perplexity(&student.weights, held)?;
    let mut position = Position {
        key,
        step: 0,
        best_perplexity: before,
        bad_evaluations: 0,
        history: vec![],
        learning_rate: None,
        trials: vec![],
    };
    let mut resumed_at = None;
    if let Some(c) = &checkpoint {
        if let Some(p) = c.load(&student, &mut adam, &mut best)? {
            resumed_at = Some(p.step);
            position = p;
        }
    }

    let run = Run {
        teacher,
        kept,
        train,
        settings,
        seed,
        per_step,
        steps,
    };
    progress.start("recovering", steps as u64);
    progress.advance(position.step as u64);
    let mut first_loss = None;
    let mut interval = (Terms::default(), 0usize);
    let mut step = position.step;
    // Learning rates to choose from: each runs the first evaluation's steps from the
    // start, and the run goes on from the best one's state.
    if resumed_at.is_none() && !settings.learning_rate_trials.is_empty() {
        let k = settings.eval_every.min(steps);
        let start = best.clone(); // not resumed: the starting weights
                                  // (held-out perplexity, weights, optimizer, loss terms, first loss) of the best.
        type Trial = (f64, Vec<Tensor>, AdamW, (Terms, usize), Option<f64>);
        let mut winner: Option<Trial> = None;
        for &lr in &settings.learning_rate_trials {
            progress.status(&format!("trying peak learning rate {lr:e}"));
            student.restore(&start).map_err(ce)?;
            let mut trial_adam = AdamW::new(&student).map_err(ce)?;
            let (mut sum, mut first) = ((Terms::default(), 0usize), None);
            let mut diverged = false;
            for step in 0..k {
                let Some(terms) = run.step(&student, &mut trial_adam, step, lr)? else {
                    diverged = true;
                    break;
                };
                first.get_or_insert(terms.loss);
                sum.0.add(terms);
                sum.1 += 1;
            }
            // A rate whose loss or perplexity is not finite is a failed trial, not an
            // error: trying too high a rate is what trials are for.
            let ppl = match diverged {
                true => None,
                false => Some(perplexity(&student.weights, held)?).filter(|p| p.is_finite()),
            };
            position.trials.push(LearningRateTrial {
                learning_rate: lr,
                held_out_perplexity: ppl,
            });
            if let Some(ppl) = ppl.filter(|p| winner.as_ref().is_none_or(|w| *p < w.0)) {
                let state = student.snapshot().map_err(ce)?;
                winner = Some((ppl, state, trial_adam, sum, first));
                position.learning_rate = Some(lr);
            }
        }
        let Some((_, state, trial_adam, sum, first)) = winner else {
            return Err(Error::numerical(
                CONTEXT,
                format!(
                    "every learning rate tried ({:?}) made the loss or the held-out perplexity non-finite: give lower ones (--recover-lr, recovery.learning_rate_trials)",
                    settings.learning_rate_trials
                ),
            ));
        };
        student.restore(&state).map_err(ce)?;
        adam = trial_adam;
        (interval, first_loss, step) = (sum, first, k);
        progress.advance(k as u64);
    }
    let peak = position.learning_rate.unwrap_or(settings.learning_rate);
    let mut stopped_early = false;
    loop {
        if step > 0
            && (step.is_multiple_of(settings.eval_every) || step == steps)
            && step > position.step
        {
            let ppl = perplexity(&student.weights, held)?;
            let mean = interval.0.mean(interval.1);
            interval = (Terms::default(), 0);
            position.history.push(RecoveryPoint {
                step,
                loss: mean.loss,
                kl: mean.kl,
                hidden: mean.hidden,
                held_out_perplexity: ppl,
            });
            progress.status(&format!(
                "loss {:.4} (KL {:.4}, hidden {:.4}), held-out perplexity {ppl:.2}",
                mean.loss, mean.kl, mean.hidden
            ));
            if ppl < position.best_perplexity {
                position.best_perplexity = ppl;
                position.bad_evaluations = 0;
                best = student.snapshot().map_err(ce)?;
            } else {
                position.bad_evaluations += 1;
            }
            position.step = step;
            if position.bad_evaluations >= settings.patience {
                stopped_early = true;
                break;
            }
            if let Some(c) = &checkpoint {
                if step < steps {
                    c.save(&student, &adam, &best, &position)?;
                }
            }
        }
        if step >= steps {
            break;
        }
        let Some(terms) = run.step(&student, &mut adam, step, peak)? else {
            return Err(Error::numerical(
                CONTEXT,
                format!("the distillation loss became non-finite at step {step}: lower recovery.learning_rate"),
            ));
        };
        first_loss.get_or_insert(terms.loss);
        interval.0.add(terms);
        interval.1 += 1;
        step += 1;
        progress.advance(1);
    }
    progress.finish();
    student.restore(&best).map_err(ce)?;
    let params = student.parameters();
    let weights = student.into_weights().map_err(ce)?;
    if let Some(c) = &checkpoint {
        let _ = std::fs::remove_file(c.path);
    }
    let summary = RecoverySummary {
        steps: position.step,
        planned_steps: steps,
        tokens: (position.step * per_step * window) as u64,
        windows_per_step: per_step,
        train_windows: train.len(),
        held_out_windows: held.len(),
        trained_parameters: params as u64,
        first_loss: first_loss.unwrap_or(f64::NAN),
        held_out_perplexity_before: before,
        held_out_perplexity_after: position.best_perplexity,
        stopped_early,
        learning_rate: peak,
        learning_rate_trials: position.trials,
        resumed_at_step: resumed_at,
        seconds: started.elapsed().as_secs_f64(),
        memory_estimate_bytes: memory_estimate(
            pruned,
            params,
            window,
            !settings.learning_rate_trials.is_empty(),
        ),
        peak_rss_bytes: peak_rss_bytes(),
        history: position.history,
    };
    Ok((weights, summary))
}

/// Relative difference below which two norm weights are the same tensor (stored at
/// another precision: bf16 rounds to about 4e-3).
const SAME_NORM: f32 = 1e-2;

/// The layer of `teacher` each layer of `student` came from, for a student that was
/// pruned (and perhaps recovered) from the teacher with whole layers dropped: matched
/// in order by the layers' norm weights, which pruning and recovery leave as they are.
/// An error when the two do not share the hidden width and vocabulary, when a student
/// layer has no match (the teacher is not the model the student came from), or when
/// it matches more than one place (norms that repeat, as in untrained models).
pub fn layers_in_teacher(teacher: &LlamaWeights, student: &LlamaWeights) -> Result<Vec<usize>> {
    let (t, s) = (&teacher.config, &student.config);
    if t.hidden != s.hidden || t.vocab != s.vocab {
        return Err(Error::Invalid(format!(
            "the recovery's teacher has hidden width {} and {} tokens, the model pruned {} and {}: give the dense model the pruned one came from",
            t.hidden, t.vocab, s.hidden, s.vocab
        )));
    }
    let norms = |l: &LayerWeights| -> Result<Vec<f32>> {
        let mut v = l.attn_norm.to_vec1::<f32>().map_err(ce)?;
        v.extend(l.ffn_norm.to_vec1::<f32>().map_err(ce)?);
        Ok(v)
    };
    let teacher_norms = teacher
        .layers
        .iter()
        .map(norms)
        .collect::<Result<Vec<_>>>()?;
    let mut map = Vec::with_capacity(student.layers.len());
    let mut next = 0;
    let (nt, ns) = (teacher_norms.len(), student.layers.len());
    for (j, layer) in student.layers.iter().enumerate() {
        let mine = norms(layer)?;
        let same = |theirs: &Vec<f32>| {
            let scale = theirs
                .iter()
                .fold(0f32, |m, x| m.max(x.abs()))
                .max(f32::MIN_POSITIVE);
            let diff = theirs
                .iter()
                .zip(&mine)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            diff <= SAME_NORM * scale
        };
        // The layers after this one need teacher layers after its match.
        let last = (nt + j + 1).saturating_sub(ns);
        let found: Vec<usize> = (next..last.min(nt))
            .filter(|&i| same(&teacher_norms[i]))
            .collect();
        let i = match found[..] {
            [i] => i,
            [] => {
                return Err(Error::Invalid(format!(
                    "layer {j} of the model pruned matches no layer of the recovery's teacher (their norm weights differ): give the dense model the pruned one came from"
                )))
            }
            _ => {
                return Err(Error::Invalid(format!(
                    "layer {j} of the model pruned matches layers {found:?} of the recovery's teacher (their norm weights repeat), so the layers it kept cannot be told apart: recover towards it without a teacher"
                )))
            }
        };
        map.push(i);
        next = i + 1;
    }
    Ok(map)
}

/// The dense layer of each layer the plan keeps (the pruned model's layer order).
pub fn kept_layers(structure: &ModelStructure, plan: &Plan) -> Vec<usize> {
    let mut layers: Vec<usize> = structure
        .blocks
        .iter()
        .zip(&plan.blocks)
        .filter(|(b, p)| b.kind.is_attention() && !p.kept.is_empty())
        .map(|(b, _)| b.layer.0 as usize)
        .collect();
    layers.sort_unstable();
    layers.dedup();
    layers
}

fn matrix_of(t: &Tensor) -> Result<WeightMatrix> {
    let (r, c) = t.dims2().map_err(ce)?;
    let data = t
        .flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(ce)?;
    WeightMatrix::new(r, c, data).ok_or_else(|| Error::numerical(CONTEXT, "tensor size"))
}

/// Every trained tensor of `student` (pruned by `plan`) as the plan's replaced
/// weights: the out-projections and, by role, Q/K/V and gate/up.
pub fn as_pruned_weights(
    student: &LlamaWeights,
    structure: &ModelStructure,
    plan: &Plan,
) -> Result<PrunedWeights> {
    let kept = kept_layers(structure, plan);
    if kept.len() != student.layers.len() {
        return Err(Error::Invalid(format!(
            "the plan keeps {} layers, the recovered model has {}",
            kept.len(),
            student.layers.len()
        )));
    }
    let mut out = PrunedWeights::default();
    for (j, &dense_layer) in kept.iter().enumerate() {
        let l = &student.layers[j];
        for b in structure
            .blocks
            .iter()
            .filter(|b| b.layer.0 as usize == dense_layer)
        {
            let (proj, roles): (&Tensor, Vec<(&str, &Tensor)>) = if b.kind.is_attention() {
                (
                    &l.wo,
                    vec![(ROLE_Q, &l.wq), (ROLE_K, &l.wk), (ROLE_V, &l.wv)],
                )
            } else {
                (&l.down, vec![(ROLE_GATE, &l.gate), (ROLE_UP, &l.up)])
            };
            out.out_projections.insert(b.id, matrix_of(proj)?);
            let mut m = std::collections::BTreeMap::new();
            for (role, t) in roles {
                m.insert(role.to_string(), matrix_of(t)?);
            }
            out.tensors.insert(b.id, m);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    use crate::backend::mistralrs::llama::{random_tensor as rand, tiny_weights as tiny};

    /// A student with its first layer dropped maps onto the teacher's second; norms
    /// stored at bf16 still match; another model's layers and another width do not.
    #[test]
    fn a_pruned_students_layers_are_found_in_its_teacher() {
        let teacher = tiny(1, DType::F32);
        assert_eq!(layers_in_teacher(&teacher, &teacher).unwrap(), vec![0, 1]);
        let mut student = teacher.clone();
        student.layers.remove(0);
        student.config.n_layers = 1;
        for l in &mut student.layers {
            l.attn_norm = l
                .attn_norm
                .to_dtype(DType::BF16)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
        }
        assert_eq!(layers_in_teacher(&teacher, &student).unwrap(), vec![1]);
        let other = tiny(100, DType::F32);
        let e = layers_in_teacher(&other, &student).unwrap_err().to_string();
        assert!(
            e.contains("layer 0 of the model pruned matches no layer"),
            "{e}"
        );
        let mut twins = teacher.clone();
        twins.layers[0] = twins.layers[1].clone();
        let e = layers_in_teacher(&twins, &student).unwrap_err().to_string();
        assert!(e.contains("matches layers [0, 1]"), "{e}");
        let mut wide = teacher.clone();
        wide.config.hidden = 32;
        let e = layers_in_teacher(&wide, &student).unwrap_err().to_string();
        assert!(e.contains("hidden width 32"), "{e}");
    }

    /// Every op of the training forward passes its gradient on: the gradient of the
    /// whole distillation loss (KL + hidden term) against central finite differences,
    /// in f64, for entries of every trained tensor of every layer.
    #[test]
    fn differentiable_forward_matches_finite_differences() {
        let teacher = tiny(1, DType::F64);
        let student_w = tiny(100, DType::F64);
        let student = Student::new(&student_w).unwrap();
        let ids: Vec<u32> = vec![3, 1, 4, 1, 5, 9, 2, 6];
        let kept = [0usize, 1];
        let (grads, _) = gradients(&teacher, &student, &kept, &[&ids], 0.7).unwrap();
        assert_eq!(grads.len(), 14);
        let loss = |s: &Student| {
            distillation_loss(&teacher, &s.weights, &kept, std::slice::from_ref(&ids), 0.7)
                .unwrap()
                .0
        };
        let h = 1e-5;
        for (i, var) in student.vars.iter().enumerate() {
            let g = grads[i].flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let base = var
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            for k in [0, base.len() / 2, base.len() - 1] {
                let bumped = |delta: f64| {
                    let mut v = base.clone();
                    v[k] += delta;
                    var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                        .unwrap();
                    loss(&student)
                };
                let fd = (bumped(h) - bumped(-h)) / (2.0 * h);
                var.set(&Tensor::from_vec(base.clone(), var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                let tol = 1e-6 + 1e-4 * fd.abs().max(g[k].abs());
                assert!(
                    (g[k] - fd).abs() <= tol,
                    "{} [{k}]: backward {} vs finite difference {fd}",
                    Student::name(i),
                    g[k]
                );
            }
        }
    }

    /// The fused kernels cut the gradient: the check above would catch a forward
    /// that used them.
    #[test]
    fn fused_kernels_give_no_gradient() {
        let x = Var::from_tensor(&rand(&[2, 1, 3, 4], 5, DType::F32)).unwrap();
        let (cos, sin) = (rand(&[3, 2], 6, DType::F32), rand(&[3, 2], 7, DType::F32));
        let y = candle_nn::rotary_emb::rope_i(x.as_tensor(), &cos, &sin).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(x.as_tensor()).is_none());
        let y = candle_nn::rotary_emb::rope_i_slow(x.as_tensor(), &cos, &sin).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(x.as_tensor()).is_some());
    }

    /// A teacher, a student of the same shapes, and settings for 20 steps of 2 of the
    /// 8 training windows (12 tokens each) with an evaluation every 5 and no early stop.
    fn tiny_run() -> (LlamaWeights, LlamaWeights, RecoverySettings) {
        let mut settings = RecoverySettings::with_tokens(12 * 40);
        settings.step_tokens = 24;
        settings.held_out = 2;
        settings.eval_every = 5;
        settings.patience = 100;
        (tiny(1, DType::F32), tiny(100, DType::F32), settings)
    }

    /// The tiny run's 10 windows: 8 to train on, 2 held out.
    fn tiny_windows() -> Vec<Vec<u32>> {
        (0..10u32)
            .map(|s| (0..12u32).map(|i| (i * 7 + s * 3) % 11).collect())
            .collect()
    }

    /// [`recover`] on the tiny run's windows (both layers kept, seed 7).
    fn recover_tiny(
        teacher: &LlamaWeights,
        pruned: &LlamaWeights,
        settings: &RecoverySettings,
        checkpoint: Option<&Path>,
    ) -> Result<(LlamaWeights, RecoverySummary)> {
        let windows = tiny_windows();
        let (train, held) = windows.split_at(8);
        recover(
            teacher,
            pruned,
            &[0, 1],
            train,
            held,
            settings,
            7,
            checkpoint,
            &crate::progress::Quiet,
        )
    }

    /// Learning rates tried on held-out text: the run goes on from the best trial's
    /// state, and ends exactly where a run given that learning rate alone ends.
    #[test]
    fn a_learning_rate_chosen_on_held_out_text_continues_as_if_given_alone() {
        let (teacher, pruned, mut settings) = tiny_run();
        settings.min_learning_rate = 3e-6;
        settings.learning_rate_trials = vec![3e-5, 3e-3];
        let run = |s: &RecoverySettings| recover_tiny(&teacher, &pruned, s, None).unwrap();
        let (chosen_w, chosen) = run(&settings);
        let trials = &chosen.learning_rate_trials;
        assert_eq!(trials.len(), 2);
        let ppl = |t: &crate::job::LearningRateTrial| t.held_out_perplexity.unwrap();
        let best = trials
            .iter()
            .min_by(|a, b| ppl(a).total_cmp(&ppl(b)))
            .unwrap();
        assert_eq!(chosen.learning_rate, best.learning_rate);
        assert!(ppl(&trials[0]) != ppl(&trials[1]));
        // The winner's trial is the first evaluation of its run.
        assert_eq!(chosen.history[0].step, 5);
        assert_eq!(chosen.history[0].held_out_perplexity, ppl(best));

        let (alone_w, alone) = run(&settings.with_peak(best.learning_rate));
        assert!(alone.learning_rate_trials.is_empty());
        assert_eq!(alone.learning_rate, best.learning_rate);
        assert_eq!(chosen.history, alone.history);
        assert_eq!(chosen.steps, alone.steps);
        let bits = |w: &LlamaWeights| {
            w.layers
                .iter()
                .flat_map(|l| l.down.flatten_all().unwrap().to_vec1::<f32>().unwrap())
                .collect::<Vec<f32>>()
        };
        assert_eq!(bits(&chosen_w), bits(&alone_w));

        // A rate that diverges is a failed trial, not an error; all diverging is one.
        let mut wild = settings.clone();
        wild.learning_rate_trials = vec![3e-3, 1e30];
        let (_, s) = run(&wild);
        assert_eq!(s.learning_rate, 3e-3);
        assert_eq!(s.learning_rate_trials[1].held_out_perplexity, None);
        wild.learning_rate_trials = vec![1e30, 1e31];
        let e = recover_tiny(&teacher, &pruned, &wild, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("every learning rate tried"), "{e}");
    }

    /// Training lowers the distillation loss, keeps the shapes, is deterministic for a
    /// seed, and a second run with the same inputs resumes from the checkpoint.
    #[test]
    fn recovery_lowers_the_distillation_loss() {
        let (teacher, pruned, mut settings) = tiny_run();
        settings.learning_rate = 3e-3;
        settings.min_learning_rate = 3e-4;
        let kept = [0usize, 1];
        let windows = tiny_windows();
        let (train, held) = windows.split_at(8);
        let before = distillation_loss(&teacher, &pruned, &kept, train, 1.0)
            .unwrap()
            .0;
        let run = || recover_tiny(&teacher, &pruned, &settings, None).unwrap();
        let (after_w, summary) = run();
        let after = distillation_loss(&teacher, &after_w, &kept, train, 1.0)
            .unwrap()
            .0;
        assert!(after < 0.8 * before, "loss {before} -> {after}");
        assert_eq!(summary.planned_steps, 20);
        assert!(summary.held_out_perplexity_after <= summary.held_out_perplexity_before);
        for (a, b) in after_w.layers.iter().zip(&pruned.layers) {
            assert_eq!(a.wq.dims(), b.wq.dims());
            assert_eq!(a.down.dims(), b.down.dims());
        }
        let (again, _) = run();
        let bits = |w: &LlamaWeights| {
            w.layers[1]
                .up
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(bits(&after_w), bits(&again), "one seed, one result");

        // Resume: a checkpoint written mid-run by the same job is picked up.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ckpt.safetensors");
        let student = Student::new(&pruned).unwrap();
        let adam = AdamW::new(&student).unwrap();
        let key = run_key(&settings, 7, (train, held), &student).unwrap();
        let best = student.snapshot().unwrap();
        let c = Checkpoint {
            path: &path,
            key: key.clone(),
        };
        let position = Position {
            key,
            step: 15,
            best_perplexity: 1e30,
            bad_evaluations: 0,
            history: vec![],
            learning_rate: None,
            trials: vec![],
        };
        c.save(&student, &adam, &best, &position).unwrap();
        let (_, resumed) = recover_tiny(&teacher, &pruned, &settings, Some(&path)).unwrap();
        assert_eq!(resumed.resumed_at_step, Some(15));
        assert_eq!(resumed.steps, 20);
        assert!(!path.exists(), "the checkpoint goes when the run ends");
    }
}
