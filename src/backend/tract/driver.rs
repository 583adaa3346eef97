//! The tract backend in the pipeline: [`TractSession`] (an ONNX model loaded for one
//! job) and [`TractBackend`], its entry in the backend registry.

use super::device::TractDevice;
use super::gpu::Placement;
use super::loss::OutputLoss;
use super::model::{TractModel, TractOptions};
use super::profile::{time_pair, TractProfiler};
use crate::backend::{Backend, ProfileRequest};
use crate::data::SampleMode;
use crate::error::{Error, Result};
use crate::job::{Device, OptionSpec, PruneJob};
use crate::pipeline::{self, BudgetOutcome, JobRun, Session};
use crate::profile::ProfileSettings;
use crate::progress::Progress;
use crate::report::PruneReport;
use std::path::{Path, PathBuf};
use ziplm_plugin_api::{
    EmitSummary, GqaPolicy, LatencyProfiler, LatencyTable, ModelAdapter, ModelStructure,
    PairedTiming, Plan, PrunedWeights, Workload,
};

/// Calibration samples the SPDY loss hook scores candidates on.
const LOSS_SAMPLES: usize = 64;

/// A tract run's results (with the loaded [`TractModel`]).
pub type TractRun = JobRun<TractSession>;

/// The tract backend's state for one job: the target device, the loss, and where each
/// verification round's model ran on a GPU (reset per budget).
pub struct TractSession {
    device: TractDevice,
    loss: Option<OutputLoss>,
    placements: Vec<Option<Placement>>,
}

impl TractSession {
    /// Loads the job's model. A GPU target this machine cannot run is refused here,
    /// before calibration, unless the job has a latency table to take the timings from
    /// (a table profiled on the GPU machine: the cross-target flow).
    pub fn open(job: &PruneJob) -> Result<(TractModel, TractSession)> {
        let device = TractDevice::of(job.device)?;
        match job.latency_table.as_deref().filter(|p| p.exists()) {
            // A table of another runtime (CPU for GPU) is refused before any work.
            Some(path) => crate::profile::check_same_runtime(
                path,
                &crate::profile::load_table(path)?,
                &device.fingerprint(),
            )?,
            None => device.require("profiling the latency table")?,
        }
        let model = load(&job.model, job.workload, job.gqa_policy)?;
        Ok((
            model,
            TractSession {
                device,
                loss: None,
                placements: vec![],
            },
        ))
    }
}

/// Loads an ONNX file in tract at a workload, refusing a workload whose forward would
/// not fit in memory.
fn load(model: &Path, workload: Workload, gqa_policy: GqaPolicy) -> Result<TractModel> {
    let m = TractModel::load(
        model,
        TractOptions {
            workload,
            gqa_policy,
        },
    )?;
    crate::memory::check_workload_fits(m.structure(), &workload, m.vocab())?;
    Ok(m)
}

impl Session for TractSession {
    type Model = TractModel;

    fn notes(&self, _job: &PruneJob) -> Vec<String> {
        match &self.device {
            TractDevice::CudaUnavailable { index, reason } => vec![format!(
                "CUDA device {index} cannot be used on this machine ({reason}): the latencies are the table's, and nothing is timed here"
            )],
            _ => vec![],
        }
    }

