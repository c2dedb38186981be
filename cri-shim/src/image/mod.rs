//! The image store: a content-addressed layout under `ROOT/images`.
//!
//! - `layers/<chain ID>/`: one unpacked layer each (an overlayfs lower dir), shared by every
//!   image containing the same layer stack; created under a temporary name and renamed in.
//! - `index.json`: the images (ID = config digest, tags, digests, chain IDs, config),
//!   replaced atomically on every change.
//!
//! Lookups accept what the kubelet sends: an image ID (`sha256:...` or bare hex), a tagged or
//! digested reference, or a short name (`busybox` = `docker.io/library/busybox:latest`).

pub mod hosts;
pub mod pull;
pub mod unpack;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use oci_client::Reference;
use oci_spec::image::ImageConfiguration;
use serde::{Deserialize, Serialize};

use crate::store::{self, StoreError};

/// What went wrong in the image store or while pulling.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The reference does not parse.
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference {
        /// What was given.
        reference: String,
        /// The parser's complaint.
        reason: String,
    },
    /// No such image in the store.
    #[error("image {0:?} not found")]
    NotFound(String),
    /// The registry has no such repository, tag or digest.
    #[error("failed to pull image {reference:?}: not found: {message}")]
    RemoteNotFound {
        /// The reference pulled.
        reference: String,
        /// The registry's answer.
        message: String,
    },
    /// The registry refused our credentials.
    #[error("failed to pull image {reference:?}: unauthorized: {message}")]
    Unauthorized {
        /// The reference pulled.
        reference: String,
        /// The registry's answer.
        message: String,
    },
    /// Any other registry or transport failure.
    #[error("failed to pull image {reference:?}: {source}")]
    Registry {
        /// The reference pulled.
        reference: String,
        /// The client error.
        #[source]
        source: oci_client::errors::OciDistributionError,
    },
    /// The registry's `hosts.toml` cannot be used.
    #[error("failed to pull image {reference:?}: {source}")]
    Hosts {
        /// The reference pulled.
        reference: String,
        /// What is wrong with the file.
        #[source]
        source: hosts::HostsError,
    },
    /// The registry's `hosts.toml` leaves no host able to serve the request.
    #[error("failed to pull image {reference:?}: no registry host has the capability needed")]
    NoHost {
        /// The reference pulled.
        reference: String,
    },
    /// The image's config or manifest is unusable.
    #[error("image {reference:?}: {reason}")]
    BadImage {
        /// The reference pulled.
        reference: String,
        /// What is wrong.
        reason: String,
    },
    /// A layer failed to unpack or verify.
    #[error("image {reference:?}: {source}")]
    Unpack {
        /// The reference pulled.
        reference: String,
        /// The unpack failure.
        #[source]
        source: unpack::UnpackError,
    },
    /// Store files could not be read or written.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One image in the store.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ImageRecord {
    /// `sha256:<config digest>`.
    pub id: String,
    /// Normalised tagged references (`docker.io/library/busybox:latest`).
    pub repo_tags: Vec<String>,
    /// Normalised digested references (`docker.io/library/busybox@sha256:...`).
    pub repo_digests: Vec<String>,
    /// Compressed size of config and layers, as registries report it.
    pub size: u64,
    /// Chain IDs of the layers, bottom first (the overlay lower dirs, reversed).
    pub chain_ids: Vec<String>,
    /// The image configuration.
    pub config: ImageConfiguration,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Index {
    images: BTreeMap<String, ImageRecord>,
}

/// The store; cheap lookups under one mutex, the index file rewritten on each change.
#[derive(Debug)]
pub struct ImageStore {
    root: PathBuf,
    index: Mutex<Index>,
}

/// Normalises a reference the way the kubelet and containerd name images.
pub fn normalize(reference: &str) -> Result<Reference, ImageError> {
    reference
        .parse::<Reference>()
        .map_err(|e| ImageError::InvalidReference {
            reference: reference.to_string(),
            reason: e.to_string(),
        })
}

