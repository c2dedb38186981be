//! The controller's blocking operations: volumes and snapshots as image files in the pool.
//! Callers have validated the request and hold the objects' in-flight claims.
//!
//! Crash safety: a record is written in phase `Creating` before its image is touched and
//! flipped to `Ready` (durably) after; a crash in between leaves a `Creating` record (or,
//! after a power loss, a torn one: it is written without fsync) that the next attempt (or
//! the startup reconcile) clears together with the partial image. A failed
//! operation removes what it made (a drop guard, defused on success).

use std::collections::BTreeMap;
use std::fs::File;
use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::driver::Driver;
use crate::error::CsiError;
use crate::fstools::FsType;
use crate::ids::{SnapshotId, VolumeId};
use crate::image::{self, CloneMethod};
use crate::state::{
    AccessRecord, ContentSource, Kind, NodeRecord, Phase, SnapshotRecord, Stored, VolumeRecord,
};
use crate::sys;

/// Size of a volume created without a requested size.
pub const DEFAULT_VOLUME_SIZE: u64 = 1 << 30;
/// Sizes are rounded up to this (a filesystem block).
const ALIGN: u64 = 4096;

/// Serialises capacity checks with the `Creating` record that reserves the space.
static RESERVE: Mutex<()> = Mutex::new(());

/// A CreateVolume request, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeSpec {
    /// The CO's name.
    pub name: String,
    /// capacity_range.required_bytes (0: unset).
    pub required: u64,
    /// capacity_range.limit_bytes (0: unset).
    pub limit: u64,
    /// The filesystem to make; `None` for raw block.
    pub fs_type: Option<FsType>,
    /// The parameters.
    pub parameters: BTreeMap<String, String>,
    /// The content source.
    pub source: Option<ContentSource>,
}

/// The pool's capacity as GetCapacity reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    /// Bytes still available to new volumes.
    pub available: u64,
    /// The most any volume can ever have (the configured maximum or the pool's size).
    pub total: u64,
}

/// Decides a new volume's size from the capacity range, the filesystem's minimum and the
/// source's size (OUT_OF_RANGE when they cannot all hold).
pub fn decide_size(required: u64, limit: u64, min: u64, source: u64) -> Result<u64, CsiError> {
    if limit > 0 && required > limit {
        return Err(CsiError::OutOfRange(format!(
            "required_bytes {required} exceeds limit_bytes {limit}"
        )));
    }
    if required > 0 && required < min {
        return Err(CsiError::OutOfRange(format!(
            "required_bytes {required} is below this filesystem's minimum of {min} bytes"
        )));
    }
    let wanted = if required == 0 {
        let default = DEFAULT_VOLUME_SIZE.max(source).max(min);
        if limit > 0 {
            default.min(limit).max(source).max(min)
        } else {
            default
        }
    } else {
        required.max(source)
    };
    let size = wanted.div_ceil(ALIGN) * ALIGN;
    if limit > 0 && size > limit {
        return Err(CsiError::OutOfRange(format!(
            "the volume needs {size} bytes (minimum {min}, source {source}, {ALIGN}-byte aligned) but limit_bytes is {limit}"
        )));
    }
    Ok(size)
}

/// Removes what a failed create made unless defused.
struct Rollback<'a> {
    driver: &'a Driver,
    kind: Kind,
    id: String,
    image: PathBuf,
    armed: bool,
}

impl Drop for Rollback<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Err(e) = image::remove(&self.image) {
            tracing::warn!(error = %e, "rollback: removing image");
        }
        if let Err(e) = self.driver.store.remove(self.kind, &self.id) {
            tracing::warn!(error = %e, "rollback: removing record");
        }
    }
}

