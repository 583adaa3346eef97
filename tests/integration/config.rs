//! Serving configs: valid files become jobs; mistakes name the file, line and key.

use std::path::Path;
use ziplm::config;
use ziplm::data::CalibrationSource;
use ziplm::job::Device;
use ziplm::search::Budget;
use ziplm_plugin_api::Phase;

const GOOD: &str = r#"
[[model]]
name = "minilm"
source = "models/model.onnx"
[model.target]
threads = 2
[model.workload]
batch = 1
seq_len = 64
phase = "decode"
kv_len = 256
[model.budget]
speedup = [1.5, 2.0]
latency_ms = [8.0]
[model.calibration]
path = "data/train.jsonl"
samples = 16
seq_len = 32
"#;

/// An app folder holding the files GOOD names (empty: resolving checks they exist).
fn app() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in [
        "models/model.onnx",
        "models/smollm2.gguf",
        "data/train.jsonl",
    ] {
        let p = dir.path().join(f);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b"").unwrap();
    }
    dir
}

#[test]
fn a_valid_config_becomes_jobs_with_resolved_paths() {
    let app = app();
    let base = app.path();
    let file = &base.join("ziplm.toml");
    let cfg = config::parse(GOOD, file).unwrap();
    let job = cfg.model[0].to_job(file, base).unwrap();
    assert_eq!(job.model, base.join("models/model.onnx"));
    assert_eq!(job.device, Device::Cpu { threads: 2 });
    assert_eq!(job.workload.phase, Phase::Decode { kv_len: 256 });
    assert_eq!(
        job.budgets,
        vec![
            Budget::Speedup(1.5),
            Budget::Speedup(2.0),
            Budget::LatencyMs(8.0)
        ]
    );
    assert_eq!(
        job.calibration
            .as_ref()
            .unwrap()
            .paths()
            .collect::<Vec<_>>(),
        [base.join("data/train.jsonl").as_path()]
    );
    assert_eq!(job.output_stem(&Budget::Speedup(1.5)), "minilm.speedup-1.5");
}

#[test]
fn a_list_of_calibration_sources_shares_the_samples() {
    let app = app();
    let base = app.path();
    let file = &base.join("ziplm.toml");
    let mix = GOOD
        .replace("models/model.onnx", "models/smollm2.gguf")
        .replace("phase = \"decode\"\nkv_len = 256\n", "")
        .replace(
            "path = \"data/train.jsonl\"",
            "path = [\"data/train.jsonl\", \"self:4096\"]",
        );
    let cfg = config::parse(&mix, file).unwrap();
    let cal = cfg.model[0]
        .to_job(file, base)
        .unwrap()
        .calibration
        .unwrap();
    // The file resolves beside the config; `self:N` is not a path.
    assert_eq!(
        cal.sources,
        [
            CalibrationSource::File {
                path: base.join("data/train.jsonl"),
                format: None
            },
            CalibrationSource::SelfChat { tokens: 4096 }
        ]
    );
    assert_eq!((cal.share(0), cal.share(1)), (8, 8));
    // A chat LLM given the file alone gets the same mix by default, for a model that
    // turns out to chat; `self_chat = false` keeps it to the file.
    let one = mix.replace(
        "path = [\"data/train.jsonl\", \"self:4096\"]",
        "path = \"data/train.jsonl\"",
    );
    let job = config::parse(&one, file).unwrap().model[0]
        .to_job(file, base)
        .unwrap();
    assert_eq!(job.calibration.unwrap().sources.len(), 1);
    let chat = job.chat_calibration.unwrap();
    assert_eq!(
        chat.sources[1],
        CalibrationSource::SelfChat { tokens: 8 * 32 }
    );
    let off = one.replace("samples = 16", "samples = 16\nself_chat = false");
    let job = config::parse(&off, file).unwrap().model[0]
        .to_job(file, base)
        .unwrap();
    assert!(job.chat_calibration.is_none());
    // An empty list or a number is refused, naming the key and what it takes.
    for bad in ["path = []", "path = 5"] {
        let text = GOOD.replace("path = \"data/train.jsonl\"", bad);
        let err = config::parse(&text, file).unwrap_err().to_string();
        assert!(
            err.contains("path") && err.contains("a data file, \"self:N\", or a list of them"),
            "{bad}: {err}"
        );
    }
}