fn chain_dir_name(chain_id: &str) -> &str {
    chain_id.strip_prefix("sha256:").unwrap_or(chain_id)
}

impl ImageStore {
    /// Opens (creating) the store under `root` (`ROOT/images`).
    pub fn open(root: PathBuf) -> Result<Self, ImageError> {
        for d in ["layers", "tmp"] {
            let dir = root.join(d);
            fs::create_dir_all(&dir).map_err(|source| StoreError::Io { path: dir, source })?;
        }
        // Half-written pulls of a crashed shim.
        let tmp = root.join("tmp");
        store::remove_dir_all(&tmp)?;
        fs::create_dir_all(&tmp).map_err(|source| StoreError::Io { path: tmp, source })?;
        let index = store::read_json(&root.join("index.json"))?.unwrap_or_default();
        Ok(Self {
            root,
            index: Mutex::new(index),
        })
    }

    /// The store's directory (its "filesystem" for ImageFsInfo).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Scratch space for a pull (removed at next start if left over).
    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// The unpacked directory of a layer stack.
    pub fn layer_dir(&self, chain_id: &str) -> PathBuf {
        self.root.join("layers").join(chain_dir_name(chain_id))
    }

    /// Whether a layer stack is already unpacked.
    pub fn has_layer(&self, chain_id: &str) -> bool {
        self.layer_dir(chain_id).is_dir()
    }

