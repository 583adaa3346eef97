//! The `ziplm` binary: commands, `--json`, exit codes, clear errors on bad input.

use std::process::Command;

fn ziplm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ziplm"))
}

fn fixture(name: &str) -> String {
    super::tract_fixtures::fixture(name).display().to_string()
}

/// Runs `ziplm prune ARGS --quiet --json --out OUT`; returns the exit code and the
/// JSON report on stdout.
fn prune_json(args: &[&str], out: &std::path::Path) -> (Option<i32>, serde_json::Value) {
    let o = ziplm()
        .arg("prune")
        .args(args)
        .args(["--quiet", "--json", "--out"])
        .arg(out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    let report = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {stderr}"));
    (o.status.code(), report)
}

#[test]
fn inspect_prints_the_structure_and_json() {
    let out = ziplm()
        .args([
            "inspect",
            &fixture("tiny-bert-feature-extraction"),
            "--seq-len",
            "16",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("architecture: bert") && text.contains("total: 8 heads, 256 FFN neurons"),
        "{text}"
    );
    let out = ziplm()
        .args([
            "inspect",
            &fixture("tiny-llama-gqa-text-generation"),
            "--seq-len",
            "16",
            "--json",
        ])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["layers"][0]["kv_heads"], 2);
}

#[test]
fn prune_writes_models_plans_bundles_and_reports() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("tiny-gpt2-text-generation");
    let (code, report) = prune_json(
        &[
            &model,
            "--speedup",
            "1.2",
            "--speedup",
            "1.4",
            "--seq-len",
            "16",
        ],
        dir.path(),
    );
    assert!(matches!(code, Some(0) | Some(1)), "{report}");
    assert_eq!(report["budgets"].as_array().unwrap().len(), 2);
    for stem in ["model.speedup-1.2", "model.speedup-1.4"] {
        for ext in ["onnx", "plan.json", "plan-bundle.json", "plan-bundle.bin"] {
            assert!(
                dir.path().join(format!("{stem}.{ext}")).exists(),
                "{stem}.{ext} missing"
            );
        }
    }
    for f in ["model.report.json", "model.report.txt", "model.report.svg"] {
        assert!(dir.path().join(f).exists(), "{f} missing");
    }
    let svg = std::fs::read_to_string(dir.path().join("model.report.svg")).unwrap();
    assert!(svg.starts_with("<svg") || svg.contains("<svg"));
    // Exit code 1 exactly when a verified budget was missed.
    let missed = report["budgets"]
        .as_array()
        .unwrap()
        .iter()
        .any(|b| b["met"] == false);
    assert_eq!(code, Some(if missed { 1 } else { 0 }));
}

#[test]
fn bad_inputs_exit_2_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let corrupt = dir.path().join("corrupt.onnx");
    let mut bytes = std::fs::read(fixture("tiny-bert-feature-extraction")).unwrap();
    bytes.truncate(bytes.len() / 3);
    std::fs::write(&corrupt, &bytes).unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["inspect".into(), corrupt.display().to_string()],
            "corrupt or truncated",
        ),
        (
            vec!["inspect".into(), "/nonexistent/model.onnx".into()],
            "/nonexistent/model.onnx",
        ),
        (
            vec![
                "prune".into(),
                fixture("tiny-bert-feature-extraction"),
                "--speedup=-2".into(),
                "--seq-len".into(),
                "16".into(),
                "--quiet".into(),
                "--out".into(),
                dir.path().join("o").display().to_string(),
            ],
            "speedup must be a positive number",
        ),
        (
            vec![
                "prune".into(),
                fixture("tiny-bert-feature-extraction"),
                "--speedup".into(),
                "50".into(),
                "--seq-len".into(),
                "16".into(),
                "--quiet".into(),
                "--out".into(),
                dir.path().join("o").display().to_string(),
            ],
            "cannot be met",
        ),
    ];
    for (args, expect) in cases {
        let out = ziplm().args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(expect),
            "{args:?}: expected `{expect}` in: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

#[test]
fn spdy_refinement_scores_candidates_with_the_tract_loss_hook() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("tiny-llama-gqa-text-generation");
    let (_, report) = prune_json(
        &[
            &model,
            "--speedup",
            "1.4",
            "--seq-len",
            "16",
            "--refine",
            "6",
        ],
        dir.path(),
    );
    let losses = report["budgets"][0]["refined_loss"]
        .as_array()
        .unwrap_or_else(|| panic!("no refined loss: {report}"));
    let (refined, plain) = (losses[0].as_f64().unwrap(), losses[1].as_f64().unwrap());
    assert!(
        refined.is_finite() && plain.is_finite() && refined <= plain,
        "{refined} vs {plain}"
    );
}

