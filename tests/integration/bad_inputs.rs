//! Bad input never costs data or a panic: every case below gets an error that names
//! what is wrong and what to do, and the output folder is left exactly as it was (an
//! existing model file in it keeps its content).

use std::path::{Path, PathBuf};
use ziplm::backend::tract::onnx::OnnxFile;
use ziplm::data::{CalibrationData, CalibrationSource, DataFormat};
use ziplm::job::PruneJob;
use ziplm::search::Budget;

const OLD: &[u8] = b"an older model the failed run must not touch";

/// A job on `model` with fast settings (no verification, one timed run per shape).
fn fast_job(model: &Path) -> PruneJob {
    let mut job = PruneJob::new(model);
    job.workload = ziplm_plugin_api::Workload::prefill(1, 16);
    job.random_samples = 8;
    job.profile = ziplm::profile::ProfileSettings::new(0, 1);
    job.verify = false;
    job
}

/// A [`fast_job`] writing into a fresh folder under `dir` where an earlier output
/// already exists.
fn job(model: &Path, dir: &Path) -> PruneJob {
    let mut job = fast_job(model);
    static RUN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    job.out_dir = dir.join(format!(
        "out{}",
        RUN.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&job.out_dir).unwrap();
    std::fs::write(
        job.out_dir
            .join(format!("{}.onnx", job.output_stem(&job.budgets[0]))),
        OLD,
    )
    .unwrap();
    job
}

/// Runs `job`, expects an error containing every one of `expect`, and checks that
/// the output folder holds only the old file, unchanged.
fn fails_cleanly(job: &PruneJob, expect: &[&str]) -> String {
    let result = std::panic::catch_unwind(|| ziplm::backend::run_job(job, &ziplm::progress::Quiet));
    let err = match result {
        Err(_) => panic!("{}: panicked", job.model.display()),
        Ok(Ok(_)) => panic!("{}: succeeded, expected {expect:?}", job.model.display()),
        Ok(Err(e)) => e.to_string(),
    };
    for e in expect {
        assert!(err.contains(e), "expected `{e}` in: {err}");
    }
    let names: Vec<_> = std::fs::read_dir(&job.out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "the failed run wrote {names:?}");
    assert_eq!(std::fs::read(job.out_dir.join(&names[0])).unwrap(), OLD);
    err
}

fn bert() -> PathBuf {
    super::tract_fixtures::fixture("tiny-bert-feature-extraction")
}

/// A copy of the BERT fixture with the first value of its largest weight set to `v`.
fn bert_with_weight(dir: &Path, v: f32) -> PathBuf {
    let mut file = OnnxFile::read(&bert()).unwrap();
    let init = file
        .proto
        .graph
        .as_mut()
        .unwrap()
        .initializer
        .iter_mut()
        .max_by_key(|t| t.dims.iter().product::<i64>())
        .unwrap();
    if !init.raw_data.is_empty() {
        init.raw_data[..4].copy_from_slice(&v.to_le_bytes());
    } else {
        init.float_data[0] = v;
    }
    let path = dir.join(format!("weight-{v}.onnx"));
    std::fs::write(&path, file.to_bytes()).unwrap();
    path
}

/// A word-level tokenizer over a few words; `far` gets id 500 (beyond the fixtures'
/// vocabulary of 128).
fn tokenizer(dir: &Path) -> PathBuf {
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": { "type": "Whitespace" }, "post_processor": null, "decoder": null,
        "model": { "type": "WordLevel", "unk_token": "[UNK]",
                   "vocab": { "[UNK]": 0, "the": 1, "cat": 2, "sat": 3, "on": 4, "mat": 5, "far": 500 } }
    });
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, json.to_string()).unwrap();
    path
}

fn with_text(mut job: PruneJob, dir: &Path, text: &str) -> PruneJob {
    let path = dir.join("calibration.txt");
    std::fs::write(&path, text).unwrap();
    job.tokenizer = Some(tokenizer(dir));
    job.calibration = Some(CalibrationData::file(path, Some(DataFormat::Text), 8, 16));
    job
}

