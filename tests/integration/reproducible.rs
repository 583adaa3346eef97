//! Reproducible and concurrent: the same inputs and seed give byte-identical emitted
//! models, plans, bundles and reports whatever the thread count, and two processes
//! building with one cache both succeed and leave one consistent entry.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use ziplm::job::PruneJob;
use ziplm::search::Budget;

/// Every file of a folder and of its sub-folders (emitted model folders), by relative
/// name.
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap().map(|e| e.unwrap()) {
        let name = e.file_name().to_string_lossy().into_owned();
        if e.file_type().unwrap().is_dir() {
            for (n, b) in files(&e.path()) {
                out.insert(format!("{name}/{n}"), b);
            }
        } else {
            out.insert(name, std::fs::read(e.path()).unwrap());
        }
    }
    out
}

/// The report without its wall-clock stage times (the only figures that are
/// measurements when verification is off and the latency table is given) and without
/// the output paths.
fn report_without_stage_times(bytes: &[u8]) -> serde_json::Value {
    let mut v: serde_json::Value = serde_json::from_slice(bytes).unwrap();
    v.as_object_mut().unwrap().remove("stages");
    // Output paths name each run's own folder.
    for b in v["budgets"].as_array_mut().unwrap() {
        b.as_object_mut().unwrap().remove("output");
    }
    v
}

/// Runs `job` with 0 (rayon's default), 1, 2 and again 1 threads (the first run profiles
/// and writes the latency table, the others reuse it) and asserts byte-identical models,
/// plans and reports (stage times aside). Returns the first run's file names.
fn assert_same_outputs_whatever_the_thread_count(job: &PruneJob, dir: &Path) -> Vec<String> {
    let mut job = job.clone();
    job.verify = false;
    job.latency_table = Some(dir.join("latency-table.json"));
    let mut outputs = vec![];
    for (i, threads) in [0usize, 1, 2, 1].into_iter().enumerate() {
        let mut j = job.clone();
        j.out_dir = dir.join(format!("run{i}"));
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| ziplm::backend::run_job(&j, &ziplm::progress::Quiet))
            .unwrap();
        let mut f = files(&j.out_dir);
        let stem = format!("{}.report", j.display_name());
        let report = f.remove(&format!("{stem}.json")).unwrap();
        f.remove(&format!("{stem}.txt"));
        f.remove(&format!("{stem}.svg"));
        outputs.push((threads, f, report_without_stage_times(&report)));
    }
    let (_, first, first_report) = &outputs[0];
    for (threads, f, report) in &outputs[1..] {
        assert_eq!(
            f.keys().collect::<Vec<_>>(),
            first.keys().collect::<Vec<_>>()
        );
        for (name, bytes) in f {
            assert!(
                bytes == &first[name],
                "{name} differs with {threads} threads"
            );
        }
        assert_eq!(
            report, first_report,
            "report differs with {threads} threads"
        );
    }
    first.keys().cloned().collect()
}

#[test]
fn same_inputs_give_identical_outputs_whatever_the_thread_count() {
    let dir = tempfile::tempdir().unwrap();
    let mut job = PruneJob::new(super::tract_fixtures::fixture(
        "tiny-llama-gqa-text-generation",
    ));
    job.workload = ziplm_plugin_api::Workload::prefill(1, 16);
    job.random_samples = 16;
    job.budgets = vec![Budget::Speedup(1.3), Budget::Speedup(1.6)];
    // Five timed runs a shape: with one, a busy machine once made every pruned shape
    // time as slow as the dense one (ImpossibleBudget, max speedup 1.0).
    job.profile = ziplm::profile::ProfileSettings::new(1, 5);
    let names = assert_same_outputs_whatever_the_thread_count(&job, dir.path());
    assert!(
        names.iter().any(|k| k.ends_with(".onnx"))
            && names.iter().any(|k| k.ends_with(".plan.json")),
        "{names:?}"
    );
}