/// `--sequential` runs the correct stage in the tract backend end to end (emit and
/// verify after it), and the report times it.
#[test]
fn sequential_correction_runs_in_the_tract_backend() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("tiny-bert-feature-extraction");
    let (code, report) = prune_json(
        &[
            &model,
            "--speedup",
            "1.4",
            "--seq-len",
            "16",
            "--refine",
            "0",
            "--sequential",
        ],
        dir.path(),
    );
    assert_eq!(code, Some(0), "{report}");
    let correct = report["stages"]["correct_s"].as_f64().unwrap();
    assert!(correct > 0.0, "{report}");
}

/// `ziplm profile` on the deployment machine, commit the table, build elsewhere: the
/// table defines the target, the build uses it as is (no profiling, no verification,
/// and the report says why).
#[test]
fn a_table_profiled_on_another_machine_is_used_as_is() {
    let dir = tempfile::tempdir().unwrap();
    let table = dir.path().join("deploy-cpu1.json");
    let model = fixture("tiny-bert-feature-extraction");
    let out = ziplm()
        .args(["profile", &model, "--seq-len", "16", "--quiet", "-o"])
        .arg(&table)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Pretend it came from the deployment machine.
    let mut t: serde_json::Value = serde_json::from_slice(&std::fs::read(&table).unwrap()).unwrap();
    t["key"]["target"]["device"] = "Deployment CPU [avx2] x86_64".into();
    std::fs::write(&table, serde_json::to_vec_pretty(&t).unwrap()).unwrap();
    let before = std::fs::read(&table).unwrap();
    let table_arg = table.display().to_string();
    let (code, report) = prune_json(
        &[
            &model,
            "--speedup",
            "1.3",
            "--seq-len",
            "16",
            "--latency-table",
            &table_arg,
        ],
        &dir.path().join("out"),
    );
    assert_eq!(code, Some(0), "{report}");
    assert_eq!(report["target"]["device"], "Deployment CPU [avx2] x86_64");
    assert!(
        report["notes"][0]
            .as_str()
            .unwrap()
            .contains("not verified"),
        "{report}"
    );
    assert!(report["budgets"][0]["measured_ms"].is_null());
    assert_eq!(
        std::fs::read(&table).unwrap(),
        before,
        "a committed table is not rewritten"
    );
}