#[test]
fn llm_output_formats_become_the_backend_options() {
    let app = app();
    let base = app.path();
    let file = &base.join("ziplm.toml");
    let llm = GOOD
        .replace("models/model.onnx", "models/smollm2.gguf")
        .replace("phase = \"decode\"\nkv_len = 256\n", "");
    for (format, want) in [
        ("safetensors", (Some("safetensors"), None)),
        ("gguf-q8_0", (Some("gguf"), Some("q8_0"))),
    ] {
        let text = format!("{llm}[model.output]\ndir = \"pruned\"\nformat = \"{format}\"\n");
        let cfg = config::parse(&text, file).unwrap();
        let job = cfg.model[0].to_job(file, base).unwrap();
        let got = (job.options.get("llm_format"), job.options.get("gguf_dtype"));
        assert_eq!(got, want, "{format}");
    }
    let text = format!("{llm}[model.output]\ndir = \"pruned\"\nformat = \"onnx\"\n");
    let cfg = config::parse(&text, file).unwrap();
    let err = cfg.model[0].to_job(file, base).unwrap_err().to_string();
    assert!(err.contains("output.format"), "{err}");
    // The runtime fit is on unless the config turns it off.
    let job = |extra: &str| {
        let text = format!("{llm}{extra}");
        config::parse(&text, file).unwrap().model[0]
            .to_job(file, base)
            .unwrap()
    };
    assert!(job("").options.flag("runtime_fit", true));
    assert!(!job("[model.profile]\nno_runtime_fit = true\n")
        .options
        .flag("runtime_fit", true));
    assert!(!job("").options.flag("refit", false));
    assert!(job("[model.profile]\nrefit = true\n")
        .options
        .flag("refit", false));
    // Extra timings: 2 by default, set by the config, bounded with the key named.
    assert_eq!(job("").search.extra_timings, 2);
    assert_eq!(
        job("[model.profile]\nextra_timings = 4\n")
            .search
            .extra_timings,
        4
    );
    let text = format!("{llm}[model.profile]\nextra_timings = 80\n");
    let err = config::parse(&text, file).unwrap().model[0]
        .to_job(file, base)
        .unwrap_err()
        .to_string();
    assert!(err.contains("profile.extra_timings is at most 8"), "{err}");
}

#[test]
fn unknown_keys_and_bad_values_name_file_line_and_key() {
    let file = Path::new("ziplm.toml");
    let typo = GOOD.replace("seq_len = 64", "seqlen = 64");
    let err = config::parse(&typo, file).unwrap_err().to_string();
    assert!(
        err.contains("ziplm.toml") && err.contains("seqlen") && err.contains("line 9"),
        "{err}"
    );

    let cases = [
        (GOOD.replace("threads = 2", "threads = 0"), "target.threads"),
        (
            GOOD.replace("speedup = [1.5, 2.0]", "speedup = [-1.0]"),
            "budget.speedup",
        ),
        (
            GOOD.replace("phase = \"decode\"", "phase = \"decoding\""),
            "workload.phase",
        ),
        (GOOD.replace("kv_len = 256\n", ""), "kv_len"),
        (
            GOOD.replace("samples = 16", "samples = 0"),
            "calibration.samples",
        ),
    ];
    let app = app();
    for (text, key) in cases {
        let cfg = config::parse(&text, file).unwrap();
        let err = cfg.model[0]
            .to_job(file, app.path())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("ziplm.toml") && err.contains(key),
            "{key}: {err}"
        );
    }
    let negative = GOOD.replace("batch = 1", "batch = -1");
    let err = config::parse(&negative, file).unwrap_err().to_string();
    assert!(err.contains("batch"), "{err}");
}

#[test]
fn cargo_metadata_table_of_the_example_app() {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/app/Cargo.toml");
    let jobs = config::load_jobs(&manifest).unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].display_name(), "tiny-bert");
    assert!(jobs[0]
        .model
        .ends_with("fixtures/onnx/tiny-bert-feature-extraction/model.onnx"));
}

/// `pruning.sequential` turns the correct stage on for any backend (an ONNX model
/// here); it is off by default, and fits to the residual target unless told.
#[test]
fn pruning_sequential_turns_the_correct_stage_on() {
    use ziplm::pipeline::correct::SequentialTarget;
    let app = app();
    let base = app.path();
    let file = &base.join("ziplm.toml");
    let cfg = config::parse(GOOD, file).unwrap();
    assert!(!cfg.model[0].to_job(file, base).unwrap().sequential);
    let on = format!("{GOOD}[model.pruning]\nsequential = true\n");
    let cfg = config::parse(&on, file).unwrap();
    let job = cfg.model[0].to_job(file, base).unwrap();
    assert!(job.sequential);
    assert_eq!(job.sequential_target, SequentialTarget::Residual);
    let output = format!("{on}sequential_target = \"output\"\n");
    let job = config::parse(&output, file).unwrap().model[0]
        .to_job(file, base)
        .unwrap();
    assert_eq!(job.sequential_target, SequentialTarget::Output);
    // A target for a correction that is off is refused, naming both keys.
    let off = format!("{GOOD}[model.pruning]\nsequential_target = \"output\"\n");
    let err = config::parse(&off, file).unwrap().model[0]
        .to_job(file, base)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("pruning.sequential_target") && err.contains("pruning.sequential = true"),
        "{err}"
    );
    // Keeping the database's choice: off unless asked, and only with the correction.
    assert!(!job.sequential_keep_choice);
    let keep = format!(
        "{on}sequential_keep_choice = true
"
    );
    let job = config::parse(&keep, file).unwrap().model[0]
        .to_job(file, base)
        .unwrap();
    assert!(job.sequential_keep_choice);
    let off = format!("{GOOD}[model.pruning]\nsequential_keep_choice = true\n");
    let err = config::parse(&off, file).unwrap().model[0]
        .to_job(file, base)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("pruning.sequential_keep_choice") && err.contains("pruning.sequential = true"),
        "{err}"
    );
}
