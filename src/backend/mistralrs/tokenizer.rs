//! The tokenizer of a GGUF model, built from its `tokenizer.ggml.*` metadata the way
//! mistral.rs builds it (GPT-2 style byte-level BPE), so ziplm's calibration and
//! perplexity see the same token ids as the runtime.

use super::gguf::GgufFile;
use candle_core::quantized::gguf_file::Value;
use tokenizers::models::bpe::BpeBuilder;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    AddedToken, ModelWrapper, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer,
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

/// Builds the tokenizer described by a GGUF file's metadata. Only `gpt2` (byte-level
/// BPE) tokenizers are built; for others, pass a `tokenizer.json`.
pub fn from_gguf(file: &GgufFile) -> Result<Tokenizer, String> {
    let md = file.metadata();
    let model = file
        .string("tokenizer.ggml.model")
        .ok_or("the file has no tokenizer (tokenizer.ggml.model missing); pass --tokenizer")?;
    if model != "gpt2" {
        return Err(format!(
            "its tokenizer is `{model}`; ziplm builds only `gpt2` (byte-level BPE) tokenizers from GGUF metadata: pass the model's tokenizer.json with --tokenizer"
        ));
    }
    let tokens = md
        .get("tokenizer.ggml.tokens")
        .and_then(strings)
        .ok_or("tokenizer.ggml.tokens is missing or not a list of strings")?;
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
    let unk = token("tokenizer.ggml.unknown_token_id")?;
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
