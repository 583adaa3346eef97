//! Recovery settings (ZIPLM.md section 9, the gradual mode): how long and how a pruned
//! model is distilled towards the dense one after its shapes are verified.
//!
//! Backend-neutral: a backend that recovers says so ([`crate::backend::Backend::recovers`])
//! and reads these; the mistral.rs backend's distillation is
//! `backend::mistralrs::recovery`.

use serde::{Deserialize, Serialize};

/// How a job distils each pruned model towards the dense model (`--recover TOKENS`,
/// `[model.recovery]`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecoverySettings {
    /// Training tokens in all (optimizer steps = tokens / `step_tokens`).
    pub tokens: u64,
    /// Peak learning rate (AdamW), reached after the warm-up.
    #[serde(default = "default_lr")]
    pub learning_rate: f64,
    /// Peak learning rates to choose from on held-out text: each runs the first
    /// `eval_every` steps from the same start on the same windows (its minimum scaled
    /// as `min_learning_rate / learning_rate`), and the run goes on from the one whose
    /// held-out perplexity is lowest, as if it alone had been given. The trials' steps
    /// fall in the warm-up when it is longer than `eval_every` steps, so the rates are
    /// compared below their peaks there. Empty: `learning_rate` as it is.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub learning_rate_trials: Vec<f64>,
    /// Learning rate at the end of the cosine schedule.
    #[serde(default = "default_min_lr")]
    pub min_learning_rate: f64,
    /// Fraction of the steps spent warming the learning rate up linearly.
    #[serde(default = "default_warmup")]
    pub warmup: f64,
    /// Tokens per optimizer step (whole calibration windows; at least one).
    #[serde(default = "default_step_tokens")]
    pub step_tokens: usize,
    /// Weight of the hidden-state term beside the logits' KL divergence.
    #[serde(default = "default_hidden_weight")]
    pub hidden_weight: f64,
    /// Global gradient-norm clip.
    #[serde(default = "default_clip")]
    pub clip: f64,
    /// AdamW's decoupled weight decay.
    #[serde(default)]
    pub weight_decay: f64,
    /// Calibration windows held out of training; recovery stops when their perplexity
    /// stops improving, and keeps the best weights.
    #[serde(default = "default_held_out")]
    pub held_out: usize,
    /// Optimizer steps between held-out evaluations (and checkpoints).
    #[serde(default = "default_eval_every")]
    pub eval_every: usize,
    /// Held-out evaluations without improvement before stopping.
    #[serde(default = "default_patience")]
    pub patience: usize,
    /// The model to distil towards, when the model pruned is itself pruned and
    /// recovered (prune -> recover -> prune, ZIPLM.md section 9): the original dense
    /// model. `None`: the model pruned. A chat model's own-chat calibration is written
    /// by it too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teacher: Option<std::path::PathBuf>,
    /// Prune the budgets as a chain (`--chain`; speedups only, two or more): the
    /// smallest from the model, each next one from the last one's recovered model,
    /// every stage distilled towards the original (or `teacher`) and its speedup
    /// stated against the original ([`crate::pipeline::chain`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub chain: bool,
    /// With `chain`: the training tokens of each stage, smallest speedup first
    /// (`--recover 16384,81920`), so the recovery goes where the damage is. Empty:
    /// `tokens` for every stage.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stage_tokens: Vec<u64>,
}

/// 1e-4 (the published full-scale recipes, with batches of ~1M tokens) made SmolLM2-135M
/// worse with 2,048-token steps (held-out perplexity 41.8 -> 45.9 after 4 steps); 1e-5
/// improved another 1.5x plan (100.8 -> 93.9 after 12 steps). Two runs on this
/// project's machine, not a controlled sweep.
fn default_lr() -> f64 {
    1e-5
}
fn default_min_lr() -> f64 {
    1e-6
}
fn default_warmup() -> f64 {
    0.05
}
fn default_step_tokens() -> usize {
    2048
}
fn default_hidden_weight() -> f64 {
    1.0
}
fn default_clip() -> f64 {
    1.0
}
fn default_held_out() -> usize {
    8
}
fn default_eval_every() -> usize {
    8
}
fn default_patience() -> usize {
    3
}

