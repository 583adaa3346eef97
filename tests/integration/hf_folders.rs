//! Hugging Face folders in the mistral.rs backend: the tiny Llama fixture
//! (`fixtures/hf/tiny-llama-gqa`, config.json + model.safetensors) read, pruned, written
//! as a safetensors folder and loaded by stock mistral.rs; GGUF sources written as
//! folders; bad folders refused.

use super::mistralrs_backend::{max_abs_diff, plan_keeping, tiny as tiny_gguf, tiny_job};
use std::path::{Path, PathBuf};
use ziplm::backend::mistralrs::options::LlmFormat;
use ziplm::backend::mistralrs::{self as mrs, LlamaModel, LlamaOptions, LoadedModel};
use ziplm_plugin_api::{ModelAdapter, Plan, PrunedWeights};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The Hugging Face fixture copied into `dir`, with a `tokenizer.json` (the fixture has
/// none): the GGUF fixture's tokenizer, which was made for these weights.
fn tiny_folder(dir: &Path) -> PathBuf {
    let out = dir.join("tiny-llama-gqa");
    std::fs::create_dir_all(&out).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(
            root().join("fixtures/hf/tiny-llama-gqa").join(f),
            out.join(f),
        )
        .unwrap();
    }
    let g = mrs::gguf::GgufFile::open(&tiny_gguf()).unwrap();
    mrs::tokenizer::from_gguf(&g)
        .unwrap()
        .save(out.join("tokenizer.json"), false)
        .unwrap();
    out
}

fn logits(w: &mrs::llama::LlamaWeights, ids: &[u32]) -> Vec<Vec<f32>> {
    w.forward(ids, true, &mut |_, _, _| Ok(()))
        .unwrap()
        .to_vec2::<f32>()
        .unwrap()
}

/// Emits `model` with every layer but the first dropped as a folder at `dest`, loads it
/// in mistral.rs and returns the max |logit| difference to ziplm's forward of it.
fn first_layer_only_diff(model: &LlamaModel, dest: &Path) -> f32 {
    let mut plan = Plan::dense(model.structure());
    for bp in plan.blocks.iter_mut().skip(2) {
        bp.kept.clear();
        bp.kept_kv_heads.clear();
    }
    model.emit(&plan, &PrunedWeights::default(), dest).unwrap();
    let ids: Vec<u32> = (0..12).map(|i| (i * 7 + 1) % 128).collect();
    let want = logits(
        &model
            .pruned_weights(&plan, &PrunedWeights::default())
            .unwrap(),
        &ids,
    );
    max_abs_diff(
        &LoadedModel::load(dest).unwrap().logits(&ids).unwrap(),
        &want,
    )
}

fn tensor_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// 2 of 4 heads, the same FFN width 96 in both layers (a folder has one
/// `intermediate_size`).
fn a_uniform_plan(model: &LlamaModel) -> (Plan, PrunedWeights) {
    plan_keeping(model, |_| 96)
}

