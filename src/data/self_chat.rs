//! Chat transcripts a chat model writes itself (`--calibration self:N`): calibration and
//! recovery data in the model's own chat format, for a user who has no data.
//!
//! The questions come from the model too. It is asked, in a few fixed [`FORMS`], to
//! pose a question about each topic of `data/self_chat_topics.txt`, and then answers
//! each of its questions. Every reply is greedy, so a model writes the same transcripts
//! in the same order every time. They are cached per model file ([`cache_file`]) in
//! that order: a later job that needs more tokens goes on from the cache's end, one that
//! needs fewer takes its first transcripts ([`take_tokens`]).
//!
//! The topics are general subjects; none is drawn from the probe set that
//! `ziplm eval --probes` scores (`data/probes.jsonl`).

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The topics that ship with ziplm, one per line (`#` starts a comment line).
pub const TOPICS: &str = include_str!("../../data/self_chat_topics.txt");

/// The forms of the request for a question; `{topic}` is replaced by a topic.
pub const FORMS: [&str; 5] = [
    "Ask me one short question about {topic}. Write only the question.",
    "What would a curious child ask about {topic}? Write the question only.",
    "Write one question a student might ask a teacher about {topic}.",
    "Write one question about {topic} that starts with \"How\".",
    "Write one question about {topic} that starts with \"Why\".",
];

/// Tokens the model may write for a question.
pub const QUESTION_TOKENS: usize = 48;
/// Tokens the model may write for a reply.
pub const REPLY_TOKENS: usize = 256;

/// What `--calibration` / `calibration.path` says when it names self-written chat:
/// `self` (as many tokens as the samples need) or `self:N` (N tokens). `None` for an
/// ordinary path.
pub fn parse_spec(spec: &str) -> Option<std::result::Result<Option<usize>, String>> {
    let rest = spec.strip_prefix("self")?;
    if rest.is_empty() {
        return Some(Ok(None));
    }
    let n = rest.strip_prefix(':')?;
    Some(match n.replace('_', "").parse::<usize>() {
        Ok(0) => Err(format!(
            "{spec}: the model would write no tokens; give self:N with N >= 1 (or `self` for as many as the samples need)"
        )),
        Ok(n) => Ok(Some(n)),
        Err(_) => Err(format!(
            "{spec}: not a token count; write self:N (e.g. self:65536) or `self`"
        )),
    })
}

/// Every request for a question, in the order the transcripts are written: the topics
/// in turn, each round in the next form, so that a short run already spans the topics.
pub fn question_requests() -> Vec<String> {
    let topics: Vec<&str> = TOPICS
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let mut out = Vec::with_capacity(topics.len() * FORMS.len());
    for round in 0..FORMS.len() {
        for (i, topic) in topics.iter().enumerate() {
            let form = FORMS[(round + i) % FORMS.len()];
            out.push(form.replace("{topic}", topic));
        }
    }
    out
}

/// The question in a model's reply to a request for one: its first non-empty line,
/// without quotes or a "Question:" label. `None` when there is nothing that reads as a
/// question (empty, or not between 8 and 300 characters).
pub fn question_from(reply: &str) -> Option<String> {
    let line = reply.lines().map(str::trim).find(|l| !l.is_empty())?;
    let mut q = line;
    for label in ["Question:", "question:", "Q:"] {
        q = q.strip_prefix(label).unwrap_or(q).trim();
    }
    let q = q
        .trim_matches(|c: char| c == '"' || c == '\'' || c == '*')
        .trim();
    (8..=300)
        .contains(&q.chars().count())
        .then(|| q.to_string())
}

/// One self-written exchange: a question, its reply, and the whole exchange in the
/// model's chat format as token ids (what calibration and recovery see).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Transcript {
    /// The model's question.
    pub question: String,
    /// The model's greedy reply.
    pub reply: String,
    /// The exchange through the model's chat template (system prompt included where the
    /// template adds one), tokenised by the runtime that serves the model.
    pub ids: Vec<u32>,
}

/// The transcripts a job uses: the first ones holding at least `tokens` ids in all (or
/// every one, when they hold fewer).
pub fn take_tokens(transcripts: &[Transcript], tokens: usize) -> &[Transcript] {
    let mut sum = 0;
    for (i, t) in transcripts.iter().enumerate() {
        if sum >= tokens {
            return &transcripts[..i];
        }
        sum += t.ids.len();
    }
    transcripts
}

/// Token ids in all.
pub fn token_count(transcripts: &[Transcript]) -> usize {
    transcripts.iter().map(|t| t.ids.len()).sum()
}

/// Calibration samples: the transcripts' ids one after another, cut into at most
/// `count` non-overlapping windows of `seq_len` (a shorter tail is dropped).
pub fn windows(transcripts: &[Transcript], count: usize, seq_len: usize) -> Vec<Vec<i64>> {
    let ids: Vec<i64> = transcripts
        .iter()
        .flat_map(|t| t.ids.iter().map(|&i| i64::from(i)))
        .collect();
    ids.chunks_exact(seq_len.max(1))
        .take(count)
        .map(<[i64]>::to_vec)
        .collect()
}

/// The folder self-written transcripts are cached in: `ZIPLM_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/ziplm`, else `~/.cache/ziplm`, each with `self-chat/` below.
pub fn cache_folder() -> PathBuf {
    let base = std::env::var_os("ZIPLM_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("ziplm")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/ziplm")))
        .unwrap_or_else(|| std::env::temp_dir().join("ziplm"));
    base.join("self-chat")
}