/// What a recovery run did (the budget's report).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecoverySummary {
    /// Optimizer steps run (the last one counted, or where early stopping came).
    pub steps: usize,
    /// Steps the token budget allowed.
    pub planned_steps: usize,
    /// Training tokens seen.
    pub tokens: u64,
    /// Calibration windows per optimizer step.
    pub windows_per_step: usize,
    /// Windows trained on / held out.
    pub train_windows: usize,
    /// Windows held out (perplexity, early stopping).
    pub held_out_windows: usize,
    /// Trained values.
    pub trained_parameters: u64,
    /// Distillation loss of the first step.
    pub first_loss: f64,
    /// Held-out perplexity of the one-shot model.
    pub held_out_perplexity_before: f64,
    /// Held-out perplexity of the weights kept (the best evaluation).
    pub held_out_perplexity_after: f64,
    /// Whether held-out perplexity stopped the run before its token budget.
    pub stopped_early: bool,
    /// The step a checkpoint resumed the run at.
    pub resumed_at_step: Option<usize>,
    /// Wall time of the stage.
    pub seconds: f64,
    /// The stated memory bound beyond the loaded model (weights, gradients, moments,
    /// one window's activations).
    pub memory_estimate_bytes: u64,
    /// Measured peak resident memory of the process after the run (Linux).
    pub peak_rss_bytes: Option<u64>,
    /// Every held-out evaluation.
    pub history: Vec<RecoveryPoint>,
    /// The peak learning rate the run went on with.
    #[serde(default)]
    pub learning_rate: f64,
    /// The learning rates tried on held-out text before it (`learning_rate_trials`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub learning_rate_trials: Vec<LearningRateTrial>,
}

/// One learning rate tried for the first `eval_every` steps, and what it reached.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LearningRateTrial {
    /// The peak learning rate.
    pub learning_rate: f64,
    /// Held-out perplexity after the trial's steps; `None` when the loss or the
    /// perplexity was not finite (the rate diverged).
    pub held_out_perplexity: Option<f64>,
}

/// One held-out evaluation of a recovery run, with the mean training loss (and its
/// terms) of the steps since the one before.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecoveryPoint {
    /// Optimizer steps done.
    pub step: usize,
    /// Mean distillation loss of those steps.
    pub loss: f64,
    /// Its KL term (nats per token).
    pub kl: f64,
    /// Its hidden-state term.
    pub hidden: f64,
    /// Perplexity of the held-out windows.
    pub held_out_perplexity: f64,
}