#[test]
fn a_folder_reads_as_its_gguf_conversion() {
    let dir = tempfile::tempdir().unwrap();
    let folder = LlamaModel::load(&tiny_folder(dir.path()), LlamaOptions::default()).unwrap();
    let gguf = LlamaModel::load(&tiny_gguf(), LlamaOptions::default()).unwrap();
    assert_eq!(folder.weights.config, gguf.weights.config);
    assert_eq!(folder.format, LlmFormat::Safetensors);
    for (a, b) in folder.weights.layers.iter().zip(&gguf.weights.layers) {
        // Q / K permuted to the GGUF layout exactly as llama.cpp's converter does.
        assert_eq!(tensor_diff(&a.wq, &b.wq), 0.0);
        assert_eq!(tensor_diff(&a.wk, &b.wk), 0.0);
        assert_eq!(tensor_diff(&a.down, &b.down), 0.0);
    }
    // And the forward agrees with the numpy reference computed from these HF weights.
    let reference: serde_json::Value = serde_json::from_slice(
        &std::fs::read(root().join("fixtures/gguf/tiny-llama-gqa.logits.json")).unwrap(),
    )
    .unwrap();
    let ids: Vec<u32> = reference["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let want: Vec<Vec<f32>> = serde_json::from_value(reference["logits"].clone()).unwrap();
    let d = max_abs_diff(&logits(&folder.weights, &ids), &want);
    assert!(d < 1e-4, "max |diff| to the numpy reference: {d}");
    // The permutation round-trips.
    let q = &folder.weights.layers[0].wq;
    let back = mrs::hf::to_interleaved(&mrs::hf::to_rotate_half(q, 4).unwrap(), 4).unwrap();
    assert_eq!(tensor_diff(q, &back), 0.0);
}

#[test]
fn a_pruned_folder_loads_in_mistralrs_with_ziplms_logits() {
    let dir = tempfile::tempdir().unwrap();
    let src = tiny_folder(dir.path());
    let model = LlamaModel::load(&src, LlamaOptions::default()).unwrap();
    assert!(model.structure().constraints.uniform_ffn_width);
    let ids: Vec<u32> = (0..20).map(|i| (i * 11 + 5) % 128).collect();

    // Dense: stock mistral.rs (its llama loader) on the source folder.
    let d = max_abs_diff(
        &LoadedModel::load(&src).unwrap().logits(&ids).unwrap(),
        &logits(&model.weights, &ids),
    );
    eprintln!("dense tiny llama folder: max |ziplm - mistral.rs| {d:e}");
    assert!(d < 1e-4, "dense logits differ by {d}");

    let (plan, weights) = a_uniform_plan(&model);
    let dest = dir.path().join("pruned");
    let summary = model.emit(&plan, &weights, &dest).unwrap();
    assert!(summary.params_after < summary.params_before);
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(dest.join(f).is_file(), "{f} written");
    }
    let want = logits(&model.pruned_weights(&plan, &weights).unwrap(), &ids);
    // Read back by ziplm: the pruned shapes and the same function.
    let back = LlamaModel::load(&dest, LlamaOptions::default()).unwrap();
    assert_eq!(back.weights.config.n_heads, 2);
    assert_eq!(back.weights.config.ffn_width, 96);
    assert!(max_abs_diff(&logits(&back.weights, &ids), &want) < 1e-5);
    // Stock mistral.rs (its mistral loader, head_dim from config.json).
    let d = max_abs_diff(
        &LoadedModel::load(&dest).unwrap().logits(&ids).unwrap(),
        &want,
    );
    eprintln!("pruned tiny llama folder: max |ziplm - mistral.rs| {d:e}");
    assert!(d < 1e-4, "pruned logits differ by {d}");
}

#[test]
fn folders_drop_layers_refuse_mixed_widths_and_are_byte_identical() {
    let dir = tempfile::tempdir().unwrap();
    let model = LlamaModel::load(&tiny_folder(dir.path()), LlamaOptions::default()).unwrap();
    let d = first_layer_only_diff(&model, &dir.path().join("one-layer"));
    assert!(d < 1e-4, "one-layer logits differ by {d}");

    // The same plan twice: the same bytes in every file.
    let (plan, weights) = a_uniform_plan(&model);
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    model.emit(&plan, &weights, &a).unwrap();
    LlamaModel::load(
        &tiny_folder(&dir.path().join("again")),
        LlamaOptions::default(),
    )
    .unwrap()
    .emit(&plan, &weights, &b)
    .unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert_eq!(
            std::fs::read(a.join(f)).unwrap(),
            std::fs::read(b.join(f)).unwrap(),
            "{f}"
        );
    }

    // Per-layer widths cannot be written as a folder: refused, nothing written.
    let mut mixed = Plan::dense(model.structure());
    mixed.blocks[3].kept = (0..64).collect();
    let dest = dir.path().join("mixed");
    let e = model
        .emit(&mixed, &PrunedWeights::default(), &dest)
        .unwrap_err()
        .to_string();
    assert!(e.contains("intermediate_size"), "{e}");
    assert!(!dest.exists());
}

#[test]
fn a_gguf_model_can_be_written_as_a_folder() {
    let dir = tempfile::tempdir().unwrap();
    let options = LlamaOptions {
        format: Some(LlmFormat::Safetensors),
        ..Default::default()
    };
    let model = LlamaModel::load(&tiny_gguf(), options).unwrap();
    let (plan, weights) = a_uniform_plan(&model);
    let dest = dir.path().join("from-gguf");
    model.emit(&plan, &weights, &dest).unwrap();
    let ids: Vec<u32> = (0..16).map(|i| (i * 3 + 2) % 128).collect();
    let want = logits(&model.pruned_weights(&plan, &weights).unwrap(), &ids);
    let d = max_abs_diff(
        &LoadedModel::load(&dest).unwrap().logits(&ids).unwrap(),
        &want,
    );
    assert!(d < 1e-4, "logits differ by {d}");
    // The folder's tokenizer.json encodes as the GGUF metadata's tokenizer.
    let g = mrs::gguf::GgufFile::open(&tiny_gguf()).unwrap();
    let from_meta = mrs::tokenizer::from_gguf(&g).unwrap();
    let written = tokenizers::Tokenizer::from_file(dest.join("tokenizer.json")).unwrap();
    let text = "ab abc, xyz!";
    assert_eq!(
        from_meta.encode(text, false).unwrap().get_ids(),
        written.encode(text, false).unwrap().get_ids()
    );
}

