//! Pruning from an app's build script.
//!
//! ```no_run
//! // build.rs, in `fn main()`: reads [package.metadata.ziplm] of this crate's
//! // Cargo.toml (or pass a ziplm.toml).
//! ziplm::build::Builder::from_env().unwrap().run().unwrap();
//! ```
//! ```ignore
//! // main.rs: the emitted files' paths, one constant per model and budget.
//! include!(concat!(env!("OUT_DIR"), "/ziplm_models.rs"));
//! let path = ziplm_models::MINILM_SPEEDUP_1_5;
//! ```
//!
//! Every input is declared with `cargo:rerun-if-changed`, so a no-op rebuild does not
//! run the script at all. When it does run, results come from a content-addressed
//! cache (model, calibration data, tokenizer, latency table, the job's settings and
//! the ziplm version, hashed with SHA-256); a hit does no pruning work. The cache is
//! shared between crates (`ZIPLM_CACHE_DIR`, default `<target>/ziplm-cache`): an entry
//! is built under an exclusive file lock in a temporary folder and renamed into place,
//! so concurrent builds neither corrupt nor duplicate it.

use crate::config;
use crate::error::{Error, Result};
use crate::job::PruneJob;
use crate::progress::Quiet;
use sha2::{Digest, Sha256};
use std::fs::File;
use std::path::{Path, PathBuf};

/// Runs the jobs of a serving config for a build script.
pub struct Builder {
    config: PathBuf,
    out_dir: PathBuf,
    cache_dir: PathBuf,
    jobs: Vec<PruneJob>,
}

/// What a build produced for one job.
#[derive(Debug, Clone)]
pub struct Built {
    /// Name of the model (constant prefix).
    pub name: String,
    /// Emitted files with their budget, in budget order.
    pub files: Vec<(crate::search::Budget, PathBuf)>,
    /// Whether the result came from the cache.
    pub cached: bool,
}

fn env_path(name: &str) -> Result<PathBuf> {
    std::env::var_os(name).map(PathBuf::from).ok_or_else(|| {
        Error::Invalid(format!(
            "{name} is not set: ziplm::build runs inside a cargo build script"
        ))
    })
}

/// The files a job reads.
pub fn inputs_of(job: &PruneJob) -> Vec<PathBuf> {
    let mut v = vec![job.model.clone()];
    if let Some(c) = &job.calibration {
        v.extend(c.paths().map(Path::to_path_buf));
    }
    if let Some(t) = job
        .tokenizer
        .clone()
        .or_else(|| crate::data::tokenizer::Tokenizer::next_to(&job.model))
    {
        v.push(t);
    }
    if let Some(t) = &job.latency_table {
        if t.exists() {
            v.push(t.clone());
        }
    }
    v
}

