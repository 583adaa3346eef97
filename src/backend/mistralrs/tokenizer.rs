//! The tokenizer of a GGUF model, built from its `tokenizer.ggml.*` metadata the way
//! mistral.rs builds it (`gpt2`: byte-level BPE; `llama`: SentencePiece unigram with
//! byte fallback), so ziplm's calibration and perplexity see the same token ids as the
//! runtime.

use super::gguf::GgufFile;
use candle_core::quantized::gguf_file::Value;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::BpeBuilder;
use tokenizers::models::unigram::Unigram;
use tokenizers::normalizers::{Prepend, Replace};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    AddedToken, DecoderWrapper, ModelWrapper, NormalizerWrapper, PreTokenizerWrapper,
    SplitDelimiterBehavior, Tokenizer,
};

/// The pre-tokenizer regex mistral.rs uses for GGUF `gpt2` tokenizers.
const GPT2_SPLIT: &str = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

fn strings(v: &Value) -> Option<Vec<String>> {
    v.to_vec()
        .ok()?
        .iter()
        .map(|x| x.to_string().ok().cloned())
        .collect()
}

/// Builds the tokenizer described by a GGUF file's metadata: `gpt2` (byte-level BPE)
/// and `llama` (SentencePiece unigram) tokenizers, as mistral.rs builds them; for
/// others, pass a `tokenizer.json`.
pub fn from_gguf(file: &GgufFile) -> Result<Tokenizer, String> {
    let md = file.metadata();
    let model = file
        .string("tokenizer.ggml.model")
        .ok_or("the file has no tokenizer (tokenizer.ggml.model missing); pass --tokenizer")?;
    let tokens = md
        .get("tokenizer.ggml.tokens")
        .and_then(strings)
        .ok_or("tokenizer.ggml.tokens is missing or not a list of strings")?;
    let token = |key: &str| -> Result<Option<String>, String> {
        match file.uint(key) {
            None => Ok(None),
            Some(i) => tokens
                .get(i as usize)
                .cloned()
                .map(Some)
                .ok_or_else(|| format!("{key} = {i} is beyond the {} tokens", tokens.len())),
        }
    };
    let mut tok = match model {
        "gpt2" => bpe(file, &tokens, token("tokenizer.ggml.unknown_token_id")?)?,
        "llama" => unigram(file, &tokens)?,
        other => {
            return Err(format!(
                "its tokenizer is `{other}`; ziplm builds `gpt2` (byte-level BPE) and `llama` (SentencePiece) tokenizers from GGUF metadata: pass the model's tokenizer.json with --tokenizer"
            ))
        }
    };
    // Special tokens: every token whose type is not "normal" (1), then bos / eos / unk,
    // as mistral.rs does.
    if let Some(types) = md
        .get("tokenizer.ggml.token_type")
        .and_then(|v| v.to_vec().ok())
    {
        if types.len() == tokens.len() {
            let special: Vec<AddedToken> = types
                .iter()
                .zip(&tokens)
                .filter(|(ty, _)| ty.to_i32().ok() != Some(1))
                .map(|(_, t)| AddedToken::from(t.clone(), true))
                .collect();
            tok.add_special_tokens(&special);
        }
    }
    for key in [
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.unknown_token_id",
    ] {
        if let Some(t) = token(key)? {
            tok.add_special_tokens(&[AddedToken::from(t, true)]);
        }
    }
    Ok(tok)
}

/// SentencePiece as mistral.rs converts it: a unigram model over the scored pieces
/// (unknown id from the metadata, else 0) with byte fallback; spaces become `▁` and one
/// is prepended; decoding undoes both.
fn unigram(file: &GgufFile, tokens: &[String]) -> Result<Tokenizer, String> {
    let scores: Vec<f64> = file
        .metadata()
        .get("tokenizer.ggml.scores")
        .and_then(|v| v.to_vec().ok())
        .and_then(|v| v.iter().map(|x| x.to_f32().ok().map(f64::from)).collect())
        .ok_or("tokenizer.ggml.scores is missing or not a list of numbers (a `llama` tokenizer needs one score per token)")?;
    if scores.len() != tokens.len() {
        return Err(format!(
            "{} tokenizer scores for {} tokens",
            scores.len(),
            tokens.len()
        ));
    }
    let unk = file.uint("tokenizer.ggml.unknown_token_id").unwrap_or(0) as usize;
    if unk >= tokens.len() {
        return Err(format!(
            "tokenizer.ggml.unknown_token_id = {unk} is beyond the {} tokens",
            tokens.len()
        ));
    }
    let vocab: Vec<(String, f64)> = tokens.iter().cloned().zip(scores).collect();
    let model = Unigram::from(vocab, Some(unk), true)
        .map_err(|e| format!("building the SentencePiece model: {e}"))?;
    let mut tok = Tokenizer::new(ModelWrapper::Unigram(model));
    let replace = |a: &str, b: &str| {
        Replace::new(a, b).map_err(|e| format!("the tokenizer's replace rule: {e}"))
    };
    tok.with_normalizer(Some(NormalizerWrapper::Sequence(
        tokenizers::normalizers::Sequence::new(vec![
            NormalizerWrapper::Prepend(Prepend::new("▁".into())),
            NormalizerWrapper::Replace(replace(" ", "▁")?),
        ]),
    )));
    tok.with_decoder(Some(DecoderWrapper::Sequence(DecoderSequence::new(vec![
        DecoderWrapper::Replace(replace("▁", " ")?),
        DecoderWrapper::ByteFallback(ByteFallback::default()),
        DecoderWrapper::Fuse(Fuse::default()),
        DecoderWrapper::Strip(Strip::new(' ', 1, 0)),
    ]))));
    Ok(tok)
}

/// GPT-2 byte-level BPE as mistral.rs converts it.
fn bpe(file: &GgufFile, tokens: &[String], unk: Option<String>) -> Result<Tokenizer, String> {
    let md = file.metadata();
    let merges = md
        .get("tokenizer.ggml.merges")
        .and_then(strings)
        .ok_or("tokenizer.ggml.merges is missing or not a list of strings")?;
    let merges = merges
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| format!("tokenizer merge `{m}` is not two tokens"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let mut bpe = BpeBuilder::new().vocab_and_merges(vocab, merges);
    if let Some(u) = &unk {
        bpe = bpe.unk_token(u.clone());
    }
    let bpe = bpe
        .build()
        .map_err(|e| format!("building the BPE model: {e}"))?;
    let mut tok = Tokenizer::new(ModelWrapper::BPE(bpe));
    let split = Split::new(
        SplitPattern::Regex(GPT2_SPLIT.to_string()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(|e| format!("the split pattern: {e}"))?;
    tok.with_pre_tokenizer(Some(Sequence::new(vec![
        PreTokenizerWrapper::Split(split),
        PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, false)),
    ])));
    tok.with_decoder(Some(ByteLevel::new(false, false, false)));
    tok.with_post_processor(Some(ByteLevel::new(false, false, false)));
    Ok(tok)
}