#[test]
fn a_prune_job_on_a_folder_is_verified_in_mistralrs() {
    let dir = tempfile::tempdir().unwrap();
    let job = tiny_job(tiny_folder(dir.path()), dir.path());
    let report = ziplm::backend::run_job(&job, &ziplm::progress::Quiet).unwrap();
    let b = &report.budgets[0];
    let out = Path::new(&b.output);
    assert!(out.join("model.safetensors").is_file(), "{}", out.display());
    assert!(b.measured_ms.is_some(), "verification ran in mistral.rs");
    assert_eq!(out.file_name().unwrap(), "tiny-llama-gqa.speedup-1.2");
    let back = LlamaModel::load(out, LlamaOptions::default()).unwrap();
    let widths: Vec<usize> = back.weights.layers.iter().map(|l| l.ffn_width()).collect();
    assert!(widths.windows(2).all(|w| w[0] == w[1]), "{widths:?}");
    for e in std::fs::read_dir(&job.out_dir).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(
            !name.starts_with(".ziplm") && !name.ends_with(".tmp"),
            "left {name}"
        );
    }
}

#[test]
fn bad_folders_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let err = |p: &Path, options: LlamaOptions| match LlamaModel::load(p, options) {
        Ok(_) => panic!("{} loaded", p.display()),
        Err(e) => e.to_string(),
    };
    let fresh = |name: &str| tiny_folder(&dir.path().join(name));

    // Truncated weights: the file is named.
    let f = fresh("truncated");
    let bytes = std::fs::read(f.join("model.safetensors")).unwrap();
    std::fs::write(f.join("model.safetensors"), &bytes[..bytes.len() - 10]).unwrap();
    let e = err(&f, LlamaOptions::default());
    assert!(
        e.contains("model.safetensors") && e.contains("truncated"),
        "{e}"
    );
    std::fs::write(f.join("model.safetensors"), &bytes[..5]).unwrap();
    let e = err(&f, LlamaOptions::default());
    assert!(e.contains("truncated"), "{e}");

    // An unsupported family and an inconsistent config.
    let f = fresh("gemma");
    let cfg = std::fs::read_to_string(f.join("config.json")).unwrap();
    std::fs::write(
        f.join("config.json"),
        cfg.replace("\"model_type\": \"llama\"", "\"model_type\": \"gemma\""),
    )
    .unwrap();
    let e = err(&f, LlamaOptions::default());
    assert!(e.contains("gemma") && e.contains("config.json"), "{e}");
    // A Qwen2 config over weights without its Q/K/V biases: the missing tensor named.
    std::fs::write(
        f.join("config.json"),
        cfg.replace("\"model_type\": \"llama\"", "\"model_type\": \"qwen2\""),
    )
    .unwrap();
    let e = err(&f, LlamaOptions::default());
    assert!(
        e.contains("self_attn.q_proj.bias") && e.contains("missing"),
        "{e}"
    );
    std::fs::write(
        f.join("config.json"),
        cfg.replace("\"hidden_size\": 64", "\"hidden_size\": 96"),
    )
    .unwrap();
    let e = err(&f, LlamaOptions::default());
    assert!(
        e.contains("model.embed_tokens.weight") && e.contains("shape"),
        "{e}"
    );

    // A missing tensor and NaN weights, named.
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<u8>, Vec<usize>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.data().to_vec(), v.shape().to_vec()))
        .collect();
    let write = |f: &Path, t: &[(String, Vec<u8>, Vec<usize>)]| {
        let views: Vec<(String, safetensors::tensor::TensorView)> = t
            .iter()
            .map(|(n, d, s)| {
                let v = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d)
                    .unwrap();
                (n.clone(), v)
            })
            .collect();
        std::fs::write(
            f.join("model.safetensors"),
            safetensors::serialize(views, None).unwrap(),
        )
        .unwrap();
    };
    let f = fresh("missing");
    let without: Vec<_> = tensors
        .iter()
        .filter(|t| t.0 != "model.layers.1.mlp.up_proj.weight")
        .cloned()
        .collect();
    write(&f, &without);
    let e = err(&f, LlamaOptions::default());
    assert!(
        e.contains("model.layers.1.mlp.up_proj.weight") && e.contains("missing"),
        "{e}"
    );
    let f = fresh("nan");
    for t in tensors.iter_mut() {
        if t.0 == "model.layers.0.self_attn.v_proj.weight" {
            t.1 = f32::NAN.to_le_bytes().repeat(t.1.len() / 4);
        }
    }
    write(&f, &tensors);
    let e = err(&f, LlamaOptions::default());
    assert!(
        e.contains("model.layers.0.self_attn.v_proj.weight") && e.contains("NaN"),
        "{e}"
    );

    // No tokenizer.json for the output; a GGUF output from a folder; a quantised type.
    let f = fresh("no-tokenizer");
    std::fs::remove_file(f.join("tokenizer.json")).unwrap();
    let e = err(&f, LlamaOptions::default());
    assert!(
        e.contains("tokenizer.json") && e.contains("--tokenizer"),
        "{e}"
    );
    let f = fresh("formats");
    let gguf_out = LlamaOptions {
        format: Some(LlmFormat::Gguf),
        ..Default::default()
    };
    let e = err(&f, gguf_out);
    assert!(e.contains("GGUF output needs a GGUF source"), "{e}");
    let q8 = LlamaOptions {
        output_dtype: ziplm::backend::mistralrs::options::GgufDType::Q8_0,
        ..Default::default()
    };
    let e = err(&f, q8);
    assert!(e.contains("f32 or f16"), "{e}");
}

