//! GPU targets (tract's CUDA runtime) on a machine without a GPU: a table profiled on a
//! GPU (here by a fake CUDA profiler with a real H200's fingerprint) builds here by the
//! CLI and by a serving config, a CPU table is refused for a GPU target, and asking to
//! run on a GPU that is not here is a clear error (exit 2) naming what is missing.

use std::path::Path;
use std::process::Command;
use std::time::Duration;
use ziplm::api::{
    AdapterResult, BlockShape, LatencyProfiler, Measured, ModelAdapter, TargetFingerprint,
    TimedRun, Workload,
};
use ziplm::backend::tract::device::TractDevice;
use ziplm::backend::tract::gpu::GpuInfo;
use ziplm::backend::tract::profile::TractProfiler;
use ziplm::backend::tract::{TractModel, TractOptions};
use ziplm::profile::ProfileSettings;

fn ziplm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ziplm"))
}

fn fixture(name: &str) -> String {
    let shared = std::env::var("ZIPLM_SHARED").unwrap_or_else(|_| "../shared".into());
    format!("{shared}/fixtures/onnx/{name}/model.onnx")
}

/// An H200 as the fake profiler reports it (named so that it never matches a real
/// machine's fingerprint, where verification would then run).
fn h200() -> GpuInfo {
    GpuInfo {
        index: 0,
        name: "NVIDIA H200 (fake profiler)".into(),
        compute_capability: (9, 0),
        driver: "580.159.03".into(),
        cuda_driver_api: 13000,
        cuda_runtime_api: 13000,
    }
}

/// A CUDA profiler without a GPU: the H200's fingerprint, the real model key, and
/// timings that grow with the shape (attention 0.01 ms a head, FFN 0.0005 ms a neuron;
/// the rest 0.05 ms).
struct FakeCudaProfiler {
    key: String,
}

struct Fixed(Duration);

impl TimedRun for Fixed {
    fn run(&mut self) -> AdapterResult<Duration> {
        Ok(self.0)
    }
}

impl LatencyProfiler for FakeCudaProfiler {
    fn target(&self) -> TargetFingerprint {
        h200().fingerprint()
    }
    fn model_key(&self) -> String {
        self.key.clone()
    }
    fn prepare<'a>(
        &'a mut self,
        what: &Measured,
        _workload: &Workload,
    ) -> AdapterResult<Box<dyn TimedRun + 'a>> {
        let us = match what {
            Measured::Block(BlockShape::Attention { heads, .. }) => 10 * *heads as u64,
            Measured::Block(BlockShape::Ffn { width, .. }) => (*width as u64).div_ceil(2),
            _ => 50,
        };
        Ok(Box::new(Fixed(Duration::from_micros(us))))
    }
}

/// Writes the fake GPU's table for `model` at `workload` (every shape of the default
/// grid) to `path`.
fn gpu_table(model: &str, workload: Workload, path: &Path) {
    let m = TractModel::load(
        Path::new(model),
        TractOptions {
            workload,
            gqa_policy: ziplm::api::GqaPolicy::WholeKvGroups,
        },
    )
    .unwrap();
    let key = TractProfiler::new(&m, TractDevice::cpu(1)).model_key();
    let shapes = ziplm::database::grid_shapes(m.structure(), &Default::default());
    let table = ziplm::profile::build_table(
        &mut FakeCudaProfiler { key },
        &workload,
        &shapes,
        &ProfileSettings::new(0, 1),
        None,
        &ziplm::progress::Quiet,
    )
    .unwrap();
    ziplm::profile::save_table(&table, path).unwrap();
}

/// Whether this machine can run models on CUDA device 0.
fn gpu_usable() -> bool {
    TractDevice::of(ziplm::job::Device::Cuda { device: 0 })
        .unwrap()
        .is_usable()
}

fn run(cmd: &mut Command) -> (Option<i32>, String, String) {
    let o = cmd.output().unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn a_table_profiled_on_a_gpu_builds_here_with_the_cli_at_batched_workloads() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("tiny-bert-feature-extraction");
    for batch in [1usize, 8] {
        let table = dir.path().join(format!("h200-{batch}x16.json"));
        gpu_table(&model, Workload::prefill(batch, 16), &table);
        let before = std::fs::read(&table).unwrap();
        let out = dir.path().join(format!("out-{batch}"));
        let (code, stdout, stderr) = run(ziplm()
            .args([
                "prune",
                &model,
                "--cuda",
                "0",
                "--speedup",
                "1.5",
                "--seq-len",
                "16",
            ])
            .args([
                "--batch",
                &batch.to_string(),
                "--quiet",
                "--json",
                "--latency-table",
            ])
            .arg(&table)
            .arg("--out")
            .arg(&out));
        assert_eq!(code, Some(0), "{stderr}");
        let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(report["target"]["runtime"], "tract-cuda");
        assert_eq!(
            report["target"]["device"],
            "NVIDIA H200 (fake profiler) [sm_90] driver 580.159.03 CUDA 13.0 (runtime 13.0)"
        );
        assert_eq!(report["workload"]["batch"], batch);
        let notes = report["notes"].to_string();
        assert!(notes.contains("not verified"), "{notes}");
        assert_eq!(
            notes.contains("cannot be used on this machine"),
            !gpu_usable(),
            "{notes}"
        );
        let b = &report["budgets"][0];
        assert!(b["measured_ms"].is_null(), "{b}");
        // Planned on the GPU's timings: predicted at least 1.5x faster.
        let predicted =
            b["predicted_dense_ms"].as_f64().unwrap() / b["predicted_ms"].as_f64().unwrap();
        assert!(predicted >= 1.5 - 1e-9, "{predicted}");
        assert!(out.join("model.speedup-1.5.onnx").exists());
        assert_eq!(
            std::fs::read(&table).unwrap(),
            before,
            "a committed table is not rewritten"
        );
    }
}