#[test]
fn broken_model_files() {
    let dir = tempfile::tempdir().unwrap();
    let truncated = dir.path().join("truncated.onnx");
    let bytes = std::fs::read(bert()).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).unwrap();
    fails_cleanly(
        &job(&truncated, dir.path()),
        &["truncated.onnx", "corrupt or truncated"],
    );

    let garbage = dir.path().join("garbage.onnx");
    std::fs::write(&garbage, b"this is not a protobuf \xff\xfe\x00").unwrap();
    fails_cleanly(&job(&garbage, dir.path()), &["garbage.onnx"]);

    let missing = dir.path().join("missing.onnx");
    fails_cleanly(&job(&missing, dir.path()), &["missing.onnx"]);

    // GGUF goes to the mistral.rs backend: a clear error, not a crash on the bytes
    // (without the feature: build with it).
    let gguf = dir.path().join("model.gguf");
    std::fs::write(&gguf, b"GGUF\x03\x00\x00\x00truncated").unwrap();
    let expect = if cfg!(feature = "mistralrs") {
        "truncated or corrupt"
    } else {
        "mistralrs"
    };
    fails_cleanly(&job(&gguf, dir.path()), &["model.gguf", expect]);
}

#[test]
fn a_graph_without_transformer_blocks_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/bad/no-transformer.onnx");
    fails_cleanly(
        &job(&model, dir.path()),
        &["no-transformer.onnx", "attention"],
    );
}

#[test]
fn non_finite_weights_and_activations() {
    let dir = tempfile::tempdir().unwrap();
    for v in [f32::NAN, f32::INFINITY] {
        let model = bert_with_weight(dir.path(), v);
        let err = fails_cleanly(&job(&model, dir.path()), &[]);
        assert!(err.contains("NaN") || err.contains("inf"), "{err}");
    }
}

#[test]
fn unusable_calibration_data() {
    let dir = tempfile::tempdir().unwrap();
    let base = || job(&bert(), dir.path());
    fails_cleanly(
        &with_text(base(), dir.path(), "\n  \n"),
        &["calibration.txt", "no text"],
    );
    fails_cleanly(
        &with_text(base(), dir.path(), "the cat sat far"),
        &["token id 500", "vocabulary of 128"],
    );
    let mut missing = with_text(base(), dir.path(), "the cat");
    missing.calibration.as_mut().unwrap().sources = vec![CalibrationSource::File {
        path: dir.path().join("nope.txt"),
        format: None,
    }];
    fails_cleanly(&missing, &["nope.txt"]);
    let mut no_tokenizer = with_text(base(), dir.path(), "the cat");
    no_tokenizer.tokenizer = None;
    fails_cleanly(&no_tokenizer, &["tokenizer.json", "--tokenizer"]);
    // Decoders calibrate on windows of the sequence length: too little text is an error.
    let gpt2 = job(
        &super::tract_fixtures::fixture("tiny-gpt2-text-generation"),
        &dir.path().join("g"),
    );
    fails_cleanly(
        &with_text(gpt2, dir.path(), "the cat sat on the mat"),
        &["too short", "16 tokens"],
    );
}

#[test]
fn budgets_the_model_cannot_meet_or_already_meets() {
    let dir = tempfile::tempdir().unwrap();
    let mut impossible = job(&bert(), dir.path());
    impossible.budgets = vec![Budget::Speedup(1.2), Budget::Speedup(1000.0)];
    fails_cleanly(&impossible, &["cannot be met", "at least"]);

    let mut zero = job(&bert(), dir.path());
    zero.budgets = vec![Budget::LatencyMs(0.0)];
    fails_cleanly(&zero, &["positive"]);

    // A budget the dense model meets: the dense model is emitted and the report says so.
    let mut easy = job(&bert(), &dir.path().join("easy"));
    easy.budgets = vec![Budget::LatencyMs(1e6)];
    let report = ziplm::backend::run_job(&easy, &ziplm::progress::Quiet).unwrap();
    assert!(
        report.notes.iter().any(|n| n.contains("already meets")),
        "{:?}",
        report.notes
    );
    assert_eq!(
        report.budgets[0]
            .layers
            .iter()
            .map(|l| l.heads.0)
            .sum::<usize>(),
        8
    );
}

#[test]
fn an_unwritable_output_path_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let mut j = fast_job(&bert());
    j.out_dir = file.join("out");
    let err = ziplm::backend::run_job(&j, &ziplm::progress::Quiet)
        .unwrap_err()
        .to_string();
    // Refused before any profiling (so no budget check on a noisy table can come first).
    assert!(err.contains("a-file is a file, not a folder"), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), b"x");
}
