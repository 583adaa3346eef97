//! Output sets: the files of one model (its pruned models, plans, bundles, archives,
//! report and manifest) committed into the output folder as one set, under a lock.
//!
//! A run writes everything into a staging folder inside the output folder
//! (`.ziplm-stage-NAME-*`), verification candidates included. When the set is complete
//! it writes a commit journal into the staging folder (the commit point), then renames
//! each file into place, removes the files of the model's previous set that the new set
//! does not have (listed in the previous `NAME.manifest.json`), and removes the staging
//! folder. So:
//!
//! - a run that fails or is killed before the commit point leaves the previous set as it
//!   was; its staging folder is removed by the next run into the folder;
//! - a run killed after the commit point (during the renames, a few system calls) is
//!   rolled forward by the next run into the folder, or by [`recover`];
//! - a [`FolderLock`] held for the whole run refuses a second run into the same folder,
//!   so two runs never mix their files.
//!
//! Stale temporary files of killed runs (`.*.tmp`, `.*.old`, `.ziplm-scratch-*`) are
//! removed under the lock by [`recover`], which every run calls first.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::path::{Path, PathBuf};

/// The lock file every run takes in its output folder.
pub const LOCK_FILE: &str = ".ziplm.lock";
/// The prefix of staging folders.
const STAGE_PREFIX: &str = ".ziplm-stage-";
/// The commit journal inside a staging folder.
const JOURNAL: &str = ".commit.json";

/// An exclusive lock on an output folder, released when dropped (or when the process
/// dies: the operating system drops the lock with the file handle). The lock file is
/// removed as the lock is let go, so a finished run leaves no trace of it.
pub struct FolderLock {
    _file: File,
    dir: PathBuf,
}

impl FolderLock {
    /// Takes the lock of `dir` (created if missing), or fails at once, naming the folder,
    /// when another run holds it.
    pub fn acquire(dir: &Path) -> Result<FolderLock> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let path = dir.join(LOCK_FILE);
        loop {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| Error::io(&path, e))?;
            match file.try_lock() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(Error::Invalid(format!(
                        "{}: another ziplm run is writing to this output folder (it holds {LOCK_FILE}); wait for it to finish, or choose another output folder",
                        dir.display()
                    )))
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(&path, e)),
            }
            // The holder before us removes the file as it lets go: a lock on a file no
            // longer at `path` locks nothing, so take the one there now.
            if same_file(&file, &path) {
                return Ok(FolderLock {
                    _file: file,
                    dir: dir.to_path_buf(),
                });
            }
        }
    }

    /// The locked folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for FolderLock {
    fn drop(&mut self) {
        // Removed while still held: whoever opened it meanwhile finds it gone (see
        // `acquire`) and takes a new one.
        let _ = std::fs::remove_file(self.dir.join(LOCK_FILE));
    }
}

/// Whether the open `file` is the one at `path` now.
fn same_file(file: &File, path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        match (file.metadata(), std::fs::metadata(path)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (file, path);
        true
    }
}

/// What a committed set holds (`NAME.manifest.json`, written last).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// The model's name (the prefix of every file).
    pub name: String,
    /// Every file and folder of the set, by name in the output folder, sorted.
    pub files: Vec<String>,
}

/// The file name of a model's manifest.
pub fn manifest_name(name: &str) -> String {
    format!("{name}.manifest.json")
}

/// Reads the manifest of the model `name` in `dir`, if a set of it was committed there.
pub fn read_manifest(dir: &Path, name: &str) -> Option<Manifest> {
    crate::fsutil::read_json(&dir.join(manifest_name(name))).ok()
}

#[derive(Serialize, Deserialize)]
struct Journal {
    /// Names to move from the staging folder into the output folder, in order.
    moves: Vec<String>,
    /// Names of the previous set to remove from the output folder.
    removes: Vec<String>,
}

/// A set being written: files go into [`OutputSet::stage`], and [`OutputSet::commit`]
/// makes them visible together. Dropped without a commit, it removes its staging
/// folder (and the output folder itself when the run created it and left it empty).
pub struct OutputSet {
    lock: FolderLock,
    name: String,
    stage: Option<tempfile::TempDir>,
    created_dir: bool,
}

impl OutputSet {
    /// Locks `dir` (creating it), recovers what killed runs left there, and opens a
    /// staging folder for the set of the model `name`.
    pub fn begin(dir: &Path, name: &str) -> Result<OutputSet> {
        let created_dir = !dir.exists();
        let lock = FolderLock::acquire(dir)?;
        recover_locked(dir)?;
        let stage = tempfile::Builder::new()
            .prefix(&format!("{STAGE_PREFIX}{name}-"))
            .tempdir_in(dir)
            .map_err(|e| Error::io(dir, e))?;
        Ok(OutputSet {
            lock,
            name: name.to_string(),
            stage: Some(stage),
            created_dir,
        })
    }

