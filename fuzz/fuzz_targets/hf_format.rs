//! Hugging Face folder inputs from arbitrary bytes: the safetensors header check, the
//! config.json reader and the shard index reader never panic. The first byte picks the
//! reader; the rest is its input.
#![no_main]

use libfuzzer_sys::fuzz_target;

// The module itself, not the ziplm crate: it needs only serde and safetensors, so this
// target builds in a minute instead of instrumenting tract.
#[path = "../../src/hf_format.rs"]
mod hf_format;
use hf_format::{check_safetensors, shard_files, HfLlamaConfig};

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 3 {
        0 => {
            if let Ok(tensors) = check_safetensors(rest) {
                for t in tensors.values() {
                    // Accepted tensors have a known float type.
                    assert!(["F32", "F16", "BF16"].contains(&t.dtype.as_str()));
                }
            }
        }
        1 => {
            if let Ok(text) = std::str::from_utf8(rest) {
                if let Ok(c) = HfLlamaConfig::parse(text) {
                    // Accepted configs have consistent head shapes.
                    assert!(c.kv_heads() > 0 && c.num_attention_heads % c.kv_heads() == 0);
                    assert!(c.head_width() > 0 && c.exact_context() > 0);
                    // Qwen2's loader derives the head width: accepted configs agree.
                    if c.qkv_bias() {
                        assert_eq!(c.head_width() * c.num_attention_heads, c.hidden_size);
                    }
                }
            }
        }
        _ => {
            if let Ok(text) = std::str::from_utf8(rest) {
                if let Ok(files) = shard_files(text) {
                    assert!(files.iter().all(|f| !f.contains('/')));
                }
            }
        }
    }
});
