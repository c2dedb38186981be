//! The node's blocking operations: stage (attach the image to a loop device, make sure the
//! filesystem exists and fills the device, mount it), publish (bind mounts), their reverses,
//! node expansion and stats. Callers have validated the request (paths resolved) and hold
//! the volume's in-flight claim. Every step checks the kernel's state first, so repeating a
//! call never stacks mounts or loop devices; a failed stage undoes what it did.

use std::io;
use std::path::Path;

use nix::mount::MsFlags;

use crate::capability::{Access, Capability};
use crate::driver::Driver;
use crate::error::CsiError;
use crate::fstools::{FsInfo, FsType};
use crate::ids::VolumeId;
use crate::loopdev::LoopDevice;
use crate::mounter::MountOptions;
use crate::mountinfo::MountEntry;
use crate::state::{AccessRecord, Kind, NodeRecord, Publication, Publications, StateError, Stored};

use nodekit_proto::csi::v1::volume_capability::access_mode::Mode;

/// A staged volume's usage, for NodeGetVolumeStats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Total bytes.
    pub total: u64,
    /// Bytes available to unprivileged writers (`None` for block).
    pub available: Option<u64>,
    /// Used bytes (`None` for block).
    pub used: Option<u64>,
    /// Inodes: (total, free, used), for filesystems.
    pub inodes: Option<(u64, u64, u64)>,
}

/// What is wrong with a staged volume, if anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    /// Whether something is wrong.
    pub abnormal: bool,
    /// What.
    pub message: String,
}

/// Detaches a device attached by a stage that then failed, unless defused.
struct DetachOnFailure<'a> {
    driver: &'a Driver,
    device: Option<LoopDevice>,
}

impl Drop for DetachOnFailure<'_> {
    fn drop(&mut self) {
        if let Some(device) = self.device.take() {
            if let Err(e) = self.driver.loops.detach(device) {
                tracing::warn!(%device, error = %e, "rollback: detaching");
            }
        }
    }
}

impl Driver {
    /// The node record of a volume, with its publications. A torn record, which only a
    /// power loss during its volatile write leaves, means not staged: the power loss took
    /// the loop device and the mount with it.
    pub fn node_record(&self, id: &VolumeId) -> Result<Option<NodeRecord>, CsiError> {
        match self
            .store
            .get_or_torn::<NodeRecord>(Kind::Node, id.as_str())?
        {
            Some(Stored::Whole(rec)) => Ok(Some(self.with_publications(rec)?)),
            Some(Stored::Torn) | None => Ok(None),
        }
    }

    /// `rec` with the publications from their own file (a record written before they had
    /// one keeps its own). A torn file, which only a power loss leaves, means none: a power
    /// loss unmounts every target.
    pub(crate) fn with_publications(&self, mut rec: NodeRecord) -> Result<NodeRecord, CsiError> {
        match self
            .store
            .get::<Publications>(Kind::Publications, &rec.volume_id)
        {
            Ok(Some(publications)) => rec.publications = publications,
            Ok(None) => {}
            Err(StateError::Corrupt { path, .. }) => {
                tracing::warn!(path = %path.display(), "torn publications file: none assumed");
                rec.publications.clear();
            }
            Err(e) => return Err(e.into()),
        }
        Ok(rec)
    }

    /// Records the publications of `id` (not durably: see [`Kind::Publications`]); none is
    /// no file, which an unlink records more cheaply than a rewrite.
    pub(crate) fn put_publications(
        &self,
        id: &str,
        publications: &Publications,
    ) -> Result<(), CsiError> {
        if publications.is_empty() {
            self.store.remove_volatile(Kind::Publications, id)?;
            return Ok(());
        }
        Ok(self
            .store
            .put_volatile(Kind::Publications, id, publications)?)
    }

    /// The loop devices backing a staged volume's image: the one its record remembers while
    /// that still backs the image (one sysfs read), else every one a listing finds.
    fn staged_devices(&self, record: &NodeRecord) -> Result<Vec<LoopDevice>, CsiError> {
        if let Some(device) = record.loop_device {
            let current = self.loops.backing(device)?;
            if current.is_some_and(|a| a.backing == record.image && !a.deleted) {
                return Ok(vec![device]);
            }
        }
        Ok(self.loops.find(&record.image)?)
    }

    /// The loop device backing `image` (`record`'s when it is staged), attaching one if
    /// none is (`true` when attached now).
    fn ensure_attached(
        &self,
        image: &Path,
        record: Option<&NodeRecord>,
    ) -> Result<(LoopDevice, bool), CsiError> {
        let found = match record {
            Some(rec) => self.staged_devices(rec)?,
            None => self.loops.find(image)?,
        };
        if let Some(device) = found.first() {
            return Ok((*device, false));
        }
        Ok((self.loops.attach(image)?, true))
    }

    /// Whether `device`'s filesystem is mounted at `path`.
    fn fs_mounted_at(&self, device: LoopDevice, path: &Path) -> Result<bool, CsiError> {
        Ok(self
            .mounter
            .mounted_at(path)?
            .is_some_and(|m| is_fs_of(&m, device)))
    }

    /// Whether `device`'s filesystem is mounted anywhere.
    fn device_mounted(&self, device: LoopDevice) -> Result<bool, CsiError> {
        let dev = device.path();
        Ok(self
            .mounter
            .mounts()?
            .iter()
            .any(|m| Path::new(&m.source) == dev))
    }

