//! The mistral.rs backend on the tiny Llama fixture (`fixtures/gguf/tiny-llama-gqa.gguf`,
//! written by gguf-py from the Hugging Face fixture, see `scripts/make_tiny_llama_gguf.py`)
//! and, when it has been fetched, the real SmolLM2-135M.

use std::path::{Path, PathBuf};
use ziplm::backend::mistralrs::{self as mrs, LlamaModel, LlamaOptions, LoadedModel};
use ziplm::job::PruneJob;
use ziplm::search::Budget;
use ziplm_plugin_api::{ModelAdapter, Plan, PrunedWeights, WeightMatrix};

/// The tiny Llama GGUF fixture.
pub fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/gguf/tiny-llama-gqa.gguf")
}

/// Largest absolute difference of two logit tables of the same shape.
pub fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len(), "row counts differ");
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.len(), y.len());
            x.iter().zip(y).map(|(p, q)| (p - q).abs())
        })
        .fold(0.0, f32::max)
}

fn our_logits(model: &LlamaModel, ids: &[u32]) -> Vec<Vec<f32>> {
    model
        .weights
        .forward(ids, true, &mut |_, _, _| Ok(()))
        .unwrap()
        .to_vec2::<f32>()
        .unwrap()
}

#[test]
fn tiny_llama_forward_matches_an_independent_numpy_reference() {
    let reference: serde_json::Value = serde_json::from_slice(
        &std::fs::read(tiny().with_file_name("tiny-llama-gqa.logits.json")).unwrap(),
    )
    .unwrap();
    let ids: Vec<u32> = reference["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let want: Vec<Vec<f32>> = serde_json::from_value(reference["logits"].clone()).unwrap();
    let model = LlamaModel::load(&tiny(), LlamaOptions::default()).unwrap();
    let got = our_logits(&model, &ids);
    let d = max_abs_diff(&got, &want);
    assert!(d < 1e-4, "max |diff| to the numpy reference: {d}");
}

/// A plan that keeps query heads 0 and 2 (1 per KV group) in every layer and
/// `width(layer)` FFN neurons, with the out-projections replaced by arbitrary matrices
/// (as OBS would).
pub fn plan_keeping(model: &LlamaModel, width: impl Fn(u32) -> usize) -> (Plan, PrunedWeights) {
    let s = model.structure();
    let mut plan = Plan::dense(s);
    let mut weights = PrunedWeights::default();
    for (bp, b) in plan.blocks.iter_mut().zip(&s.blocks) {
        bp.kept = match b.kind.is_attention() {
            true => vec![0, 2],
            false => (0..width(b.layer.0)).collect(),
        };
        let cols = bp.kept_columns().len();
        let data = (0..b.hidden * cols)
            .map(|i| ((i * 31 % 17) as f32 - 8.0) / 40.0)
            .collect();
        weights
            .out_projections
            .insert(b.id, WeightMatrix::new(b.hidden, cols, data).unwrap());
    }
    (plan, weights)
}

/// 2 of 4 heads, FFN widths 96 and 64.
fn a_pruned_plan(model: &LlamaModel) -> (Plan, PrunedWeights) {
    plan_keeping(model, |layer| if layer == 0 { 96 } else { 64 })
}

/// A prune job on a tiny model with random calibration ids, quick profiling and
/// verification, one 1.2x budget, writing into `dir/out`.
pub fn tiny_job(model: PathBuf, dir: &Path) -> PruneJob {
    let mut job = PruneJob::new(model);
    job.workload = ziplm_plugin_api::Workload::prefill(1, 32);
    job.random_samples = 16;
    job.budgets = vec![Budget::Speedup(1.2)];
    job.profile = ziplm::profile::ProfileSettings::new(1, 5);
    job.verify_settings = ziplm::profile::ProfileSettings::new(1, 5);
    job.search.retries = 1;
    job.out_dir = dir.join("out");
    job
}

#[test]
fn a_pruned_tiny_llama_loads_in_mistralrs_with_ziplms_logits() {
    let dir = tempfile::tempdir().unwrap();
    let model = LlamaModel::load(&tiny(), LlamaOptions::default()).unwrap();
    let ids: Vec<u32> = (0..20).map(|i| (i * 13 + 3) % 128).collect();

    // Dense: mistral.rs on the fixture itself.
    let dense_rt = LoadedModel::load(&tiny()).unwrap();
    let d = max_abs_diff(&dense_rt.logits(&ids).unwrap(), &our_logits(&model, &ids));
    eprintln!("dense tiny llama: max |ziplm - mistral.rs| logit diff {d:e}");
    assert!(d < 1e-4, "dense logits differ by {d}");

    // Pruned: emitted file in mistral.rs vs ziplm's forward of the pruned weights.
    let (plan, weights) = a_pruned_plan(&model);
    let dest = dir.path().join("pruned.gguf");
    let summary = model.emit(&plan, &weights, &dest).unwrap();
    assert!(summary.params_after < summary.params_before);
    let ours = model.pruned_weights(&plan, &weights).unwrap();
    let want = ours
        .forward(&ids, true, &mut |_, _, _| Ok(()))
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    // The emitted file read back by ziplm has the pruned shapes.
    let back = LlamaModel::load(&dest, LlamaOptions::default()).unwrap();
    assert_eq!(back.weights.config.n_heads, 2);
    assert_eq!(back.weights.config.n_kv_heads, 2);
    assert_eq!(back.weights.layers[0].ffn_width(), 96);
    assert_eq!(back.weights.layers[1].ffn_width(), 64);
    assert!(max_abs_diff(&our_logits(&back, &ids), &want) < 1e-5);
    let rt = LoadedModel::load(&dest).unwrap();
    let d = max_abs_diff(&rt.logits(&ids).unwrap(), &want);
    eprintln!("pruned tiny llama: max |ziplm - mistral.rs| logit diff {d:e}");
    assert!(d < 1e-4, "pruned logits differ by {d}");
}

/// The dense plan with the given layers dropped whole (attention and FFN).
fn without_layers(model: &LlamaModel, layers: &[u32]) -> Plan {
    let mut plan = Plan::dense(model.structure());
    for (bp, b) in plan.blocks.iter_mut().zip(&model.structure().blocks) {
        if layers.contains(&b.layer.0) {
            bp.kept.clear();
            bp.kept_kv_heads.clear();
        }
    }
    plan
}

#[test]
fn dropping_a_whole_layer_loads_and_matches() {
    let dir = tempfile::tempdir().unwrap();
    let model = LlamaModel::load(&tiny(), LlamaOptions::default()).unwrap();
    let plan = without_layers(&model, &[0]);
    let dest = dir.path().join("one-layer.gguf");
    model.emit(&plan, &PrunedWeights::default(), &dest).unwrap();
    let ids: Vec<u32> = (0..12).map(|i| (i * 7 + 1) % 128).collect();
    let want = model
        .pruned_weights(&plan, &PrunedWeights::default())
        .unwrap()
        .forward(&ids, true, &mut |_, _, _| Ok(()))
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert_eq!(
        LlamaModel::load(&dest, LlamaOptions::default())
            .unwrap()
            .weights
            .layers
            .len(),
        1
    );
    let d = max_abs_diff(
        &LoadedModel::load(&dest).unwrap().logits(&ids).unwrap(),
        &want,
    );
    assert!(d < 1e-4, "logits differ by {d}");

    // Attention alone cannot be removed: a clear refusal, nothing written.
    let mut half = Plan::dense(model.structure());
    half.blocks[0].kept.clear();
    half.blocks[0].kept_kv_heads.clear();
    let dest = dir.path().join("half.gguf");
    let e = model
        .emit(&half, &PrunedWeights::default(), &dest)
        .unwrap_err()
        .to_string();
    assert!(e.contains("whole layers only"), "{e}");
    assert!(!dest.exists());
}

/// Writes `model` with whole `layers` dropped (nothing re-fitted) to `dest`.
fn emit_without_layers(model: &LlamaModel, layers: &[u32], dest: &Path) {
    model
        .emit(
            &without_layers(model, layers),
            &PrunedWeights::default(),
            dest,
        )
        .unwrap();
}

/// Recovery settings for the tiny fixture: `tokens` in steps of two 32-token windows,
/// 2 windows held out, an evaluation every step.
fn tiny_recovery(tokens: u64) -> ziplm::job::RecoverySettings {
    let mut settings = ziplm::job::RecoverySettings::with_tokens(tokens);
    settings.step_tokens = 64;
    settings.held_out = 2;
    settings.eval_every = 1;
    settings
}

/// The fixture with other first-layer norms, loaded and written to `dir/original.gguf`:
/// the fixture's norms are all ones (untrained), and a pruned model's layers are
/// matched to their original's by their norms.
fn original_with_own_norms(dir: &Path) -> (LlamaModel, PathBuf) {
    let mut dense = LlamaModel::load(&tiny(), LlamaOptions::default()).unwrap();
    let l0 = &mut dense.weights.layers[0];
    l0.attn_norm = l0.attn_norm.affine(1.5, 0.25).unwrap();
    let original = dir.join("original.gguf");
    dense
        .emit(
            &Plan::dense(dense.structure()),
            &PrunedWeights::default(),
            &original,
        )
        .unwrap();
    (dense, original)
}

/// Prune -> recover -> prune: a model already pruned (here its first layer dropped) is
/// recovered towards the original dense model given as the teacher. The budget (1x)
/// keeps its shapes, so the student starts as the model itself: towards itself the first
/// loss is zero, towards the original it is the distance the pruning left. A teacher it
/// did not come from is refused when the job opens.
/// The fixture's norms are all ones (untrained), so the original here is the fixture
/// with other first-layer norms: layers are matched to the teacher's by their norms.
#[test]
fn a_pruned_model_recovers_towards_the_original_as_teacher() {
    let dir = tempfile::tempdir().unwrap();
    let (dense, original) = original_with_own_norms(dir.path());
    let stage1 = dir.path().join("stage1.gguf");
    emit_without_layers(&dense, &[0], &stage1);
    let first_loss = |teacher: Option<PathBuf>, out: &str| {
        let mut job = tiny_job(stage1.clone(), dir.path());
        job.budgets = vec![Budget::Speedup(1.0)];
        job.out_dir = dir.path().join(out);
        let mut settings = tiny_recovery(4 * 32);
        settings.teacher = teacher;
        job.recovery = Some(settings);
        ziplm::backend::run_job(&job, &ziplm::progress::Quiet)
            .map(|r| r.budgets[0].recovery.clone().unwrap().first_loss)
    };
    let own = first_loss(None, "own").unwrap();
    let towards_original = first_loss(Some(original), "original").unwrap();
    assert!(own.abs() < 1e-4, "towards itself the loss starts at {own}");
    assert!(
        towards_original > 1e-3,
        "distilling towards the original starts further away: {towards_original} vs {own}"
    );
    // A teacher it did not come from: the fixture's first layer alone.
    let wrong = dir.path().join("first-layer.gguf");
    emit_without_layers(&dense, &[1], &wrong);
    let e = first_loss(Some(wrong), "wrong").unwrap_err().to_string();
    assert!(
        e.contains("matches no layer of the recovery's teacher"),
        "{e}"
    );
}

/// `--chain`: the second budget is pruned from the first one's recovered model,
/// distilled towards the original, and both land as one output set named by the
/// chain's budgets. (The fixture's norms are all ones, so the original here has other
/// first-layer norms: the later stage's layers are matched to it by their norms.)
#[test]
fn a_chain_prunes_each_budget_from_the_last_ones_recovered_model() {
    let dir = tempfile::tempdir().unwrap();
    let (_, original) = original_with_own_norms(dir.path());
    let mut job = tiny_job(original.clone(), dir.path());
    job.budgets = vec![Budget::Speedup(2.0), Budget::Speedup(1.2)];
    job.verify = false;
    let mut settings = tiny_recovery(2 * 32);
    settings.chain = true;
    // One step for the first stage, two for the second.
    settings.stage_tokens = vec![64, 2 * 64];
    job.recovery = Some(settings);
    let report = ziplm::backend::run_job(&job, &ziplm::progress::Quiet).unwrap();

    let out = &job.out_dir;
    let names: Vec<String> = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    for f in [
        "original.speedup-1.2.gguf",
        "original.speedup-2.gguf",
        "original.speedup-1.2.plan.json",
        "original.speedup-2.plan.json",
        "original.report.json",
    ] {
        assert!(names.iter().any(|n| n == f), "{f} not in {names:?}");
    }
    assert!(
        !names
            .iter()
            .any(|n| n.contains("chain") || n.contains("stage")),
        "{names:?}"
    );
    assert_eq!(report.budgets.len(), 2);
    let (first, second) = (&report.budgets[0], &report.budgets[1]);
    assert_eq!(first.budget, Budget::Speedup(1.2));
    assert_eq!(second.budget, Budget::Speedup(2.0));
    let (c1, c2) = (first.chain.clone().unwrap(), second.chain.clone().unwrap());
    assert_eq!(c1.pruned_from, original.display().to_string());
    assert!(
        c2.pruned_from.ends_with("original.speedup-1.2.gguf"),
        "{c2:?}"
    );
    assert!(
        c1.speedup_over_original >= 1.2 && c2.speedup_over_original >= 2.0,
        "{c1:?} {c2:?}"
    );
    // The second stage's budget is what was left of the chain's after the first.
    let Budget::Speedup(rest) = c2.stage_budget else {
        panic!("{c2:?}")
    };
    assert!(
        (rest * c1.speedup_over_original - 2.0).abs() < 1e-9,
        "{rest}"
    );
    let planned = |b: &ziplm::report::BudgetReport| b.recovery.as_ref().unwrap().planned_steps;
    assert_eq!((planned(first), planned(second)), (1, 2));
    // The stages' notes name the models as committed, by the chain's budgets.
    assert!(
        report
            .notes
            .iter()
            .any(|n| n.starts_with("stage 1: original.speedup-2: recovery")),
        "{:?}",
        report.notes
    );
    // The second model is pruned from the first, and each serves in mistral.rs.
    assert_eq!(second.params.0, first.params.1);
    assert!(
        second.params.1 < first.params.1,
        "{:?} {:?}",
        first.params,
        second.params
    );
    for f in ["original.speedup-1.2.gguf", "original.speedup-2.gguf"] {
        LoadedModel::load(&out.join(f)).unwrap();
    }

    // Verified, every model of the chain is then timed against the original itself.
    job.verify = true;
    job.out_dir = dir.path().join("verified");
    let report = ziplm::backend::run_job(&job, &ziplm::progress::Quiet).unwrap();
    for b in &report.budgets {
        let (dense, model, speedup) = (
            b.measured_dense_ms.unwrap(),
            b.measured_ms.unwrap(),
            b.measured_speedup.unwrap(),
        );
        assert!(dense > 0.0 && model > 0.0 && speedup > 0.0);
        let Budget::Speedup(want) = b.budget else {
            panic!()
        };
        assert_eq!(b.met, Some(speedup >= want));
    }
    assert!(report
        .notes
        .iter()
        .any(|n| n.contains("paired run against the original")));
}

#[test]
fn the_same_plan_gives_byte_identical_gguf_files() {
    let dir = tempfile::tempdir().unwrap();
    let model = LlamaModel::load(&tiny(), LlamaOptions::default()).unwrap();
    let (plan, weights) = a_pruned_plan(&model);
    let a = dir.path().join("a.gguf");
    let b = dir.path().join("b.gguf");
    model.emit(&plan, &weights, &a).unwrap();
    LlamaModel::load(&tiny(), LlamaOptions::default())
        .unwrap()
        .emit(&plan, &weights, &b)
        .unwrap();
    assert_eq!(std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
}

#[test]
fn a_prune_job_on_the_tiny_llama_is_verified_in_mistralrs() {
    let dir = tempfile::tempdir().unwrap();
    let job = tiny_job(tiny(), dir.path());
    let report = ziplm::backend::run_job(&job, &ziplm::progress::Quiet).unwrap();
    let b = &report.budgets[0];
    assert!(Path::new(&b.output).exists());
    assert!(b.measured_ms.is_some(), "verification ran in mistral.rs");
    assert!(b.params.1 <= b.params.0);
    assert!(report.notes.iter().any(|n| n.contains("mistral.rs reply")));
    // The table was fitted to mistral.rs before the search (or the note says why not).
    assert!(
        report.notes.iter().any(|n| n.starts_with("runtime fit")),
        "{:?}",
        report.notes
    );
    // The emitted file loads in mistral.rs and in ziplm.
    LlamaModel::load(Path::new(&b.output), LlamaOptions::default()).unwrap();
    // No scratch files left behind.
    for e in std::fs::read_dir(&job.out_dir).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!name.starts_with(".ziplm"), "left {name}");
    }
}