/// SmolLM2-135M (when fetched) written as a safetensors folder: stock mistral.rs (its
/// mistral loader, unquantised f32 matmuls) agrees with ziplm's forward, and the folder
/// keeps the chat template.
#[test]
fn smollm2_as_a_folder_matches_ziplm_in_mistralrs() {
    let Some(path) = super::mistralrs_backend::smollm2() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let options = LlamaOptions {
        format: Some(LlmFormat::Safetensors),
        ..Default::default()
    };
    let model = LlamaModel::load(&path, options).unwrap();
    let dest = dir.path().join("smollm2");
    model
        .emit(
            &Plan::dense(model.structure()),
            &PrunedWeights::default(),
            &dest,
        )
        .unwrap();
    let tok = tokenizers::Tokenizer::from_file(dest.join("tokenizer.json")).unwrap();
    let ids = tok
        .encode(
            "The capital of France is Paris, and the capital of Italy is",
            false,
        )
        .unwrap()
        .get_ids()
        .to_vec();
    let want = logits(&model.weights, &ids);
    let rt = LoadedModel::load(&dest).unwrap();
    let got = rt.logits(&ids).unwrap();
    let scale = want.iter().flatten().fold(0f32, |m, x| m.max(x.abs()));
    let d = max_abs_diff(&got, &want);
    eprintln!("SmolLM2 folder: max |ziplm - mistral.rs| {d:e} of max |logit| {scale}");
    assert!(d < 1e-3 * scale, "logits differ by {d}");
    let reply = rt.chat("What is the capital of France?", 12).unwrap();
    eprintln!("SmolLM2 folder reply: {:?}", reply.text);
    assert!(reply.text.contains("Paris"), "{:?}", reply.text);
}