/// Runs `ziplm speedup ARGS --quiet`; returns the exit code, stdout and stderr.
fn speedup(args: &[&str]) -> (Option<i32>, String, String) {
    let o = ziplm()
        .arg("speedup")
        .args(args)
        .arg("--quiet")
        .output()
        .unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn speedup_times_emitted_models_against_the_dense_one_in_tract() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("tiny-gpt2-text-generation");
    let (code, report) = prune_json(
        &[&model, "--speedup", "1.3", "--seq-len", "16", "--no-verify"],
        dir.path(),
    );
    assert_eq!(code, Some(0), "{report}");
    let pruned = dir.path().join("model.speedup-1.3.onnx");
    let pruned = pruned.to_str().unwrap();
    let (code, stdout, stderr) = speedup(&[
        &model,
        pruned,
        &model,
        "--seq-len",
        "16",
        "--runs",
        "3",
        "--json",
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["workload"]["seq_len"], 16);
    let models = v["models"].as_array().unwrap();
    assert_eq!(models.len(), 2);
    assert_eq!(models[0]["model"], pruned);
    for m in models {
        let (d, t) = (
            m["dense"]["median_ms"].as_f64().unwrap(),
            m["timing"]["median_ms"].as_f64().unwrap(),
        );
        assert!(d > 0.0 && t > 0.0, "{m}");
        assert_eq!(m["timing"]["runs"], 3);
        // The speedup is the median of the rounds' ratios: each lies between the
        // slowest dense run over the fastest model run and the other way round.
        let f = |k: &str, s: &str| m[k][s].as_f64().unwrap();
        let s = m["speedup"].as_f64().unwrap();
        let (lo, hi) = (
            f("dense", "min_ms") / f("timing", "max_ms"),
            f("dense", "max_ms") / f("timing", "min_ms"),
        );
        assert!(lo <= s && s <= hi, "{m}");
    }
    // The text form names each model and its ratio.
    let (code, stdout, _) = speedup(&[&model, pruned, "--seq-len", "16", "--runs", "1"]);
    assert_eq!(code, Some(0));
    assert!(
        stdout.contains("model.speedup-1.3.onnx") && stdout.contains("x\n"),
        "{stdout}"
    );
    // Bad input: exit 2 and the reason.
    let missing = dir.path().join("missing.onnx");
    let (code, _, stderr) = speedup(&[&model, missing.to_str().unwrap()]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("missing.onnx: no such model"), "{stderr}");
    let (code, _, stderr) = speedup(&[&model, pruned, "--runs", "0"]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("--runs"), "{stderr}");
    let (code, _, stderr) = speedup(&[&model]);
    assert_eq!(code, Some(2), "{stderr}");
}

/// Runs `ziplm ARGS`; returns the exit code, stdout and stderr.
fn run(args: &[&str]) -> (Option<i32>, String, String) {
    let o = ziplm().args(args).output().unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn options_that_would_be_dropped_or_do_nothing_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bert = fixture("tiny-bert-feature-extraction");
    let out = dir.path().join("o");
    let out = out.to_str().unwrap();
    let cfg = dir.path().join("ziplm.toml");
    std::fs::write(&cfg, "[[model]]\nsource = \"m.onnx\"\n").unwrap();
    let cfg = cfg.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        // --config sets models, budgets, workloads and folders: flags are not dropped.
        (
            vec!["prune", "--config", cfg, "--speedup", "2", "--out", out],
            "--speedup, --out cannot be combined with --config",
        ),
        (
            vec!["prune", &bert, "--config", cfg],
            "MODEL cannot be combined with --config",
        ),
        (
            vec![
                "prune",
                "--config",
                cfg,
                "--threads",
                "2",
                "--ffn-multiple",
                "64",
            ],
            "--threads, --ffn-multiple cannot be combined with --config",
        ),
        (
            vec!["prune", &bert, "--calibration-seq-len", "64", "--out", out],
            "give --calibration FILE too",
        ),
        (
            vec!["prune", &bert, "--gguf-dtype", "q8_0", "--out", out],
            "--gguf-dtype is an option of the mistralrs backend",
        ),
        (
            vec!["prune", &bert, "--llm-format", "gguf", "--out", out],
            "--llm-format is an option of the mistralrs backend",
        ),
        (
            vec!["prune", &bert, "--ffn-multiple", "0", "--out", out],
            "--ffn-multiple must be at least 1",
        ),
        (
            vec!["prune", &bert, "--decode-kv-len", "0", "--out", out],
            "at least one cached token",
        ),
        (
            vec![
                "prune",
                &bert,
                "--speedup",
                "1.5",
                "--speedup",
                "1.5",
                "--out",
                out,
            ],
            "is given twice",
        ),
        // eval checks what prune checks.
        (
            vec!["eval", &bert, "--sts", "x.tsv", "--seq-len", "0"],
            "sequence length must be at least 1",
        ),
        (
            vec!["eval", &bert, "--sts", "x.tsv", "--batch", "0"],
            "batch must be at least 1",
        ),
    ];
    for (args, expect) in cases {
        let (code, _, stderr) = run(&args);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(expect),
            "{args:?}: expected `{expect}` in: {stderr}"
        );
    }
    // Nothing was written for any of them.
    assert!(!dir.path().join("o").exists());
}

#[test]
fn json_errors_are_json_on_stdout_with_the_same_exit_code() {
    for args in [
        vec!["inspect", "/nonexistent/model.onnx", "--json"],
        vec!["prune", "/nonexistent/model.onnx", "--json", "--quiet"],
        vec![
            "eval",
            "/nonexistent/model.onnx",
            "--sts",
            "x.tsv",
            "--batch",
            "0",
            "--json",
        ],
    ] {
        let (code, stdout, stderr) = run(&args);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        let v: serde_json::Value = serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("{args:?}: stdout is not JSON ({e}): {stdout}"));
        let msg = v["error"].as_str().unwrap_or_else(|| panic!("{v}"));
        assert!(!msg.is_empty() && stderr.contains(msg), "{msg} / {stderr}");
    }
}