#[test]
fn a_serving_config_with_target_cuda_builds_from_the_gpu_table() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("tiny-gpt2-text-generation");
    let table = dir.path().join("h200.json");
    gpu_table(&model, Workload::prefill(1, 16), &table);
    let config = dir.path().join("ziplm.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[[model]]
source = "{}"
[model.target]
cuda = 0
[model.workload]
seq_len = 16
[model.budget]
speedup = [1.4]
[model.profile]
latency_table = "{}"
[model.output]
dir = "{}"
"#,
            Path::new(&model).canonicalize().unwrap().display(),
            table.display(),
            dir.path().join("out").display()
        ),
    )
    .unwrap();
    let (code, stdout, stderr) = run(ziplm()
        .args(["prune", "--quiet", "--json", "--config"])
        .arg(&config));
    assert_eq!(code, Some(0), "{stderr}");
    assert!(dir.path().join("out/model.speedup-1.4.onnx").exists());
    assert!(stdout.contains("tract-cuda"), "{stdout}");
    assert!(stdout.contains("NVIDIA H200"), "{stdout}");
}

#[test]
fn a_cpu_table_is_refused_for_a_gpu_target() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("tiny-bert-feature-extraction");
    let table = dir.path().join("cpu.json");
    let (code, _, stderr) = run(ziplm()
        .args(["profile", &model, "--seq-len", "16", "--quiet", "-o"])
        .arg(&table));
    assert_eq!(code, Some(0), "{stderr}");
    let (code, _, stderr) = run(ziplm()
        .args([
            "prune",
            &model,
            "--cuda",
            "0",
            "--speedup",
            "1.5",
            "--seq-len",
            "16",
            "--quiet",
        ])
        .arg("--latency-table")
        .arg(&table)
        .arg("--out")
        .arg(dir.path().join("out")));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("measured with tract (") && stderr.contains("this job targets tract-cuda"),
        "{stderr}"
    );
    assert!(!dir.path().join("out").exists());

    // And a GPU table for a CPU target.
    let gpu = dir.path().join("h200.json");
    gpu_table(&model, Workload::prefill(1, 16), &gpu);
    let (code, _, stderr) = run(ziplm()
        .args([
            "prune",
            &model,
            "--speedup",
            "1.5",
            "--seq-len",
            "16",
            "--quiet",
        ])
        .arg("--latency-table")
        .arg(&gpu)
        .arg("--out")
        .arg(dir.path().join("out")));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("measured with tract-cuda (")
            && stderr.contains("this job targets tract ("),
        "{stderr}"
    );
    assert!(!dir.path().join("out").exists());
}

/// What the error must name on a machine without a GPU: the missing driver (feature
/// built) or the missing feature.
fn assert_names_what_is_missing(stderr: &str) {
    assert!(stderr.contains("CUDA device 0"), "{stderr}");
    if cfg!(feature = "cuda") {
        assert!(stderr.contains("CUDA driver"), "{stderr}");
    } else {
        assert!(stderr.contains("--features cuda"), "{stderr}");
    }
    assert!(stderr.contains("--latency-table"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn a_gpu_target_without_a_gpu_is_a_clear_error_before_any_work() {
    if gpu_usable() {
        eprintln!("a CUDA GPU is usable here: the no-GPU errors are not reachable");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("tiny-bert-feature-extraction");
    let out = dir.path().join("out");
    let (code, _, stderr) = run(ziplm()
        .args([
            "prune",
            &model,
            "--cuda",
            "0",
            "--speedup",
            "1.5",
            "--seq-len",
            "16",
            "--quiet",
            "--out",
        ])
        .arg(&out));
    assert_eq!(code, Some(2), "{stderr}");
    assert_names_what_is_missing(&stderr);
    assert!(!out.exists(), "nothing is written");

    let table = dir.path().join("t.json");
    let (code, _, stderr) = run(ziplm()
        .args([
            "profile",
            &model,
            "--cuda",
            "0",
            "--seq-len",
            "16",
            "--quiet",
            "-o",
        ])
        .arg(&table));
    assert_eq!(code, Some(2), "{stderr}");
    assert_names_what_is_missing(&stderr);
    assert!(!table.exists());

    let (code, _, stderr) = run(ziplm().args([
        "speedup",
        &model,
        &model,
        "--cuda",
        "0",
        "--seq-len",
        "16",
        "--quiet",
    ]));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("CUDA device 0"), "{stderr}");

    // A device other than the first is named too.
    let (code, _, stderr) = run(ziplm()
        .args([
            "prune",
            &model,
            "--cuda",
            "1",
            "--speedup",
            "1.5",
            "--seq-len",
            "16",
            "--quiet",
            "--out",
        ])
        .arg(&out));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("CUDA device 1"), "{stderr}");
}

#[test]
fn threads_and_cuda_together_are_refused() {
    let model = fixture("tiny-bert-feature-extraction");
    let (code, _, stderr) =
        run(ziplm().args(["prune", &model, "--cuda", "0", "--threads", "2", "--quiet"]));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("--threads") && stderr.contains("--cuda"),
        "{stderr}"
    );
}
