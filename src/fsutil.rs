//! File writes that never leave a half-written file behind.

use crate::error::{Error, Result};
use std::io::Write;
use std::path::Path;

/// The folder `dest` will be written in (`.` for a bare name); an error when it does not
/// exist.
fn existing_parent(dest: &Path) -> Result<&Path> {
    let dir = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(Error::io(
            dest,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("folder {} does not exist", dir.display()),
            ),
        ));
    }
    Ok(dir)
}

/// Writes `bytes` to `dest` atomically: a temporary file in the same folder is written,
/// flushed to disk and renamed over `dest`. On error `dest` keeps its old content (or
/// still does not exist) and the temporary file is removed.
pub fn write_atomic(dest: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(dest, |f| f.write_all(bytes))
}

/// Like [`write_atomic`], with the content produced by `fill` writing into the
/// temporary file (for outputs too large to hold in memory twice).
pub fn write_atomic_with(
    dest: &Path,
    fill: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>,
) -> Result<()> {
    let dir = existing_parent(dest)?;
    let prefix = format!(
        ".{}.",
        dest.file_name().and_then(|n| n.to_str()).unwrap_or("ziplm")
    );
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix).suffix(".tmp");
    // Outputs are ordinary files (readable by the serving user), not 0600 temp files.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(0o644));
    }
    let mut tmp = builder.tempfile_in(dir).map_err(|e| Error::io(dir, e))?;
    fill(tmp.as_file_mut()).map_err(|e| Error::io(dest, e))?;
    tmp.as_file_mut()
        .sync_all()
        .map_err(|e| Error::io(dest, e))?;
    tmp.persist(dest).map_err(|e| Error::io(dest, e.error))?;
    Ok(())
}

/// Writes a folder of files at `dest` atomically: the files are written and synced in a
/// temporary folder beside `dest`, which is then renamed into place. An existing `dest`
/// folder is first moved aside and removed only after the rename, so `dest` is always
/// either the old folder or the complete new one (between the two renames it briefly does
/// not exist); on error the temporary folder is removed.
#[cfg_attr(not(feature = "mistralrs"), allow(dead_code))]
pub fn write_dir_atomic(dest: &Path, files: &[(&str, &[u8])]) -> Result<()> {
    let parent = existing_parent(dest)?;
    if dest.exists() && !dest.is_dir() {
        return Err(Error::io(
            dest,
            std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "a file is in the way of the model folder",
            ),
        ));
    }
    let prefix = format!(
        ".{}.",
        dest.file_name().and_then(|n| n.to_str()).unwrap_or("ziplm")
    );
    let tmp = tempfile::Builder::new()
        .prefix(&prefix)
        .suffix(".tmp")
        .tempdir_in(parent)
        .map_err(|e| Error::io(parent, e))?;
    for (name, bytes) in files {
        let path = tmp.path().join(name);
        let mut f = std::fs::File::create(&path).map_err(|e| Error::io(dest, e))?;
        f.write_all(bytes).map_err(|e| Error::io(dest, e))?;
        f.sync_all().map_err(|e| Error::io(dest, e))?;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755))
            .map_err(|e| Error::io(dest, e))?;
    }
    let old = if dest.is_dir() {
        let aside = tempfile::Builder::new()
            .prefix(&prefix)
            .suffix(".old")
            .tempdir_in(parent)
            .map_err(|e| Error::io(parent, e))?
            .keep();
        let aside = aside.join("previous");
        std::fs::rename(dest, &aside).map_err(|e| Error::io(dest, e))?;
        Some(aside)
    } else {
        None
    };
    let tmp = tmp.keep();
    if let Err(e) = std::fs::rename(&tmp, dest) {
        if let Some(o) = &old {
            let _ = std::fs::rename(o, dest);
        }
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(Error::io(dest, e));
    }
    if let Some(o) = old {
        if let Some(holder) = o.parent() {
            let _ = std::fs::remove_dir_all(holder);
        }
    }
    Ok(())
}