#[test]
fn the_cli_profiles_a_gguf_model_into_the_table_a_prune_job_uses() {
    let dir = tempfile::tempdir().unwrap();
    let table = dir.path().join("table.json");
    let profile = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_ziplm"))
            .arg("profile")
            .arg(tiny())
            .arg("--out")
            .arg(&table)
            .args(["--seq-len", "32", "--runs", "3", "--quiet", "--json"])
            .output()
            .unwrap()
    };
    let out = profile();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["key"]["target"]["runtime"], "mistralrs");
    let entries = v["entries"].as_array().unwrap();
    let kinds = |k: &str| entries.iter().filter(|e| e["shape"]["kind"] == k).count();
    assert!(kinds("attention") > 0 && kinds("ffn") > 0, "{v}");
    for e in entries {
        assert_eq!(e["timing"]["runs"], 3, "{e}");
    }
    // A second profile reuses every shape, and a prune job at the same workload takes
    // the table as it is (nothing missing, so the file is not rewritten).
    let before = std::fs::read(&table).unwrap();
    assert!(profile().status.success());
    assert_eq!(std::fs::read(&table).unwrap(), before);
    let mut job = tiny_job(tiny(), dir.path());
    job.latency_table = Some(table.clone());
    job.verify = false;
    ziplm::backend::run_job(&job, &ziplm::progress::Quiet).unwrap();
    assert_eq!(std::fs::read(&table).unwrap(), before);
}

