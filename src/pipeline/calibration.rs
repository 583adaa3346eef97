//! The calibrate stage's input: the samples a job calibrates on, for any backend.

use super::Session;
use crate::data::{self, self_chat, tokenizer::Tokenizer, CalibrationSource, DataFormat};
use crate::error::{Error, Result};
use crate::job::PruneJob;
use crate::progress::Progress;
use ziplm_plugin_api::{ModelAdapter, ModelStructure};

/// The tokenizer a job's calibration text is encoded with: `--tokenizer`, else a
/// `tokenizer.json` next to (or inside) the model, else the one the session's model
/// carries ([`Session::embedded_tokenizer`], e.g. a GGUF file's metadata).
pub fn tokenizer<S: Session>(job: &PruneJob, model: &S::Model, session: &S) -> Result<Tokenizer> {
    if let Some(p) = job
        .tokenizer
        .clone()
        .or_else(|| Tokenizer::next_to(&job.model))
    {
        return Tokenizer::from_file(&p);
    }
    session.embedded_tokenizer(model, job).unwrap_or_else(|| {
        Err(Error::Invalid(format!(
            "calibration text needs the model's tokenizer: no tokenizer.json next to {}; pass --tokenizer",
            job.model.display()
        )))
    })
}

/// Calibration samples for a job: each of its sources' share
/// ([`data::CalibrationData::share`]), interleaved ([`data::interleave`]); random id
/// sequences of the workload's length (`job.random_samples` of them) when no data is
/// given.
pub fn samples<S: Session>(
    job: &PruneJob,
    model: &S::Model,
    session: &S,
    progress: &dyn Progress,
) -> Result<Vec<Vec<i64>>> {
    let Some(cal) = chosen(job, model, session) else {
        let vocab = model.vocab_size().ok_or_else(|| {
            Error::Invalid(
                "no calibration data given and the vocabulary size is unknown; pass --calibration"
                    .into(),
            )
        })?;
        return Ok(data::random_samples(
            vocab,
            job.random_samples,
            job.workload.seq_len,
            job.seed,
        ));
    };
    let mut lists = Vec::with_capacity(cal.sources.len());
    for (i, source) in cal.sources.iter().enumerate() {
        let count = cal.share(i);
        if count > 0 {
            lists.push(source_samples(
                job,
                model,
                session,
                source,
                count,
                cal.seq_len,
                progress,
            )?);
        }
    }
    Ok(data::interleave(lists))
}

/// The calibration a job runs on its loaded model: [`PruneJob::chat_calibration`] (the
/// data files and the model's own chat) when the model chats, else
/// [`PruneJob::calibration`].
pub fn chosen<'a, S: Session>(
    job: &'a PruneJob,
    model: &S::Model,
    session: &S,
) -> Option<&'a data::CalibrationData> {
    match &job.chat_calibration {
        Some(chat) if session.chats(model, job) => Some(chat),
        _ => job.calibration.as_ref(),
    }
}

/// The report's note on a job that would add the model's own chat to its text: what the
/// chat's share was, or that the model has no chat template.
pub fn chat_note<S: Session>(job: &PruneJob, model: &S::Model, session: &S) -> Option<String> {
    let chat = job.chat_calibration.as_ref()?;
    if !session.chats(model, job) {
        return Some(
            "calibration: the model has no chat template, so it calibrated on the text alone"
                .into(),
        );
    }
    let last = chat.sources.len() - 1;
    let CalibrationSource::SelfChat { tokens } = chat.sources[last] else {
        return None;
    };
    Some(format!(
        "calibration: the model has a chat template, so {} of the {} samples are its own chat transcripts (self:{tokens}, cached) beside the text; --no-self-chat (calibration.self_chat = false) calibrates on the text alone",
        chat.share(last),
        chat.samples
    ))
}

