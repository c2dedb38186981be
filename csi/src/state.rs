//! The driver's state on disk: one JSON file per volume, per snapshot and per staged volume
//! under `--state-dir`, each written crash-safely by `nodekit_nsutil::durable` (temp file,
//! fsync, rename, and an fsync of the directory where the new record must survive a crash),
//! so a reader sees the old record or the new one, never a torn one.
//!
//! A staged volume's published targets live in a file of their own, written without any
//! fsync (temp file and rename: a process crash still sees old or new): a power loss unmounts
//! every target anyway, so after one the file is only a hint that the reconcile checks
//! against the mount table, and a torn one reads as "no publications". An empty set is no
//! file.
//!
//! Node records are written and removed without fsync too. A node record describes kernel
//! state (a loop device, a staging mount) that a power loss takes away, and the kubelet
//! stages again when it finds the staging path unmounted, so losing one loses no data and
//! no mount; a torn one reads as "not staged". Each carries the boot it was written in, and
//! the startup reconcile drops records from an earlier boot instead of re-mounting them, so
//! a removal that a power loss undid cannot bring back a volume the kubelet had unstaged.
//!
//! Layout: `volumes/<volume-id>.json` and `snapshots/<snapshot-id>.json` (controller),
//! `node/<volume-id>.json` and `publications/<volume-id>.json` (node). Controller and node
//! records live in separate files so the two services can run as separate processes on one
//! state directory.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use nodekit_nsutil::durable;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::fstools::FsType;
use crate::loopdev::LoopDevice;

/// A record kind, i.e. a subdirectory of the state directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// [`VolumeRecord`]s.
    Volumes,
    /// [`SnapshotRecord`]s.
    Snapshots,
    /// [`NodeRecord`]s (not durable: see the module doc).
    Node,
    /// [`Publications`] of staged volumes (not durable: see the module doc).
    Publications,
}

impl Kind {
    fn dir(self) -> &'static str {
        match self {
            Self::Volumes => "volumes",
            Self::Snapshots => "snapshots",
            Self::Node => "node",
            Self::Publications => "publications",
        }
    }
}

/// A state file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A file operation failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A record is not valid JSON of its kind.
    #[error("state file {path} is corrupt")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
}

/// Whether a record's object is complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Being made: its image may be partial. A crash leaves this; the next attempt (or
    /// delete) starts over.
    Creating,
    /// Complete and reported to the CO.
    Ready,
}

/// Where a volume's initial content came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind", content = "id")]
pub enum ContentSource {
    /// A snapshot's ID.
    Snapshot(String),
    /// Another volume's ID.
    Volume(String),
}

/// A volume, as the controller knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeRecord {
    /// The volume ID.
    pub id: String,
    /// The CO's name for it.
    pub name: String,
    /// Its size in bytes (the image's apparent size).
    pub capacity: u64,
    /// The filesystem made on it; `None` for a raw block volume.
    pub fs_type: Option<FsType>,
    /// The CreateVolume parameters.
    pub parameters: BTreeMap<String, String>,
    /// Its content source.
    pub source: Option<ContentSource>,
    /// Complete or not.
    pub phase: Phase,
}

/// A snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotRecord {
    /// The snapshot ID.
    pub id: String,
    /// The CO's name for it.
    pub name: String,
    /// The volume it was cut from.
    pub source_volume_id: String,
    /// The source's size when cut.
    pub size: u64,
    /// The source's filesystem (`None`: raw block).
    pub fs_type: Option<FsType>,
    /// When it was cut: seconds since the epoch.
    pub created_secs: i64,
    /// ... and nanoseconds.
    pub created_nanos: i32,
    /// Complete or not.
    pub phase: Phase,
}

/// How a volume is staged or published: compared for the spec's idempotency rules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "type")]
pub enum AccessRecord {
    /// A filesystem.
    Mount {
        /// Its type.
        fs_type: FsType,
        /// The mount flags asked for.
        mount_flags: Vec<String>,
    },
    /// A raw block device.
    Block,
}