    /// Whether `device`'s node is bind-mounted at `path` (block publish).
    fn device_bound_at(&self, device: LoopDevice, path: &Path) -> Result<bool, CsiError> {
        let name = format!("/{}", device.name());
        Ok(self
            .mounter
            .mounted_at(path)?
            .is_some_and(|m| m.root == Path::new(&name)))
    }

    /// NodeStageVolume. `fs_hint` is the filesystem CreateVolume made (volume context).
    pub fn stage(
        &self,
        id: &VolumeId,
        staging: &Path,
        cap: &Capability,
        fs_hint: Option<FsType>,
    ) -> Result<(), CsiError> {
        let image = self.volume_image(id);
        if !image.exists() {
            return Err(CsiError::NotFound(format!(
                "volume {id} does not exist on this node"
            )));
        }
        let existing = self.node_record(id)?;
        if let Some(rec) = &existing {
            if rec.staging_path != staging {
                return Err(CsiError::FailedPrecondition(format!(
                    "volume {id} is already staged at {}",
                    rec.staging_path.display()
                )));
            }
        }
        let (device, attached_now) = self.ensure_attached(&image, existing.as_ref())?;
        let mut undo = DetachOnFailure {
            driver: self,
            device: attached_now.then_some(device),
        };
        let mut grow_xfs = false;
        let access = match &cap.access {
            Access::Block => AccessRecord::Block,
            Access::Mount {
                fs_type,
                mount_flags,
            } => {
                let (fs, short) = self.ensure_filesystem(device, fs_type.or(fs_hint))?;
                grow_xfs = short && fs.fs_type == FsType::Xfs;
                if let Some(asked) = fs_type {
                    if *asked != fs.fs_type {
                        return Err(CsiError::FailedPrecondition(format!(
                            "volume {id} holds {} but {asked} was asked for",
                            fs.fs_type
                        )));
                    }
                }
                AccessRecord::Mount {
                    fs_type: fs.fs_type,
                    mount_flags: mount_flags.clone(),
                }
            }
        };
        if let Some(rec) = &existing {
            if rec.access != access || rec.access_mode != cap.mode as i32 {
                return Err(CsiError::AlreadyExists(format!(
                    "volume {id} is staged at {} with another capability ({:?})",
                    staging.display(),
                    rec.access
                )));
            }
        }
        if let AccessRecord::Mount {
            fs_type,
            mount_flags,
        } = &access
        {
            self.mount_staging(device, staging, *fs_type, mount_flags, grow_xfs)?;
        }
        // Publications keep their own file (a record from before they had one hands its
        // over); a fresh stage drops any that a lost remove left.
        let record = NodeRecord {
            volume_id: id.to_string(),
            image,
            staging_path: staging.to_path_buf(),
            access,
            access_mode: cap.mode as i32,
            loop_device: Some(device),
            boot_id: Some(self.boot_id.clone()),
            publications: Publications::new(),
        };
        let publications = existing.map(|rec| rec.publications).unwrap_or_default();
        // Not fsynced: see `Kind::Node` (a power loss takes this mount and device with it).
        let stored = self
            .put_publications(id.as_str(), &publications)
            .and_then(|()| {
                self.store
                    .put_volatile(Kind::Node, id.as_str(), &record)
                    .map_err(CsiError::from)
            });
        if let Err(e) = stored {
            let _ = self.mounter.unmount(staging);
            return Err(e);
        }
        undo.device = None;
        tracing::info!(volume = %id, %device, staging = %staging.display(), "volume staged");
        Ok(())
    }

    /// Makes sure `device` holds a filesystem that fills it: formats a blank device with
    /// `fs_type` (or the default), grows an ext4 offline (it cannot grow online here).
    /// Returns the filesystem and whether it is still short of the device (an xfs grows
    /// once mounted).
    fn ensure_filesystem(
        &self,
        device: LoopDevice,
        fs_type: Option<FsType>,
    ) -> Result<(FsInfo, bool), CsiError> {
        let dev = device.path();
        let info = match self.fs.probe(&dev)? {
            Some(info) => info,
            None => {
                let fs = fs_type.unwrap_or(FsType::DEFAULT);
                self.fs.mkfs(fs, &dev)?;
                self.fs.probe(&dev)?.ok_or_else(|| {
                    CsiError::FailedPrecondition(format!(
                        "no {fs} superblock on {dev:?} after mkfs"
                    ))
                })?
            }
        };
        let short = falls_short(&info, self.loops.size(device)?);
        if info.fs_type == FsType::Ext4 && short && !self.device_mounted(device)? {
            self.fs.grow_ext4_offline(&dev)?;
            tracing::info!(%device, "ext4 grown offline to fill the device");
            return Ok((self.fs.probe(&dev)?.unwrap_or(info), false));
        }
        Ok((info, short))
    }