    fn sample_mode(&self, model: &TractModel) -> SampleMode {
        // An encoder sees one text per sample; a decoder reads windows of running text.
        if model.structure().architecture == "bert" {
            SampleMode::PerText
        } else {
            SampleMode::Windows
        }
    }
    fn profiler<'a>(
        &'a self,
        model: &'a TractModel,
        _job: &PruneJob,
    ) -> Box<dyn LatencyProfiler + 'a> {
        Box::new(TractProfiler::new(model, self.device.clone()))
    }
    fn prepare_loss(&mut self, model: &TractModel, job: &PruneJob) -> Result<()> {
        // SPDY refinement scores candidates by their output error on held samples.
        let cap = match job.workload.phase {
            ziplm_plugin_api::Phase::Prefill => job.workload.seq_len,
            ziplm_plugin_api::Phase::Decode { .. } => 128,
        };
        self.loss = Some(OutputLoss::new(
            model,
            model.calibration_samples(),
            LOSS_SAMPLES,
            cap,
        )?);
        Ok(())
    }
    fn loss(
        &self,
        model: &TractModel,
        plan: &Plan,
        weights: &PrunedWeights,
    ) -> Option<Result<f64>> {
        let loss = self.loss.as_ref()?;
        Some(loss.loss(model, plan, weights).map_err(Into::into))
    }
    fn output_name(&self, _model: &TractModel, stem: &str) -> String {
        format!("{stem}.onnx")
    }
    fn measure(
        &mut self,
        model: &TractModel,
        job: &PruneJob,
        emitted: &EmitSummary,
    ) -> Result<PairedTiming> {
        let t = time_pair(
            model,
            &job.model,
            &emitted.path,
            &job.workload,
            &self.device,
            &job.verify_settings,
        )?;
        self.placements.push(t.placement);
        Ok(t.timing)
    }
    fn check_served(&mut self, _job: &PruneJob, outcome: &BudgetOutcome) -> Result<Vec<String>> {
        // Where the kept model's nodes ran on the GPU: one measurement per round, and
        // the outcome is its chosen round.
        let rounds = std::mem::take(&mut self.placements);
        let chosen = if rounds.len() == outcome.attempts.len() {
            rounds.get(outcome.chosen).cloned().flatten()
        } else {
            rounds.last().cloned().flatten()
        };
        Ok(chosen
            .map(|p| {
                let name = outcome
                    .emitted
                    .path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                format!("{name} on the GPU: {p}")
            })
            .into_iter()
            .collect())
    }
    fn write_artifacts(
        &mut self,
        model: &TractModel,
        job: &PruneJob,
        dir: &Path,
        stem: &str,
        outcome: &BudgetOutcome,
    ) -> Result<()> {
        if job.options.flag("nnef", false) {
            let onnx_bytes = std::fs::read(&outcome.emitted.path)
                .map_err(|e| Error::io(&outcome.emitted.path, e))?;
            let nnef_path = dir.join(format!("{stem}.nnef.tar"));
            super::nnef::write_nnef(&onnx_bytes, &job.workload, &nnef_path)?;
        }
        // The bundle for the load-time tract transform (same model as the ONNX: the
        // weights the model was emitted with).
        super::hook::write_bundle(
            &dir.join(format!("{stem}.plan-bundle.json")),
            &outcome.plan,
            &outcome.weights,
            super::onnx::keeps_bias_when_removed(model)?,
        )
    }
}

/// Runs a job with tract end to end (see [`pipeline::run`]).
pub fn run(job: &PruneJob, progress: &dyn Progress) -> Result<TractRun> {
    pipeline::run(job, TractSession::open, progress)
}

/// The tract backend: ONNX files, on the CPU or (feature `cuda`) a CUDA GPU.
pub struct TractBackend;

impl Backend for TractBackend {
    fn name(&self) -> &'static str {
        "tract"
    }
    fn takes(&self, model: &Path) -> bool {
        model.extension().and_then(|e| e.to_str()) == Some("onnx")
    }
    fn profile_settings(&self) -> ProfileSettings {
        // Preparing a tract block model costs more than timing it: one pass.
        ProfileSettings::new(2, 9)
    }
    fn run(&self, job: &PruneJob, progress: &dyn Progress) -> Result<PruneReport> {
        Ok(run(job, progress)?.report)
    }
    fn models(&self) -> &'static str {
        "ONNX models"
    }
    fn options(&self) -> &'static [OptionSpec] {
        const OPTIONS: &[OptionSpec] = &[OptionSpec::flag(
            "nnef",
            "also write each pruned model as a tract NNEF archive (NAME.nnef.tar)",
        )];
        OPTIONS
    }
    fn output_format(&self, format: &str) -> Option<Vec<(&'static str, &'static str)>> {
        match format {
            "onnx" => Some(vec![("nnef", "false")]),
            "nnef" => Some(vec![("nnef", "true")]),
            _ => None,
        }
    }
    fn time_files(
        &self,
        dense: &Path,
        models: &[PathBuf],
        workload: &Workload,
        device: Device,
        settings: &ProfileSettings,
        progress: &dyn Progress,
    ) -> Result<Vec<crate::backend::TimedFile>> {
        let device = TractDevice::of(device)?;
        device.require("timing models")?;
        let model = load(dense, *workload, GqaPolicy::WholeKvGroups)?;
        let mut out = vec![];
        for m in models {
            let t = time_pair(&model, dense, m, workload, &device, settings)?;
            out.push(t.timing.into());
            progress.advance(1);
        }
        Ok(out)
    }
    fn structure(&self, model: &Path, workload: &Workload) -> Result<ModelStructure> {
        let m = load(model, *workload, GqaPolicy::WholeKvGroups)?;
        Ok(m.structure().clone())
    }
    fn profile(
        &self,
        model: &Path,
        request: &ProfileRequest,
        progress: &dyn Progress,
    ) -> Result<LatencyTable> {
        let device = TractDevice::of(request.device)?;
        device.require("profiling")?;
        let m = load(model, request.workload, request.gqa_policy)?;
        let shapes = crate::database::grid_shapes(m.structure(), request.grid);
        let mut profiler = TractProfiler::new(&m, device);
        crate::profile::build_table(
            &mut profiler,
            &request.workload,
            &shapes,
            &request.settings,
            request.reuse,
            progress,
        )
    }
}