/// One published target of a staged volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Publication {
    /// The access type and its options.
    pub access: AccessRecord,
    /// The CSI access mode (enum value).
    pub access_mode: i32,
    /// Published read-only.
    pub readonly: bool,
}

/// The published targets of a staged volume (resolved paths).
pub type Publications = BTreeMap<PathBuf, Publication>;

/// A volume staged on this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeRecord {
    /// The volume ID.
    pub volume_id: String,
    /// The image file backing it.
    pub image: PathBuf,
    /// The staging path (resolved).
    pub staging_path: PathBuf,
    /// How it is staged.
    pub access: AccessRecord,
    /// The CSI access mode it was staged with.
    pub access_mode: i32,
    /// The loop device it was attached to, checked against its backing file before use
    /// (found by listing every device when absent or stale).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loop_device: Option<LoopDevice>,
    /// The boot it was staged in (`/proc/sys/kernel/random/boot_id`): a record from another
    /// boot describes a loop device and mounts that the reboot took away. `None` in records
    /// written before boots were recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
    /// Published targets (resolved paths); kept in [`Kind::Publications`] on disk.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub publications: Publications,
}

/// A record as read back by [`StateStore::get_or_torn`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored<T> {
    /// Complete.
    Whole(T),
    /// Torn by a power loss during a [`StateStore::put_volatile`].
    Torn,
}

/// The state directory.
#[derive(Debug, Clone)]
pub struct StateStore {
    root: PathBuf,
}