/// `count` samples of one source: a data file tokenised and cut as the session asks
/// ([`Session::sample_mode`]), or the model's own chat transcripts
/// ([`Session::self_chat`]) cut into windows.
fn source_samples<S: Session>(
    job: &PruneJob,
    model: &S::Model,
    session: &S,
    source: &CalibrationSource,
    count: usize,
    seq_len: usize,
    progress: &dyn Progress,
) -> Result<Vec<Vec<i64>>> {
    let (path, format) = match source {
        CalibrationSource::File { path, format } => (path, format),
        CalibrationSource::SelfChat { tokens } => {
            let transcripts = session.self_chat(model, job, *tokens, progress)?;
            let windows = self_chat::windows(&transcripts, count, seq_len);
            if windows.is_empty() {
                return Err(Error::Calibration {
                    context: format!("{}: self-written chat", job.model.display()),
                    detail: format!(
                        "the model wrote {} tokens of transcripts, less than one sample of {seq_len}; give a data file, or a shorter --calibration-seq-len",
                        self_chat::token_count(&transcripts),
                    ),
                });
            }
            return Ok(windows);
        }
    };
    let tok = tokenizer(job, model, session)?;
    let format = format.unwrap_or_else(|| DataFormat::from_path(path));
    let texts = data::read_texts(path, format)?;
    data::make_samples(&tok, &texts, session.sample_mode(model), count, seq_len)
}

/// A warning when calibration saw fewer tokens than the widest out-projection has
/// inputs: then `H = 2 X X^T / N` is singular and the OBS errors mostly measure the
/// dampening, not the data.
pub fn too_few_tokens(tokens: u64, structure: &ModelStructure) -> Option<String> {
    let widest = structure
        .blocks
        .iter()
        .map(|b| b.kind.out_proj_inputs())
        .max()
        .unwrap_or(0) as u64;
    (tokens < widest).then(|| {
        format!(
            "warning: calibration saw {tokens} tokens, fewer than the {widest} inputs of the widest out-projection: its Hessian is singular and the pruning choices are poor; give more calibration data (--samples, --calibration-seq-len)"
        )
    })
}

/// Moves the last `count` samples out of `samples` (the interleaved order, so every
/// source gives its share) and returns them: text the database, the correction and
/// the recovery's training never see, on which the recovery's early stopping reads
/// perplexity. At least one sample must stay to calibrate on.
pub fn hold_out(samples: &mut Vec<Vec<i64>>, count: usize) -> Result<Vec<Vec<i64>>> {
    if count == 0 {
        return Ok(vec![]);
    }
    if samples.len() <= count {
        return Err(Error::Invalid(format!(
            "recovery holds out {count} calibration windows from every fit and calibrates on the rest, but there are only {}: give more calibration data (--samples) or a smaller recovery.held_out",
            samples.len()
        )));
    }
    Ok(samples.split_off(samples.len() - count))
}

#[cfg(test)]
mod tests {
    #[test]
    fn held_out_windows_leave_the_calibration_set() {
        let mut samples: Vec<Vec<i64>> = (0..5).map(|i| vec![i]).collect();
        let held = super::hold_out(&mut samples, 2).unwrap();
        assert_eq!(held, vec![vec![3], vec![4]]);
        assert_eq!(samples, vec![vec![0], vec![1], vec![2]]);
        assert!(super::hold_out(&mut samples, 0).unwrap().is_empty());
        assert_eq!(samples.len(), 3);
        let e = super::hold_out(&mut samples, 3).unwrap_err().to_string();
        assert!(e.contains("only 3: give more calibration data"), "{e}");
    }

    #[test]
    fn too_few_calibration_tokens_are_warned_about() {
        let bert = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures/onnx/tiny-bert-feature-extraction/model.onnx");
        let w = ziplm_plugin_api::Workload::prefill(1, 16);
        let structure = crate::backend::load_structure(&bert, &w).unwrap();
        // The widest out-projection of the fixture has 128 inputs (its FFN).
        let warning = super::too_few_tokens(9, &structure).unwrap();
        assert!(
            warning.contains("calibration saw 9 tokens, fewer than the 128"),
            "{warning}"
        );
        assert!(super::too_few_tokens(128, &structure).is_none());
    }
}
