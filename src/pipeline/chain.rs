//! Prune -> recover -> prune within one job (ZIPLM.md section 9, `--chain`,
//! `recovery.chain`): the job's speedups, smallest first, each pruned from the last
//! one's recovered model.
//!
//! Each stage is one [`super::run`] of the job with one budget: the first prunes the
//! model to the smallest speedup; stage `i` prunes stage `i - 1`'s output to
//! `speedup_i / reached`, where `reached` is the product of the earlier stages'
//! measured speedups (predicted where a stage is not verified), and every stage
//! distils towards the original model (or the job's `teacher`). A model pruned from
//! another reuses its latency table ([`crate::profile::committed_table`]). The stages
//! write into a hidden folder inside the job's staging folder; their models and plans
//! are renamed to the chain's budgets (`NAME.speedup-2.gguf`) and committed with one
//! report as one output set, or not at all. Each budget's predicted figures, layers and
//! plan are against the model its stage pruned; its measured ones against the original
//! when the chain is timed (below). Without a committed latency table the stages share
//! one in that folder. When the job verifies, every model is then
//! timed against the original in one paired run each (`Session::time_against_dense`). (So a killed chain starts again: its
//! stages' recovery checkpoints live in that staging folder too.)

use super::Session;
use crate::error::{Error, Result};
use crate::job::PruneJob;
use crate::outputs::OutputSet;
use crate::progress::Progress;
use crate::report::{ChainStage, PruneReport, StageTimes};
use crate::search::Budget;
use std::path::{Path, PathBuf};

/// The chain's speedups, ascending; an error unless there are two or more and every
/// budget is a speedup.
pub fn speedups(budgets: &[Budget]) -> std::result::Result<Vec<f64>, String> {
    let mut s = Vec::with_capacity(budgets.len());
    for b in budgets {
        match b {
            Budget::Speedup(x) => s.push(*x),
            Budget::LatencyMs(_) => {
                return Err("a chain prunes to speedups over the original model: give --speedup budgets, not --latency-ms".into())
            }
        }
    }
    s.sort_by(f64::total_cmp);
    s.dedup();
    if s.len() < 2 {
        return Err("a chain needs two or more different --speedup budgets (the first pruned from the model, each next from the last)".into());
    }
    Ok(s)
}