/// Checks, before any work, that the output folder `dir` exists or can be created: no
/// part of its path is a file. Creates nothing, so a job that fails later leaves no
/// empty folder behind.
pub fn check_output_folder(dir: &Path) -> Result<()> {
    let unusable = |why: String| {
        Error::Invalid(format!(
            "{}: cannot write the output here: {why}; choose another output folder",
            dir.display()
        ))
    };
    for ancestor in dir.ancestors().filter(|a| !a.as_os_str().is_empty()) {
        let Ok(meta) = std::fs::metadata(ancestor) else {
            continue;
        };
        if !meta.is_dir() {
            return Err(unusable(format!(
                "{} is a file, not a folder",
                ancestor.display()
            )));
        }
        return Ok(());
    }
    Ok(())
}

/// Removes a scratch model (file or folder), ignoring failures: the scratch folder it
/// lives in is removed at the end anyway.
#[cfg_attr(not(feature = "mistralrs"), allow(dead_code))]
pub fn remove_model(path: &Path) {
    let _ = if path.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
}

/// Serialises `value` as pretty JSON (with a final newline) and writes it atomically.
pub fn write_json_atomic<T: serde::Serialize>(dest: &Path, value: &T) -> Result<()> {
    let mut bytes = serde_json::to_vec_pretty(value).map_err(|e| Error::Format {
        path: dest.to_path_buf(),
        detail: e.to_string(),
    })?;
    bytes.push(b'\n');
    write_atomic(dest, &bytes)
}

/// Reads and parses a JSON file, naming the file and the position in errors.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_slice(&bytes).map_err(|e| Error::Format {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })
}

/// Feeds the bytes of the file at `path` into `h`; for a folder, the name and bytes of
/// each file directly inside it, in name order (content hashes of models and data).
pub fn hash_path(h: &mut impl sha2::Digest, path: &Path) -> Result<()> {
    if path.is_dir() {
        let mut entries: Vec<std::path::PathBuf> = std::fs::read_dir(path)
            .map_err(|e| Error::io(path, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for e in entries.into_iter().filter(|e| e.is_file()) {
            h.update(e.file_name().unwrap_or_default().as_encoded_bytes());
            hash_file(h, &e)?;
        }
        Ok(())
    } else {
        hash_file(h, path)
    }
}

fn hash_file(h: &mut impl sha2::Digest, path: &Path) -> Result<()> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            return Ok(());
        }
        h.update(&buf[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_write_keeps_old_content_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.bin");
        write_atomic(&dest, b"old").unwrap();
        let err = write_atomic_with(&dest, |f| {
            f.write_all(b"partial")?;
            Err(std::io::Error::other("injected failure"))
        })
        .unwrap_err();
        assert!(err.to_string().contains("injected failure"));
        assert_eq!(std::fs::read(&dest).unwrap(), b"old");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn folders_are_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("model");
        write_dir_atomic(&dest, &[("a", b"1"), ("b", b"2")]).unwrap();
        write_dir_atomic(&dest, &[("a", b"3")]).unwrap();
        assert_eq!(std::fs::read(dest.join("a")).unwrap(), b"3");
        assert!(
            !dest.join("b").exists(),
            "the old folder is replaced, not merged"
        );
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "no temporary folders are left");
        // A file name that cannot be created fails and leaves the old folder as it was.
        assert!(write_dir_atomic(&dest, &[("x/y", b"4")]).is_err());
        assert_eq!(std::fs::read(dest.join("a")).unwrap(), b"3");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn missing_folder_is_reported() {
        let err = write_atomic(Path::new("/nonexistent-ziplm-dir/x.json"), b"{}")
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not exist"), "{err}");
    }

    #[test]
    fn a_file_on_the_output_path_is_named_and_nothing_is_created() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a-file");
        std::fs::write(&file, b"x").unwrap();
        let err = check_output_folder(&file.join("out/deeper"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("a-file is a file, not a folder"), "{err}");
        assert!(check_output_folder(&dir.path().join("new/folder")).is_ok());
        assert!(!dir.path().join("new").exists());
        assert!(check_output_folder(dir.path()).is_ok());
    }
}