/// The mistral.rs backend, GGUF and safetensors outputs (candle's forward, the OBS
/// database and SPDY's loss evaluations all run under the pool).
#[cfg(feature = "mistralrs")]
#[test]
fn llm_outputs_are_identical_whatever_the_thread_count() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for format in [
        ziplm::backend::mistralrs::options::LlmFormat::Gguf,
        ziplm::backend::mistralrs::options::LlmFormat::Safetensors,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut job = PruneJob::new(root.join("fixtures/gguf/tiny-llama-gqa.gguf"));
        job.workload = ziplm_plugin_api::Workload::prefill(1, 32);
        job.random_samples = 16;
        job.budgets = vec![Budget::Speedup(1.3), Budget::Speedup(1.8)];
        job.profile = ziplm::profile::ProfileSettings::new(0, 1);
        job.options.set(
            "llm_format",
            match format {
                ziplm::backend::mistralrs::options::LlmFormat::Gguf => "gguf",
                ziplm::backend::mistralrs::options::LlmFormat::Safetensors => "safetensors",
            },
        );
        let names = assert_same_outputs_whatever_the_thread_count(&job, dir.path());
        let model = match format {
            ziplm::backend::mistralrs::options::LlmFormat::Gguf => ".gguf",
            ziplm::backend::mistralrs::options::LlmFormat::Safetensors => "/model.safetensors",
        };
        assert!(
            names.iter().filter(|k| k.ends_with(model)).count() == 2,
            "{format:?}: {names:?}"
        );
    }
}

const CHILD_ENV: &str = "ZIPLM_TEST_BUILD_CHILD";

/// Run by [`two_processes_share_one_cache`] in a child process: one `ziplm::build`
/// of the config in `$ZIPLM_TEST_BUILD_CHILD` into `$OUT_DIR` with `$ZIPLM_CACHE_DIR`.
#[test]
#[ignore = "child process of two_processes_share_one_cache"]
fn build_child_process() {
    let Some(config) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let built = ziplm::build::Builder::with_config(Path::new(&config))
        .unwrap()
        .run()
        .unwrap();
    println!("CHILD cached={}", built[0].cached);
}

#[test]
fn two_processes_share_one_cache() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ziplm.toml");
    let model = super::tract_fixtures::fixture("tiny-bert-feature-extraction");
    std::fs::write(
        &config,
        format!(
            "[[model]]\nname = \"bert\"\nsource = {:?}\n[model.workload]\nbatch = 1\nseq_len = 16\n\
             [model.budget]\nspeedup = [1.3]\n[model.profile]\nruns = 1\nno_verify = true\n",
            model.display().to_string()
        ),
    )
    .unwrap();
    let cache = dir.path().join("cache");
    let children: Vec<_> = (0..2)
        .map(|i| {
            let out = dir.path().join(format!("out{i}"));
            std::fs::create_dir_all(&out).unwrap();
            let child = Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "reproducible::build_child_process",
                    "--ignored",
                    "--nocapture",
                    "--test-threads",
                    "1",
                ])
                .env(CHILD_ENV, &config)
                .env("OUT_DIR", &out)
                .env("ZIPLM_CACHE_DIR", &cache)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            (out, child)
        })
        .collect();
    let mut cached = vec![];
    let mut models: Vec<PathBuf> = vec![];
    for (out, child) in children {
        let o = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success(),
            "{stdout}\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
        cached.push(stdout.contains("CHILD cached=true"));
        assert!(stdout.contains("CHILD cached="), "{stdout}");
        let generated = std::fs::read_to_string(out.join("ziplm_models.rs")).unwrap();
        assert!(generated.contains("BERT_SPEEDUP_1_3"), "{generated}");
        models.push(out.join("ziplm/bert/bert.speedup-1.3.onnx"));
    }
    // Exactly one process pruned; the other waited for the lock and took the entry.
    cached.sort();
    assert_eq!(cached, vec![false, true]);
    assert_eq!(
        std::fs::read(&models[0]).unwrap(),
        std::fs::read(&models[1]).unwrap()
    );
    // The cache holds one complete entry and its lock, no temporary folders.
    let mut entries: Vec<String> = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    entries.sort();
    assert_eq!(entries.len(), 2, "{entries:?}");
    let key = entries.iter().find(|e| !e.ends_with(".lock")).unwrap();
    assert!(entries.contains(&format!("{key}.lock")), "{entries:?}");
    assert_eq!(
        std::fs::read_to_string(cache.join(key).join(".complete")).unwrap(),
        *key
    );
}
