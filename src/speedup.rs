//! Measuring emitted models against their dense model in the serving runtime: the
//! check a user runs on artifacts (`ziplm speedup DENSE MODEL...`), with the same
//! method as verification (alternating runs of the dense and the pruned model in one
//! process; the speedup is the median of the rounds' ratios).
//!
//! ONNX files are timed in tract (end to end at the workload, on the CPU's `threads`
//! threads or a CUDA GPU); GGUF files and Hugging Face folders in mistral.rs (feature
//! `mistralrs`; prefill: a one-token request on a prompt of `seq_len` tokens; decode:
//! per generated token after a `kv_len`-token prompt).

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::profile::ProfileSettings;
use crate::progress::Progress;
use serde::Serialize;
use std::path::{Path, PathBuf};
use ziplm_plugin_api::{Timing, Workload};

/// One model timed against the dense model.
#[derive(Clone, Debug, Serialize)]
pub struct SpeedupMeasurement {
    /// The model timed.
    pub model: PathBuf,
    /// The dense model's timing in the same alternating run.
    pub dense: Timing,
    /// How the dense model was run when not as its file is (the backend's words: a
    /// GGUF dense model stored in another tensor type than the model is emitted
    /// unpruned in the model's type first).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dense_as: Option<String>,
    /// The model's timing.
    pub timing: Timing,
    /// The median over the alternating rounds of the dense run's time over the
    /// model's ([`ziplm_plugin_api::PairedTiming::speedup`]; drift between rounds
    /// cancels).
    pub speedup: f64,
}

/// The backend that serves a model file or folder.
fn backend_of(path: &Path) -> Result<&'static dyn Backend> {
    if !path.exists() {
        return Err(Error::Invalid(format!(
            "{}: no such model file or folder",
            path.display()
        )));
    }
    crate::backend::for_model(path).ok_or_else(|| {
        Error::Invalid(format!(
            "{}: not a model ziplm can time (give .onnx files, .gguf files or Hugging Face folders)",
            path.display()
        ))
    })
}

/// Times each of `models` against `dense` at `workload` in the runtime that serves
/// them; every model must be served by the same runtime as the dense one.
pub fn measure(
    dense: &Path,
    models: &[PathBuf],
    workload: &Workload,
    device: crate::job::Device,
    settings: &ProfileSettings,
    progress: &dyn Progress,
) -> Result<Vec<SpeedupMeasurement>> {
    if models.is_empty() {
        return Err(Error::Invalid(
            "give at least one model to time against the dense one".into(),
        ));
    }
    if settings.runs == 0 {
        return Err(Error::Invalid(
            "timing needs at least one timed run (--runs 1 or more)".into(),
        ));
    }
    workload.validate().map_err(Error::Invalid)?;
    let backend = backend_of(dense)?;
    for m in models {
        if backend_of(m)?.name() != backend.name() {
            return Err(Error::Invalid(format!(
                "{} and the dense model {} are served by different runtimes: time ONNX files against an ONNX dense model, GGUF files and folders against a GGUF file or folder",
                m.display(),
                dense.display()
            )));
        }
    }
    progress.start("timing against the dense model", models.len() as u64);
    let timings = backend.time_files(dense, models, workload, device, settings, progress)?;
    progress.finish();
    Ok(models
        .iter()
        .zip(timings)
        .map(|(m, t)| SpeedupMeasurement {
            model: m.clone(),
            speedup: t.timing.speedup,
            dense: t.timing.dense,
            dense_as: t.dense_as,
            timing: t.timing.model,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The error of timing `models` against `dense` (tiny prefill, default settings).
    fn error_of(dense: &Path, models: &[PathBuf]) -> String {
        measure(
            dense,
            models,
            &Workload::prefill(1, 8),
            crate::job::Device::Cpu { threads: 1 },
            &ProfileSettings::default(),
            &crate::progress::Quiet,
        )
        .unwrap_err()
        .to_string()
    }

    #[test]
    fn models_of_two_runtimes_are_refused_before_any_timing() {
        let dir = tempfile::tempdir().unwrap();
        let onnx = dir.path().join("a.onnx");
        let gguf = dir.path().join("b.gguf");
        std::fs::write(&onnx, b"x").unwrap();
        std::fs::write(&gguf, b"x").unwrap();
        let err = error_of(&onnx, &[gguf]);
        assert!(err.contains("different runtimes"), "{err}");
    }

    #[test]
    fn missing_and_unknown_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let txt = dir.path().join("model.txt");
        std::fs::write(&txt, b"x").unwrap();
        let missing = dir.path().join("nope.onnx");
        let err = error_of(&missing, std::slice::from_ref(&txt));
        assert!(err.contains("nope.onnx: no such model"), "{err}");
        let err = error_of(&txt, std::slice::from_ref(&txt));
        assert!(err.contains("not a model ziplm can time"), "{err}");
        let err = error_of(&txt, &[]);
        assert!(err.contains("at least one model"), "{err}");
    }
}