impl StateStore {
    /// Opens (creating) the state directory at `root`; removes temp files a crash left.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, StateError> {
        let store = Self { root: root.into() };
        for kind in [
            Kind::Volumes,
            Kind::Snapshots,
            Kind::Node,
            Kind::Publications,
        ] {
            let dir = store.dir(kind);
            std::fs::create_dir_all(&dir).map_err(|source| StateError::Io {
                op: "creating",
                path: dir.clone(),
                source,
            })?;
            for entry in read_dir(&dir)? {
                if entry.extension().is_some_and(|e| e == "tmp") {
                    let _ = std::fs::remove_file(&entry);
                }
            }
        }
        Ok(store)
    }

    fn dir(&self, kind: Kind) -> PathBuf {
        self.root.join(kind.dir())
    }

    fn file(&self, kind: Kind, id: &str) -> PathBuf {
        self.dir(kind).join(format!("{id}.json"))
    }

    /// Reads record `id` of `kind`; `None` when absent.
    pub fn get<T: DeserializeOwned>(&self, kind: Kind, id: &str) -> Result<Option<T>, StateError> {
        match self.read(kind, id)? {
            Some((path, bytes)) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| StateError::Corrupt { path, source }),
            None => Ok(None),
        }
    }

    /// Reads record `id` of `kind`, telling a record torn by a power loss during
    /// [`Self::put_volatile`] (empty or zero-filled: its data never reached the disk) from
    /// a whole one; any other damage is [`StateError::Corrupt`].
    pub fn get_or_torn<T: DeserializeOwned>(
        &self,
        kind: Kind,
        id: &str,
    ) -> Result<Option<Stored<T>>, StateError> {
        match self.read(kind, id)? {
            Some((_, bytes)) if bytes.iter().all(|b| *b == 0) => Ok(Some(Stored::Torn)),
            Some((path, bytes)) => serde_json::from_slice(&bytes)
                .map(|r| Some(Stored::Whole(r)))
                .map_err(|source| StateError::Corrupt { path, source }),
            None => Ok(None),
        }
    }

    fn read(&self, kind: Kind, id: &str) -> Result<Option<(PathBuf, Vec<u8>)>, StateError> {
        let path = self.file(kind, id);
        match std::fs::read(&path) {
            Ok(bytes) => Ok(Some((path, bytes))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StateError::Io {
                op: "reading",
                path,
                source,
            }),
        }
    }

    /// Writes record `id` of `kind` atomically and durably: after a crash the new record is
    /// there.
    pub fn put<T: Serialize>(&self, kind: Kind, id: &str, record: &T) -> Result<(), StateError> {
        self.prepare(kind, id, record)?.commit()
    }

    /// [`Self::put`] in two steps: the record is written and fsynced beside its file now,
    /// and takes its place at [`PreparedRecord::commit`], so the fsync can overlap work that
    /// must finish before the record may change (dropped uncommitted, it leaves nothing).
    pub fn prepare<T: Serialize>(
        &self,
        kind: Kind,
        id: &str,
        record: &T,
    ) -> Result<PreparedRecord, StateError> {
        let path = self.file(kind, id);
        let bytes = encode(&path, record)?;
        Ok(PreparedRecord(durable::prepare(&path, &bytes)?))
    }

    /// Writes record `id` of `kind` without any fsync: after a process crash the old record
    /// or the new one is there; after a power loss it may be old, new, missing or torn (see
    /// [`Self::get_or_torn`]). Only for records a crash lets the driver re-derive or redo:
    /// node records and publications (kernel state a power loss clears) and `Creating`
    /// records.
    pub fn put_volatile<T: Serialize>(
        &self,
        kind: Kind,
        id: &str,
        record: &T,
    ) -> Result<(), StateError> {
        let path = self.file(kind, id);
        let bytes = encode(&path, record)?;
        Ok(durable::write_volatile(&path, &bytes)?)
    }

    /// Removes record `id` of `kind` durably; OK when absent.
    pub fn remove(&self, kind: Kind, id: &str) -> Result<(), StateError> {
        if self.remove_volatile(kind, id)? {
            self.sync_dir(kind)?;
        }
        Ok(())
    }

    /// Removes record `id` of `kind` without waiting for the disk (see
    /// [`Self::put_volatile`]); returns whether it was there.
    pub fn remove_volatile(&self, kind: Kind, id: &str) -> Result<bool, StateError> {
        let path = self.file(kind, id);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(StateError::Io {
                op: "removing",
                path,
                source,
            }),
        }
    }

    /// The IDs of every record of `kind`, sorted.
    pub fn ids(&self, kind: Kind) -> Result<Vec<String>, StateError> {
        let mut ids: Vec<String> = read_dir(&self.dir(kind))?
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .filter_map(|p| p.file_stem().and_then(|s| s.to_str()).map(str::to_string))
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// Every readable record of `kind`, sorted by ID. A corrupt file is skipped with a
    /// warning so one bad record does not hide the others.
    pub fn list<T: DeserializeOwned>(&self, kind: Kind) -> Result<Vec<T>, StateError> {
        let mut out = Vec::new();
        for id in self.ids(kind)? {
            match self.get(kind, &id) {
                Ok(Some(r)) => out.push(r),
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "skipping unreadable state file"),
            }
        }
        Ok(out)
    }

    fn sync_dir(&self, kind: Kind) -> Result<(), StateError> {
        Ok(durable::sync_dir(&self.dir(kind))?)
    }
}

/// A record written durably beside its file, not yet in place (see [`StateStore::prepare`]).
#[derive(Debug)]
pub struct PreparedRecord(durable::Prepared);

impl PreparedRecord {
    /// Puts the record in place, durably.
    pub fn commit(self) -> Result<(), StateError> {
        Ok(self.0.commit()?)
    }
}

/// A record's file content.
fn encode<T: Serialize>(path: &Path, record: &T) -> Result<Vec<u8>, StateError> {
    serde_json::to_vec_pretty(record).map_err(|source| StateError::Corrupt {
        path: path.to_path_buf(),
        source,
    })
}

impl From<durable::WriteError> for StateError {
    fn from(e: durable::WriteError) -> Self {
        Self::Io {
            op: e.step,
            path: e.path,
            source: e.source,
        }
    }
}