/// Records the stages a job starts.
#[derive(Default)]
struct Stages(std::sync::Mutex<Vec<String>>);

impl ziplm::progress::Progress for Stages {
    fn start(&self, stage: &str, _: u64) {
        self.0.lock().unwrap().push(stage.to_string());
    }
    fn advance(&self, _: u64) {}
    fn finish(&self) {}
}

#[test]
fn a_pruned_model_reuses_its_originals_latency_table_and_a_wrong_one_fails_first() {
    let dir = tempfile::tempdir().unwrap();
    let table = dir.path().join("table.json");
    // What this test checks is which table each job takes, not what it prunes: a budget
    // every model meets keeps the search out of it, so that timing noise cannot fail it
    // (a busy machine once timed every pruned shape of this tiny model as slow as the
    // dense one, and a speedup budget failed with ImpossibleBudget).
    let any_model_meets_it = vec![Budget::LatencyMs(1e6)];
    let mut job = tiny_job(tiny(), dir.path());
    job.budgets = any_model_meets_it.clone();
    job.latency_table = Some(table.clone());
    job.verify = false;
    ziplm::backend::run_job(&job, &ziplm::progress::Quiet).unwrap();
    let before = std::fs::read(&table).unwrap();

    // A model pruned from it (a whole layer gone, so every shape it can take is one the
    // original's table already holds) takes that table as it is: nothing re-profiled,
    // the file not rewritten.
    let model = LlamaModel::load(&tiny(), LlamaOptions::default()).unwrap();
    let pruned = dir.path().join("pruned.gguf");
    emit_without_layers(&model, &[0], &pruned);
    let mut job = tiny_job(pruned.clone(), dir.path());
    job.budgets = any_model_meets_it.clone();
    job.latency_table = Some(table.clone());
    job.verify = false;
    job.out_dir = dir.path().join("out-pruned");
    let stages = Stages::default();
    ziplm::backend::run_job(&job, &stages).unwrap();
    assert!(
        !stages.0.lock().unwrap().iter().any(|s| s == "profiling"),
        "{:?}",
        stages.0.lock().unwrap()
    );
    assert_eq!(std::fs::read(&table).unwrap(), before);

    // A table for another workload fails the job when it opens, before calibration.
    job.workload = ziplm_plugin_api::Workload::prefill(1, 16);
    job.out_dir = dir.path().join("out-wrong");
    let stages = Stages::default();
    let e = ziplm::backend::run_job(&job, &stages)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("latency table is for") && e.contains("ziplm profile"),
        "{e}"
    );
    assert!(
        stages.0.lock().unwrap().is_empty(),
        "{:?}",
        stages.0.lock().unwrap()
    );
    assert!(!job.out_dir.join("pruned.report.json").exists());

    // A pruned model whose first FFN is the narrower profiles its own shapes too (each
    // is cut from a layer wide enough to hold it).
    let (plan, weights) = plan_keeping(&model, |layer| if layer == 0 { 64 } else { 96 });
    let narrow_first = dir.path().join("narrow-first.gguf");
    model.emit(&plan, &weights, &narrow_first).unwrap();
    let mut job = tiny_job(narrow_first, dir.path());
    job.verify = false;
    job.out_dir = dir.path().join("out-narrow-first");
    job.budgets = any_model_meets_it;
    job.latency_table = Some(dir.path().join("narrow-first-table.json"));
    ziplm::backend::run_job(&job, &ziplm::progress::Quiet).unwrap();
    let t = ziplm::profile::load_table(job.latency_table.as_ref().unwrap()).unwrap();
    assert!(
        t.entries
            .iter()
            .any(|e| matches!(e.shape, ziplm_plugin_api::BlockShape::Ffn { width: 96, .. })),
        "{:?}",
        t.entries
    );
}

/// Every tensor of a GGUF file, by name, as stored (to write a variant of it).
fn gguf_tensors(g: &mrs::gguf::GgufFile) -> Vec<(String, candle_core::quantized::QTensor)> {
    g.content
        .tensor_infos
        .keys()
        .map(|n| (n.clone(), g.qtensor(n).unwrap()))
        .collect()
}

/// Writes a GGUF file with candle's writer.
fn write_gguf(
    path: &Path,
    meta: &[(String, candle_core::quantized::gguf_file::Value)],
    tensors: &[(String, candle_core::quantized::QTensor)],
) {
    let mut f = std::fs::File::create(path).unwrap();
    candle_core::quantized::gguf_file::write(
        &mut f,
        &meta
            .iter()
            .map(|(k, v)| (k.as_str(), v))
            .collect::<Vec<_>>(),
        &tensors
            .iter()
            .map(|(k, t)| (k.as_str(), t))
            .collect::<Vec<_>>(),
    )
    .unwrap();
}

