//! Crash-safe replacement of a whole file, the one implementation behind every state
//! record, checkpoint and spec file nodekit writes.
//!
//! The bytes go to a temp file in the same directory (named after the target, the process
//! and a per-process counter, ending in `.tmp`), which is then renamed over the target, so
//! a reader sees the old file or the new one, never a torn one. [`write`] also fsyncs the
//! file before the rename and the directory after it, so the new file survives a power
//! loss; [`write_volatile`] skips both fsyncs, for files a power loss makes moot.
//! [`prepare`] + [`Prepared::commit`] is [`write`] in two steps, so a caller can overlap
//! the content's fsync with work that must finish before the file may change.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A step of a file replacement failed.
#[derive(Debug, thiserror::Error)]
#[error("{step} {}: {source}", path.display())]
pub struct WriteError {
    /// What was being done: `creating`, `writing`, `syncing`, `renaming into`.
    pub step: &'static str,
    /// The file or directory it was done to.
    pub path: PathBuf,
    /// The OS error.
    #[source]
    pub source: io::Error,
}

/// Replaces `path` with `bytes` atomically and durably: temp file, fsync, rename, fsync of
/// the directory. Missing parent directories are created. After it returns, a crash or
/// power loss leaves the new content; during it, the old or the new, never a torn file.
pub fn write(path: &Path, bytes: &[u8]) -> Result<(), WriteError> {
    prepare(path, bytes)?.commit()
}

/// Replaces `path` with `bytes` atomically but without any fsync: a process crash leaves
/// the old or the new content; a power loss may leave old, new, missing or a torn (empty
/// or zero-filled) file. Missing parent directories are created.
pub fn write_volatile(path: &Path, bytes: &[u8]) -> Result<(), WriteError> {
    Prepared::new(path, bytes, false)?.rename()
}

/// The first step of [`write`]: `bytes` in a temp file next to `path`, fsynced; `path`
/// itself is untouched until [`Prepared::commit`].
pub fn prepare(path: &Path, bytes: &[u8]) -> Result<Prepared, WriteError> {
    Prepared::new(path, bytes, true)
}

/// New content for a file, written to its temp file but not yet in place. Dropped without
/// [`Prepared::commit`], it removes the temp file.
#[derive(Debug)]
pub struct Prepared {
    tmp: PathBuf,
    path: PathBuf,
    renamed: bool,
}

impl Prepared {
    fn new(path: &Path, bytes: &[u8], sync: bool) -> Result<Self, WriteError> {
        let prepared = Self {
            tmp: temp_path(path),
            path: path.to_path_buf(),
            renamed: false,
        };
        write_temp(&prepared.tmp, bytes, sync)?;
        Ok(prepared)
    }

    /// The second step of [`write`]: renames the content over the file and fsyncs the
    /// directory. After it returns, a crash or power loss leaves the new content.
    pub fn commit(self) -> Result<(), WriteError> {
        let dir = parent(&self.path).to_path_buf();
        self.rename()?;
        sync_dir(&dir)
    }

    fn rename(mut self) -> Result<(), WriteError> {
        fs::rename(&self.tmp, &self.path).map_err(failed("renaming into", &self.path))?;
        self.renamed = true;
        Ok(())
    }
}

impl Drop for Prepared {
    fn drop(&mut self) {
        if !self.renamed {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Fsyncs directory `dir`, making a rename or removal in it durable.
pub fn sync_dir(dir: &Path) -> Result<(), WriteError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(failed("syncing", dir))
}

fn write_temp(tmp: &Path, bytes: &[u8], sync: bool) -> Result<(), WriteError> {
    let mut file = match File::create(tmp) {
        // Create the parent only when missing: no extra syscall on the usual path.
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let dir = parent(tmp);
            fs::create_dir_all(dir).map_err(failed("creating", dir))?;
            File::create(tmp)
        }
        other => other,
    }
    .map_err(failed("creating", tmp))?;
    file.write_all(bytes).map_err(failed("writing", tmp))?;
    if sync {
        file.sync_all().map_err(failed("syncing", tmp))?;
    }
    Ok(())
}

/// `.NAME.PID-SEQ.tmp` next to `path`: unique among this process's threads and other
/// processes, hidden, and never mistaken for the target's kind of file.
fn temp_path(path: &Path) -> PathBuf {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    parent(path).join(format!(".{name}.{}-{seq}.tmp", std::process::id()))
}

/// The directory holding `path` (`.` for a bare file name).
fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn failed<'a>(step: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> WriteError + 'a {
    move |source| WriteError {
        step,
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn both_variants_replace_the_file_create_parents_and_leave_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        for (sub, put) in [
            (
                "durable",
                write as fn(&Path, &[u8]) -> Result<(), WriteError>,
            ),
            ("volatile", write_volatile),
        ] {
            let path = dir.path().join(sub).join("deep/rec.json");
            put(&path, b"old").unwrap();
            put(&path, b"new").unwrap();
            assert_eq!(fs::read(&path).unwrap(), b"new", "{sub}");
            assert_eq!(entries(parent(&path)), ["rec.json"], "{sub}");
        }
    }

    #[test]
    fn a_prepared_write_changes_nothing_until_committed_and_a_dropped_one_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rec.json");
        fs::write(&path, b"old").unwrap();
        drop(prepare(&path, b"dropped").unwrap());
        assert_eq!(entries(dir.path()), ["rec.json"]);
        let prepared = prepare(&path, b"new").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"old", "untouched before commit");
        assert_eq!(
            entries(dir.path()).len(),
            2,
            "the temp file holds the content"
        );
        prepared.commit().unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new");
        assert_eq!(entries(dir.path()), ["rec.json"]);
    }

    #[test]
    fn a_failed_write_names_its_step_and_path_and_leaves_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        // The target is a non-empty directory: the rename must fail.
        let path = dir.path().join("rec");
        fs::create_dir(&path).unwrap();
        fs::write(path.join("keep"), b"x").unwrap();
        let err = write(&path, b"new").unwrap_err();
        assert_eq!(err.step, "renaming into");
        assert_eq!(err.path, path);
        assert_eq!(entries(dir.path()), ["rec"], "temp file removed");
        assert_eq!(entries(&path), ["keep"]);
    }

    #[test]
    fn temp_files_are_hidden_unique_and_end_in_tmp() {
        let path = Path::new("/s/volumes/v1.json");
        let (a, b) = (temp_path(path), temp_path(path));
        assert_ne!(a, b);
        assert_eq!(a.parent(), Some(Path::new("/s/volumes")));
        let name = a.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            name.starts_with(".v1.json.") && name.ends_with(".tmp"),
            "{name}"
        );
        assert_eq!(parent(Path::new("bare")), Path::new("."));
    }

    #[test]
    fn syncing_a_missing_directory_fails_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("gone");
        let err = sync_dir(&missing).unwrap_err();
        assert_eq!((err.step, err.path), ("syncing", missing));
    }
}