    /// The staging folder: write every file of the set here, under its final name.
    pub fn stage(&self) -> &Path {
        self.stage
            .as_ref()
            .map(|s| s.path())
            .unwrap_or(&self.lock.dir)
    }

    /// The output folder.
    pub fn dir(&self) -> &Path {
        self.lock.dir()
    }

    /// Where a staged file named `file` lands once committed.
    pub fn final_path(&self, file: &str) -> PathBuf {
        self.dir().join(file)
    }

    /// Commits the staged files as the model's set: writes the manifest and the journal,
    /// renames every file into the output folder, removes the previous set's files the
    /// new one lacks, and removes the staging folder. Returns the manifest.
    pub fn commit(mut self) -> Result<Manifest> {
        let stage = self.stage.take().expect("an open set has a staging folder");
        let dir = self.lock.dir().to_path_buf();
        let mut files: Vec<String> = std::fs::read_dir(stage.path())
            .map_err(|e| Error::io(stage.path(), e))?
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .filter(|n| !n.starts_with('.'))
            .collect();
        let manifest_file = manifest_name(&self.name);
        files.retain(|f| *f != manifest_file);
        files.push(manifest_file.clone());
        files.sort();
        let manifest = Manifest {
            name: self.name.clone(),
            files: files.clone(),
        };
        crate::fsutil::write_json_atomic(&stage.path().join(&manifest_file), &manifest)?;
        let previous = read_manifest(&dir, &self.name).unwrap_or_default();
        // The manifest moves last: a reader that finds it finds the whole set.
        let mut moves: Vec<String> = files
            .iter()
            .filter(|f| **f != manifest_file)
            .cloned()
            .collect();
        moves.push(manifest_file);
        let journal = Journal {
            moves,
            removes: previous
                .files
                .into_iter()
                .filter(|f| !files.contains(f) && plain(f))
                .collect(),
        };
        sync_dir(stage.path());
        // The commit point.
        crate::fsutil::write_json_atomic(&stage.path().join(JOURNAL), &journal)?;
        let stage = stage.keep();
        roll_forward(&dir, &stage, &journal)?;
        Ok(manifest)
    }
}

impl Drop for OutputSet {
    fn drop(&mut self) {
        if let Some(stage) = self.stage.take() {
            drop(stage);
            if self.created_dir {
                // Leave no empty folder behind a run that failed in a folder it made.
                // (the lock file goes as the lock is let go, just after).
                let dir = self.lock.dir();
                let only_lock = std::fs::read_dir(dir).is_ok_and(|entries| {
                    entries
                        .filter_map(|e| e.ok())
                        .all(|e| e.file_name() == LOCK_FILE)
                });
                if only_lock {
                    let _ = std::fs::remove_file(dir.join(LOCK_FILE));
                    let _ = std::fs::remove_dir(dir);
                }
            }
        }
    }
}

