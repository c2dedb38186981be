//! Crash-safe state files: every record is written to a temporary file and renamed over the
//! old one, so a restarted shim reads either the old or the new record, never a torn one.
//!
//! Runtime state (`--state`: sandbox and container records, bundles, exit records) is not
//! fsynced: it describes processes, mounts and namespaces that a power loss ends, and lives on
//! tmpfs (`/run`) by default, like containerd's and CRI-O's; a record torn by a power loss on
//! a disk-backed state dir is skipped at start. What must outlive a reboot (the image index
//! under `--root`) is written durably.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use nodekit_nsutil::durable;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// A state file could not be written, read or parsed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Filesystem error on `path`.
    #[error("state file {path}: {source}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The file holds something that is not the expected JSON record.
    #[error("state file {path} is corrupt: {source}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Atomically replaces the runtime state file `path` with `bytes` (temp file + rename, no
/// fsync: see the module comment), creating missing parent directories.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    durable::write_volatile(path, bytes).map_err(write_err)
}

/// Atomically writes `value` as JSON to the runtime state file `path`.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), StoreError> {
    write_atomic(path, &to_json(path, value)?)
}

/// Atomically and durably (fsync of file and directory) writes `value` as JSON to `path`,
/// for data that must survive a power loss.
pub fn write_json_durable<T: Serialize>(path: &Path, value: &T) -> Result<(), StoreError> {
    durable::write(path, &to_json(path, value)?).map_err(write_err)
}

fn to_json<T: Serialize>(path: &Path, value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec_pretty(value).map_err(|source| StoreError::Corrupt {
        path: path.to_path_buf(),
        source,
    })
}

fn write_err(e: durable::WriteError) -> StoreError {
    StoreError::Io {
        path: e.path,
        source: e.source,
    }
}

/// Reads the JSON record at `path`; `Ok(None)` when the file does not exist.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, StoreError> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(path)(e)),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|source| StoreError::Corrupt {
            path: path.to_path_buf(),
            source,
        })
}

/// Removes a directory tree; a missing one is success (removal converges).
pub fn remove_dir_all(path: &Path) -> Result<(), StoreError> {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(path)(e)),
        _ => Ok(()),
    }
}

/// A fresh 64-hex-digit identifier, the shape containerd and CRI-O use for IDs.
pub fn random_id() -> Result<String, StoreError> {
    let mut bytes = [0u8; 32];
    let path = Path::new("/dev/urandom");
    io::Read::read_exact(&mut File::open(path).map_err(io_err(path))?, &mut bytes)
        .map_err(io_err(path))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trips_and_replaces_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/rec.json");
        assert_eq!(read_json::<Vec<u32>>(&path).unwrap(), None);
        write_json(&path, &vec![1u32, 2]).unwrap();
        write_json_durable(&path, &vec![3u32]).unwrap();
        assert_eq!(read_json::<Vec<u32>>(&path).unwrap(), Some(vec![3]));
        let leftovers: Vec<_> = fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temp file may remain");
    }

    #[test]
    fn corrupt_file_is_reported_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rec.json");
        fs::write(&path, b"{not json").unwrap();
        let err = read_json::<Vec<u32>>(&path).unwrap_err();
        assert!(err.to_string().contains("rec.json"), "{err}");
    }

    #[test]
    fn ids_are_64_hex_and_distinct() {
        let (a, b) = (random_id().unwrap(), random_id().unwrap());
        assert_eq!(a.len(), 64);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
