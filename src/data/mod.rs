//! Calibration and evaluation data: reading text files, JSONL and STS-style TSV, and
//! tokenising them into samples.

pub mod probes;
pub mod self_chat;
pub mod sts;
pub mod tokenizer;

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// How a calibration file is laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataFormat {
    /// Plain text (decoders: one long text cut into windows; encoders: one sample per
    /// non-empty line).
    Text,
    /// One JSON object per line with a `"text"` field.
    Jsonl,
    /// STS Benchmark TSV (genre, file, year, id, score, sentence 1, sentence 2): both
    /// sentences of every pair are samples.
    StsTsv,
}

impl DataFormat {
    /// Guesses the format from the file extension (`.jsonl`, `.csv`/`.tsv`, else text).
    pub fn from_path(path: &Path) -> DataFormat {
        match path
            .extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase())
            .as_deref()
        {
            Some("jsonl") => DataFormat::Jsonl,
            Some("tsv") | Some("csv") => DataFormat::StsTsv,
            _ => DataFormat::Text,
        }
    }
}

/// Where calibration samples come from, and how many.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CalibrationData {
    /// The texts, one or more: with several, the samples are split between them as
    /// evenly as they divide ([`CalibrationData::share`]) and interleaved, so a data file
    /// and the model's own chat (`self:N`) calibrate one job together.
    pub sources: Vec<CalibrationSource>,
    /// Number of samples to use, from all sources together.
    pub samples: usize,
    /// Tokens per sample (longer ones are truncated; windows have exactly this length).
    pub seq_len: usize,
}

impl CalibrationData {
    /// Samples from a data file (its layout guessed from the extension when `format`
    /// is `None`).
    pub fn file(
        path: impl Into<PathBuf>,
        format: Option<DataFormat>,
        samples: usize,
        seq_len: usize,
    ) -> CalibrationData {
        CalibrationData {
            sources: vec![CalibrationSource::File {
                path: path.into(),
                format,
            }],
            samples,
            seq_len,
        }
    }

    /// The data files the samples come from (none when the model writes them all).
    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        self.sources.iter().filter_map(|s| match s {
            CalibrationSource::File { path, .. } => Some(path.as_path()),
            CalibrationSource::SelfChat { .. } => None,
        })
    }

    /// The samples source `i` gives: `samples / n`, and one more for each of the first
    /// `samples % n` sources.
    pub fn share(&self, i: usize) -> usize {
        let n = self.sources.len().max(1);
        self.samples / n + usize::from(i < self.samples % n)
    }
}

/// Round-robin merge of per-source sample lists: one sample of each source in turn, the
/// longer lists' rest at the end. Calibration sees every source throughout, and the last
/// windows (recovery's held-out set) hold some of each where the lists are equal.
pub fn interleave(lists: Vec<Vec<Vec<i64>>>) -> Vec<Vec<i64>> {
    let total = lists.iter().map(Vec::len).sum();
    let mut iters: Vec<_> = lists.into_iter().map(Vec::into_iter).collect();
    let mut out = Vec::with_capacity(total);
    while out.len() < total {
        for it in iters.iter_mut() {
            out.extend(it.next());
        }
    }
    out
}

/// The text calibration (and recovery) reads.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CalibrationSource {
    /// A data file.
    File {
        /// The file.
        path: PathBuf,
        /// Its layout (guessed from the extension when absent).
        #[serde(default)]
        format: Option<DataFormat>,
    },
    /// Chat transcripts the dense model writes itself ([`self_chat`]), cached.
    SelfChat {
        /// Tokens of transcripts (whole transcripts, so a few more).
        tokens: usize,
    },
}

/// How texts become samples.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SampleMode {
    /// Each text (sentence, line, JSON record) is one sample, with special tokens.
    PerText,
    /// All texts are tokenised without special tokens, concatenated and cut into
    /// non-overlapping windows (language-model calibration).
    Windows,
}

