//! The device manager's checkpoint: which devices each pod's containers hold, with the
//! plugin's Allocate answer, so a restarted manager hands the same devices to the same
//! containers and never gives them to anyone else. Written crash-safely: a temp file in the
//! same directory, fsync, rename over the old one, fsync of the directory; a crash leaves
//! either the old or the new checkpoint, never a torn one.

use std::path::{Path, PathBuf};

use nodekit_nsutil::durable;
use nodekit_proto::deviceplugin::v1beta1 as api;
use prost::Message;
use serde::{Deserialize, Serialize};

/// The format version written.
pub const VERSION: u32 = 1;

/// One container's devices of one resource.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// The pod's UID.
    pub pod_uid: String,
    /// The container's name.
    pub container: String,
    /// The extended resource.
    pub resource: String,
    /// The device IDs it holds.
    pub device_ids: Vec<String>,
    /// The plugin's Allocate answer for it.
    pub response: api::ContainerAllocateResponse,
}

/// On-disk shape: the answer as protobuf bytes in hex.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct FileEntry {
    pod_uid: String,
    container: String,
    resource: String,
    device_ids: Vec<String>,
    response: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    version: u32,
    entries: Vec<FileEntry>,
}

/// The checkpoint could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// A file operation failed.
    #[error("checkpoint {}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a checkpoint of a known version.
    #[error("checkpoint {} is corrupt: {reason}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// Reads the checkpoint at `path`; a missing file is an empty checkpoint.
pub fn load(path: &Path) -> Result<Vec<Entry>, CheckpointError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(CheckpointError::Io {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let corrupt = |reason: String| CheckpointError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    let file: File = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
    if file.version != VERSION {
        return Err(corrupt(format!("unknown version {}", file.version)));
    }
    file.entries
        .into_iter()
        .map(|e| {
            let bytes =
                from_hex(&e.response).ok_or_else(|| corrupt("response is not hex".into()))?;
            let response = api::ContainerAllocateResponse::decode(bytes.as_slice())
                .map_err(|err| corrupt(format!("response of pod {}: {err}", e.pod_uid)))?;
            Ok(Entry {
                pod_uid: e.pod_uid,
                container: e.container,
                resource: e.resource,
                device_ids: e.device_ids,
                response,
            })
        })
        .collect()
}

/// Replaces the checkpoint at `path` with `entries`, atomically and durably.
pub fn save(path: &Path, entries: &[Entry]) -> Result<(), CheckpointError> {
    let file = File {
        version: VERSION,
        entries: entries
            .iter()
            .map(|e| FileEntry {
                pod_uid: e.pod_uid.clone(),
                container: e.container.clone(),
                resource: e.resource.clone(),
                device_ids: e.device_ids.clone(),
                response: to_hex(&e.response.encode_to_vec()),
            })
            .collect(),
    };
    let json = serde_json::to_vec(&file).map_err(|e| CheckpointError::Corrupt {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    durable::write(path, &json).map_err(|e| CheckpointError::Io {
        path: e.path,
        source: e.source,
    })
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex(text: &str) -> Option<Vec<u8>> {
    text.as_bytes()
        .chunks(2)
        .map(|pair| {
            let pair = std::str::from_utf8(pair).ok().filter(|p| p.len() == 2)?;
            u8::from_str_radix(pair, 16).ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(pod: &str) -> Entry {
        let mut response = api::ContainerAllocateResponse::default();
        response.envs.insert("A".into(), "b,c".into());
        response.devices.push(api::DeviceSpec {
            container_path: "/dev/x".into(),
            host_path: "/dev/x".into(),
            permissions: "rw".into(),
        });
        Entry {
            pod_uid: pod.into(),
            container: "main".into(),
            resource: "nodekit.io/lab".into(),
            device_ids: vec!["x::0".into()],
            response,
        }
    }

    #[test]
    fn entries_survive_a_save_and_load_and_a_missing_file_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/checkpoint");
        assert!(load(&path).unwrap().is_empty());
        let entries = vec![entry("p1"), entry("p2")];
        save(&path, &entries).unwrap();
        assert_eq!(load(&path).unwrap(), entries);
        save(&path, &entries[1..]).unwrap();
        assert_eq!(load(&path).unwrap(), entries[1..]);
        // Only the checkpoint is left: no temp file.
        assert_eq!(
            std::fs::read_dir(dir.path().join("sub")).unwrap().count(),
            1
        );
    }

    #[test]
    fn a_damaged_checkpoint_is_reported_not_silently_emptied() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checkpoint");
        save(&path, &[entry("p1")]).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, &text[..text.len() / 2]).unwrap();
        let e = load(&path).unwrap_err();
        assert!(matches!(e, CheckpointError::Corrupt { .. }), "{e}");
        std::fs::write(&path, r#"{"version":9,"entries":[]}"#).unwrap();
        assert!(load(&path).unwrap_err().to_string().contains("version 9"));
    }

    #[test]
    fn hex_round_trips() {
        assert_eq!(
            from_hex(&to_hex(&[0, 1, 254, 255])).unwrap(),
            [0, 1, 254, 255]
        );
        assert_eq!(from_hex("abc"), None);
        assert_eq!(from_hex("zz"), None);
    }
}