impl Driver {
    /// The pool's free and total capacity for volumes.
    pub fn capacity(&self) -> Result<Capacity, CsiError> {
        let pool = &self.config.pool_dir;
        let st = nix::sys::statvfs::statvfs(pool).map_err(|e| CsiError::Io {
            op: "statvfs",
            path: pool.clone(),
            source: e.into(),
        })?;
        let frsize = st.fragment_size() as u64;
        let free = (st.blocks_available() as u64).saturating_mul(frsize);
        let size = (st.blocks() as u64).saturating_mul(frsize);
        let total = self.config.max_capacity.unwrap_or(size);
        let provisioned: u64 = self
            .store
            .list::<VolumeRecord>(Kind::Volumes)?
            .iter()
            .map(|v| v.capacity)
            .sum();
        Ok(Capacity {
            available: free.min(total.saturating_sub(provisioned)),
            total,
        })
    }

    fn check_space(&self, size: u64, what: &str) -> Result<(), CsiError> {
        let cap = self.capacity()?;
        if size > cap.total {
            return Err(CsiError::OutOfRange(format!(
                "{what} of {size} bytes exceeds the pool's capacity of {} bytes",
                cap.total
            )));
        }
        if size > cap.available {
            return Err(CsiError::ResourceExhausted(format!(
                "{what} of {size} bytes does not fit: {} bytes available in {}",
                cap.available,
                self.config.pool_dir.display()
            )));
        }
        Ok(())
    }

    /// A ready volume's record; NOT_FOUND otherwise.
    pub fn ready_volume(&self, id: &str) -> Result<(VolumeId, VolumeRecord), CsiError> {
        let not_found = || CsiError::NotFound(format!("volume {id:?} does not exist"));
        let vid = VolumeId::parse(id).ok_or_else(not_found)?;
        match self
            .store
            .get::<VolumeRecord>(Kind::Volumes, vid.as_str())?
        {
            Some(r) if r.phase == Phase::Ready => Ok((vid, r)),
            _ => Err(not_found()),
        }
    }

    /// A ready snapshot's record; NOT_FOUND otherwise.
    pub fn ready_snapshot(&self, id: &str) -> Result<(SnapshotId, SnapshotRecord), CsiError> {
        let not_found = || CsiError::NotFound(format!("snapshot {id:?} does not exist"));
        let sid = SnapshotId::parse(id).ok_or_else(not_found)?;
        match self
            .store
            .get::<SnapshotRecord>(Kind::Snapshots, sid.as_str())?
        {
            Some(r) if r.phase == Phase::Ready => Ok((sid, r)),
            _ => Err(not_found()),
        }
    }

    /// The image and record of a content source; NOT_FOUND when it does not exist,
    /// INVALID_ARGUMENT when its filesystem differs from `fs_type`.
    fn source_image(
        &self,
        source: &ContentSource,
        fs_type: Option<FsType>,
    ) -> Result<(PathBuf, u64), CsiError> {
        let (image, size, source_fs) = match source {
            ContentSource::Snapshot(id) => {
                let (sid, rec) = self.ready_snapshot(id)?;
                (self.snapshot_image(&sid), rec.size, rec.fs_type)
            }
            ContentSource::Volume(id) => {
                let (vid, rec) = self.ready_volume(id)?;
                (self.volume_image(&vid), rec.capacity, rec.fs_type)
            }
        };
        if source_fs != fs_type {
            let name = |f: Option<FsType>| f.map_or("raw block".to_string(), |f| f.to_string());
            return Err(CsiError::InvalidArgument(format!(
                "the source holds {} but the new volume asks for {}",
                name(source_fs),
                name(fs_type)
            )));
        }
        Ok((image, size))
    }

