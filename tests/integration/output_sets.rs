//! Output sets (issue 16, items 1-3): a run's files appear together or not at all, a
//! killed run leaves the previous set, two runs never mix their files, and every model
//! of a folder keeps its own report.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn ziplm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ziplm"))
}

fn bert() -> String {
    super::tract_fixtures::fixture("tiny-bert-feature-extraction")
        .display()
        .to_string()
}

/// `ziplm prune tiny-bert --speedup S --seq-len 16 --quiet --out OUT`, with a latency
/// table beside OUT shared by every run (so the same inputs give the same files) and no
/// verification timing (which could pick another round).
fn prune(speedup: &str, out: &Path) -> Command {
    let table = out.parent().unwrap().join("latency-table.json");
    let mut c = ziplm();
    c.args(["prune", &bert(), "--speedup", speedup, "--seq-len", "16"])
        .args(["--quiet", "--refine", "4", "--no-verify", "--latency-table"])
        .arg(table)
        .arg("--out")
        .arg(out)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

/// The visible files of a folder (hidden ones aside), with their bytes; reports are
/// compared by name only (they hold stage times).
fn visible(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap().map(|e| e.unwrap()) {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let bytes = if name.contains(".report.") {
            vec![]
        } else {
            std::fs::read(e.path()).unwrap()
        };
        out.insert(name, bytes);
    }
    out
}

fn hidden(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.') && n != ziplm::outputs::LOCK_FILE)
        .collect()
}

fn run_ok(mut c: Command) {
    let o = c.output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// Sets of one finished run at 1.5x (old) and one at 1.3x (new), each in its own folder.
fn reference_sets(root: &Path) -> (BTreeMap<String, Vec<u8>>, BTreeMap<String, Vec<u8>>) {
    let (old, new) = (root.join("ref-old"), root.join("ref-new"));
    run_ok(prune("1.5", &old));
    run_ok(prune("1.3", &new));
    (visible(&old), visible(&new))
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().map(|e| e.unwrap()) {
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn a_killed_run_leaves_the_old_set_or_the_new_one_never_a_mix() {
    let root = tempfile::tempdir().unwrap();
    let (old, new) = reference_sets(root.path());
    assert!(old.keys().any(|k| k == "model.speedup-1.5.onnx"), "{old:?}");
    assert!(new.keys().any(|k| k == "model.speedup-1.3.onnx"), "{new:?}");
    // How long a whole run takes here, to spread the kills over it.
    let t = Instant::now();
    run_ok(prune("1.3", &root.path().join("timing")));
    let whole = t.elapsed();
    let mut seen_old = 0;
    let mut seen_new = 0;
    for tenth in 1..=10u32 {
        let dir = root.path().join(format!("kill{tenth}"));
        copy_dir(&root.path().join("ref-old"), &dir);
        let mut child: Child = prune("1.3", &dir).spawn().unwrap();
        std::thread::sleep(whole * tenth / 10);
        let _ = child.kill();
        let _ = child.wait();
        // What any next ziplm call on the folder does first: finish a committed set or
        // drop an uncommitted one.
        ziplm::outputs::recover(&dir).unwrap();
        let now = visible(&dir);
        if now == old {
            seen_old += 1;
        } else if now == new {
            seen_new += 1;
        } else {
            panic!(
                "killed at {tenth}/10 of a run: a mixed set {:?}",
                now.keys().collect::<Vec<_>>()
            );
        }
        assert!(hidden(&dir).is_empty(), "{:?}", hidden(&dir));
        // And the next run into the folder completes the new set.
        run_ok(prune("1.3", &dir));
        assert_eq!(visible(&dir), new);
        assert!(hidden(&dir).is_empty(), "{:?}", hidden(&dir));
    }
    // The kills landed both before and after the commit.
    assert!(seen_old > 0, "no kill landed before the commit");
    eprintln!("kills: {seen_old} left the old set, {seen_new} the new one");
}

#[test]
fn a_failed_run_leaves_the_previous_set_untouched() {
    let root = tempfile::tempdir().unwrap();
    let dir = &root.path().join("out");
    run_ok(prune("1.5", dir));
    let before = visible(dir);
    // 1.5x can be met, 50x cannot: the job fails, after 1.5x's model could have been
    // written.
    let mut c = prune("1.5", dir);
    c.args(["--speedup", "50"]);
    let o = c.output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(visible(dir), before);
    assert!(hidden(dir).is_empty(), "{:?}", hidden(dir));
}

#[test]
fn a_second_run_into_a_locked_folder_is_refused_and_writes_nothing() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("out");
    run_ok(prune("1.5", &dir));
    let before = visible(&dir);
    // The overlap is certain: the lock is held (as a running job holds it) while the
    // second run starts.
    let held = ziplm::outputs::FolderLock::acquire(&dir).unwrap();
    let o = prune("1.3", &dir).output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("another ziplm run"), "{stderr}");
    assert_eq!(visible(&dir), before);
    drop(held);

    // Two real runs: the first is stopped while it holds the folder (its staging folder
    // exists only under the lock), the second starts, then the first goes on.
    let mut first = prune("1.3", &dir).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !std::fs::read_dir(&dir).unwrap().any(|e| {
        e.unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with(".ziplm-stage-")
    }) {
        assert!(Instant::now() < deadline, "the first run never staged");
        std::thread::sleep(Duration::from_millis(2));
    }
    let pid = first.id().to_string();
    assert!(Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap()
        .success());
    let o = prune("1.5", &dir).output().unwrap();
    assert!(Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .unwrap()
        .success());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("another ziplm run"), "{stderr}");
    assert!(first.wait().unwrap().success());
    // The folder holds the first run's set alone.
    let now = visible(&dir);
    assert!(now.contains_key("model.speedup-1.3.onnx"), "{now:?}");
    assert!(!now.contains_key("model.speedup-1.5.onnx"), "{now:?}");
}

#[test]
fn models_sharing_a_folder_keep_their_own_reports() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("ziplm.toml");
    let model = |name: &str, speedup: &str| {
        format!(
            "[[model]]\nname = \"{name}\"\nsource = {:?}\n[model.workload]\nseq_len = 16\n[model.budget]\nspeedup = [{speedup}]\n[model.output]\ndir = \"out\"\n[model.pruning]\nrefine = 4\n",
            bert()
        )
    };
    std::fs::write(&cfg, model("a", "1.5") + &model("b", "1.3")).unwrap();
    let o = ziplm()
        .args(["prune", "--quiet", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = dir.path().join("out");
    for f in [
        "a.report.json",
        "b.report.json",
        "a.manifest.json",
        "b.manifest.json",
        "a.speedup-1.5.onnx",
        "b.speedup-1.3.onnx",
    ] {
        assert!(out.join(f).exists(), "{f}: {:?}", visible(&out).keys());
    }
    let manifest = ziplm::outputs::read_manifest(&out, "a").unwrap();
    assert!(
        manifest.files.iter().all(|f| f.starts_with("a.")),
        "{manifest:?}"
    );
}