    /// Mounts `device`'s filesystem at `staging` unless it is there, then grows an xfs
    /// that `grow_xfs` says is short of its device (restored into a larger volume, or
    /// grown while unstaged).
    fn mount_staging(
        &self,
        device: LoopDevice,
        staging: &Path,
        fs_type: FsType,
        mount_flags: &[String],
        grow_xfs: bool,
    ) -> Result<(), CsiError> {
        if !self.fs_mounted_at(device, staging)? {
            std::fs::create_dir_all(staging).map_err(|source| CsiError::Io {
                op: "creating staging directory",
                path: staging.to_path_buf(),
                source,
            })?;
            let options = fs_options(fs_type, mount_flags)?;
            self.mounter
                .mount_fs(&device.path(), staging, fs_type.name(), &options)?;
        }
        if grow_xfs {
            self.fs.grow_xfs(staging)?;
        }
        Ok(())
    }

    /// NodeUnstageVolume: unmounts the staging path and detaches the volume's loop devices;
    /// OK when not staged. FAILED_PRECONDITION while a target is still published.
    pub fn unstage(&self, id: &VolumeId, staging: &Path) -> Result<(), CsiError> {
        let record = self.node_record(id)?;
        if record.as_ref().is_some_and(|r| r.staging_path != staging) {
            // Not staged here: nothing of ours to undo at this path.
            return Ok(());
        }
        if let Some(rec) = &record {
            let mut still = Vec::new();
            for target in rec.publications.keys() {
                if self.mounter.mounted_at(target)?.is_some() {
                    still.push(target.display().to_string());
                }
            }
            if !still.is_empty() {
                return Err(CsiError::FailedPrecondition(format!(
                    "volume {id} is still published at {}",
                    still.join(", ")
                )));
            }
        }
        let devices = match &record {
            Some(rec) => self.staged_devices(rec)?,
            None => self.loops.find(&self.volume_image(id))?,
        };
        // Staged here by us: whatever is at the staging path is ours (unmounting nothing is
        // OK). Without a record, only a filesystem of the image's devices is.
        let ours = match &record {
            Some(_) => true,
            None => self
                .mounter
                .mounted_at(staging)?
                .is_some_and(|m| devices.iter().any(|d| is_fs_of(&m, *d))),
        };
        if ours {
            self.mounter.unmount(staging)?;
        }
        for device in devices {
            self.loops.detach(device)?;
        }
        // Not fsynced: see `Kind::Node` (the reconcile drops records of earlier boots).
        self.store
            .remove_volatile(Kind::Publications, id.as_str())?;
        self.store.remove_volatile(Kind::Node, id.as_str())?;
        tracing::info!(volume = %id, staging = %staging.display(), "volume unstaged");
        Ok(())
    }

    /// NodePublishVolume.
    pub fn publish(
        &self,
        id: &VolumeId,
        staging: &Path,
        target: &Path,
        cap: &Capability,
        readonly: bool,
    ) -> Result<(), CsiError> {
        let mut record = self
            .node_record(id)?
            .filter(|r| r.staging_path == staging)
            .ok_or_else(|| {
                CsiError::FailedPrecondition(format!(
                    "volume {id} is not staged at {}: call NodeStageVolume first",
                    staging.display()
                ))
            })?;
        let access = match (&cap.access, &record.access) {
            (Access::Block, AccessRecord::Block) => AccessRecord::Block,
            (
                Access::Mount {
                    fs_type,
                    mount_flags,
                },
                AccessRecord::Mount {
                    fs_type: staged, ..
                },
            ) if fs_type.is_none_or(|f| f == *staged) => AccessRecord::Mount {
                fs_type: *staged,
                mount_flags: mount_flags.clone(),
            },
            _ => {
                return Err(CsiError::FailedPrecondition(format!(
                    "volume {id} is staged as {:?}, which this capability cannot use",
                    record.access
                )))
            }
        };
        let publication = Publication {
            access,
            access_mode: cap.mode as i32,
            readonly,
        };
        let device = self
            .staged_devices(&record)?
            .into_iter()
            .next()
            .ok_or_else(|| {
                CsiError::FailedPrecondition(format!(
                    "volume {id} is staged but its loop device is gone: unstage and stage again"
                ))
            })?;
        if let Some(existing) = record.publications.get(target) {
            if *existing != publication {
                return Err(CsiError::AlreadyExists(format!(
                    "volume {id} is already published at {} with other arguments",
                    target.display()
                )));
            }
        } else if cap.mode == Mode::SingleNodeSingleWriter && !record.publications.is_empty() {
            let others: Vec<String> = record
                .publications
                .keys()
                .map(|p| p.display().to_string())
                .collect();
            return Err(CsiError::FailedPrecondition(format!(
                "volume {id} is SINGLE_NODE_SINGLE_WRITER and already published at {}",
                others.join(", ")
            )));
        }
        let ro = readonly || cap.read_only_mode();
        match &publication.access {
            AccessRecord::Block => {
                if !self.device_bound_at(device, target)? {
                    ensure_file(target)?;
                    let flags = if ro {
                        MsFlags::MS_RDONLY
                    } else {
                        MsFlags::empty()
                    };
                    self.mounter.bind(&device.path(), target, flags)?;
                }
            }
            AccessRecord::Mount { mount_flags, .. } => {
                if !self.fs_mounted_at(device, target)? {
                    std::fs::create_dir_all(target).map_err(|source| CsiError::Io {
                        op: "creating target directory",
                        path: target.to_path_buf(),
                        source,
                    })?;
                    let mut flags = MountOptions::parse(mount_flags)?.per_mount_flags();
                    if ro {
                        flags |= MsFlags::MS_RDONLY;
                    }
                    self.mounter.bind(staging, target, flags)?;
                }
            }
        }
        record
            .publications
            .insert(target.to_path_buf(), publication);
        // Publications are re-derived from the mount table after a crash: no fsync needed.
        if let Err(e) = self.put_publications(id.as_str(), &record.publications) {
            let _ = self.mounter.unmount(target);
            return Err(e);
        }
        tracing::info!(volume = %id, target = %target.display(), readonly = ro, "volume published");
        Ok(())
    }