#[test]
fn bad_gguf_inputs_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(tiny()).unwrap();
    let err = |p: &Path| match LlamaModel::load(p, LlamaOptions::default()) {
        Ok(_) => panic!("{} loaded", p.display()),
        Err(e) => e.to_string(),
    };
    // Truncated in the tensor data and in the header.
    for (name, len) in [("data.gguf", bytes.len() - 100), ("head.gguf", 300)] {
        let p = dir.path().join(name);
        std::fs::write(&p, &bytes[..len]).unwrap();
        let e = err(&p);
        assert!(e.contains(name) && e.contains("truncated"), "{e}");
    }
    // An unsupported architecture, written with candle's writer.
    let g = mrs::gguf::GgufFile::open(&tiny()).unwrap();
    let mut meta: Vec<(String, candle_core::quantized::gguf_file::Value)> = g
        .metadata()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for (k, v) in meta.iter_mut() {
        if k == "general.architecture" {
            *v = candle_core::quantized::gguf_file::Value::String("qwen2".into());
        }
    }
    let tensors = gguf_tensors(&g);
    let p = dir.path().join("qwen.gguf");
    write_gguf(&p, &meta, &tensors);
    let e = err(&p);
    assert!(e.contains("qwen2") && e.contains("llama"), "{e}");
    // NaN in a projection.
    let mut nan = tensors;
    let t = candle_core::Tensor::full(f32::NAN, (64, 64), &candle_core::Device::Cpu).unwrap();
    for (k, v) in nan.iter_mut() {
        if k == "blk.1.attn_q.weight" {
            *v = candle_core::quantized::QTensor::quantize(
                &t,
                candle_core::quantized::GgmlDType::F32,
            )
            .unwrap();
        }
    }
    for (k, v) in meta.iter_mut() {
        if k == "general.architecture" {
            *v = candle_core::quantized::gguf_file::Value::String("llama".into());
        }
    }
    let p = dir.path().join("nan.gguf");
    write_gguf(&p, &meta, &nan);
    let e = err(&p);
    assert!(
        e.contains("blk.1.attn_q.weight") && e.contains("NaN"),
        "{e}"
    );
    // A folder that is not a model: named, with what it needs.
    let job = PruneJob::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures"));
    let e = ziplm::backend::run_job(&job, &ziplm::progress::Quiet)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("config.json") && e.contains("model.safetensors"),
        "{e}"
    );
}

/// SmolLM2-135M-Instruct, fetched by `scripts/fetch_smollm2.py`.
pub fn smollm2() -> Option<PathBuf> {
    let p = std::env::var_os("ZIPLM_SMOLLM2")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    if p.is_file() {
        Some(p)
    } else {
        eprintln!(
            "skipped: SmolLM2-135M not found at {} (run scripts/fetch_smollm2.py)",
            p.display()
        );
        None
    }
}

#[test]
fn smollm2_logits_agree_with_mistralrs_and_the_tokenizer_too() {
    let Some(path) = smollm2() else { return };
    let model = LlamaModel::load(&path, LlamaOptions::default()).unwrap();
    let c = &model.weights.config;
    assert_eq!(
        (
            c.n_layers,
            c.hidden,
            c.n_heads,
            c.n_kv_heads,
            c.head_dim,
            c.ffn_width,
            c.vocab
        ),
        (30, 576, 9, 3, 64, 1536, 49152)
    );
    let tok = mrs::tokenizer::from_gguf(model.gguf().unwrap()).unwrap();
    let ids = tok
        .encode("The capital of France is Paris. It is known for", false)
        .unwrap()
        .get_ids()
        .to_vec();
    assert!(ids.len() > 5 && ids.iter().all(|&i| i < 49152));
    let rt = LoadedModel::load(&path).unwrap();
    // The same ids as mistral.rs's own tokenizer, on prose, WikiText markup and odd
    // characters.
    for text in [
        "The capital of France is Paris. It is known for",
        " = Valkyria Chronicles III = \n\n Senjō no Valkyria 3 : <unk> Chronicles ( Japanese : 戦場のヴァルキュリア3 ) ,",
        "  tabs\tand  spaces, numbers 1234567 and émojis 🙂!",
    ] {
        let ours = tok.encode(text, false).unwrap().get_ids().to_vec();
        assert_eq!(ours, rt.tokenize(text, false).unwrap(), "{text}");
    }
    let theirs = rt.logits(&ids).unwrap();
    let ours = our_logits(&model, &ids);
    let d = max_abs_diff(&theirs, &ours);
    let scale = ours.iter().flatten().fold(0f32, |m, x| m.max(x.abs()));
    eprintln!("SmolLM2 dense: max |ziplm - mistral.rs| logit diff {d:e} (max |logit| {scale})");
    // mistral.rs multiplies the Q4_1 weights with quantised kernels (activations
    // quantised to Q8_1), ziplm with dequantised f32: close, not identical.
    assert!(d < 0.05 * scale, "logits differ by {d}");
    let argmax = |r: &Vec<f32>| {
        r.iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0
    };
    let agree = theirs
        .iter()
        .zip(&ours)
        .filter(|(a, b)| argmax(a) == argmax(b))
        .count();
    assert!(
        agree * 10 >= ids.len() * 9,
        "{agree}/{} argmax agree",
        ids.len()
    );
}

#[test]
fn q8_0_output_loads_in_mistralrs_and_stays_close() {
    let dir = tempfile::tempdir().unwrap();
    let options = LlamaOptions {
        output_dtype: ziplm::backend::mistralrs::options::GgufDType::Q8_0,
        ..Default::default()
    };
    let model = LlamaModel::load(&tiny(), options).unwrap();
    let (plan, weights) = a_pruned_plan(&model);
    let dest = dir.path().join("q8.gguf");
    model.emit(&plan, &weights, &dest).unwrap();
    let g = mrs::gguf::GgufFile::open(&dest).unwrap();
    assert_eq!(
        g.qtensor("blk.0.ffn_down.weight").unwrap().dtype(),
        candle_core::quantized::GgmlDType::Q8_0
    );
    let ids: Vec<u32> = (0..16).map(|i| (i * 5 + 2) % 128).collect();
    let want = model
        .pruned_weights(&plan, &weights)
        .unwrap()
        .forward(&ids, true, &mut |_, _, _| Ok(()))
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let got = LoadedModel::load(&dest).unwrap().logits(&ids).unwrap();
    let scale = want.iter().flatten().fold(0f32, |m, x| m.max(x.abs()));
    let d = max_abs_diff(&got, &want);
    eprintln!("Q8_0 tiny llama: max |diff| {d:e} (max |logit| {scale})");
    assert!(d < 0.05 * scale.max(1.0), "Q8_0 logits differ by {d}");
}

/// A decode budget (one new token after a 24-token cache): blocks profiled as decode
/// steps in candle, the emitted model timed per generated token in mistral.rs.
#[test]
fn a_decode_budget_is_profiled_and_verified_per_token() {
    let dir = tempfile::tempdir().unwrap();
    let mut job = tiny_job(tiny(), dir.path());
    job.workload = ziplm_plugin_api::Workload::decode(1, 24);
    let report = ziplm::backend::run_job(&job, &ziplm::progress::Quiet).unwrap();
    let b = &report.budgets[0];
    assert!(b.measured_ms.is_some(), "decode verified in mistral.rs");
    assert!(
        report
            .notes
            .iter()
            .any(|n| n.contains("per generated token")),
        "{:?}",
        report.notes
    );
    // The helper apps use for decode timing runs on the emitted model.
    let rt = LoadedModel::load(Path::new(&b.output)).unwrap();
    let prompt: Vec<u32> = (0..24).map(|i| (i * 5 + 3) % 128).collect();
    // (On this tiny model a step takes microseconds: the difference of two wall times
    // can be zero under load, so only that it runs is checked; no timing assertion.)
    rt.decode_step(&prompt, 8).unwrap();

    // What mistral.rs cannot time is refused before any work.
    job.workload = ziplm_plugin_api::Workload::decode(2, 24);
    let e = ziplm::backend::run_job(&job, &ziplm::progress::Quiet)
        .unwrap_err()
        .to_string();
    assert!(e.contains("batch 1"), "{e}");
    job.workload = ziplm_plugin_api::Workload::decode(1, 60);
    let e = ziplm::backend::run_job(&job, &ziplm::progress::Quiet)
        .unwrap_err()
        .to_string();
    assert!(e.contains("context"), "{e}");
}

