//! The startup reconcile: makes the kernel match the state files after a crash or restart.
//! Clears creates that never finished, forgets node records that a power loss tore or that
//! an earlier boot wrote (the kubelet stages those again), re-attaches and re-mounts what
//! volumes staged in this boot need, forgets publications whose mounts are gone, and
//! detaches loop devices on pool images
//! that no staged volume owns. It never deletes an image that a ready record names, and
//! leaves any device that is still mounted somewhere.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::driver::Driver;
use crate::error::CsiError;
use crate::image;
use crate::loopdev::LoopDevice;
use crate::mountinfo;
use crate::state::{
    AccessRecord, Kind, NodeRecord, Phase, Publications, SnapshotRecord, Stored, VolumeRecord,
};

/// What the reconcile changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reconciled {
    /// Volumes and snapshots whose interrupted create was cleared.
    pub cleared: Vec<String>,
    /// Staged volumes whose loop device was attached again.
    pub reattached: Vec<String>,
    /// Staged volumes whose staging mount was made again.
    pub remounted: Vec<String>,
    /// Loop devices detached because no staged volume owns their image.
    pub detached: Vec<LoopDevice>,
    /// Node records dropped: torn by a power loss, or written before the last reboot.
    pub forgotten: Vec<String>,
}

impl Driver {
    /// Runs the reconcile for the services this process serves.
    pub fn reconcile(&self) -> Result<Reconciled, CsiError> {
        let mut done = Reconciled::default();
        if self.config.mode.controller() {
            self.clear_interrupted_creates(&mut done)?;
        }
        if self.config.mode.node() {
            let owned = self.restore_staged(&mut done)?;
            self.detach_orphans(&owned, &mut done)?;
        }
        tracing::info!(?done, "startup reconcile finished");
        Ok(done)
    }

    /// Clears `Creating` records (and torn ones: only a `Creating` record is written
    /// without fsync) with their partial images.
    fn clear_interrupted_creates(&self, done: &mut Reconciled) -> Result<(), CsiError> {
        for id in self.store.ids(Kind::Volumes)? {
            let Some(vid) = crate::ids::VolumeId::parse(&id) else {
                continue;
            };
            if self.interrupted::<VolumeRecord>(Kind::Volumes, &id, |v| v.phase) {
                image::remove(&self.volume_image(&vid))?;
                self.store.remove(Kind::Volumes, &id)?;
                done.cleared.push(id);
            }
        }
        for id in self.store.ids(Kind::Snapshots)? {
            let Some(sid) = crate::ids::SnapshotId::parse(&id) else {
                continue;
            };
            if self.interrupted::<SnapshotRecord>(Kind::Snapshots, &id, |s| s.phase) {
                image::remove(&self.snapshot_image(&sid))?;
                self.store.remove(Kind::Snapshots, &id)?;
                done.cleared.push(id);
            }
        }
        Ok(())
    }

    /// Whether record `id` is an interrupted create; an unreadable one is left alone.
    fn interrupted<T: serde::de::DeserializeOwned>(
        &self,
        kind: Kind,
        id: &str,
        phase: impl Fn(&T) -> Phase,
    ) -> bool {
        match self.store.get_or_torn::<T>(kind, id) {
            Ok(Some(Stored::Whole(r))) => phase(&r) == Phase::Creating,
            Ok(Some(Stored::Torn)) => true,
            Ok(None) => false,
            Err(e) => {
                tracing::warn!(error = %e, "skipping unreadable state file");
                false
            }
        }
    }