    /// NodeUnpublishVolume: unmounts and removes `target`, whatever is mounted there, and
    /// forgets the publication; OK when already done or when the volume is unknown.
    pub fn unpublish(&self, id: Option<&VolumeId>, target: &Path) -> Result<(), CsiError> {
        self.mounter.unmount(target)?;
        remove_target(target)?;
        if let Some(id) = id {
            if let Some(mut record) = self.node_record(id)? {
                if record.publications.remove(target).is_some() {
                    self.put_publications(id.as_str(), &record.publications)?;
                }
            }
        }
        tracing::info!(target = %target.display(), "target unpublished");
        Ok(())
    }

    /// The staged record of `id` if `path` is its staging path or one of its targets;
    /// NOT_FOUND otherwise.
    pub fn record_for_path(&self, id: &VolumeId, path: &Path) -> Result<NodeRecord, CsiError> {
        self.node_record(id)?
            .filter(|r| r.staging_path == path || r.publications.contains_key(path))
            .ok_or_else(|| {
                CsiError::NotFound(format!(
                    "volume {id} is neither staged nor published at {}",
                    path.display()
                ))
            })
    }

    /// NodeExpandVolume: makes the loop device see the grown image and grows the mounted
    /// filesystem (xfs online; ext4 online where CAP_SYS_RESOURCE allows, else
    /// FAILED_PRECONDITION and it grows at the next stage). Returns the capacity.
    pub fn expand_node(
        &self,
        id: &VolumeId,
        record: &NodeRecord,
        required: u64,
    ) -> Result<u64, CsiError> {
        let devices = self.staged_devices(record)?;
        let device = *devices.first().ok_or_else(|| {
            CsiError::FailedPrecondition(format!("volume {id} is staged but not attached"))
        })?;
        for d in &devices {
            self.loops.refresh_capacity(*d)?;
        }
        let size = self.loops.size(device)?;
        if required > size {
            return Err(CsiError::OutOfRange(format!(
                "volume {id} is {size} bytes; ControllerExpandVolume must grow it to {required} first"
            )));
        }
        if let AccessRecord::Mount { fs_type, .. } = record.access {
            let info = self.fs.probe(&device.path())?;
            if info.is_some_and(|i| falls_short(&i, size)) {
                match fs_type {
                    FsType::Xfs => self.fs.grow_xfs(&record.staging_path)?,
                    FsType::Ext4 => self.fs.grow_ext4_online(&device.path())?,
                }
                tracing::info!(volume = %id, size, "filesystem grown online");
            }
        }
        Ok(size)
    }

    /// NodeGetVolumeStats for `path` of a staged volume: its condition, and its usage
    /// unless abnormal (an abnormal volume may not answer statvfs).
    pub fn stats(
        &self,
        record: &NodeRecord,
        path: &Path,
    ) -> Result<(Condition, Option<Usage>), CsiError> {
        let device = match self.healthy_device(record, path)? {
            Ok(device) => device,
            Err(message) => {
                let condition = Condition {
                    abnormal: true,
                    message,
                };
                return Ok((condition, None));
            }
        };
        let usage = self.usage(record, path, device)?;
        let condition = Condition {
            abnormal: false,
            message: format!("healthy on {device}"),
        };
        Ok((condition, Some(usage)))
    }

    /// The numbers of a healthy staged volume attached to `device`.
    fn usage(
        &self,
        record: &NodeRecord,
        path: &Path,
        device: LoopDevice,
    ) -> Result<Usage, CsiError> {
        match record.access {
            AccessRecord::Block => Ok(Usage {
                total: self.loops.size(device)?,
                available: None,
                used: None,
                inodes: None,
            }),
            AccessRecord::Mount { .. } => {
                let st = nix::sys::statvfs::statvfs(path).map_err(|e| CsiError::Io {
                    op: "statvfs",
                    path: path.to_path_buf(),
                    source: e.into(),
                })?;
                let frsize = st.fragment_size() as u64;
                let total = st.blocks() as u64 * frsize;
                let free = st.blocks_free() as u64 * frsize;
                let available = st.blocks_available() as u64 * frsize;
                let files = st.files() as u64;
                let files_free = st.files_free() as u64;
                Ok(Usage {
                    total,
                    available: Some(available),
                    used: Some(total.saturating_sub(free)),
                    inodes: Some((files, files_free, files.saturating_sub(files_free))),
                })
            }
        }
    }