    /// CreateVolume: returns the volume named `spec.name`, making it if needed. Caller
    /// holds the claims on the volume's ID and on its source.
    pub fn create_volume(&self, spec: &VolumeSpec) -> Result<VolumeRecord, CsiError> {
        let id = VolumeId::for_name(&spec.name);
        let image = self.volume_image(&id);
        let min = spec.fs_type.map_or(ALIGN, FsType::min_size);
        if let Some(existing) = self
            .store
            .get_or_torn::<VolumeRecord>(Kind::Volumes, id.as_str())?
        {
            if let Stored::Whole(ready) = existing {
                if ready.phase == Phase::Ready {
                    return compatible(ready, spec);
                }
            }
            // A create that crashed or failed half-way: start over.
            image::remove(&image)?;
            self.store.remove(Kind::Volumes, id.as_str())?;
        }
        let (source_image, source_size) = match &spec.source {
            Some(source) => {
                let (img, size) = self.source_image(source, spec.fs_type)?;
                (Some(img), size)
            }
            None => (None, 0),
        };
        let size = decide_size(spec.required, spec.limit, min, source_size)?;
        let mut record = VolumeRecord {
            id: id.to_string(),
            name: spec.name.clone(),
            capacity: size,
            fs_type: spec.fs_type,
            parameters: spec.parameters.clone(),
            source: spec.source.clone(),
            phase: Phase::Creating,
        };
        {
            let _reserve = RESERVE.lock().unwrap_or_else(PoisonError::into_inner);
            self.check_space(size, "a volume")?;
            self.store
                .put_volatile(Kind::Volumes, id.as_str(), &record)?;
        }
        let mut rollback = Rollback {
            driver: self,
            kind: Kind::Volumes,
            id: id.to_string(),
            image: image.clone(),
            armed: true,
        };
        record.phase = Phase::Ready;
        let make_image = || -> Result<(), CsiError> {
            match &source_image {
                Some(src) => {
                    let method = image::clone_image(src, &image)?;
                    image::grow(&image, size)?;
                    tracing::info!(volume = %id, ?method, "volume restored from its source");
                }
                None => {
                    image::create_sparse(&image, size)?;
                    match spec.fs_type {
                        // mkfs syncs what it wrote, the size included.
                        Some(fs) => self.fs.mkfs(fs, &image)?,
                        None => image::sync(&image)?,
                    }
                }
            }
            Ok(())
        };
        // The `Ready` record is written and fsynced while the image is made, and replaces
        // the `Creating` one only once the image is complete.
        let ready = std::thread::scope(|s| {
            let ready = s.spawn(|| self.store.prepare(Kind::Volumes, id.as_str(), &record));
            let made = make_image();
            let ready = ready
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            made.and(ready.map_err(CsiError::from))
        })?;
        ready.commit()?;
        rollback.armed = false;
        tracing::info!(volume = %id, name = %spec.name, size, "volume created");
        Ok(record)
    }

    /// DeleteVolume: OK when the volume is already gone; FAILED_PRECONDITION while a loop
    /// device still uses its image (still staged). Caller holds the volume's claim.
    pub fn delete_volume(&self, id: &VolumeId) -> Result<(), CsiError> {
        let image = self.volume_image(id);
        let attached = self.loops.find(&image)?;
        if !attached.is_empty() {
            let devices: Vec<String> = attached.iter().map(|d| d.to_string()).collect();
            return Err(CsiError::FailedPrecondition(format!(
                "volume {id} is in use: its image is attached to {} (unstage it first)",
                devices.join(", ")
            )));
        }
        image::remove(&image)?;
        self.store.remove(Kind::Volumes, id.as_str())?;
        tracing::info!(volume = %id, "volume deleted");
        Ok(())
    }

    /// ControllerExpandVolume: grows the image to at least `required` bytes (never shrinks;
    /// OK when already large enough). Returns the capacity. Caller holds the claim.
    pub fn expand_volume(
        &self,
        id: &VolumeId,
        mut record: VolumeRecord,
        required: u64,
        limit: u64,
    ) -> Result<u64, CsiError> {
        if record.capacity >= required {
            return Ok(record.capacity);
        }
        let size = required.div_ceil(ALIGN) * ALIGN;
        if limit > 0 && size > limit {
            return Err(CsiError::OutOfRange(format!(
                "growing to {size} bytes ({ALIGN}-byte aligned) exceeds limit_bytes {limit}"
            )));
        }
        {
            let _reserve = RESERVE.lock().unwrap_or_else(PoisonError::into_inner);
            let grow_by = size - record.capacity;
            self.check_space(grow_by, "growing the volume")
                .map_err(|e| match e {
                    CsiError::ResourceExhausted(m) => CsiError::OutOfRange(m),
                    other => other,
                })?;
            record.capacity = size;
            // Record first: a crash after it leaves a record larger than the image, which
            // the next expand (same request) converges.
            self.store.put(Kind::Volumes, id.as_str(), &record)?;
        }
        image::grow(&self.volume_image(id), size)?;
        tracing::info!(volume = %id, size, "volume image grown");
        Ok(size)
    }