/// The other layouts a Hugging Face folder comes in: a Mistral config (sliding window),
/// sharded weights with an index, BF16 weights. Each reads as the same model.
#[test]
fn mistral_configs_shards_and_bf16_weights_read_as_the_same_model() {
    let dir = tempfile::tempdir().unwrap();
    let reference = LlamaModel::load(
        &tiny_folder(&dir.path().join("ref")),
        LlamaOptions::default(),
    )
    .unwrap();
    let ids: Vec<u32> = (0..14).map(|i| (i * 9 + 4) % 128).collect();
    let want = logits(&reference.weights, &ids);

    // Mistral: same tensors, `sliding_window` bounds the context ziplm calibrates with;
    // stock mistral.rs serves the source folder with its mistral loader.
    let f = tiny_folder(&dir.path().join("mistral"));
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(f.join("config.json")).unwrap()).unwrap();
    cfg["model_type"] = "mistral".into();
    cfg["architectures"] = serde_json::json!(["MistralForCausalLM"]);
    cfg["sliding_window"] = 32.into();
    std::fs::write(f.join("config.json"), cfg.to_string()).unwrap();
    let m = LlamaModel::load(&f, LlamaOptions::default()).unwrap();
    assert_eq!(m.weights.config.context_length, 32);
    assert!(max_abs_diff(&logits(&m.weights, &ids), &want) < 1e-6);
    let d = max_abs_diff(&LoadedModel::load(&f).unwrap().logits(&ids).unwrap(), &want);
    assert!(d < 1e-4, "mistral loader: logits differ by {d}");
    let mut m = m;
    let e = m
        .set_calibration(vec![vec![1; 40]])
        .unwrap_err()
        .to_string();
    assert!(e.contains("context"), "{e}");

    // Two shards and an index.
    let f = tiny_folder(&dir.path().join("sharded"));
    let bytes = std::fs::read(f.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    let mut map = serde_json::Map::new();
    for (i, part) in names.chunks(names.len() / 2 + 1).enumerate() {
        let file = format!("model-{:05}-of-00002.safetensors", i + 1);
        let views: Vec<(String, safetensors::tensor::TensorView)> = part
            .iter()
            .map(|n| (n.clone(), st.tensor(n).unwrap()))
            .collect();
        std::fs::write(f.join(&file), safetensors::serialize(views, None).unwrap()).unwrap();
        for n in part {
            map.insert(n.clone(), file.clone().into());
        }
    }
    std::fs::remove_file(f.join("model.safetensors")).unwrap();
    std::fs::write(
        f.join("model.safetensors.index.json"),
        serde_json::json!({ "metadata": {}, "weight_map": map }).to_string(),
    )
    .unwrap();
    let m = LlamaModel::load(&f, LlamaOptions::default()).unwrap();
    assert_eq!(max_abs_diff(&logits(&m.weights, &ids), &want), 0.0);

    // BF16 weights: converted to f32 on read, close to the f32 model.
    let f = tiny_folder(&dir.path().join("bf16"));
    let tensors: Vec<(String, candle_core::Tensor)> = names
        .iter()
        .map(|n| {
            let v = st.tensor(n).unwrap();
            let t = candle_core::safetensors::Load::load(&v, &candle_core::Device::Cpu)
                .unwrap()
                .to_dtype(candle_core::DType::BF16)
                .unwrap();
            (n.clone(), t)
        })
        .collect();
    std::fs::write(
        f.join("model.safetensors"),
        safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), None).unwrap(),
    )
    .unwrap();
    let m = LlamaModel::load(&f, LlamaOptions::default()).unwrap();
    let scale = want.iter().flatten().fold(0f32, |a, x| a.max(x.abs()));
    let d = max_abs_diff(&logits(&m.weights, &ids), &want);
    assert!(
        d > 0.0 && d < 0.05 * scale.max(1.0),
        "bf16 logits differ by {d}"
    );
}

/// The tiny fixture as a Qwen2 folder: the same tensors plus Q/K/V biases (arbitrary,
/// large enough to matter), `model_type` qwen2, `Qwen2ForCausalLM`, no `head_dim` (the
/// qwen2 loader derives hidden / heads = 16, the fixture's head width).
fn tiny_qwen2_folder(dir: &Path) -> PathBuf {
    let f = tiny_folder(dir);
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(f.join("config.json")).unwrap()).unwrap();
    cfg["model_type"] = "qwen2".into();
    cfg["architectures"] = serde_json::json!(["Qwen2ForCausalLM"]);
    let obj = cfg.as_object_mut().unwrap();
    obj.remove("head_dim");
    obj.remove("attention_bias");
    std::fs::write(f.join("config.json"), cfg.to_string()).unwrap();
    let bytes = std::fs::read(f.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, candle_core::Tensor)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            use candle_core::safetensors::Load;
            (n, v.load(&candle_core::Device::Cpu).unwrap())
        })
        .collect();
    for layer in 0..2 {
        for (proj, rows) in [("q_proj", 64usize), ("k_proj", 32), ("v_proj", 32)] {
            let v: Vec<f32> = (0..rows)
                .map(|i| ((i * 37 + layer * 11 + proj.len()) % 23) as f32 / 10.0 - 1.1)
                .collect();
            tensors.push((
                format!("model.layers.{layer}.self_attn.{proj}.bias"),
                candle_core::Tensor::from_vec(v, rows, &candle_core::Device::Cpu).unwrap(),
            ));
        }
    }
    std::fs::write(
        f.join("model.safetensors"),
        safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), None).unwrap(),
    )
    .unwrap();
    f
}