    /// The loop device of a staged volume that is healthy at `path` (image present, loop
    /// attached, the filesystem or device mounted there), or what is wrong.
    fn healthy_device(
        &self,
        record: &NodeRecord,
        path: &Path,
    ) -> Result<Result<LoopDevice, String>, CsiError> {
        let abnormal = |message: String| Ok(Err(message));
        if !record.image.exists() {
            return abnormal(format!("image {} is missing", record.image.display()));
        }
        let Some(device) = self.staged_devices(record)?.into_iter().next() else {
            return abnormal(format!(
                "image {} is not attached to a loop device",
                record.image.display()
            ));
        };
        let mounted = match record.access {
            AccessRecord::Block if path != record.staging_path => {
                self.device_bound_at(device, path)?
            }
            AccessRecord::Block => true,
            AccessRecord::Mount { .. } => self.fs_mounted_at(device, path)?,
        };
        if !mounted {
            return abnormal(format!("{device} is not mounted at {}", path.display()));
        }
        Ok(Ok(device))
    }
}

/// The staging mount's options: the capability's flags, plus `nouuid` for xfs, since a
/// restored or cloned volume carries its source's UUID and xfs refuses to mount a
/// duplicate.
pub fn fs_options(fs_type: FsType, mount_flags: &[String]) -> Result<MountOptions, CsiError> {
    let mut options = MountOptions::parse(mount_flags)?;
    if fs_type == FsType::Xfs && !options.data.split(',').any(|o| o == "nouuid") {
        if !options.data.is_empty() {
            options.data.push(',');
        }
        options.data.push_str("nouuid");
    }
    Ok(options)
}

/// Whether the filesystem is at least 1 MiB short of its device's `device_size`.
fn falls_short(info: &FsInfo, device_size: u64) -> bool {
    device_size >= info.size + (1 << 20)
}

/// Whether `mount` is `device`'s filesystem (not a bind of its node or of a subtree).
fn is_fs_of(mount: &MountEntry, device: LoopDevice) -> bool {
    Path::new(&mount.source) == device.path() && mount.root == Path::new("/")
}

/// Creates an empty file at `target` (the bind point of a block volume) if none exists.
fn ensure_file(target: &Path) -> Result<(), CsiError> {
    match std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(target)
    {
        Ok(_) => Ok(()),
        Err(source) => Err(CsiError::Io {
            op: "creating block target file",
            path: target.to_path_buf(),
            source,
        }),
    }
}