fn read_dir(dir: &Path) -> Result<Vec<PathBuf>, StateError> {
    let entries = std::fs::read_dir(dir).map_err(|source| StateError::Io {
        op: "listing",
        path: dir.to_path_buf(),
        source,
    })?;
    Ok(entries.flatten().map(|e| e.path()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn volume(id: &str) -> VolumeRecord {
        VolumeRecord {
            id: id.into(),
            name: format!("name-{id}"),
            capacity: 1 << 30,
            fs_type: Some(FsType::Xfs),
            parameters: BTreeMap::from([("fsType".into(), "xfs".into())]),
            source: Some(ContentSource::Snapshot("nks-1".into())),
            phase: Phase::Ready,
        }
    }

    #[test]
    fn records_round_trip_list_sorted_and_remove_idempotently() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = StateStore::open(dir.path()).expect("open");
        store.put(Kind::Volumes, "b", &volume("b")).expect("put");
        store.put(Kind::Volumes, "a", &volume("a")).expect("put");
        assert_eq!(
            store.get::<VolumeRecord>(Kind::Volumes, "a").expect("get"),
            Some(volume("a"))
        );
        assert_eq!(store.ids(Kind::Volumes).expect("ids"), vec!["a", "b"]);
        let listed: Vec<VolumeRecord> = store.list(Kind::Volumes).expect("list");
        assert_eq!(listed, vec![volume("a"), volume("b")]);
        store.remove(Kind::Volumes, "a").expect("remove");
        store.remove(Kind::Volumes, "a").expect("remove again");
        assert_eq!(
            store.get::<VolumeRecord>(Kind::Volumes, "a").expect("get"),
            None
        );
        assert!(store.ids(Kind::Snapshots).expect("ids").is_empty());
    }

    #[test]
    fn leftover_temp_files_are_ignored_and_cleaned_and_corrupt_ones_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = StateStore::open(dir.path()).expect("open");
        store.put(Kind::Volumes, "a", &volume("a")).expect("put");
        std::fs::write(dir.path().join("volumes/b.json.tmp"), b"{half").expect("write");
        std::fs::write(dir.path().join("volumes/c.json"), b"{garbage").expect("write");
        let listed: Vec<VolumeRecord> = store.list(Kind::Volumes).expect("list");
        assert_eq!(listed, vec![volume("a")]);
        assert!(matches!(
            store.get::<VolumeRecord>(Kind::Volumes, "c"),
            Err(StateError::Corrupt { .. })
        ));
        StateStore::open(dir.path()).expect("reopen");
        assert!(!dir.path().join("volumes/b.json.tmp").exists());
    }

    #[test]
    fn a_volatile_record_torn_by_a_power_loss_reads_as_torn_and_other_damage_as_corrupt() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = StateStore::open(dir.path()).expect("open");
        store
            .put_volatile(Kind::Volumes, "a", &volume("a"))
            .expect("put");
        assert_eq!(
            store.get_or_torn(Kind::Volumes, "a").expect("get"),
            Some(Stored::Whole(volume("a")))
        );
        std::fs::write(dir.path().join("volumes/a.json"), b"").expect("truncate");
        std::fs::write(dir.path().join("volumes/b.json"), [0u8; 64]).expect("zeros");
        std::fs::write(dir.path().join("volumes/c.json"), b"{garbage").expect("write");
        for id in ["a", "b"] {
            assert_eq!(
                store
                    .get_or_torn::<VolumeRecord>(Kind::Volumes, id)
                    .expect("get"),
                Some(Stored::Torn)
            );
        }
        assert!(matches!(
            store.get_or_torn::<VolumeRecord>(Kind::Volumes, "c"),
            Err(StateError::Corrupt { .. })
        ));
        assert!(store.remove_volatile(Kind::Volumes, "a").expect("remove"));
        assert!(!store.remove_volatile(Kind::Volumes, "a").expect("again"));
    }

    #[test]
    fn the_on_disk_shape_is_stable_json() {
        let json = serde_json::to_value(volume("a")).expect("json");
        assert_eq!(json["fsType"], "xfs");
        assert_eq!(json["source"]["kind"], "snapshot");
        assert_eq!(json["phase"], "ready");
    }
}