/// Qwen2 folders: read with their biases (ziplm's forward matches stock mistral.rs's
/// qwen2 loader), pruned in FFN width and whole layers only (the qwen2 loader derives
/// the head width from hidden / heads, so every head stays), written as
/// `Qwen2ForCausalLM` folders that load with ziplm's logits.
#[test]
fn qwen2_folders_keep_their_heads_and_load_in_mistralrs() {
    let dir = tempfile::tempdir().unwrap();
    let f = tiny_qwen2_folder(&dir.path().join("src"));
    let model = LlamaModel::load(&f, LlamaOptions::default()).unwrap();
    let s = model.structure();
    assert_eq!(s.architecture, "qwen2");
    assert!(s.constraints.fixed_heads);
    let ids: Vec<u32> = (0..18).map(|i| (i * 11 + 5) % 128).collect();
    let ours = logits(&model.weights, &ids);
    // The biases matter: without them the logits are another model's.
    let plain = LlamaModel::load(
        &tiny_folder(&dir.path().join("plain")),
        LlamaOptions::default(),
    )
    .unwrap();
    let moved = max_abs_diff(&logits(&plain.weights, &ids), &ours);
    assert!(moved > 1e-2, "biases moved the logits by only {moved}");
    let d = max_abs_diff(&LoadedModel::load(&f).unwrap().logits(&ids).unwrap(), &ours);
    eprintln!("dense tiny qwen2: max |ziplm - mistral.rs| logit diff {d:e}");
    assert!(d < 1e-4, "dense qwen2 logits differ by {d}");

    // Every head, FFN 96 in both layers, arbitrary out-projections.
    let (mut plan, mut weights) = plan_keeping(&model, |_| 96);
    for (bp, b) in plan.blocks.iter_mut().zip(&s.blocks) {
        if b.kind.is_attention() {
            bp.kept = (0..4).collect();
            bp.kept_kv_heads = vec![0, 1];
            weights.out_projections.remove(&b.id);
        }
    }
    let dest = dir.path().join("ffn96");
    model.emit(&plan, &weights, &dest).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dest.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"][0], "Qwen2ForCausalLM");
    assert_eq!(
        (
            cfg["intermediate_size"].as_u64(),
            cfg["num_attention_heads"].as_u64()
        ),
        (Some(96), Some(4))
    );
    let want = logits(&model.pruned_weights(&plan, &weights).unwrap(), &ids);
    let d = max_abs_diff(
        &LoadedModel::load(&dest).unwrap().logits(&ids).unwrap(),
        &want,
    );
    eprintln!("pruned tiny qwen2 (FFN 96): max |ziplm - mistral.rs| logit diff {d:e}");
    assert!(d < 1e-4, "pruned qwen2 logits differ by {d}");
    // Read back: the same model, biases included.
    let back = LlamaModel::load(&dest, LlamaOptions::default()).unwrap();
    assert!(max_abs_diff(&logits(&back.weights, &ids), &want) < 1e-5);

    // A dropped layer loads too.
    let d = first_layer_only_diff(&model, &dir.path().join("one-layer"));
    assert!(d < 1e-4, "one-layer qwen2 logits differ by {d}");

    // Pruned heads cannot be written: a clear error, nothing written.
    let (heads, weights) = plan_keeping(&model, |_| 96);
    let dest = dir.path().join("heads");
    let e = model.emit(&heads, &weights, &dest).unwrap_err().to_string();
    assert!(e.contains("keeps every head"), "{e}");
    assert!(!dest.exists());

    // A whole prune job: verified in mistral.rs, every head kept.
    let job = tiny_job(f, dir.path());
    let report = ziplm::backend::run_job(&job, &ziplm::progress::Quiet).unwrap();
    let b = &report.budgets[0];
    assert!(b.measured_ms.is_some(), "verification ran in mistral.rs");
    let out = LlamaModel::load(Path::new(&b.output), LlamaOptions::default()).unwrap();
    assert!(out.weights.is_qwen2());
    for l in &out.weights.layers {
        assert_eq!(l.n_heads(16), 4);
    }
}