/// Removes the directory or file the driver made at `target`; OK when absent.
fn remove_target(target: &Path) -> Result<(), CsiError> {
    let meta = match std::fs::symlink_metadata(target) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(CsiError::Io {
                op: "inspecting",
                path: target.to_path_buf(),
                source,
            })
        }
    };
    let removed = if meta.is_dir() {
        std::fs::remove_dir(target)
    } else {
        std::fs::remove_file(target)
    };
    match removed {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(CsiError::Io {
            op: "removing",
            path: target.to_path_buf(),
            source: e,
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    //! The staging logic against recording fakes of the loop devices, the mount table and
    //! the filesystem tools: which kernel calls a request makes, and that repeats make none.

    use std::path::PathBuf;
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::driver::{Config, Mode as DriverMode};
    use crate::fstools::{FsToolError, FsTools};
    use crate::loopdev::{Attached, LoopDeviceError, LoopDevices};
    use crate::mounter::{MountError, Mounter};
    use nodekit_proto::csi::v1::volume_capability::access_mode::Mode;

    /// The kernel calls made, in order, shared by the fakes.
    type Log = Arc<Mutex<Vec<String>>>;

    #[derive(Default)]
    struct FakeLoops {
        attached: Mutex<Vec<Attached>>,
        calls: Log,
    }

    impl LoopDevices for FakeLoops {
        fn attach(&self, backing: &Path) -> Result<LoopDevice, LoopDeviceError> {
            let mut a = self.attached.lock().expect("lock");
            let device = LoopDevice(a.iter().map(|x| x.device.0 + 1).max().unwrap_or(0));
            a.push(Attached {
                device,
                backing: backing.to_path_buf(),
                deleted: false,
            });
            self.calls
                .lock()
                .expect("lock")
                .push(format!("attach {device}"));
            Ok(device)
        }
        fn list(&self) -> Result<Vec<Attached>, LoopDeviceError> {
            Ok(self.attached.lock().expect("lock").clone())
        }
        fn detach(&self, device: LoopDevice) -> Result<(), LoopDeviceError> {
            self.attached
                .lock()
                .expect("lock")
                .retain(|a| a.device != device);
            self.calls
                .lock()
                .expect("lock")
                .push(format!("detach {device}"));
            Ok(())
        }
        fn refresh_capacity(&self, device: LoopDevice) -> Result<(), LoopDeviceError> {
            self.calls
                .lock()
                .expect("lock")
                .push(format!("refresh {device}"));
            Ok(())
        }
        fn size(&self, device: LoopDevice) -> Result<u64, LoopDeviceError> {
            let a = self.attached.lock().expect("lock");
            let backing = a
                .iter()
                .find(|x| x.device == device)
                .map(|x| x.backing.clone());
            Ok(backing
                .and_then(|b| std::fs::metadata(b).ok())
                .map_or(0, |m| m.len()))
        }
    }

    #[derive(Default)]
    struct FakeMounts {
        table: Mutex<Vec<MountEntry>>,
        calls: Log,
        fail_mount: Mutex<bool>,
    }

    impl Mounter for FakeMounts {
        fn mount_fs(
            &self,
            device: &Path,
            target: &Path,
            fs_type: &str,
            _o: &MountOptions,
        ) -> Result<(), MountError> {
            if *self.fail_mount.lock().expect("lock") {
                return Err(MountError::Mount {
                    source_path: device.to_path_buf(),
                    target: target.to_path_buf(),
                    what: fs_type.into(),
                    source: nix::errno::Errno::EINVAL,
                });
            }
            self.calls
                .lock()
                .expect("lock")
                .push(format!("mount {}", target.display()));
            self.table.lock().expect("lock").push(MountEntry {
                id: 1,
                major: 7,
                minor: 0,
                root: "/".into(),
                mount_point: target.to_path_buf(),
                options: "rw".into(),
                fs_type: fs_type.into(),
                source: device.display().to_string(),
            });
            Ok(())
        }
        fn bind(&self, source: &Path, target: &Path, flags: MsFlags) -> Result<(), MountError> {
            let mut t = self.table.lock().expect("lock");
            let entry = match t.iter().find(|m| m.mount_point == source).cloned() {
                Some(fs) => MountEntry {
                    mount_point: target.to_path_buf(),
                    ..fs
                },
                None => MountEntry {
                    id: 2,
                    major: 0,
                    minor: 5,
                    root: PathBuf::from("/").join(source.file_name().expect("device name")),
                    mount_point: target.to_path_buf(),
                    options: "rw".into(),
                    fs_type: "devtmpfs".into(),
                    source: "udev".into(),
                },
            };
            t.push(entry);
            self.calls.lock().expect("lock").push(format!(
                "bind {} ro={}",
                target.display(),
                flags.contains(MsFlags::MS_RDONLY)
            ));
            Ok(())
        }
        fn unmount(&self, target: &Path) -> Result<(), MountError> {
            self.table
                .lock()
                .expect("lock")
                .retain(|m| m.mount_point != target);
            self.calls
                .lock()
                .expect("lock")
                .push(format!("umount {}", target.display()));
            Ok(())
        }
        fn mounts(&self) -> Result<Vec<MountEntry>, MountError> {
            Ok(self.table.lock().expect("lock").clone())
        }
    }

    struct FakeFs {
        loops: Arc<FakeLoops>,
        fs: Mutex<Option<FsInfo>>,
        calls: Log,
    }

    impl FakeFs {
        fn device_size(&self) -> u64 {
            let device = self
                .loops
                .attached
                .lock()
                .expect("lock")
                .first()
                .map(|a| a.device);
            device.map_or(0, |d| self.loops.size(d).unwrap_or(0))
        }
        fn grow(&self, what: &str) {
            let size = self.device_size();
            if let Some(info) = self.fs.lock().expect("lock").as_mut() {
                info.size = size;
            }
            self.calls.lock().expect("lock").push(what.into());
        }
    }

    impl FsTools for FakeFs {
        fn mkfs(&self, fs_type: FsType, _target: &Path) -> Result<(), FsToolError> {
            let size = self.device_size();
            *self.fs.lock().expect("lock") = Some(FsInfo { fs_type, size });
            self.calls
                .lock()
                .expect("lock")
                .push(format!("mkfs {fs_type}"));
            Ok(())
        }
        fn grow_ext4_offline(&self, _device: &Path) -> Result<(), FsToolError> {
            self.grow("grow ext4 offline");
            Ok(())
        }
        /// As without CAP_SYS_RESOURCE.
        fn grow_ext4_online(&self, device: &Path) -> Result<(), FsToolError> {
            Err(FsToolError::OnlineResizeDenied {
                target: device.to_path_buf(),
            })
        }
        fn grow_xfs(&self, _mount_point: &Path) -> Result<(), FsToolError> {
            self.grow("grow xfs");
            Ok(())
        }
        fn probe(&self, _path: &Path) -> Result<Option<FsInfo>, FsToolError> {
            Ok(*self.fs.lock().expect("lock"))
        }
    }

    struct Rig {
        driver: Driver,
        loops: Arc<FakeLoops>,
        mounts: Arc<FakeMounts>,
        id: VolumeId,
        dir: tempfile::TempDir,
    }

    impl Rig {
        /// A driver on fakes with one 64 MiB volume image, blank or holding an `fs` that
        /// fills it.
        fn new(fs: Option<FsType>) -> Self {
            let dir = tempfile::tempdir().expect("tempdir");
            let config = Config {
                driver_name: "t".into(),
                node_id: "n".into(),
                state_dir: dir.path().join("state"),
                pool_dir: dir.path().join("pool"),
                mode: DriverMode::All,
                kubelet_root: dir.path().join("kubelet"),
                allow_any_path: false,
                max_capacity: None,
                max_volumes_per_node: 0,
            };
            let log = Log::default();
            let loops = Arc::new(FakeLoops {
                calls: Arc::clone(&log),
                ..FakeLoops::default()
            });
            let mounts = Arc::new(FakeMounts {
                calls: Arc::clone(&log),
                ..FakeMounts::default()
            });
            let fake_fs = Arc::new(FakeFs {
                loops: Arc::clone(&loops),
                fs: Mutex::new(fs.map(|fs_type| FsInfo {
                    fs_type,
                    size: 64 << 20,
                })),
                calls: log,
            });
            let driver = Driver::with_backends(config, loops.clone(), mounts.clone(), fake_fs)
                .expect("driver");
            let id = VolumeId::for_name("v");
            std::fs::File::create(driver.volume_image(&id))
                .and_then(|f| f.set_len(64 << 20))
                .expect("image");
            Self {
                driver,
                loops,
                mounts,
                id,
                dir,
            }
        }

        fn path(&self, rel: &str) -> PathBuf {
            self.dir.path().join("kubelet").join(rel)
        }

        fn calls(&self) -> Vec<String> {
            self.loops.calls.lock().expect("lock").clone()
        }

        /// The volume's file in state directory `kind` (`node`, `publications`).
        fn state_file(&self, kind: &str) -> PathBuf {
            self.dir
                .path()
                .join("state")
                .join(kind)
                .join(format!("{}.json", self.id))
        }

        /// Stages the volume at `s` as a single-node writer.
        fn stage(&self) -> (PathBuf, Capability) {
            let staging = self.path("s");
            let c = cap(None, Mode::SingleNodeWriter);
            self.driver
                .stage(&self.id, &staging, &c, None)
                .expect("stage");
            (staging, c)
        }

        fn grow_image(&self, size: u64) {
            crate::image::grow(&self.driver.volume_image(&self.id), size).expect("grow");
        }
    }

    fn cap(fs: Option<FsType>, mode: Mode) -> Capability {
        Capability {
            access: Access::Mount {
                fs_type: fs,
                mount_flags: Vec::new(),
            },
            mode,
        }
    }

    #[test]
    fn a_remembered_loop_device_that_now_backs_another_file_is_left_alone() {
        let rig = Rig::new(Some(FsType::Ext4));
        let (staging, _) = rig.stage();
        let image = rig.driver.volume_image(&rig.id);
        // Behind the driver's back: loop0 now backs another file, the image is on loop1.
        *rig.loops.attached.lock().expect("lock") = vec![
            Attached {
                device: LoopDevice(0),
                backing: rig.dir.path().join("other.img"),
                deleted: false,
            },
            Attached {
                device: LoopDevice(1),
                backing: image,
                deleted: false,
            },
        ];
        rig.driver.unstage(&rig.id, &staging).expect("unstage");
        assert_eq!(
            rig.calls().last().map(String::as_str),
            Some("detach /dev/loop1")
        );
        assert!(!rig.calls().contains(&"detach /dev/loop0".to_string()));
    }

    #[test]
    fn staging_twice_formats_attaches_and_mounts_once() {
        let rig = Rig::new(None);
        let staging = rig.path("staging");
        let c = cap(None, Mode::SingleNodeWriter);
        rig.driver
            .stage(&rig.id, &staging, &c, Some(FsType::Xfs))
            .expect("stage");
        rig.driver
            .stage(&rig.id, &staging, &c, Some(FsType::Xfs))
            .expect("stage again");
        assert_eq!(
            rig.calls(),
            vec![
                "attach /dev/loop0".to_string(),
                "mkfs xfs".into(),
                format!("mount {}", staging.display())
            ]
        );
        let rec = rig
            .driver
            .node_record(&rig.id)
            .expect("read")
            .expect("record");
        assert_eq!(
            rec.access,
            AccessRecord::Mount {
                fs_type: FsType::Xfs,
                mount_flags: vec![]
            }
        );
    }

    #[test]
    fn a_failed_mount_detaches_the_device_it_attached() {
        let rig = Rig::new(Some(FsType::Ext4));
        *rig.mounts.fail_mount.lock().expect("lock") = true;
        let err = rig
            .driver
            .stage(
                &rig.id,
                &rig.path("s"),
                &cap(None, Mode::SingleNodeWriter),
                None,
            )
            .unwrap_err();
        assert!(matches!(err, CsiError::Mount(_)), "{err}");
        assert_eq!(rig.calls(), vec!["attach /dev/loop0", "detach /dev/loop0"]);
        assert!(rig.driver.node_record(&rig.id).expect("read").is_none());
    }

    #[test]
    fn a_grown_image_grows_ext4_offline_before_mounting_and_xfs_after() {
        for (fs, expect) in [
            (FsType::Ext4, "grow ext4 offline"),
            (FsType::Xfs, "grow xfs"),
        ] {
            let rig = Rig::new(Some(fs));
            rig.grow_image(128 << 20);
            let staging = rig.path("s");
            rig.driver
                .stage(&rig.id, &staging, &cap(None, Mode::SingleNodeWriter), None)
                .expect("stage");
            let calls = rig.calls();
            let grow = calls
                .iter()
                .position(|c| c == expect)
                .unwrap_or_else(|| panic!("{calls:?}"));
            let mount = calls
                .iter()
                .position(|c| c.starts_with("mount"))
                .expect("mounted");
            assert_eq!(grow < mount, fs == FsType::Ext4, "{calls:?}");
        }
    }

    #[test]
    fn publish_is_idempotent_and_enforces_the_single_writer_and_same_arguments_rules() {
        let rig = Rig::new(Some(FsType::Ext4));
        let staging = rig.path("s");
        let single = cap(None, Mode::SingleNodeSingleWriter);
        rig.driver
            .stage(&rig.id, &staging, &single, None)
            .expect("stage");
        let t1 = rig.path("t1");
        rig.driver
            .publish(&rig.id, &staging, &t1, &single, false)
            .expect("publish");
        rig.driver
            .publish(&rig.id, &staging, &t1, &single, false)
            .expect("publish again");
        assert_eq!(
            rig.calls().iter().filter(|c| c.starts_with("bind")).count(),
            1
        );
        let other_args = rig
            .driver
            .publish(&rig.id, &staging, &t1, &single, true)
            .unwrap_err();
        assert!(
            matches!(other_args, CsiError::AlreadyExists(_)),
            "{other_args}"
        );
        let second = rig
            .driver
            .publish(&rig.id, &staging, &rig.path("t2"), &single, false)
            .unwrap_err();
        assert!(
            matches!(second, CsiError::FailedPrecondition(_)),
            "{second}"
        );
        let unstage = rig.driver.unstage(&rig.id, &staging).unwrap_err();
        assert!(
            matches!(unstage, CsiError::FailedPrecondition(_)),
            "still published: {unstage}"
        );
        rig.driver.unpublish(Some(&rig.id), &t1).expect("unpublish");
        rig.driver.unstage(&rig.id, &staging).expect("unstage");
        assert!(rig.mounts.table.lock().expect("lock").is_empty());
        assert!(rig.loops.attached.lock().expect("lock").is_empty());
    }

    #[test]
    fn a_torn_node_record_means_not_staged_and_the_reconcile_removes_it() {
        let rig = Rig::new(Some(FsType::Ext4));
        let record = rig.state_file("node");
        // What a power loss during the record's volatile write can leave.
        std::fs::write(&record, [0u8; 64]).expect("torn record");
        assert!(rig.driver.node_record(&rig.id).expect("read").is_none());
        let done = rig.driver.reconcile().expect("reconcile");
        assert_eq!(done.forgotten, vec![rig.id.to_string()]);
        assert!(!record.exists(), "torn record removed");
        std::fs::write(&record, b"").expect("empty record");
        rig.stage();
        assert!(rig.driver.node_record(&rig.id).expect("read").is_some());
    }

    #[test]
    fn the_reconcile_restores_stages_of_this_boot_and_drops_those_of_an_earlier_one() {
        let rig = Rig::new(Some(FsType::Ext4));
        rig.stage();
        let lose_kernel_state = || {
            rig.loops.attached.lock().expect("lock").clear();
            rig.mounts.table.lock().expect("lock").clear();
        };
        lose_kernel_state();
        let done = rig.driver.reconcile().expect("reconcile");
        assert_eq!(done.reattached, vec![rig.id.to_string()]);
        assert_eq!(done.remounted, vec![rig.id.to_string()]);

        let mut rec: NodeRecord = rig
            .driver
            .store
            .get(Kind::Node, rig.id.as_str())
            .expect("read")
            .expect("record");
        assert_eq!(rec.boot_id.as_deref(), Some(rig.driver.boot_id.as_str()));
        rec.boot_id = Some("an-earlier-boot".into());
        rig.driver
            .store
            .put_volatile(Kind::Node, rig.id.as_str(), &rec)
            .expect("write");
        lose_kernel_state();
        let calls = rig.calls().len();
        let done = rig.driver.reconcile().expect("reconcile");
        assert_eq!(done.forgotten, vec![rig.id.to_string()]);
        assert!(done.reattached.is_empty() && done.remounted.is_empty());
        assert_eq!(rig.calls().len(), calls, "nothing attached or mounted");
        assert!(rig.driver.node_record(&rig.id).expect("read").is_none());
    }

    #[test]
    fn the_last_unpublish_removes_the_publications_file() {
        let rig = Rig::new(Some(FsType::Ext4));
        let (staging, c) = rig.stage();
        let file = rig.state_file("publications");
        let target = rig.path("t");
        rig.driver
            .publish(&rig.id, &staging, &target, &c, false)
            .expect("publish");
        assert!(file.exists());
        rig.driver
            .unpublish(Some(&rig.id), &target)
            .expect("unpublish");
        assert!(!file.exists(), "no publications, no file");
        let rec = rig
            .driver
            .node_record(&rig.id)
            .expect("read")
            .expect("staged");
        assert!(rec.publications.is_empty());
    }

    #[test]
    fn node_expansion_refreshes_the_device_and_reports_missing_cap_sys_resource_for_ext4() {
        let rig = Rig::new(Some(FsType::Ext4));
        let staging = rig.path("s");
        rig.driver
            .stage(&rig.id, &staging, &cap(None, Mode::SingleNodeWriter), None)
            .expect("stage");
        let rec = rig
            .driver
            .node_record(&rig.id)
            .expect("read")
            .expect("record");
        assert_eq!(
            rig.driver
                .expand_node(&rig.id, &rec, 0)
                .expect("nothing to grow"),
            64 << 20
        );
        rig.grow_image(128 << 20);
        let err = rig
            .driver
            .expand_node(&rig.id, &rec, 128 << 20)
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        assert!(err.to_string().contains("CAP_SYS_RESOURCE"), "{err}");
        assert!(rig.calls().contains(&"refresh /dev/loop0".to_string()));
        let too_big = rig.driver.expand_node(&rig.id, &rec, 1 << 30).unwrap_err();
        assert!(matches!(too_big, CsiError::OutOfRange(_)), "{too_big}");
    }
}