/// `ziplm eval MODEL --text FILE`: perplexity from ziplm's forward equals the one
/// computed here from mistral.rs's own logits (f64 log-softmax per window); bad
/// inputs exit 2 with the reason.
#[test]
fn the_cli_perplexity_matches_mistralrs_logits() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("text.txt");
    let body: String = (0..60)
        .map(|i| format!("ab abc{} xyz, {}! ", i % 7, i * 13 % 97))
        .collect();
    std::fs::write(&text, &body).unwrap();
    let run = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_ziplm"))
            .arg("eval")
            .arg(tiny())
            .arg("--text")
            .arg(&text)
            .args(["--window", "32", "--quiet"])
            .args(extra)
            .output()
            .unwrap()
    };
    let out = run(&["--json"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let cli_ppl = v["value"].as_f64().unwrap();

    // The same windows scored from mistral.rs's logits.
    let g = mrs::gguf::GgufFile::open(&tiny()).unwrap();
    let tok = mrs::tokenizer::from_gguf(&g).unwrap();
    let ids: Vec<u32> = tok.encode(body.as_str(), false).unwrap().get_ids().to_vec();
    let rt = LoadedModel::load(&tiny()).unwrap();
    let (mut nll, mut n) = (0.0f64, 0usize);
    for w in ids.chunks(32).filter(|w| w.len() >= 2) {
        let logits = rt.logits(w).unwrap();
        for (row, &next) in logits.iter().zip(&w[1..]) {
            let max = row.iter().fold(f32::MIN, |m, &x| m.max(x)) as f64;
            let lse = max
                + row
                    .iter()
                    .map(|&x| (x as f64 - max).exp())
                    .sum::<f64>()
                    .ln();
            nll += lse - row[next as usize] as f64;
            n += 1;
        }
    }
    let want = (nll / n as f64).exp();
    assert_eq!(v["tokens"].as_u64().unwrap() as usize, n);
    assert_eq!(
        v["windows"].as_u64().unwrap() as usize,
        ids.len().div_ceil(32)
    );
    assert!(
        ((cli_ppl - want) / want).abs() < 1e-4,
        "ziplm {cli_ppl} vs mistral.rs {want}"
    );
    eprintln!(
        "tiny llama perplexity: ziplm {cli_ppl:.6}, from mistral.rs logits {want:.6} ({n} tokens)"
    );

    // --windows N: the first N windows only.
    let v: serde_json::Value =
        serde_json::from_slice(&run(&["--json", "--windows", "2"]).stdout).unwrap();
    assert_eq!(v["tokens"], 62);

    // Bad inputs: exit 2, the reason, no panic.
    std::fs::write(dir.path().join("empty.txt"), "").unwrap();
    let bad = |args: &[&str], expect: &str| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_ziplm"))
            .arg("eval")
            .args(args)
            .output()
            .unwrap();
        let e = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {e}");
        assert!(
            e.contains(expect) && !e.contains("panicked"),
            "{args:?}: {e}"
        );
    };
    let tiny = tiny().display().to_string();
    let empty = dir.path().join("empty.txt").display().to_string();
    bad(&[&tiny, "--text", &empty], "is the file empty?");
    bad(
        &[&tiny, "--text", &empty, "--windows", "0"],
        "evaluates nothing",
    );
    bad(
        &[&tiny, "--text", "/nonexistent/text.txt"],
        "/nonexistent/text.txt",
    );
    bad(&[&tiny], "--text");
}

