//! Plans (`*.plan.json`) from arbitrary bytes: parsing never panics, a parsed plan
//! serialises and parses back to itself, and validating it against a model structure
//! never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ziplm_plugin_api::*;

fn structure() -> ModelStructure {
    let attn = BlockKind::Attention(AttentionShape {
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 16,
    });
    let ffn = BlockKind::Ffn(FfnShape {
        width: 128,
        gated: true,
    });
    ModelStructure {
        architecture: "llama".into(),
        blocks: vec![
            PrunableBlock {
                id: BlockId(0),
                layer: LayerIndex(0),
                kind: attn,
                hidden: 64,
                name: "attn".into(),
            },
            PrunableBlock {
                id: BlockId(1),
                layer: LayerIndex(0),
                kind: ffn,
                hidden: 64,
                name: "ffn".into(),
            },
        ],
        constraints: ShapeConstraints::default(),
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(plan) = serde_json::from_slice::<Plan>(data) {
        let text = serde_json::to_vec(&plan).expect("a parsed plan serialises");
        let again: Plan = serde_json::from_slice(&text).expect("a serialised plan parses");
        assert_eq!(again, plan);
        let _ = plan.validate_for(&structure());
    }
});