/// Content hash of everything a job's result depends on.
pub fn cache_key(job: &PruneJob) -> Result<String> {
    let mut h = Sha256::new();
    h.update(b"ziplm ");
    h.update(env!("CARGO_PKG_VERSION").as_bytes());
    let mut settings = job.clone();
    // Where results land is not part of what they are.
    settings.out_dir = PathBuf::new();
    h.update(serde_json::to_vec(&settings).map_err(|e| Error::Invalid(e.to_string()))?);
    for p in inputs_of(job) {
        crate::fsutil::hash_path(&mut h, &p)?;
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn const_name(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    if out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out
}

impl Builder {
    /// Reads `[package.metadata.ziplm]` of the crate being built (`CARGO_MANIFEST_DIR`),
    /// outputs into `OUT_DIR`.
    pub fn from_env() -> Result<Builder> {
        let manifest = env_path("CARGO_MANIFEST_DIR")?.join("Cargo.toml");
        Self::with_config(&manifest)
    }

    /// Reads a serving config (a `ziplm.toml` or a `Cargo.toml`), outputs into `OUT_DIR`.
    pub fn with_config(config: &Path) -> Result<Builder> {
        let out_dir = env_path("OUT_DIR")?;
        let cache_dir = match std::env::var_os("ZIPLM_CACHE_DIR") {
            Some(d) => PathBuf::from(d),
            None => default_cache_dir(&out_dir),
        };
        Ok(Builder {
            config: config.to_path_buf(),
            out_dir,
            cache_dir,
            jobs: config::load_jobs(config)?,
        })
    }

    /// Overrides the cache folder.
    pub fn cache_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cache_dir = dir.into();
        self
    }

    /// Overrides the output folder (default `OUT_DIR`).
    pub fn out_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.out_dir = dir.into();
        self
    }

    /// The jobs read from the config.
    pub fn jobs(&self) -> &[PruneJob] {
        &self.jobs
    }

    /// Prints `rerun-if-changed` lines, prunes what is not cached, and writes
    /// `ziplm_models.rs` into the output folder.
    pub fn run(&self) -> Result<Vec<Built>> {
        println!("cargo:rerun-if-changed={}", self.config.display());
        println!("cargo:rerun-if-env-changed=ZIPLM_CACHE_DIR");
        let mut built = vec![];
        for job in &self.jobs {
            for p in inputs_of(job) {
                println!("cargo:rerun-if-changed={}", p.display());
            }
            if let Some(t) = &job.latency_table {
                println!("cargo:rerun-if-changed={}", t.display());
            }
            built.push(self.build_one(job)?);
        }
        let mut rs = String::from("// Generated by ziplm::build. Paths of the pruned models, one per budget.\n#[allow(dead_code)]\npub mod ziplm_models {\n");
        for b in &built {
            for (budget, f) in &b.files {
                let label = PruneJob::budget_label(budget);
                rs.push_str(&format!(
                    "    /// `{}` pruned to {label}.\n    pub const {}: &str = {:?};\n",
                    b.name,
                    const_name(&format!("{}_{label}", b.name)),
                    f.display().to_string()
                ));
            }
        }
        rs.push_str("}\n");
        crate::fsutil::write_atomic(&self.out_dir.join("ziplm_models.rs"), rs.as_bytes())?;
        Ok(built)
    }

    fn build_one(&self, job: &PruneJob) -> Result<Built> {
        let key = cache_key(job)?;
        let name = job.display_name();
        let (entry, cached) = ensure_cached(&self.cache_dir, &key, |dir| {
            let mut j = job.clone();
            j.out_dir = dir.to_path_buf();
            crate::backend::run_job(&j, &Quiet).map(|_| ())
        })?;
        // Link (or copy) the entry's files into the output folder.
        let dest = self.out_dir.join("ziplm").join(&name);
        std::fs::create_dir_all(&dest).map_err(|e| Error::io(&dest, e))?;
        // The entry's committed set, as its manifest lists it (models, plans, bundles,
        // archives, report).
        let manifest = crate::outputs::read_manifest(&entry, &name).ok_or_else(|| {
            Error::Invalid(format!(
                "{}: the cached run of `{name}` has no manifest; remove this cache entry",
                entry.display()
            ))
        })?;
        for file in &manifest.files {
            let (src, dst) = (entry.join(file), dest.join(file));
            if src.is_dir() {
                place_dir(&src, &dst)?;
            } else {
                place(&src, &dst)?;
            }
        }
        let mut files = vec![];
        for budget in &job.budgets {
            let stem = job.output_stem(budget);
            // The model: `STEM.onnx`, `STEM.gguf`, or a folder `STEM` (safetensors).
            let model = manifest.files.iter().find(|f| {
                **f == stem
                    || [".onnx", ".gguf"]
                        .iter()
                        .any(|e| **f == format!("{stem}{e}"))
            });
            if let Some(m) = model {
                files.push((*budget, dest.join(m)));
            }
        }
        Ok(Built {
            name,
            files,
            cached,
        })
    }
}

fn default_cache_dir(out_dir: &Path) -> PathBuf {
    // OUT_DIR = <target>/<profile>/build/<pkg>-<hash>/out: share <target>/ziplm-cache.
    out_dir
        .ancestors()
        .nth(4)
        .map(|t| t.join("ziplm-cache"))
        .unwrap_or_else(|| out_dir.join("ziplm-cache"))
}