/// A GGUF with a SentencePiece (`llama`) tokenizer: ziplm's tokenizer from the metadata
/// gives the ids mistral.rs's own conversion gives (pieces, byte fallback, unknown
/// bytes, special tokens).
#[test]
fn a_sentencepiece_gguf_tokenizes_as_mistralrs_does() {
    use candle_core::quantized::gguf_file::Value;
    let dir = tempfile::tempdir().unwrap();
    let g = mrs::gguf::GgufFile::open(&tiny()).unwrap();
    let pieces = [
        "▁", "a", "b", "c", "x", "y", "z", ",", "!", "▁a", "▁ab", "▁abc", "bc", "ab", "▁x", "▁xyz",
        "yz", "xy", "▁the", "the", "e", "h", "t",
    ];
    let mut tokens: Vec<(String, f32, i32)> = vec![
        ("<unk>".into(), 0.0, 2),
        ("<s>".into(), 0.0, 3),
        ("</s>".into(), 0.0, 3),
    ];
    for (i, p) in pieces.iter().enumerate() {
        // Every piece costs about the same: fewer, longer pieces win.
        tokens.push((p.to_string(), -1.0 - i as f32 / 10.0, 1));
    }
    let mut byte = 0u8;
    while tokens.len() < 128 {
        tokens.push((format!("<0x{byte:02X}>"), -100.0, 6));
        byte += 1;
    }
    let mut meta: Vec<(String, Value)> = g
        .metadata()
        .iter()
        .filter(|(k, _)| !k.starts_with("tokenizer.ggml."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    meta.extend([
        (
            "tokenizer.ggml.model".to_string(),
            Value::String("llama".into()),
        ),
        (
            "tokenizer.ggml.tokens".to_string(),
            Value::Array(tokens.iter().map(|t| Value::String(t.0.clone())).collect()),
        ),
        (
            "tokenizer.ggml.scores".to_string(),
            Value::Array(tokens.iter().map(|t| Value::F32(t.1)).collect()),
        ),
        (
            "tokenizer.ggml.token_type".to_string(),
            Value::Array(tokens.iter().map(|t| Value::I32(t.2)).collect()),
        ),
        ("tokenizer.ggml.unknown_token_id".to_string(), Value::U32(0)),
        ("tokenizer.ggml.bos_token_id".to_string(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".to_string(), Value::U32(2)),
    ]);
    let tensors = gguf_tensors(&g);
    let p = dir.path().join("sentencepiece.gguf");
    write_gguf(&p, &meta, &tensors);

    let ours = mrs::tokenizer::from_gguf(&mrs::gguf::GgufFile::open(&p).unwrap()).unwrap();
    let rt = LoadedModel::load(&p).unwrap();
    for text in [
        "ab abc, xyz!",
        "the abc  xyz",
        "xy\nab",
        "über 7 the",
        "</s>ab<s>",
        "",
    ] {
        let ids = ours.encode(text, false).unwrap().get_ids().to_vec();
        eprintln!("{text:?} -> {ids:?}");
        assert_eq!(ids, rt.tokenize(text, false).unwrap(), "{text:?}");
    }
    // The model's perplexity runs on these ids too (ids within the vocabulary).
    let text = dir.path().join("t.txt");
    std::fs::write(&text, "ab abc, xyz! the abc xyz ".repeat(20)).unwrap();
    let p = mrs::eval::text_perplexity(&p, &text, None, 32, None, &ziplm::progress::Quiet).unwrap();
    assert!(p.ppl.is_finite() && p.tokens > 0);
    // An unknown tokenizer type is refused with the way out.
    let mut other = meta.clone();
    for (k, v) in other.iter_mut() {
        if k == "tokenizer.ggml.model" {
            *v = Value::String("bert".into());
        }
    }
    let q = dir.path().join("bert-tok.gguf");
    write_gguf(&q, &other, &tensors);
    let e = mrs::tokenizer::from_gguf(&mrs::gguf::GgufFile::open(&q).unwrap()).unwrap_err();
    assert!(e.contains("bert") && e.contains("--tokenizer"), "{e}");
}

#[test]
fn the_cli_times_emitted_gguf_files_in_mistralrs() {
    let dir = tempfile::tempdir().unwrap();
    let model = LlamaModel::load(&tiny(), LlamaOptions::default()).unwrap();
    let (plan, weights) = a_pruned_plan(&model);
    let pruned = dir.path().join("pruned.gguf");
    model.emit(&plan, &weights, &pruned).unwrap();
    let run = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_ziplm"))
            .arg("speedup")
            .arg(tiny())
            .arg(&pruned)
            .args(["--runs", "3", "--warmup", "1", "--quiet", "--json"])
            .args(extra)
            .output()
            .unwrap()
    };
    for extra in [
        &["--seq-len", "24"][..],
        &["--seq-len", "1", "--decode-kv-len", "16"],
    ] {
        let out = run(extra);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{extra:?}: {stderr}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let m = &v["models"][0];
        assert_eq!(m["model"], pruned.to_str().unwrap());
        assert_eq!(m["timing"]["runs"], 3);
        assert_eq!(m["dense"]["runs"], 3);
        // The median of the rounds' ratios, so between the slowest dense run over the
        // fastest model run and the other way round (what is timed is not asserted:
        // timings are noisy). Both files store F32: the dense file is timed as it is.
        let f = |k: &str, s: &str| m[k][s].as_f64().unwrap();
        assert!(f("timing", "min_ms") > 0.0, "{m}");
        let s = m["speedup"].as_f64().unwrap();
        assert!(
            f("dense", "min_ms") / f("timing", "max_ms") <= s
                && s <= f("dense", "max_ms") / f("timing", "min_ms"),
            "{m}"
        );
        assert!(m.get("dense_as").is_none(), "{m}");
    }
    // A model stored in another tensor type is timed against the dense model emitted
    // unpruned in that type (mistral.rs runs each type with its own kernels), and the
    // output says so.
    let q8 = LlamaModel::load(
        &tiny(),
        LlamaOptions {
            output_dtype: ziplm::backend::mistralrs::options::GgufDType::Q8_0,
            ..Default::default()
        },
    )
    .unwrap();
    let (plan8, weights8) = a_pruned_plan(&q8);
    let pruned_q8 = dir.path().join("pruned-q8.gguf");
    q8.emit(&plan8, &weights8, &pruned_q8).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ziplm"))
        .arg("speedup")
        .arg(tiny())
        .args([&pruned_q8, &pruned])
        .args("--runs 1 --warmup 0 --quiet --json --seq-len 8".split(' '))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let note = v["models"][0]["dense_as"].as_str().unwrap();
    assert!(
        note.contains("as F32 and this model as Q8_0") && note.contains("emitted unpruned as Q8_0"),
        "{note}"
    );
    assert!(v["models"][1].get("dense_as").is_none(), "{v}");
    // What mistral.rs cannot time is refused with the reason.
    let out = run(&["--batch", "2"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("batch"), "{stderr}");
    let out = run(&["--seq-len", "100000"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("context"), "{stderr}");
    // A truncated model gets ziplm's reader's error, which names the file.
    let bytes = std::fs::read(&pruned).unwrap();
    let truncated = dir.path().join("truncated.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ziplm"))
        .arg("speedup")
        .arg(tiny())
        .arg(&truncated)
        .args(["--seq-len", "8", "--quiet"])
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("truncated.gguf") && !stderr.contains("mistral.rs"),
        "{stderr}"
    );
}

/// `ziplm eval --reference DENSE`: against itself a model agrees on every next token
/// with zero KL; a pruned model agrees less, with positive KL. `--probes`: the shipped
/// questions asked through mistral.rs, counted against the reference's answers.
#[test]
fn eval_compares_with_the_dense_model_and_asks_the_probes() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("text.txt");
    let body: String = (0..60)
        .map(|i| format!("ab abc{} xyz, {}! ", i % 7, i * 13 % 97))
        .collect();
    std::fs::write(&text, &body).unwrap();
    let model = LlamaModel::load(&tiny(), Default::default()).unwrap();
    let (plan, weights) = a_pruned_plan(&model);
    let pruned = dir.path().join("pruned.gguf");
    model.emit(&plan, &weights, &pruned).unwrap();
    let eval = |m: &Path, extra: &[&str]| -> serde_json::Value {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ziplm"))
            .arg("eval")
            .arg(m)
            .args(["--window", "32", "--quiet", "--json", "--reference"])
            .arg(tiny())
            .args(extra)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let text_arg = text.display().to_string();
    let same = eval(&tiny(), &["--text", &text_arg]);
    assert_eq!(same["top1_agreement"], 1.0, "{same}");
    assert!(same["kl"].as_f64().unwrap().abs() < 1e-5, "{same}");
    let p = eval(&pruned, &["--text", &text_arg]);
    let (top1, kl) = (
        p["top1_agreement"].as_f64().unwrap(),
        p["kl"].as_f64().unwrap(),
    );
    assert!(top1 < 1.0 && kl > 1e-4, "{p}");
    // The perplexity is the one without a reference.
    let plain = std::process::Command::new(env!("CARGO_BIN_EXE_ziplm"))
        .args([
            "eval",
            pruned.to_str().unwrap(),
            "--window",
            "32",
            "--quiet",
            "--json",
            "--text",
        ])
        .arg(&text)
        .output()
        .unwrap();
    let plain: serde_json::Value = serde_json::from_slice(&plain.stdout).unwrap();
    assert_eq!(plain["value"], p["value"]);

    let probes = dir.path().join("probes.jsonl");
    std::fs::write(
        &probes,
        "{\"question\": \"What is the capital of France?\", \"keywords\": [\"Paris\"]}\n{\"question\": \"What color is grass?\", \"keywords\": [\"green\"]}\n",
    )
    .unwrap();
    let v = eval(
        &tiny(),
        &[
            "--probes",
            "--probe-set",
            probes.to_str().unwrap(),
            "--reply-tokens",
            "8",
        ],
    );
    let v = &v["probes"];
    assert_eq!(v["questions"], 2, "{v}");
    assert_eq!(v["replies"].as_array().unwrap().len(), 2, "{v}");
    // Against itself: it answers exactly what the reference answers.
    assert_eq!(v["answered_of_reference"], v["reference_answered"], "{v}");
}

/// Sequential correction (ZIPLM.md section 8) through the Llama streams: with the
/// pruned inputs equal to the dense ones (every block before the last dense), the
/// re-chosen plan and fit are the database's dense-input ones; with every block
/// pruned, the corrected model is closer to the dense one end to end than the
/// dense-input OBS weights, at the same shapes.
#[test]
fn sequential_correction_refits_each_block_on_the_pruned_inputs() {
    use ziplm::database::{Database, DatabaseConfig};
    use ziplm::pipeline::correct::{correct, SequentialTarget::*};
    use ziplm::search::Selection;
    let mut model = LlamaModel::load(&tiny(), LlamaOptions::default()).unwrap();
    let samples: Vec<Vec<i64>> = (0..24)
        .map(|s| {
            (0..32)
                .map(|i| ((i * 37 + s * 11 + 5) % 128) as i64)
                .collect()
        })
        .collect();
    model.set_calibration(samples).unwrap();
    let cfg = DatabaseConfig {
        dampening: 0.0,
        ffn_width_multiple: 16,
        ..Default::default()
    };
    let db = Database::build(&mut model, &cfg, &ziplm::progress::Quiet).unwrap();
    let n_levels: Vec<usize> = db.blocks.iter().map(|b| b.levels.len()).collect();
    let last = n_levels.len() - 1;
    let max_diff = |a: &WeightMatrix, b: &[f32]| {
        let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
        a.data
            .iter()
            .zip(b)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
            / scale
    };

    // Only the last block pruned.
    let mut levels = vec![0; n_levels.len()];
    levels[last] = n_levels[last] / 2;
    let selection = Selection { levels };
    let plan = db.plan(&selection).unwrap();
    let obs = db.pruned_weights(&selection).unwrap();
    let (seq_plan, seq) = correct(
        &model,
        &db,
        &selection,
        0.0,
        Output,
        false,
        &ziplm::progress::Quiet,
    )
    .unwrap();
    assert_eq!(
        seq_plan, plan,
        "equal inputs re-choose the database's groups"
    );
    let id = plan.blocks[last].block;
    let d = max_diff(&seq.out_projections[&id], &obs.out_projections[&id].data);
    assert!(
        d < 1e-3,
        "last block: sequential vs dense-input OBS differ by {d}"
    );
    // Dense blocks are left as they are.
    assert_eq!(seq.out_projections.len(), 1);
    // The `W X~` target on equal inputs is OBS on (W, H): the database's own result.
    let (own_plan, own) = correct(
        &model,
        &db,
        &selection,
        0.0,
        Inputs,
        false,
        &ziplm::progress::Quiet,
    )
    .unwrap();
    assert_eq!(own_plan, plan);
    let d = max_diff(&own.out_projections[&id], &obs.out_projections[&id].data);
    assert!(d < 1e-3, "last block, W X~ target: differs by {d}");

    // Every block pruned: the end-to-end hidden error is smaller with the correction.
    let selection = Selection {
        levels: n_levels.iter().map(|n| n / 2).collect(),
    };
    let plan = db.plan(&selection).unwrap();
    let obs = db.pruned_weights(&selection).unwrap();
    let (seq_plan, seq) = correct(
        &model,
        &db,
        &selection,
        0.0,
        Output,
        false,
        &ziplm::progress::Quiet,
    )
    .unwrap();
    for (a, b) in seq_plan.blocks.iter().zip(&plan.blocks) {
        assert_eq!(
            a.kept.len(),
            b.kept.len(),
            "{:?}: the shape is the plan's",
            a.block
        );
    }
    let error = |plan: &Plan, w: &PrunedWeights| {
        let pruned = model.pruned_weights(plan, w).unwrap();
        let mut e = 0.0f64;
        for s in model.calibration_samples() {
            let hook = &mut |_, _, _: &candle_core::Tensor| Ok(());
            let a = model.weights.forward(s, false, hook).unwrap();
            let b = pruned.forward(s, false, hook).unwrap();
            let diff = (a - b).unwrap().sqr().unwrap().sum_all().unwrap();
            e += diff.to_scalar::<f32>().unwrap() as f64;
        }
        e
    };
    let (e_obs, e_seq) = (error(&plan, &obs), error(&seq_plan, &seq));
    // The residual target (the default): the drift each block receives is cancelled too.
    let (drift_plan, drift) = correct(
        &model,
        &db,
        &selection,
        0.0,
        Residual,
        false,
        &ziplm::progress::Quiet,
    )
    .unwrap();
    let e_drift = error(&drift_plan, &drift);
    // The `W X~` target: the plan's shapes, its error printed beside the others.
    let (own_plan, own) = correct(
        &model,
        &db,
        &selection,
        0.0,
        Inputs,
        false,
        &ziplm::progress::Quiet,
    )
    .unwrap();
    for (a, b) in own_plan.blocks.iter().zip(&plan.blocks) {
        assert_eq!(a.kept.len(), b.kept.len());
    }
    let e_own = error(&own_plan, &own);
    eprintln!(
        "end-to-end hidden error: dense-input OBS {e_obs:.4}, sequential {e_seq:.4}, residual target {e_drift:.4}, W X~ target {e_own:.4}"
    );
    assert!(
        e_seq < e_obs,
        "sequential {e_seq} is not below dense-input OBS {e_obs}"
    );
    assert!(
        e_drift < e_obs,
        "the residual target {e_drift} is not below dense-input OBS {e_obs}"
    );
}

/// Issue 15's CI smoke run of the gradual mode on the real model: SmolLM2 pruned to 6
/// of 9 heads and 1024 of 1536 neurons in every layer (sliced, no compensation), three
/// distillation steps on one 112-token window of WikiText-2 valid text lower the
/// distillation loss on that window; the recovered weights emit as a GGUF file that
/// mistral.rs serves with ziplm's logits.
#[test]
fn smollm2_recovery_smoke_lowers_the_loss_and_serves_in_mistralrs() {
    use ziplm::backend::mistralrs::recovery;
    let Some(path) = smollm2() else { return };
    let model = LlamaModel::load(&path, LlamaOptions::default()).unwrap();
    let s = model.structure();
    let mut plan = Plan::dense(s);
    for (bp, b) in plan.blocks.iter_mut().zip(&s.blocks) {
        bp.kept = match b.kind.is_attention() {
            true => vec![0, 1, 3, 4, 6, 7],
            false => (0..1024).collect(),
        };
    }
    let none = PrunedWeights::default();
    let pruned = mrs::model::prune(&model.weights, s, &plan, &none).unwrap();
    let kept = recovery::kept_layers(s, &plan);
    assert_eq!(kept, (0..30).collect::<Vec<_>>());
    let tok = mrs::tokenizer::from_gguf(model.gguf().unwrap()).unwrap();
    let text = "The game began development in 2010 , carrying over a large portion of the work done on Valkyria Chronicles II . While it retained the standard features of the series , it also underwent multiple adjustments , such as making the game more forgiving for series newcomers . Character designer Raita Honjou and composer Hitoshi Sakimoto both returned from previous entries , along with Valkyria Chronicles II director Takeshi Ozawa . A large team of writers handled the script . The game 's opening theme was sung by May 'n . It met with positive sales in Japan , and was praised by both Japanese and western critics . After release , it received downloadable content , along with an expanded edition in November of that year .";
    let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
    assert!(ids.len() >= 144, "{} tokens", ids.len());
    let windows = [ids[..112].to_vec(), ids[112..144].to_vec()];
    let mut settings = ziplm::job::RecoverySettings::with_tokens(3 * 112);
    settings.step_tokens = 112;
    settings.held_out = 1;
    settings.eval_every = 1;
    settings.patience = 10;
    settings.learning_rate = 1e-5;
    settings.min_learning_rate = 1e-5;
    settings.warmup = 0.0;
    let (recovered, summary) = recovery::recover(
        &model.weights,
        &pruned,
        &kept,
        &windows[..1],
        &windows[1..],
        &settings,
        0,
        None,
        &ziplm::progress::Quiet,
    )
    .unwrap();
    let loss = |w: &mrs::llama::LlamaWeights| {
        recovery::distillation_loss(&model.weights, w, &kept, &windows[..1], 1.0)
            .unwrap()
            .0
    };
    let (before, after) = (loss(&pruned), loss(&recovered));
    eprintln!(
        "SmolLM2 recovery smoke: distillation loss {before:.4} -> {after:.4}; {}",
        summary.line()
    );
    assert_eq!(summary.steps, 3);
    assert!(after < before, "loss {before} -> {after}");

    let dir = tempfile::tempdir().unwrap();
    let weights = recovery::as_pruned_weights(&recovered, s, &plan).unwrap();
    let dest = dir.path().join("recovered.gguf");
    model.emit(&plan, &weights, &dest).unwrap();
    let probe = &ids[..24];
    let want = recovered
        .forward(probe, true, &mut |_, _, _| Ok(()))
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    // The file holds the recovered weights exactly as trained.
    let back = LlamaModel::load(&dest, LlamaOptions::default()).unwrap();
    let d = max_abs_diff(&our_logits(&back, probe), &want);
    assert!(d < 1e-5, "read back: logits differ by {d}");
    let rt = LoadedModel::load(&dest).unwrap();
    let scale = want.iter().flatten().fold(0f32, |m, x| m.max(x.abs()));
    let d = max_abs_diff(&rt.logits(probe).unwrap(), &want);
    eprintln!("recovered SmolLM2: max |ziplm - mistral.rs| logit diff {d:e} (max |logit| {scale})");
    // As for the dense file: mistral.rs runs the Q4_1 tensors the file keeps (the tied
    // embedding and output head) with its quantised kernels.
    assert!(d < 0.05 * scale, "recovered logits differ by {d}");
}

/// `--calibration self:N` on real SmolLM2-135M-Instruct (one batch of 8 requests): the
/// transcripts are its own questions and greedy replies in its chat format, as
/// mistral.rs renders and tokenises a conversation; a second call with the same or a
/// smaller count reads them from the cache without loading the model.
#[test]
fn smollm2_writes_its_own_chat_transcripts_and_caches_them() {
    use ziplm::data::self_chat;
    let Some(path) = smollm2() else { return };
    let model = LlamaModel::load(&path, LlamaOptions::default()).unwrap();
    let cache = tempfile::tempdir().unwrap();
    let write = |tokens: usize| {
        mrs::self_chat::transcripts(
            &path,
            &model,
            tokens,
            cache.path(),
            8,
            &ziplm::progress::Quiet,
        )
        .unwrap()
    };
    let t0 = std::time::Instant::now();
    let written = write(300);
    let took = t0.elapsed().as_secs_f64();
    let tokens = self_chat::token_count(&written);
    let file = self_chat::cache_file(cache.path(), &path).unwrap();
    let (requests, all) = self_chat::read_cache(&file).unwrap();
    eprintln!(
        "SmolLM2 self-chat: {requests} requests, {} transcripts, {} tokens in {took:.1} s; first: {:?} -> {:?}",
        all.len(),
        self_chat::token_count(&all),
        written[0].question,
        written[0].reply
    );
    assert!(tokens >= 300, "{tokens} tokens");
    let tok = mrs::tokenizer::from_gguf(model.gguf().unwrap()).unwrap();
    for t in &written {
        assert!(
            t.question.chars().count() >= 8 && !t.reply.is_empty(),
            "{t:?}"
        );
        let text = tok.decode(&t.ids, false).unwrap();
        assert!(
            text.contains(&format!("<|im_start|>user\n{}<|im_end|>", t.question))
                && text.contains(&format!("<|im_start|>assistant\n{}", t.reply.trim_end())),
            "{text}"
        );
    }
    // The cache: the same transcripts, again and as a prefix, with no model loaded.
    let stamp = std::fs::metadata(&file).unwrap().modified().unwrap();
    assert_eq!(write(300), written);
    assert_eq!(write(1), written[..1].to_vec());
    assert_eq!(std::fs::metadata(&file).unwrap().modified().unwrap(), stamp);
    let windows = self_chat::windows(&written, 4, 64);
    assert_eq!(windows.len(), 4.min(tokens / 64));
    assert_eq!(windows[0][0], i64::from(written[0].ids[0]));
}

/// `ziplm prune --calibration TEXT` on the tiny fixture, a chat model: by default one
/// more share of the samples comes from its own chat transcripts (written into the
/// cache, named in the report), and the weights differ from the text-only calibration
/// of `--no-self-chat`, which writes no transcripts.
#[test]
fn a_chat_model_given_text_calibrates_on_its_own_chat_too() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("text.txt");
    let body: String = (0..400)
        .map(|i| format!("ab abc{} xyz, {}! ", i % 7, i * 13 % 97))
        .collect();
    std::fs::write(&text, &body).unwrap();
    let run = |out: &str, cache: &str, extra: &[&str]| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_ziplm"))
            .arg("prune")
            .arg(tiny())
            .args(["--speedup", "1.2", "--seq-len", "16", "--no-verify"])
            .args(["--refine", "0", "--calibration"])
            .arg(&text)
            .args(["--samples", "4", "--calibration-seq-len", "32", "--quiet"])
            .arg("--latency-table")
            .arg(dir.path().join("table.json"))
            .arg("--out")
            .arg(dir.path().join(out))
            .args(extra)
            .env("ZIPLM_CACHE_DIR", dir.path().join(cache))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(o.status.success(), "{stderr}");
        let files: Vec<_> = std::fs::read_dir(dir.path().join(out))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        let model = files
            .iter()
            .find(|p| p.extension().is_some_and(|e| e == "gguf"))
            .expect("a pruned GGUF file");
        let report = files
            .iter()
            .find(|p| p.to_string_lossy().ends_with(".report.txt"))
            .expect("a text report");
        (
            std::fs::read(model).unwrap(),
            std::fs::read_to_string(report).unwrap(),
        )
    };
    let (mixed, report) = run("a", "cache-a", &[]);
    assert!(
        report.contains("2 of the 4 samples are its own chat transcripts (self:64"),
        "{report}"
    );
    let written: Vec<_> = std::fs::read_dir(dir.path().join("cache-a/self-chat"))
        .unwrap()
        .collect();
    assert_eq!(written.len(), 1);
    let (text_only, report) = run("b", "cache-b", &["--no-self-chat"]);
    assert!(!report.contains("chat transcripts"), "{report}");
    assert!(!dir.path().join("cache-b").exists());
    assert!(mixed != text_only, "the chat share changed nothing");
}

/// `ziplm prune --calibration self:N` on the tiny fixture (it has a chat template): the
/// model writes its transcripts into the cache (`ZIPLM_CACHE_DIR`) and calibrates on
/// them; a second run reads the cache, leaves it as it is and writes the same model.
/// (The tiny model's random weights write nonsense, but the same nonsense every time.)
#[test]
fn the_cli_calibrates_a_chat_model_on_its_own_transcripts() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let run = |out: &str| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_ziplm"))
            .arg("prune")
            .arg(tiny())
            .args([
                "--speedup",
                "1.2",
                "--seq-len",
                "16",
                "--no-verify",
                "--refine",
                "0",
            ])
            .args(["--calibration", "self:200", "--samples", "4"])
            .args(["--calibration-seq-len", "32", "--quiet", "--latency-table"])
            .arg(dir.path().join("table.json"))
            .arg("--out")
            .arg(dir.path().join(out))
            .env("ZIPLM_CACHE_DIR", &cache)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(o.status.success(), "{stderr}");
        let model = std::fs::read_dir(dir.path().join(out))
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|e| e == "gguf"))
            .expect("a pruned GGUF file");
        std::fs::read(model).unwrap()
    };
    let first = run("a");
    let files: Vec<_> = std::fs::read_dir(cache.join("self-chat"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let (used, transcripts) = ziplm::data::self_chat::read_cache(&files[0]).unwrap();
    assert!(used > 0 && ziplm::data::self_chat::token_count(&transcripts) >= 128);
    let stamp = std::fs::metadata(&files[0]).unwrap().modified().unwrap();
    // (The second run reuses the first one's latency table, so its plan is the same.)
    assert!(run("b") == first, "the second run wrote another model");
    assert_eq!(
        std::fs::metadata(&files[0]).unwrap().modified().unwrap(),
        stamp
    );
    // A backend whose models do not chat is refused before any work.
    let onnx = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/onnx/tiny-bert-feature-extraction/model.onnx");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_ziplm"))
        .arg("prune")
        .arg(onnx)
        .args([
            "--speedup",
            "1.2",
            "--calibration",
            "self",
            "--quiet",
            "--out",
        ])
        .arg(dir.path().join("c"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("do not chat"));
}
