//! Chat probes: plain questions with one-word answers, asked of a chat model greedily and
//! checked by keyword (`ziplm eval --probes`). The set that ships with ziplm is
//! `data/probes.jsonl`.

use serde::{Deserialize, Serialize};

/// One plain question of a probe set and the words a right answer contains.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Probe {
    /// The question, sent as one user message through the model's chat template.
    pub question: String,
    /// A reply that contains any of these (case-insensitive) answers the question.
    pub keywords: Vec<String>,
}

/// The probe set that ships with ziplm (`data/probes.jsonl`): plain questions with
/// one-word answers.
pub const DEFAULT_PROBES: &str = include_str!("../../data/probes.jsonl");

/// Reads a probe set: JSON lines `{"question": ..., "keywords": [...]}`.
pub fn parse_probes(text: &str, source: &std::path::Path) -> crate::Result<Vec<Probe>> {
    let mut probes = vec![];
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let p: Probe = serde_json::from_str(line).map_err(|e| crate::Error::Format {
            path: source.into(),
            detail: format!(
                "line {}: {e} (expected {{\"question\": ..., \"keywords\": [...]}})",
                i + 1
            ),
        })?;
        if p.keywords.iter().all(|k| k.trim().is_empty()) {
            return Err(crate::Error::Format {
                path: source.into(),
                detail: format!("line {}: a probe needs at least one keyword", i + 1),
            });
        }
        probes.push(p);
    }
    if probes.is_empty() {
        return Err(crate::Error::Format {
            path: source.into(),
            detail: "no probe questions".into(),
        });
    }
    Ok(probes)
}

/// Whether `reply` answers `probe`: it holds one of its keywords (case-insensitive) at
/// the start of a word; a number must also end there (`0` is not found in `100`).
pub fn answers(probe: &Probe, reply: &str) -> bool {
    let reply = reply.to_lowercase();
    probe
        .keywords
        .iter()
        .map(|k| k.trim().to_lowercase())
        .filter(|k| !k.is_empty())
        .any(|k| {
            let numeric = k.chars().all(|c| c.is_ascii_digit());
            reply.match_indices(&k).any(|(at, _)| {
                let before = reply[..at].chars().next_back();
                let after = reply[at + k.len()..].chars().next();
                let starts_a_word = !before.is_some_and(char::is_alphanumeric);
                let number_goes_on = numeric && after.is_some_and(|c| c.is_ascii_digit());
                starts_a_word && !number_goes_on
            })
        })
}

/// A model's greedy reply to one probe.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProbeReply {
    /// The question.
    pub question: String,
    /// The reply.
    pub reply: String,
    /// Whether it holds a keyword.
    pub answered: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_probes_parse_and_keywords_match_words() {
        let probes = parse_probes(DEFAULT_PROBES, std::path::Path::new("probes.jsonl")).unwrap();
        assert_eq!(probes.len(), 40);
        let paris = &probes[0];
        assert!(answers(paris, "The capital of France is Paris."));
        assert!(!answers(paris, "I am a tokenism of the past"));
        let p = |k: &str| Probe {
            question: String::new(),
            keywords: vec![k.into()],
        };
        assert!(!answers(&p("0"), "It boils at 100 degrees."));
        assert!(answers(&p("0"), "Water freezes at 0 degrees."));
        assert!(answers(&p("whale"), "The blue whale."));
        assert!(!answers(&p("sun"), "It is a tsunami."));
        let e = parse_probes("{\"question\": \"q\"}", std::path::Path::new("p.jsonl"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("p.jsonl") && e.contains("line 1"), "{e}");
    }
}