/// Hard link, or copy when linking fails; replaces `dst` atomically.
fn place(src: &Path, dst: &Path) -> Result<()> {
    let tmp = dst.with_extension("ziplm-tmp");
    let _ = std::fs::remove_file(&tmp);
    if std::fs::hard_link(src, &tmp).is_err() {
        std::fs::copy(src, &tmp).map_err(|e| Error::io(dst, e))?;
    }
    std::fs::rename(&tmp, dst).map_err(|e| Error::io(dst, e))
}

/// [`place`] for a folder of files: linked (or copied) into a sibling temporary
/// folder, which then replaces `dst`.
fn place_dir(src: &Path, dst: &Path) -> Result<()> {
    let parent = dst.parent().unwrap_or(Path::new("."));
    let tmp = tempfile::Builder::new()
        .prefix(".ziplm-place-")
        .tempdir_in(parent)
        .map_err(|e| Error::io(parent, e))?;
    for f in std::fs::read_dir(src).map_err(|e| Error::io(src, e))? {
        let f = f.map_err(|e| Error::io(src, e))?;
        let to = tmp.path().join(f.file_name());
        if std::fs::hard_link(f.path(), &to).is_err() {
            std::fs::copy(f.path(), &to).map_err(|e| Error::io(&to, e))?;
        }
    }
    if dst.exists() {
        std::fs::remove_dir_all(dst).map_err(|e| Error::io(dst, e))?;
    }
    let tmp = tmp.keep();
    std::fs::rename(&tmp, dst).map_err(|e| Error::io(dst, e))
}

/// Returns the cache entry for `key`, producing it with `produce` (into a temporary
/// folder, renamed into place) under an exclusive lock when it does not exist yet.
pub fn ensure_cached(
    cache: &Path,
    key: &str,
    produce: impl FnOnce(&Path) -> Result<()>,
) -> Result<(PathBuf, bool)> {
    std::fs::create_dir_all(cache).map_err(|e| Error::io(cache, e))?;
    let entry = cache.join(key);
    if entry.join(".complete").exists() {
        return Ok((entry, true));
    }
    let lock_path = cache.join(format!("{key}.lock"));
    let lock = File::create(&lock_path).map_err(|e| Error::io(&lock_path, e))?;
    lock.lock().map_err(|e| Error::io(&lock_path, e))?;
    // Another build may have finished it while we waited.
    if entry.join(".complete").exists() {
        return Ok((entry, true));
    }
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{key}."))
        .tempdir_in(cache)
        .map_err(|e| Error::io(cache, e))?;
    produce(tmp.path())?;
    std::fs::write(tmp.path().join(".complete"), key).map_err(|e| Error::io(tmp.path(), e))?;
    let tmp_path = tmp.keep();
    if entry.exists() {
        // A stale incomplete entry (interrupted build): replace it.
        std::fs::remove_dir_all(&entry).map_err(|e| Error::io(&entry, e))?;
    }
    std::fs::rename(&tmp_path, &entry).map_err(|e| Error::io(&entry, e))?;
    drop(lock);
    Ok((entry, false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_producers_build_an_entry_once() {
        let dir = tempfile::tempdir().unwrap();
        let calls = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    let (entry, _) = ensure_cached(dir.path(), "k", |d| {
                        calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        std::thread::sleep(std::time::Duration::from_millis(50));
                        std::fs::write(d.join("model.onnx"), b"x").map_err(|e| Error::io(d, e))
                    })
                    .unwrap();
                    assert_eq!(std::fs::read(entry.join("model.onnx")).unwrap(), b"x");
                });
            }
        });
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[test]
    fn constant_names_are_identifiers() {
        assert_eq!(const_name("minilm_speedup-1.5"), "MINILM_SPEEDUP_1_5");
        assert_eq!(const_name("1x"), "_1X");
    }
}