/// A name that stays inside the output folder (journals and manifests are read back).
fn plain(name: &str) -> bool {
    !name.is_empty() && !name.starts_with('.') && !name.contains(['/', '\\', '\0'])
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Moves a staged name over the one in the output folder (a folder in the way is moved
/// into the staging folder first, and goes with it).
fn replace(stage: &Path, dir: &Path, name: &str) -> Result<()> {
    let from = stage.join(name);
    let to = dir.join(name);
    if !from.exists() {
        // Moved already by an earlier, interrupted commit.
        return Ok(());
    }
    if to.is_dir() {
        let aside = stage.join(format!(".replaced-{name}"));
        let _ = std::fs::remove_dir_all(&aside);
        std::fs::rename(&to, &aside).map_err(|e| Error::io(&to, e))?;
    }
    std::fs::rename(&from, &to).map_err(|e| Error::io(&to, e))
}

fn roll_forward(dir: &Path, stage: &Path, journal: &Journal) -> Result<()> {
    for name in journal.moves.iter().filter(|n| plain(n)) {
        replace(stage, dir, name)?;
    }
    for name in &journal.removes {
        let path = dir.join(name);
        let _ = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
    }
    sync_dir(dir);
    std::fs::remove_dir_all(stage).map_err(|e| Error::io(stage, e))
}

/// Where a recovery stage keeps its checkpoint for the model file stem `stem`: beside
/// the output set in `dir`, not inside its staging folder (which a failed run
/// removes), so that the same job run again resumes from it. [`recover`] leaves it.
pub fn recovery_checkpoint(dir: &Path, stem: &str) -> PathBuf {
    dir.join(format!(".ziplm-recovery-{stem}.safetensors"))
}

/// Finishes or discards what killed runs left in `dir`, taking its lock: a committed set
/// is rolled forward, an uncommitted staging folder and stale temporary files are
/// removed. Fails when another run holds the folder.
pub fn recover(dir: &Path) -> Result<()> {
    if !dir.is_dir() {
        return Ok(());
    }
    let _lock = FolderLock::acquire(dir)?;
    recover_locked(dir)
}

fn recover_locked(dir: &Path) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in entries.filter_map(|e| e.ok()) {
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        let path = entry.path();
        if name.starts_with(STAGE_PREFIX) {
            match crate::fsutil::read_json::<Journal>(&path.join(JOURNAL)) {
                Ok(journal) => roll_forward(dir, &path, &journal)?,
                Err(_) => {
                    let _ = std::fs::remove_dir_all(&path);
                }
            }
        } else if name.starts_with(".ziplm-scratch-")
            || (name.starts_with('.') && (name.ends_with(".tmp") || name.ends_with(".old")))
        {
            let _ = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_set_appears_whole_and_replaces_the_previous_one() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("out");
        let set = OutputSet::begin(&dir, "m").unwrap();
        std::fs::write(set.stage().join("m.a"), b"1").unwrap();
        std::fs::write(set.stage().join("m.b"), b"1").unwrap();
        std::fs::create_dir(set.stage().join("m.folder")).unwrap();
        std::fs::write(set.stage().join("m.folder/x"), b"1").unwrap();
        assert_eq!(
            names(&dir).iter().filter(|n| !n.starts_with('.')).count(),
            0
        );
        set.commit().unwrap();
        assert_eq!(names(&dir), ["m.a", "m.b", "m.folder", "m.manifest.json"]);
        // The next set has no m.b: it goes; the folder is replaced whole.
        let set = OutputSet::begin(&dir, "m").unwrap();
        std::fs::write(set.stage().join("m.a"), b"2").unwrap();
        std::fs::create_dir(set.stage().join("m.folder")).unwrap();
        std::fs::write(set.stage().join("m.folder/y"), b"2").unwrap();
        set.commit().unwrap();
        assert_eq!(names(&dir), ["m.a", "m.folder", "m.manifest.json"]);
        assert_eq!(std::fs::read(dir.join("m.a")).unwrap(), b"2");
        assert_eq!(names(&dir.join("m.folder")), ["y"]);
        // Another model's set leaves this one alone.
        let set = OutputSet::begin(&dir, "n").unwrap();
        std::fs::write(set.stage().join("n.a"), b"3").unwrap();
        set.commit().unwrap();
        assert!(dir.join("m.a").exists() && dir.join("n.a").exists());
    }

    #[test]
    fn an_uncommitted_set_leaves_nothing_and_a_new_folder_is_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("fresh");
        let set = OutputSet::begin(&dir, "m").unwrap();
        std::fs::write(set.stage().join("m.a"), b"1").unwrap();
        drop(set);
        assert!(!dir.exists(), "{:?}", names(tmp.path()));
    }

    #[test]
    fn the_lock_refuses_a_second_run_until_released() {
        let tmp = tempfile::tempdir().unwrap();
        let held = FolderLock::acquire(tmp.path()).unwrap();
        let e = OutputSet::begin(tmp.path(), "m").err().unwrap().to_string();
        assert!(e.contains("another ziplm run"), "{e}");
        drop(held);
        OutputSet::begin(tmp.path(), "m").unwrap();
    }

    #[test]
    fn recovery_rolls_a_committed_set_forward_and_drops_the_rest() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        std::fs::write(dir.join("m.a"), b"old").unwrap();
        // A run killed after its commit point, halfway through the renames.
        let committed = dir.join(".ziplm-stage-m-abc");
        std::fs::create_dir(&committed).unwrap();
        std::fs::write(committed.join("m.a"), b"new").unwrap();
        std::fs::write(dir.join("m.b"), b"new").unwrap();
        let journal = Journal {
            moves: vec!["m.a".into(), "m.b".into()],
            removes: vec!["m.c".into()],
        };
        std::fs::write(dir.join("m.c"), b"old").unwrap();
        crate::fsutil::write_json_atomic(&committed.join(JOURNAL), &journal).unwrap();
        // A run killed before its commit point, and a stale temporary file.
        let uncommitted = dir.join(".ziplm-stage-m-def");
        std::fs::create_dir(&uncommitted).unwrap();
        std::fs::write(uncommitted.join("m.a"), b"partial").unwrap();
        std::fs::write(dir.join(".m.a.XYZ.tmp"), b"partial").unwrap();
        recover(dir).unwrap();
        assert_eq!(names(dir), ["m.a", "m.b"]);
        assert_eq!(std::fs::read(dir.join("m.a")).unwrap(), b"new");
    }
}