/// Runs `job`'s budgets as a chain (see the module doc) and returns the chain's report;
/// `open` loads each stage's model.
pub fn run<S: Session>(
    job: &PruneJob,
    open: impl Fn(&PruneJob) -> Result<(S::Model, S)>,
    progress: &dyn Progress,
) -> Result<PruneReport> {
    super::check_job(job)?;
    let speedups = speedups(&job.budgets).map_err(Error::Invalid)?;
    let recovery = job
        .recovery
        .clone()
        .ok_or_else(|| Error::Invalid("a chain recovers each stage: give --recover".into()))?;
    let name = job.display_name();
    let set = OutputSet::begin(&job.out_dir, &name)?;
    let stages_dir = tempfile::Builder::new()
        .prefix(".chain-")
        .tempdir_in(set.stage())
        .map_err(|e| Error::io(set.stage(), e))?;
    let teacher = recovery
        .teacher
        .clone()
        .unwrap_or_else(|| job.model.clone());
    // Without a committed table the stages share one, so later stages time only the
    // shapes the first did not (a pruned model reuses its original's table).
    let table = job
        .latency_table
        .clone()
        .unwrap_or_else(|| stages_dir.path().join("latency-table.json"));

    let mut source = job.model.clone();
    let mut reached = 1.0;
    let mut report: Option<PruneReport> = None;
    let mut times = StageTimes::default();
    for (i, &speedup) in speedups.iter().enumerate() {
        let mut stage = job.clone();
        stage.name = Some(name.clone());
        stage.model = source.clone();
        let stage_budget = Budget::Speedup(speedup / reached);
        stage.budgets = vec![stage_budget];
        stage.out_dir = stages_dir.path().join(format!("stage-{i}"));
        stage.latency_table = Some(table.clone());
        stage.recovery = Some(crate::job::RecoverySettings {
            tokens: recovery
                .stage_tokens
                .get(i)
                .copied()
                .unwrap_or(recovery.tokens),
            stage_tokens: vec![],
            chain: false,
            teacher: (i > 0 || recovery.teacher.is_some()).then(|| teacher.clone()),
            ..recovery.clone()
        });
        let run = super::run(&stage, &open, progress)?;
        let mut r = run.report;
        drop(run.model);
        let mut b = r.budgets.remove(0);
        let stage_speedup = b
            .measured_speedup
            .unwrap_or(b.predicted_dense_ms / b.predicted_ms.max(f64::MIN_POSITIVE));
        reached *= stage_speedup;

        // The stage's files, under the chain's budget.
        let budget = Budget::Speedup(speedup);
        let (from, to) = (stage.output_stem(&stage_budget), job.output_stem(&budget));
        let mut output = None;
        for entry in std::fs::read_dir(&stage.out_dir).map_err(|e| Error::io(&stage.out_dir, e))? {
            let entry = entry.map_err(|e| Error::io(&stage.out_dir, e))?;
            let file = entry.file_name().to_string_lossy().into_owned();
            let Some(rest) = file.strip_prefix(&from) else {
                continue;
            };
            let dest = set.stage().join(format!("{to}{rest}"));
            std::fs::rename(entry.path(), &dest).map_err(|e| Error::io(&dest, e))?;
            if Path::new(&b.output).file_name() == Some(entry.file_name().as_os_str()) {
                output = Some(dest);
            }
        }
        let output = output.ok_or_else(|| {
            Error::Invalid(format!(
                "chain stage {i}: its model {} was not among its outputs",
                b.output
            ))
        })?;
        b.chain = Some(ChainStage {
            pruned_from: display(&source, &set, job),
            stage_budget,
            speedup_over_original: reached,
        });
        b.budget = budget;
        b.output = set
            .final_path(&output.file_name().unwrap_or_default().to_string_lossy())
            .display()
            .to_string();
        source = output;
        times.add(&r.stages);
        let mut stage_notes: Vec<String> = r
            .notes
            .iter()
            .map(|n| stage_note(i, n, (&stage_budget, &budget), (&from, &to)))
            .collect();
        if speedup / (reached / stage_speedup) <= 1.0 {
            stage_notes.push(format!(
                "stage {i}: the earlier stages already reached {:.2}x of the original, so this stage kept its model's shapes and only recovered",
                reached / stage_speedup
            ));
        }
        match &mut report {
            None => {
                r.notes = stage_notes;
                r.budgets = vec![b];
                report = Some(r);
            }
            Some(chain) => {
                chain.notes.extend(stage_notes);
                chain.budgets.push(b);
            }
        }
    }
    drop(stages_dir);
    let mut report = report.expect("two or more stages");
    report.notes.push(format!(
        "chain: each stage pruned the last one's recovered model and distilled towards {}",
        teacher.display()
    ));
    // Timed against the original only where every stage was verified here (a table
    // from another machine defines the target, and then nothing is timed here).
    if job.verify && report.budgets.iter().all(|b| b.measured_speedup.is_some()) {
        let t = std::time::Instant::now();
        time_against_original(job, &open, &set, &mut report)?;
        times.verify_s += t.elapsed().as_secs_f64();
    }
    report.stages = times;
    report.write(set.stage(), &format!("{name}.report"))?;
    set.commit()?;
    Ok(report)
}