/// Reads the texts of a data file.
pub fn read_texts(path: &Path, format: DataFormat) -> Result<Vec<String>> {
    let content = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let texts: Vec<String> = match format {
        DataFormat::Text => content
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect(),
        DataFormat::Jsonl => {
            let mut out = vec![];
            for (i, line) in content
                .lines()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty())
            {
                let v: serde_json::Value =
                    serde_json::from_str(line).map_err(|e| Error::Format {
                        path: path.into(),
                        detail: format!("line {}: not JSON ({e})", i + 1),
                    })?;
                let text = v
                    .get("text")
                    .and_then(|t| t.as_str())
                    .ok_or_else(|| Error::Format {
                        path: path.into(),
                        detail: format!("line {}: no string field \"text\"", i + 1),
                    })?;
                out.push(text.to_string());
            }
            out
        }
        DataFormat::StsTsv => sts::read_pairs(path)?
            .into_iter()
            .flat_map(|p| [p.a, p.b])
            .collect(),
    };
    if texts.is_empty() {
        return Err(Error::Calibration {
            context: path.display().to_string(),
            detail:
                "the calibration file holds no text; give a file with at least one non-empty line"
                    .into(),
        });
    }
    Ok(texts)
}

/// Turns texts into at most `count` samples of at most `seq_len` tokens.
pub fn make_samples(
    tok: &tokenizer::Tokenizer,
    texts: &[String],
    mode: SampleMode,
    count: usize,
    seq_len: usize,
) -> Result<Vec<Vec<i64>>> {
    if seq_len == 0 || count == 0 {
        return Err(Error::Invalid(
            "calibration needs at least one sample of at least one token".into(),
        ));
    }
    let mut out = vec![];
    match mode {
        SampleMode::PerText => {
            for t in texts {
                if out.len() == count {
                    break;
                }
                let mut ids = tok.encode(t, true)?;
                ids.truncate(seq_len);
                if !ids.is_empty() {
                    out.push(ids);
                }
            }
        }
        SampleMode::Windows => {
            let mut buf: Vec<i64> = vec![];
            for t in texts {
                buf.extend(tok.encode(t, false)?);
                while buf.len() >= seq_len && out.len() < count {
                    out.push(buf.drain(..seq_len).collect());
                }
                if out.len() == count {
                    break;
                }
            }
        }
    }
    if out.is_empty() {
        return Err(Error::Calibration {
            context: "calibration data".into(),
            detail: format!(
                "too short: not one sample of {seq_len} tokens; give more text or a smaller sequence length"
            ),
        });
    }
    Ok(out)
}

/// Deterministic pseudo-random token ids (for models without a tokenizer, like the
/// test fixtures): `count` samples of `seq_len` ids below `vocab`.
pub fn random_samples(vocab: usize, count: usize, seq_len: usize, seed: u64) -> Vec<Vec<i64>> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..count)
        .map(|_| {
            (0..seq_len)
                .map(|_| rng.random_range(0..vocab.max(1)) as i64)
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_split_evenly_between_sources_and_interleave() {
        let cal = CalibrationData {
            sources: vec![
                CalibrationSource::File {
                    path: "a.txt".into(),
                    format: None,
                },
                CalibrationSource::SelfChat { tokens: 100 },
                CalibrationSource::File {
                    path: "b.txt".into(),
                    format: None,
                },
            ],
            samples: 8,
            seq_len: 4,
        };
        assert_eq!((0..3).map(|i| cal.share(i)).collect::<Vec<_>>(), [3, 3, 2]);
        let paths: Vec<_> = cal.paths().collect();
        assert_eq!(paths, [Path::new("a.txt"), Path::new("b.txt")]);
        let merged = interleave(vec![
            vec![vec![1], vec![2], vec![3]],
            vec![vec![10]],
            vec![vec![20], vec![21]],
        ]);
        assert_eq!(
            merged,
            [vec![1], vec![10], vec![20], vec![2], vec![21], vec![3]]
        );
        assert!(interleave(vec![vec![], vec![]]).is_empty());
    }
}