impl RecoverySummary {
    /// One line for the report.
    pub fn line(&self) -> String {
        let trials = match self.learning_rate_trials.as_slice() {
            [] => String::new(),
            t => format!(
                " (chosen on held-out text: {})",
                t.iter()
                    .map(|t| match t.held_out_perplexity {
                        Some(p) => format!("{:e} -> {p:.2}", t.learning_rate),
                        None => format!("{:e} -> diverged", t.learning_rate),
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        format!(
            "recovery: {} steps ({} tokens{}) at peak learning rate {:e}{trials} in {:.0} s; held-out perplexity {:.2} -> {:.2}; memory estimate {:.1} GiB, peak RSS {}",
            self.steps,
            self.tokens,
            if self.stopped_early { ", stopped early" } else { "" },
            self.learning_rate,
            self.seconds,
            self.held_out_perplexity_before,
            self.held_out_perplexity_after,
            self.memory_estimate_bytes as f64 / (1u64 << 30) as f64,
            self.peak_rss_bytes
                .map_or("unknown".to_string(), |b| format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64)),
        )
    }
}

impl RecoverySettings {
    /// The published defaults (ZIPLM.md section 9) for `tokens` training tokens.
    pub fn with_tokens(tokens: u64) -> RecoverySettings {
        RecoverySettings {
            tokens,
            learning_rate: default_lr(),
            learning_rate_trials: vec![],
            min_learning_rate: default_min_lr(),
            warmup: default_warmup(),
            step_tokens: default_step_tokens(),
            hidden_weight: default_hidden_weight(),
            clip: default_clip(),
            weight_decay: 0.0,
            held_out: default_held_out(),
            eval_every: default_eval_every(),
            patience: default_patience(),
            teacher: None,
            chain: false,
            stage_tokens: vec![],
        }
    }

    /// Checks every value; the error names the setting (as `recovery.NAME`).
    pub fn check(&self) -> Result<(), String> {
        let positive = |v: f64, name: &str| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(format!(
                    "recovery.{name} must be a positive number, not {v}"
                ))
            }
        };
        if self.tokens == 0 {
            return Err("recovery.tokens must be at least 1 (or leave recovery out)".into());
        }
        if self.stage_tokens.contains(&0) {
            return Err("recovery.stage_tokens must each be at least 1".into());
        }
        if !self.stage_tokens.is_empty() && !self.chain {
            return Err("recovery.stage_tokens gives each stage of a chain its tokens: set recovery.chain = true, or give one figure as recovery.tokens".into());
        }
        positive(self.learning_rate, "learning_rate")?;
        positive(self.min_learning_rate, "min_learning_rate")?;
        positive(self.clip, "clip")?;
        if self.min_learning_rate > self.learning_rate {
            return Err(format!(
                "recovery.min_learning_rate ({}) is above recovery.learning_rate ({})",
                self.min_learning_rate, self.learning_rate
            ));
        }
        if self.learning_rate_trials.len() == 1 {
            return Err("recovery.learning_rate_trials chooses among two or more learning rates; give one as recovery.learning_rate".into());
        }
        for &lr in &self.learning_rate_trials {
            positive(lr, "learning_rate_trials")?;
        }
        if !(0.0..1.0).contains(&self.warmup) {
            return Err(format!(
                "recovery.warmup is a fraction of the steps in [0, 1), not {}",
                self.warmup
            ));
        }
        if !(self.hidden_weight.is_finite() && self.hidden_weight >= 0.0) {
            return Err(format!(
                "recovery.hidden_weight must be 0 or more, not {}",
                self.hidden_weight
            ));
        }
        if !(self.weight_decay.is_finite() && (0.0..1.0).contains(&self.weight_decay)) {
            return Err(format!(
                "recovery.weight_decay must be in [0, 1), not {}",
                self.weight_decay
            ));
        }
        for (v, name) in [
            (self.step_tokens, "step_tokens"),
            (self.held_out, "held_out"),
            (self.eval_every, "eval_every"),
            (self.patience, "patience"),
        ] {
            if v == 0 {
                return Err(format!("recovery.{name} must be at least 1"));
            }
        }
        Ok(())
    }

    /// These settings with peak learning rate `peak`, the minimum scaled with it (the
    /// ratio `min_learning_rate / learning_rate` kept: `--recover-lr X` alone ends at
    /// X / 10, and so does X among trials).
    pub fn with_peak(&self, peak: f64) -> RecoverySettings {
        RecoverySettings {
            learning_rate: peak,
            min_learning_rate: self.min_learning_rate * peak / self.learning_rate,
            learning_rate_trials: vec![],
            ..self.clone()
        }
    }

    /// The learning rate of step `step` (0-based) of `steps`: linear warm-up to the
    /// peak, then a cosine down to the minimum at the last step.
    pub fn learning_rate_at(&self, step: usize, steps: usize) -> f64 {
        let warm = ((steps as f64) * self.warmup).round() as usize;
        if step < warm {
            return self.learning_rate * (step + 1) as f64 / warm as f64;
        }
        let rest = steps.saturating_sub(warm).max(1);
        let progress = ((step - warm) as f64 / (rest.max(2) - 1) as f64).min(1.0);
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        self.min_learning_rate + (self.learning_rate - self.min_learning_rate) * cosine
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_falls_to_the_minimum() {
        let s = RecoverySettings::with_tokens(1);
        let steps = 100;
        assert!((s.learning_rate_at(0, steps) - 2e-6).abs() < 1e-15);
        assert!((s.learning_rate_at(4, steps) - 1e-5).abs() < 1e-15);
        assert!((s.learning_rate_at(5, steps) - 1e-5).abs() < 1e-15);
        assert!((s.learning_rate_at(99, steps) - 1e-6).abs() < 1e-15);
        let lrs: Vec<f64> = (5..100).map(|i| s.learning_rate_at(i, steps)).collect();
        assert!(lrs.windows(2).all(|w| w[1] <= w[0]));
        // One step: no warm-up (5% of one step rounds to none), the cosine's start.
        assert!((s.learning_rate_at(0, 1) - 1e-5).abs() < 1e-15);
    }

    #[test]
    fn bad_settings_name_the_key() {
        let mut s = RecoverySettings::with_tokens(10);
        s.learning_rate = -1.0;
        assert!(s.check().unwrap_err().contains("recovery.learning_rate"));
        let mut s = RecoverySettings::with_tokens(10);
        s.min_learning_rate = 1.0;
        assert!(s.check().unwrap_err().contains("min_learning_rate"));
        let mut s = RecoverySettings::with_tokens(10);
        s.held_out = 0;
        assert!(s.check().unwrap_err().contains("recovery.held_out"));
        assert!(RecoverySettings::with_tokens(0).check().is_err());
        let mut s = RecoverySettings::with_tokens(10);
        s.learning_rate_trials = vec![3e-5];
        assert!(s.check().unwrap_err().contains("two or more"));
        s.learning_rate_trials = vec![3e-5, -1e-7];
        assert!(s.check().unwrap_err().contains("learning_rate_trials"));
        s.learning_rate_trials = vec![3e-5, 1e-5];
        assert!(s.check().is_ok());
        assert!(RecoverySettings::with_tokens(10).check().is_ok());
    }
}