    /// CreateSnapshot: cuts snapshot `name` of `source` (reflink where the pool can, else a
    /// sparse copy), freezing the source's filesystem meanwhile if it is staged here.
    /// Caller holds the claims on the snapshot's ID and the source volume.
    pub fn create_snapshot(
        &self,
        name: &str,
        source_id: &str,
    ) -> Result<(SnapshotRecord, Option<CloneMethod>), CsiError> {
        let id = SnapshotId::for_name(name);
        let image = self.snapshot_image(&id);
        if let Some(existing) = self
            .store
            .get_or_torn::<SnapshotRecord>(Kind::Snapshots, id.as_str())?
        {
            if let Stored::Whole(ready) = existing {
                if ready.phase == Phase::Ready {
                    if ready.source_volume_id != source_id {
                        return Err(CsiError::AlreadyExists(format!(
                            "snapshot {name:?} exists with source volume {}",
                            ready.source_volume_id
                        )));
                    }
                    return Ok((ready, None));
                }
            }
            image::remove(&image)?;
            self.store.remove(Kind::Snapshots, id.as_str())?;
        }
        let (vid, volume) = self.ready_volume(source_id)?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let mut record = SnapshotRecord {
            id: id.to_string(),
            name: name.to_string(),
            source_volume_id: vid.to_string(),
            size: volume.capacity,
            fs_type: volume.fs_type,
            created_secs: i64::try_from(now.as_secs()).unwrap_or(i64::MAX),
            created_nanos: i32::try_from(now.subsec_nanos()).unwrap_or(0),
            phase: Phase::Creating,
        };
        self.store
            .put_volatile(Kind::Snapshots, id.as_str(), &record)?;
        let mut rollback = Rollback {
            driver: self,
            kind: Kind::Snapshots,
            id: id.to_string(),
            image: image.clone(),
            armed: true,
        };
        let method = {
            let _frozen = self.freeze_if_staged(&vid);
            image::clone_image(&self.volume_image(&vid), &image)?
        };
        record.phase = Phase::Ready;
        self.store.put(Kind::Snapshots, id.as_str(), &record)?;
        rollback.armed = false;
        tracing::info!(snapshot = %id, volume = %vid, ?method, "snapshot cut");
        Ok((record, Some(method)))
    }

    /// DeleteSnapshot: OK when already gone. Caller holds the claim.
    pub fn delete_snapshot(&self, id: &SnapshotId) -> Result<(), CsiError> {
        image::remove(&self.snapshot_image(id))?;
        self.store.remove(Kind::Snapshots, id.as_str())?;
        tracing::info!(snapshot = %id, "snapshot deleted");
        Ok(())
    }

    /// Freezes the volume's filesystem if it is staged on this node (so a snapshot is
    /// consistent); thawed when the guard drops. Best effort: a failure is logged.
    fn freeze_if_staged(&self, id: &VolumeId) -> Option<Frozen> {
        let node: NodeRecord = self.store.get(Kind::Node, id.as_str()).ok()??;
        if !matches!(node.access, AccessRecord::Mount { .. }) {
            return None;
        }
        let dir = File::open(&node.staging_path).ok()?;
        match sys::freeze(&dir) {
            Ok(()) => Some(Frozen {
                dir,
                path: node.staging_path,
            }),
            Err(e) => {
                tracing::warn!(volume = %id, error = %e, "could not freeze the staged filesystem; snapshot is crash-consistent only");
                None
            }
        }
    }
}