/// Issue 16, items 8, 11 and 12: workloads checked against the model and memory before
/// any work, options no longer accepted silently, and messages that name the problem.
#[test]
fn workloads_and_inputs_are_checked_before_any_work_with_clear_messages() {
    let dir = tempfile::tempdir().unwrap();
    let bert = fixture("tiny-bert-feature-extraction");
    let out = dir.path().join("o");
    let out = out.to_str().unwrap();
    let cfg = dir.path().join("ziplm.toml");
    let cfg_text = |workload: &str, extra: &str| {
        format!(
            "[[model]]\nsource = {bert:?}\n{extra}[model.workload]\n{workload}\n[model.budget]\nspeedup = [1.5]\n[model.output]\ndir = {out:?}\n"
        )
    };
    let table = dir.path().join("table.json");
    // A latency table with a negative time.
    let (code, _, stderr) = run(&[
        "profile",
        &bert,
        "--seq-len",
        "16",
        "--runs",
        "1",
        "-o",
        table.to_str().unwrap(),
        "--quiet",
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&table).unwrap()).unwrap();
    v["rest"]["median_ms"] = serde_json::json!(-1.0);
    let bad_table = dir.path().join("bad-table.json");
    std::fs::write(&bad_table, serde_json::to_string_pretty(&v).unwrap()).unwrap();
    let corrupt = dir.path().join("corrupt.onnx");
    std::fs::write(&corrupt, b"not an onnx file").unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        // 8: a batch far beyond memory, and a config sequence beyond the model.
        (
            vec![
                "prune".into(),
                bert.clone(),
                "--speedup".into(),
                "1.5".into(),
                "--seq-len".into(),
                "16".into(),
                "--batch".into(),
                "10000000".into(),
                "--out".into(),
                out.into(),
            ],
            "GiB of activations",
        ),
        (
            {
                std::fs::write(&cfg, cfg_text("seq_len = 100000000000", "")).unwrap();
                vec!["prune".into(), "--config".into(), cfg.display().to_string()]
            },
            "positions",
        ),
        // 11: no budget; a config tokenizer that does not exist.
        (
            vec![
                "prune".into(),
                bert.clone(),
                "--seq-len".into(),
                "16".into(),
                "--out".into(),
                out.into(),
            ],
            "no budget given",
        ),
        (
            {
                let c = dir.path().join("tok.toml");
                std::fs::write(
                    &c,
                    cfg_text("seq_len = 16", "tokenizer = \"missing-tokenizer.json\"\n"),
                )
                .unwrap();
                vec!["prune".into(), "--config".into(), c.display().to_string()]
            },
            "missing-tokenizer.json: no such tokenizer file",
        ),
        // 12: more tokens than positions; decode on an encoder; a corrupt model timed by
        // `speedup`; a bad latency-table value; a missing calibration file.
        (
            vec![
                "prune".into(),
                bert.clone(),
                "--speedup".into(),
                "1.5".into(),
                "--seq-len".into(),
                "65".into(),
                "--out".into(),
                out.into(),
            ],
            "has 64 (its position-embedding table)",
        ),
        (
            vec![
                "prune".into(),
                bert.clone(),
                "--speedup".into(),
                "1.5".into(),
                "--seq-len".into(),
                "1".into(),
                "--decode-kv-len".into(),
                "8".into(),
                "--out".into(),
                out.into(),
            ],
            "takes no KV cache",
        ),
        (
            vec![
                "speedup".into(),
                bert.clone(),
                corrupt.display().to_string(),
                "--seq-len".into(),
                "16".into(),
            ],
            "corrupt.onnx",
        ),
        (
            vec![
                "prune".into(),
                bert.clone(),
                "--speedup".into(),
                "1.5".into(),
                "--seq-len".into(),
                "16".into(),
                "--latency-table".into(),
                bad_table.display().to_string(),
                "--out".into(),
                out.into(),
            ],
            "bad-table.json: rest: times must be finite and non-negative",
        ),
        (
            vec![
                "prune".into(),
                bert.clone(),
                "--speedup".into(),
                "1.5".into(),
                "--calibration".into(),
                "/nonexistent/data.txt".into(),
                "--out".into(),
                out.into(),
            ],
            "/nonexistent/data.txt: no such calibration file",
        ),
        // An output folder that cannot be made fails before any work.
        (
            vec![
                "prune".into(),
                bert.clone(),
                "--speedup".into(),
                "1.5".into(),
                "--seq-len".into(),
                "16".into(),
                "--out".into(),
                "/proc/ziplm-cannot-write-here".into(),
            ],
            "/proc/ziplm-cannot-write-here",
        ),
    ];
    for (args, expect) in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, _, stderr) = run(&args);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(expect),
            "{args:?}: expected `{expect}` in: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        // One error line (warnings aside), no cause printed twice.
        let errors = stderr.lines().filter(|l| !l.starts_with("ziplm: warning:"));
        assert_eq!(errors.count(), 1, "{args:?}: {stderr}");
    }
    assert!(
        !std::path::Path::new(out).exists(),
        "a failed run left its output folder"
    );
}