/// The cache file of the transcripts of the model at `model` in `folder`: named by the
/// SHA-256 of the model's bytes and of everything that shapes the transcripts (the
/// topics, forms and reply lengths, and ziplm's version).
pub fn cache_file(folder: &Path, model: &Path) -> Result<PathBuf> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"ziplm self-chat 1 ");
    h.update(env!("CARGO_PKG_VERSION").as_bytes());
    h.update(TOPICS.as_bytes());
    for f in FORMS {
        h.update(f.as_bytes());
    }
    h.update(format!("{QUESTION_TOKENS} {REPLY_TOKENS}").as_bytes());
    crate::fsutil::hash_path(&mut h, model)?;
    let hex: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Ok(folder.join(format!("{}.jsonl", &hex[..32])))
}

/// The cached transcripts at `path` with the number of question requests they used
/// (the first line); empty when there is no cache. A cache that does not parse is an
/// error naming the file to remove.
pub fn read_cache(path: &Path) -> Result<(usize, Vec<Transcript>)> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((0, vec![])),
        Err(e) => return Err(Error::io(path, e)),
    };
    let bad = |line: usize, e: String| Error::Format {
        path: path.into(),
        detail: format!("line {line}: {e}; remove the file and the transcripts are written again"),
    };
    let mut lines = text.lines();
    let head: CacheHead = serde_json::from_str(lines.next().unwrap_or_default())
        .map_err(|e| bad(1, e.to_string()))?;
    let mut out = vec![];
    for (i, line) in lines.enumerate() {
        out.push(serde_json::from_str(line).map_err(|e| bad(i + 2, e.to_string()))?);
    }
    Ok((head.requests_used, out))
}

/// Writes the cache atomically: a head line with the requests used, then one
/// transcript per line.
pub fn write_cache(path: &Path, requests_used: usize, transcripts: &[Transcript]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let json = |e: serde_json::Error| Error::Invalid(e.to_string());
    let mut text = serde_json::to_string(&CacheHead { requests_used }).map_err(json)?;
    text.push('\n');
    for t in transcripts {
        text.push_str(&serde_json::to_string(t).map_err(json)?);
        text.push('\n');
    }
    crate::fsutil::write_atomic(path, text.as_bytes())
}

#[derive(Serialize, Deserialize)]
struct CacheHead {
    /// Question requests (of [`question_requests`]) already sent, answered or not.
    requests_used: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(n: usize) -> Transcript {
        Transcript {
            question: "q?".into(),
            reply: "r".into(),
            ids: (0..n as u32).collect(),
        }
    }

    #[test]
    fn specs_name_self_chat_or_a_path() {
        assert_eq!(parse_spec("self"), Some(Ok(None)));
        assert_eq!(parse_spec("self:65_536"), Some(Ok(Some(65536))));
        assert!(parse_spec("self:0")
            .unwrap()
            .unwrap_err()
            .contains("N >= 1"));
        assert!(parse_spec("self:lots")
            .unwrap()
            .unwrap_err()
            .contains("self:N"));
        assert_eq!(parse_spec("selfie.txt"), None);
        assert_eq!(parse_spec("data/self.txt"), None);
    }

    #[test]
    fn requests_cover_every_topic_in_every_form_once() {
        let r = question_requests();
        let topics = TOPICS
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
            .count();
        assert_eq!(r.len(), topics * FORMS.len());
        let unique: std::collections::BTreeSet<_> = r.iter().collect();
        assert_eq!(unique.len(), r.len());
        // The first round already spans the forms.
        assert_ne!(r[0].split(' ').next(), r[1].split(' ').next());
        // No probe question is among them.
        for p in crate::data::probes::DEFAULT_PROBES.lines() {
            let p: crate::data::probes::Probe = serde_json::from_str(p).unwrap();
            assert!(!r.iter().any(|q| q.contains(&p.question)));
        }
    }

    #[test]
    fn questions_are_read_off_the_first_line() {
        assert_eq!(
            question_from("\n  Question: \"Why do bees make honey?\"\nBecause...").as_deref(),
            Some("Why do bees make honey?")
        );
        assert_eq!(question_from("Ok"), None);
        assert_eq!(question_from("   \n"), None);
    }

    #[test]
    fn tokens_are_taken_in_whole_transcripts_and_cut_into_windows() {
        let all = [t(5), t(5), t(5)];
        assert_eq!(take_tokens(&all, 1).len(), 1);
        assert_eq!(take_tokens(&all, 5).len(), 1);
        assert_eq!(take_tokens(&all, 6).len(), 2);
        assert_eq!(take_tokens(&all, 100).len(), 3);
        let w = windows(&all, 10, 4);
        assert_eq!(w.len(), 3); // 15 ids: 3 windows of 4, a tail of 3 dropped
        assert_eq!(w[1], vec![4, 0, 1, 2]);
        assert_eq!(windows(&all, 2, 4).len(), 2);
    }

    #[test]
    fn the_cache_round_trips_and_is_named_by_the_model() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.gguf"), dir.path().join("b.gguf"));
        std::fs::write(&a, b"one").unwrap();
        std::fs::write(&b, b"two").unwrap();
        let (fa, fb) = (
            cache_file(dir.path(), &a).unwrap(),
            cache_file(dir.path(), &b).unwrap(),
        );
        assert_ne!(fa, fb);
        assert_eq!(read_cache(&fa).unwrap(), (0, vec![]));
        write_cache(&fa, 7, &[t(3), t(2)]).unwrap();
        assert_eq!(read_cache(&fa).unwrap(), (7, vec![t(3), t(2)]));
        std::fs::write(&fa, "{\"requests_used\": 1}\nnot json\n").unwrap();
        let e = read_cache(&fa).unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("remove the file"), "{e}");
    }
}