/// A frozen filesystem, thawed on drop.
struct Frozen {
    dir: File,
    path: PathBuf,
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if let Err(e) = sys::thaw(&self.dir) {
            tracing::error!(path = %self.path.display(), error = %e, "thawing after a snapshot failed");
        }
    }
}

/// The existing volume if `spec` asks for the same thing; ALREADY_EXISTS otherwise.
fn compatible(existing: VolumeRecord, spec: &VolumeSpec) -> Result<VolumeRecord, CsiError> {
    let size_ok =
        existing.capacity >= spec.required && (spec.limit == 0 || existing.capacity <= spec.limit);
    let mismatch = if !size_ok {
        Some(format!(
            "size {} outside the requested range [{}, {}]",
            existing.capacity, spec.required, spec.limit
        ))
    } else if existing.fs_type != spec.fs_type {
        Some(format!("filesystem {:?}", existing.fs_type))
    } else if existing.parameters != spec.parameters {
        Some(format!("parameters {:?}", existing.parameters))
    } else if existing.source != spec.source {
        Some(format!("content source {:?}", existing.source))
    } else {
        None
    };
    match mismatch {
        None => Ok(existing),
        Some(what) => Err(CsiError::AlreadyExists(format!(
            "volume {:?} already exists with {what}",
            spec.name
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn sizes_follow_the_range_the_minimum_and_the_source() {
        assert_eq!(
            decide_size(0, 0, 16 * MIB, 0).expect("default"),
            DEFAULT_VOLUME_SIZE
        );
        assert_eq!(
            decide_size(0, 64 * MIB, 16 * MIB, 0).expect("limit"),
            64 * MIB
        );
        assert_eq!(
            decide_size(100 * MIB + 1, 0, 16 * MIB, 0).expect("aligned"),
            100 * MIB + 4096
        );
        assert_eq!(
            decide_size(64 * MIB, 0, 16 * MIB, 128 * MIB).expect("source"),
            128 * MIB
        );
        let oor = |r: Result<u64, CsiError>| matches!(r, Err(CsiError::OutOfRange(_)));
        assert!(
            oor(decide_size(200 * MIB, 0, 300 * MIB, 0)),
            "xfs below 300 MiB"
        );
        assert!(
            oor(decide_size(64 * MIB, 32 * MIB, 16 * MIB, 0)),
            "required > limit"
        );
        assert!(
            oor(decide_size(64 * MIB, 100 * MIB, 16 * MIB, 128 * MIB)),
            "source > limit"
        );
        assert!(
            oor(decide_size(0, 8 * MIB, 16 * MIB, 0)),
            "limit below the minimum"
        );
    }

    fn spec() -> VolumeSpec {
        VolumeSpec {
            name: "pvc-a".into(),
            required: 64 * MIB,
            limit: 0,
            fs_type: Some(FsType::Ext4),
            parameters: BTreeMap::new(),
            source: None,
        }
    }

    #[test]
    fn a_repeated_create_must_ask_for_the_same_volume() {
        let existing = VolumeRecord {
            id: "nkv-x".into(),
            name: "pvc-a".into(),
            capacity: 64 * MIB,
            fs_type: Some(FsType::Ext4),
            parameters: BTreeMap::new(),
            source: None,
            phase: Phase::Ready,
        };
        assert!(compatible(existing.clone(), &spec()).is_ok());
        let exists = |s: VolumeSpec| {
            matches!(
                compatible(existing.clone(), &s),
                Err(CsiError::AlreadyExists(_))
            )
        };
        assert!(exists(VolumeSpec {
            required: 128 * MIB,
            ..spec()
        }));
        assert!(exists(VolumeSpec {
            limit: 32 * MIB,
            ..spec()
        }));
        assert!(exists(VolumeSpec {
            fs_type: Some(FsType::Xfs),
            ..spec()
        }));
        assert!(exists(VolumeSpec {
            parameters: BTreeMap::from([("fsType".into(), "ext4".into())]),
            ..spec()
        }));
        assert!(exists(VolumeSpec {
            source: Some(ContentSource::Snapshot("nks-1".into())),
            ..spec()
        }));
    }
}