    /// Re-attaches and re-mounts staged volumes; returns the images they own.
    fn restore_staged(&self, done: &mut Reconciled) -> Result<BTreeSet<PathBuf>, CsiError> {
        let mut owned = BTreeSet::new();
        // One look at the kernel for every record: each volume has its own image, staging
        // path and targets, so what one record's repair changes no other record reads.
        let attached = self.loops.list()?;
        let mounts = self.mounter.mounts()?;
        self.forget_stale_stages(done)?;
        for rec in self.store.list::<NodeRecord>(Kind::Node)? {
            let mut rec = self.with_publications(rec)?;
            owned.insert(rec.image.clone());
            if !rec.image.exists() {
                tracing::warn!(volume = %rec.volume_id, image = %rec.image.display(), "staged volume's image is missing");
                continue;
            }
            let found = attached
                .iter()
                .find(|a| a.backing == rec.image && !a.deleted);
            let device = match found {
                Some(a) => a.device,
                None => {
                    let d = self.loops.attach(&rec.image)?;
                    done.reattached.push(rec.volume_id.clone());
                    d
                }
            };
            if rec.loop_device != Some(device) {
                // Publications keep their own file.
                let remembered = NodeRecord {
                    loop_device: Some(device),
                    publications: Publications::new(),
                    ..rec.clone()
                };
                self.store
                    .put_volatile(Kind::Node, &rec.volume_id, &remembered)?;
            }
            if let AccessRecord::Mount {
                fs_type,
                mount_flags,
            } = &rec.access
            {
                let mounted = mountinfo::topmost_at(&mounts, &rec.staging_path)
                    .is_some_and(|m| Path::new(&m.source) == device.path());
                if !mounted {
                    let options = crate::stage::fs_options(*fs_type, mount_flags)?;
                    match self.mounter.mount_fs(
                        &device.path(),
                        &rec.staging_path,
                        fs_type.name(),
                        &options,
                    ) {
                        Ok(()) => done.remounted.push(rec.volume_id.clone()),
                        Err(e) => {
                            tracing::warn!(volume = %rec.volume_id, error = %e, "could not re-mount the staging path")
                        }
                    }
                }
            }
            let before = rec.publications.len();
            rec.publications
                .retain(|target, _| mountinfo::topmost_at(&mounts, target).is_some());
            if rec.publications.len() != before {
                self.put_publications(&rec.volume_id, &rec.publications)?;
            }
        }
        // Publications of volumes no longer staged: a remove that a power loss undid.
        let staged = self.store.ids(Kind::Node)?;
        for id in self.store.ids(Kind::Publications)? {
            if !staged.contains(&id) {
                self.store.remove_volatile(Kind::Publications, &id)?;
            }
        }
        Ok(owned)
    }

    /// Removes node records torn by a power loss or written before the last reboot (their
    /// publications go with them below): the reboot took their loop devices and mounts, and
    /// the kubelet stages again whatever its pods still use.
    fn forget_stale_stages(&self, done: &mut Reconciled) -> Result<(), CsiError> {
        for id in self.store.ids(Kind::Node)? {
            let stale = match self.store.get_or_torn::<NodeRecord>(Kind::Node, &id) {
                Ok(Some(Stored::Torn)) => true,
                Ok(Some(Stored::Whole(rec))) => {
                    rec.boot_id.is_some_and(|boot| boot != self.boot_id)
                }
                Ok(None) | Err(_) => false,
            };
            if stale {
                tracing::info!(volume = %id, "node record torn or from an earlier boot: not staged");
                self.store.remove_volatile(Kind::Node, &id)?;
                done.forgotten.push(id);
            }
        }
        Ok(())
    }

    fn detach_orphans(
        &self,
        owned: &BTreeSet<PathBuf>,
        done: &mut Reconciled,
    ) -> Result<(), CsiError> {
        let mounts = self.mounter.mounts()?;
        let dirs = self.image_dirs();
        for attached in self.loops.list()? {
            let in_pool = dirs.iter().any(|d| attached.backing.parent() == Some(*d));
            if !in_pool || (owned.contains(&attached.backing) && !attached.deleted) {
                continue;
            }
            let dev = attached.device.path();
            let node_name = format!("/{}", attached.device.name());
            let in_use = mounts
                .iter()
                .any(|m| Path::new(&m.source) == dev || m.root == Path::new(&node_name));
            if in_use {
                tracing::warn!(device = %attached.device, backing = %attached.backing.display(), "unowned loop device is still mounted; leaving it");
                continue;
            }
            self.loops.detach(attached.device)?;
            done.detached.push(attached.device);
        }
        Ok(())
    }
}