/// Times every model of the chain against the original in one paired run each, and
/// states each budget's measured latency, speedup and whether it was met against the
/// original (the stages' own verifications stay in `attempts`).
fn time_against_original<S: Session>(
    job: &PruneJob,
    open: &impl Fn(&PruneJob) -> Result<(S::Model, S)>,
    set: &OutputSet,
    report: &mut PruneReport,
) -> Result<()> {
    let models: Vec<PathBuf> = report
        .budgets
        .iter()
        .map(|b| {
            let file = Path::new(&b.output).file_name().unwrap_or_default();
            set.stage().join(file)
        })
        .collect();
    let (model, mut session) = open(job)?;
    let scratch = tempfile::Builder::new()
        .prefix(".scratch-")
        .tempdir_in(set.stage())
        .map_err(|e| Error::io(set.stage(), e))?;
    let Some(timings) = session.time_against_dense(&model, job, &models, scratch.path())? else {
        report.notes.push(
            "chain: this backend does not time whole models; speedups over the original are the stages' multiplied".into(),
        );
        return Ok(());
    };
    for (b, timing) in report.budgets.iter_mut().zip(timings) {
        b.measured_dense_ms = Some(timing.dense.median_ms);
        b.measured_ms = Some(timing.model.median_ms);
        b.measured_speedup = Some(timing.speedup);
        b.met = Some(crate::pipeline::budget::meets(b.budget, &timing));
    }
    report.notes.push(
        "chain: each budget's measured latency is one paired run against the original (the stages' own verifications, against the model each pruned, are its attempts)".into(),
    );
    Ok(())
}

/// Stage `i`'s report note as the chain's report gives it: its files and budget named
/// by the chain's budget, as they are committed (`NAME.speedup-2`, not the stage's own
/// `NAME.speedup-1.30...`; `speedup-2: mistral.rs reply ...`, not `speedup-1.30...:
/// ...`). `budgets` and `stems` are (the stage's, the chain's).
fn stage_note(i: usize, note: &str, budgets: (&Budget, &Budget), stems: (&str, &str)) -> String {
    let labels = (
        PruneJob::budget_label(budgets.0),
        PruneJob::budget_label(budgets.1),
    );
    let note = note.replace(stems.0, stems.1).replace(&labels.0, &labels.1);
    format!("stage {i}: {note}")
}

/// How a stage's source reads in the report: the original's path, or the earlier
/// stage's model where it will be once the set is committed.
fn display(source: &Path, set: &OutputSet, job: &PruneJob) -> String {
    if source == job.model {
        return source.display().to_string();
    }
    let file: PathBuf = source.file_name().map(PathBuf::from).unwrap_or_default();
    set.final_path(&file.to_string_lossy())
        .display()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chain_takes_two_or_more_speedups_smallest_first() {
        let s = speedups(&[Budget::Speedup(2.0), Budget::Speedup(1.5)]).unwrap();
        assert_eq!(s, vec![1.5, 2.0]);
        let e = speedups(&[Budget::Speedup(2.0)]).unwrap_err();
        assert!(e.contains("two or more"), "{e}");
        let e = speedups(&[Budget::Speedup(2.0), Budget::Speedup(2.0)]).unwrap_err();
        assert!(e.contains("two or more"), "{e}");
        let e = speedups(&[Budget::Speedup(2.0), Budget::LatencyMs(5.0)]).unwrap_err();
        assert!(e.contains("--latency-ms"), "{e}");
    }

    /// Both kinds of note a stage writes, one naming its file and one only its budget
    /// (a SmolLM2 chain printed "stage 1: speedup-1.182098901138491e0: mistral.rs
    /// reply ..."), read by the chain's budget.
    #[test]
    fn stage_notes_name_the_chains_budget() {
        let budgets = (&Budget::Speedup(1.182098901138491), &Budget::Speedup(2.0));
        let stage = PruneJob::budget_label(budgets.0);
        let stems = (format!("m.speedup-1.5.{stage}"), "m.speedup-2".to_string());
        let note = |n: &str| stage_note(1, n, budgets, (&stems.0, &stems.1));
        assert_eq!(
            note(&format!("{}: recovery: 44 steps", stems.0)),
            "stage 1: m.speedup-2: recovery: 44 steps"
        );
        assert_eq!(
            note(&format!("{stage}: mistral.rs reply to \"Hi\": \"Hello\"")),
            "stage 1: speedup-2: mistral.rs reply to \"Hi\": \"Hello\""
        );
        assert_eq!(
            note("calibration: 128 samples"),
            "stage 1: calibration: 128 samples"
        );
    }
}
