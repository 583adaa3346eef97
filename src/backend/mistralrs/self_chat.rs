//! The dense model writes its own chat transcripts (`--calibration self:N`; the data
//! side is [`crate::data::self_chat`]).
//!
//! mistral.rs renders every conversation through the model's chat template and
//! tokenises it, as it does when serving; the replies are decoded greedily by ziplm's
//! own forward of the same weights ([`super::generate::greedy`], [`BATCH`]
//! conversations at a time with a KV cache). mistralrs-core 0.8.1 decodes one request
//! at a time here at about 12 tokens/s, and batched requests came out garbled.

use super::generate;
use super::runtime::LoadedModel;
use crate::data::self_chat::{self as chat, Transcript};
use crate::error::{Error, Result};
use crate::progress::Progress;
use std::path::Path;

/// Conversations decoded at once by a job.
pub const BATCH: usize = 32;

/// Whether the model at `path` (loaded as `model`) carries a chat template: the GGUF
/// metadata's `tokenizer.chat_template`, or a folder's `chat_template.jinja` /
/// `chat_template.json` / `tokenizer_config.json` entry.
pub fn has_chat_template(path: &Path, model: &super::LlamaModel) -> bool {
    if let Some(g) = model.gguf() {
        return g.string("tokenizer.chat_template").is_some();
    }
    path.join("chat_template.jinja").is_file()
        || path.join("chat_template.json").is_file()
        || std::fs::read_to_string(path.join("tokenizer_config.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .is_some_and(|v| v.get("chat_template").is_some())
}

/// The tokens a reply ends at: the one that ends an assistant turn in the chat template
/// (`<|im_end|>` for SmolLM2; the first token of what follows any reply when a
/// conversation is rendered whole, found with two replies), and the model's
/// end-of-sequence token. Empty when there is neither: replies then run to their
/// length limit.
pub fn stop_tokens(rt: &LoadedModel, path: &Path, model: &super::LlamaModel) -> Result<Vec<u32>> {
    let render = |reply: &str| rt.tokenize_chat(&[("user", "Hello"), ("assistant", reply)], false);
    let (a, b) = (render("Yes")?, render("No")?);
    let common = a
        .iter()
        .rev()
        .zip(b.iter().rev())
        .take_while(|(x, y)| x == y)
        .count();
    let mut stop = vec![];
    if common > 0 {
        stop.push(a[a.len() - common]);
    }
    stop.extend(eos_token(path, model));
    stop.dedup();
    Ok(stop)
}

/// The end-of-sequence token: `tokenizer.ggml.eos_token_id` of a GGUF file, or a
/// folder's `generation_config.json` / `config.json` `eos_token_id` (a number or a
/// list of them).
fn eos_token(path: &Path, model: &super::LlamaModel) -> Vec<u32> {
    if let Some(g) = model.gguf() {
        return g
            .uint("tokenizer.ggml.eos_token_id")
            .map(|i| i as u32)
            .into_iter()
            .collect();
    }
    ["generation_config.json", "config.json"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(path.join(f)).ok())
        .filter_map(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .find_map(|v| {
            let e = v.get("eos_token_id")?;
            Some(match e {
                serde_json::Value::Array(a) => a
                    .iter()
                    .filter_map(|x| x.as_u64().map(|i| i as u32))
                    .collect(),
                other => other.as_u64().map(|i| i as u32).into_iter().collect(),
            })
        })
        .unwrap_or_default()
}

/// At least `tokens` ids of transcripts by the chat model at `model` (loaded as `llm`;
/// an error when it has no chat template;
/// fewer only when every question request is used up), from the cache in `cache` and
/// written on where the cache ends, `batch` conversations at a time. The cache is
/// rewritten after every batch, so an interrupted run goes on from there.
pub fn transcripts(
    model: &Path,
    llm: &super::LlamaModel,
    tokens: usize,
    cache: &Path,
    batch: usize,
    progress: &dyn Progress,
) -> Result<Vec<Transcript>> {
    if !has_chat_template(model, llm) {
        return Err(Error::Invalid(format!(
            "{}: the model has no chat template, so it cannot write chat transcripts (self:N is for chat models); give --calibration FILE",
            model.display()
        )));
    }
    let file = chat::cache_file(cache, model)?;
    let (mut used, mut written) = chat::read_cache(&file)?;
    let requests = chat::question_requests();
    let mut have = chat::token_count(&written);
    if have < tokens && used < requests.len() {
        let rt = LoadedModel::load(model)?;
        let stop = stop_tokens(&rt, model, llm)?;
        let failed = |e: candle_core::Error| {
            Error::Invalid(format!("{}: generation failed: {e}", model.display()))
        };
        // Greedy replies to user messages, as text.
        let replies = |users: &[String], max: usize| -> Result<Vec<String>> {
            let prompts = users
                .iter()
                .map(|u| rt.tokenize_chat(&[("user", u)], true))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            let ids = generate::greedy(&llm.weights, &prompts, max, &stop).map_err(failed)?;
            ids.iter()
                .map(|r| Ok(rt.detokenize(r, true)?.trim().to_string()))
                .collect()
        };
        progress.start("self-chat tokens", tokens as u64);
        progress.advance(have as u64);
        while have < tokens && used < requests.len() {
            let chunk = &requests[used..(used + batch.max(1)).min(requests.len())];
            let questions: Vec<String> = replies(chunk, chat::QUESTION_TOKENS)?
                .iter()
                .filter_map(|r| chat::question_from(r))
                .collect();
            let answers = replies(&questions, chat::REPLY_TOKENS)?;
            for (question, reply) in questions.into_iter().zip(answers) {
                let ids = rt.tokenize_chat(&[("user", &question), ("assistant", &reply)], false)?;
                have += ids.len();
                progress.advance(ids.len() as u64);
                written.push(Transcript {
                    question,
                    reply,
                    ids,
                });
            }
            used += chunk.len();
            chat::write_cache(&file, used, &written)?;
        }
        progress.finish();
    }
    Ok(chat::take_tokens(&written, tokens).to_vec())
}