    /// Moves a freshly unpacked layer into place; if a concurrent pull won, `dir` is dropped.
    pub fn commit_layer(&self, chain_id: &str, dir: &Path) -> Result<(), ImageError> {
        let target = self.layer_dir(chain_id);
        if fs::rename(dir, &target).is_err() && target.is_dir() {
            store::remove_dir_all(dir)?;
            return Ok(());
        }
        if !target.is_dir() {
            return Err(StoreError::Io {
                path: target,
                source: std::io::Error::other("layer rename failed"),
            }
            .into());
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn save(&self, index: &Index) -> Result<(), ImageError> {
        Ok(store::write_json_durable(
            &self.root.join("index.json"),
            index,
        )?)
    }

    /// Records a pulled image; its tag moves here from any image that had it.
    pub fn add(&self, mut record: ImageRecord) -> Result<(), ImageError> {
        let mut index = self.lock();
        for other in index.images.values_mut().filter(|o| o.id != record.id) {
            other.repo_tags.retain(|t| !record.repo_tags.contains(t));
        }
        if let Some(old) = index.images.get(&record.id) {
            let tags: BTreeSet<String> = old
                .repo_tags
                .iter()
                .chain(&record.repo_tags)
                .cloned()
                .collect();
            let digests: BTreeSet<String> = old
                .repo_digests
                .iter()
                .chain(&record.repo_digests)
                .cloned()
                .collect();
            record.repo_tags = tags.into_iter().collect();
            record.repo_digests = digests.into_iter().collect();
        }
        index.images.insert(record.id.clone(), record);
        self.save(&index)
    }

    /// Finds an image by ID, reference or short name.
    pub fn get(&self, name: &str) -> Option<ImageRecord> {
        let index = self.lock();
        let bare = name.strip_prefix("sha256:").unwrap_or(name);
        if bare.len() == 64 && bare.chars().all(|c| c.is_ascii_hexdigit()) {
            if let Some(img) = index.images.get(&format!("sha256:{bare}")) {
                return Some(img.clone());
            }
        }
        let reference = normalize(name).ok()?;
        let wanted = match reference.digest() {
            Some(d) => format!("{}/{}@{d}", reference.registry(), reference.repository()),
            None => reference.whole(),
        };
        index
            .images
            .values()
            .find(|i| i.repo_tags.contains(&wanted) || i.repo_digests.contains(&wanted))
            .cloned()
    }

    /// Every image.
    pub fn list(&self) -> Vec<ImageRecord> {
        self.lock().images.values().cloned().collect()
    }

    /// Removes the image `name` (idempotent) and every unpacked layer no image and no entry
    /// of `in_use` (chain IDs of existing containers) needs any more.
    pub fn remove(&self, name: &str, in_use: &HashSet<String>) -> Result<(), ImageError> {
        let Some(img) = self.get(name) else {
            return Ok(());
        };
        let mut index = self.lock();
        index.images.remove(&img.id);
        self.save(&index)?;
        let needed: HashSet<&str> = index
            .images
            .values()
            .flat_map(|i| i.chain_ids.iter().map(|c| chain_dir_name(c)))
            .chain(in_use.iter().map(|c| chain_dir_name(c)))
            .collect();
        let layers = self.root.join("layers");
        for entry in fs::read_dir(&layers)
            .map_err(|source| StoreError::Io {
                path: layers.clone(),
                source,
            })?
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !needed.contains(name.as_str()) {
                store::remove_dir_all(&entry.path())?;
            }
        }
        Ok(())
    }
}

/// Bytes and inodes used under `dir` (not following symlinks or other filesystems).
pub fn disk_usage(dir: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let Ok(top) = fs::symlink_metadata(dir) else {
        return (0, 0);
    };
    let mut stack = vec![dir.to_path_buf()];
    let (mut bytes, mut inodes) = (0u64, 0u64);
    let mut seen = HashSet::new();
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.dev() != top.dev() || !seen.insert(m.ino()) {
                continue;
            }
            inodes += 1;
            bytes += m.blocks() * 512;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    (bytes, inodes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, tags: &[&str], chains: &[&str]) -> ImageRecord {
        ImageRecord {
            id: format!("sha256:{}", id.repeat(64 / id.len())),
            repo_tags: tags.iter().map(|s| s.to_string()).collect(),
            repo_digests: vec![],
            size: 1,
            chain_ids: chains.iter().map(|c| format!("sha256:{c}")).collect(),
            config: ImageConfiguration::default(),
        }
    }

    #[test]
    fn lookup_by_id_short_name_and_tag_and_tags_move_on_repull() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path().to_path_buf()).unwrap();
        store
            .add(record("a", &["docker.io/library/busybox:latest"], &["c1"]))
            .unwrap();
        let a = store.get("busybox").unwrap();
        assert_eq!(store.get(&a.id).unwrap().id, a.id);
        assert_eq!(
            store.get(a.id.trim_start_matches("sha256:")).unwrap().id,
            a.id
        );
        assert!(store.get("docker.io/library/busybox:other").is_none());
        store
            .add(record("b", &["docker.io/library/busybox:latest"], &["c2"]))
            .unwrap();
        assert_ne!(store.get("busybox").unwrap().id, a.id);
        assert!(store.get(&a.id).unwrap().repo_tags.is_empty());
        let reopened = ImageStore::open(dir.path().to_path_buf()).unwrap();
        assert_eq!(reopened.list().len(), 2);
    }

    #[test]
    fn remove_is_idempotent_and_keeps_layers_still_needed() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path().to_path_buf()).unwrap();
        for c in ["c1", "c2", "c3"] {
            fs::create_dir_all(store.layer_dir(&format!("sha256:{c}"))).unwrap();
        }
        store
            .add(record("a", &["docker.io/r/a:1"], &["c1", "c2"]))
            .unwrap();
        store
            .add(record("b", &["docker.io/r/b:1"], &["c1"]))
            .unwrap();
        let in_use: HashSet<String> = ["sha256:c3".to_string()].into();
        store.remove("r/a:1", &in_use).unwrap();
        store.remove("r/a:1", &in_use).unwrap();
        assert!(store.has_layer("sha256:c1") && store.has_layer("sha256:c3"));
        assert!(!store.has_layer("sha256:c2"));
        assert!(store.get("r/a:1").is_none());
    }
}
