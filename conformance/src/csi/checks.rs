//! The checks of suite `csi`, each a test whose name reads as a sentence. Every check makes
//! its own uniquely named volumes and tears them down (unpublish, unstage, delete) before
//! returning, also on failure (`Volume` is a drop guard), so checks are independent.

use std::future::Future;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use nodekit_proto::csi::v1::controller_service_capability::rpc::Type as CtlCap;
use nodekit_proto::csi::v1::node_service_capability::rpc::Type as NodeCap;
use nodekit_proto::csi::v1::plugin_capability::service::Type as PluginService;
use nodekit_proto::csi::v1::plugin_capability::Type as PluginCapType;
use nodekit_proto::csi::v1::volume_capability::access_mode::Mode;
use nodekit_proto::csi::v1::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use nodekit_proto::csi::v1::volume_content_source::{SnapshotSource, Type as SourceType};
use nodekit_proto::csi::v1::*;
use tonic::{Code, Status};

use super::{Env, RPC_TIMEOUT};
use crate::report::Outcome;

const MIB: i64 = 1 << 20;

/// What stopped a check before it could judge the driver, or the judgement itself.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// An RPC failed where the spec requires success.
    #[error("{step}: {code:?}: {message}")]
    Rpc {
        /// The step of the check.
        step: String,
        /// The gRPC code.
        code: Code,
        /// The driver's message.
        message: String,
    },
    /// An RPC did not answer within [`RPC_TIMEOUT`].
    #[error("{step}: no answer within {RPC_TIMEOUT:?}")]
    Timeout {
        /// The step of the check.
        step: String,
    },
    /// The runner's own file work failed.
    #[error("{step}: {source}")]
    Io {
        /// What the runner was doing.
        step: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The driver's behaviour contradicts the spec; the message says how.
    #[error("{0}")]
    Violation(String),
}

fn violation(message: impl Into<String>) -> CheckError {
    CheckError::Violation(message.into())
}

fn io_err(step: impl Into<String>) -> impl FnOnce(std::io::Error) -> CheckError {
    let step = step.into();
    move |source| CheckError::Io { step, source }
}

/// A check's entry point.
pub type CheckFn = fn(&Env) -> Result<Outcome, CheckError>;

/// A check with its sentence-like name.
pub type Check = crate::suite::Check<CheckFn>;

/// The checks, in run order (the leftover check last).
pub const CHECKS: &[Check] = &[
    Check {
        name: "GetPluginInfo names the driver and Probe answers ready",
        run: identity_answers,
    },
    Check {
        name: "capabilities offer the controller service, create/delete and node staging",
        run: capabilities,
    },
    Check {
        name: "CreateVolume is idempotent and refuses a reused name with another size (ALREADY_EXISTS)",
        run: create_is_idempotent,
    },
    Check {
        name: "DeleteVolume is idempotent and OK for an unknown volume",
        run: delete_is_idempotent,
    },
    Check {
        name: "a mounted volume keeps its data across unpublish and re-publish; repeated calls stack nothing",
        run: node_lifecycle_keeps_data,
    },
    Check {
        name: "a read-only publish refuses writes",
        run: read_only_publish,
    },
    Check {
        name: "writing past the volume size fails with ENOSPC inside the volume",
        run: size_limit_is_real,
    },
    Check {
        name: "a block volume is a device of the volume's size at the target",
        run: block_volume,
    },
    Check {
        name: "a snapshot restores into a new volume with the data intact",
        run: snapshot_restores_data,
    },
    Check {
        name: "expansion of a mounted xfs volume is visible inside the filesystem",
        run: xfs_expands_online,
    },
    Check {
        name: "expansion of an ext4 volume is visible inside the filesystem (online, or after restaging)",
        run: ext4_expands,
    },
    Check {
        name: "bad input gets the spec's error codes",
        run: error_codes,
    },
    Check {
        name: "ListVolumes pages with next_token and answers ABORTED to a bad token",
        run: list_volumes_pages,
    },
    Check {
        name: "nothing is left mounted or attached after the checks",
        run: nothing_left,
    },
];

/// Runs one RPC with the suite's timeout.
fn call<T>(
    env: &Env,
    step: &str,
    fut: impl Future<Output = Result<tonic::Response<T>, Status>>,
) -> Result<T, CheckError> {
    match env
        .rt
        .block_on(async { tokio::time::timeout(RPC_TIMEOUT, fut).await })
    {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(s)) => Err(CheckError::Rpc {
            step: step.to_string(),
            code: s.code(),
            message: s.message().to_string(),
        }),
        Err(_) => Err(CheckError::Timeout {
            step: step.to_string(),
        }),
    }
}

/// The code an RPC answers with (`Ok` on success).
fn code_of<T>(
    env: &Env,
    step: &str,
    fut: impl Future<Output = Result<tonic::Response<T>, Status>>,
) -> Result<Code, CheckError> {
    match call(env, step, fut) {
        Ok(_) => Ok(Code::Ok),
        Err(CheckError::Rpc { code, .. }) => Ok(code),
        Err(e) => Err(e),
    }
}

fn mount_cap(fs: &str, mode: Mode) -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode { mode: mode as i32 }),
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: fs.into(),
            mount_flags: Vec::new(),
            volume_mount_group: String::new(),
        })),
    }
}

fn block_cap() -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(AccessType::Block(BlockVolume {})),
    }
}

fn create_req(name: &str, bytes: i64, cap: VolumeCapability) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![cap],
        ..Default::default()
    }
}

fn controller_caps(env: &Env) -> Result<Vec<CtlCap>, CheckError> {
    let r = call(
        env,
        "ControllerGetCapabilities",
        env.clients
            .controller
            .clone()
            .controller_get_capabilities(ControllerGetCapabilitiesRequest {}),
    )?;
    Ok(r.capabilities
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(controller_service_capability::Type::Rpc(rpc)) => {
                CtlCap::try_from(rpc.r#type).ok()
            }
            None => None,
        })
        .collect())
}

fn node_caps(env: &Env) -> Result<Vec<NodeCap>, CheckError> {
    let r = call(
        env,
        "NodeGetCapabilities",
        env.clients
            .node
            .clone()
            .node_get_capabilities(NodeGetCapabilitiesRequest {}),
    )?;
    Ok(r.capabilities
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(node_service_capability::Type::Rpc(rpc)) => NodeCap::try_from(rpc.r#type).ok(),
            None => None,
        })
        .collect())
}

/// A volume the check made, with where it is staged and published; torn down on drop.
struct Volume<'a> {
    env: &'a Env,
    volume: nodekit_proto::csi::v1::Volume,
    cap: VolumeCapability,
    staged: bool,
    staging: PathBuf,
    targets: Vec<PathBuf>,
}

impl<'a> Volume<'a> {
    /// Creates a volume (the caller's request) and remembers it for teardown.
    fn create(env: &'a Env, req: CreateVolumeRequest) -> Result<Self, CheckError> {
        let cap = req.volume_capabilities.first().cloned().unwrap_or_default();
        let name = req.name.clone();
        let resp = call(
            env,
            &format!("CreateVolume {name}"),
            env.clients.controller.clone().create_volume(req),
        )?;
        let volume = resp
            .volume
            .ok_or_else(|| violation(format!("CreateVolume {name} answered without a volume")))?;
        let staging = env.kubelet_dir.join("staging").join(&name);
        Ok(Self {
            env,
            volume,
            cap,
            staged: false,
            staging,
            targets: Vec::new(),
        })
    }

    fn id(&self) -> &str {
        &self.volume.volume_id
    }

    fn stage(&mut self) -> Result<(), CheckError> {
        std::fs::create_dir_all(&self.staging).map_err(io_err("creating the staging directory"))?;
        let req = NodeStageVolumeRequest {
            volume_id: self.id().to_string(),
            staging_target_path: self.staging.display().to_string(),
            volume_capability: Some(self.cap.clone()),
            volume_context: self.volume.volume_context.clone(),
            ..Default::default()
        };
        call(
            self.env,
            "NodeStageVolume",
            self.env.clients.node.clone().node_stage_volume(req),
        )?;
        self.staged = true;
        Ok(())
    }

    fn unstage(&mut self) -> Result<(), CheckError> {
        let req = NodeUnstageVolumeRequest {
            volume_id: self.id().to_string(),
            staging_target_path: self.staging.display().to_string(),
        };
        call(
            self.env,
            "NodeUnstageVolume",
            self.env.clients.node.clone().node_unstage_volume(req),
        )?;
        self.staged = false;
        Ok(())
    }

    fn target(&self, pod: &str) -> Result<PathBuf, CheckError> {
        let parent = self.env.kubelet_dir.join("pods").join(pod).join("volumes");
        std::fs::create_dir_all(&parent).map_err(io_err("creating the target's parent"))?;
        Ok(parent.join(self.id()))
    }

    fn publish_req(&self, target: &Path, readonly: bool) -> NodePublishVolumeRequest {
        NodePublishVolumeRequest {
            volume_id: self.id().to_string(),
            staging_target_path: self.staging.display().to_string(),
            target_path: target.display().to_string(),
            volume_capability: Some(self.cap.clone()),
            readonly,
            volume_context: self.volume.volume_context.clone(),
            ..Default::default()
        }
    }

    fn publish(&mut self, target: &Path, readonly: bool) -> Result<(), CheckError> {
        let req = self.publish_req(target, readonly);
        call(
            self.env,
            "NodePublishVolume",
            self.env.clients.node.clone().node_publish_volume(req),
        )?;
        if !self.targets.iter().any(|t| t == target) {
            self.targets.push(target.to_path_buf());
        }
        Ok(())
    }

    fn unpublish(&mut self, target: &Path) -> Result<(), CheckError> {
        let req = NodeUnpublishVolumeRequest {
            volume_id: self.id().to_string(),
            target_path: target.display().to_string(),
        };
        call(
            self.env,
            "NodeUnpublishVolume",
            self.env.clients.node.clone().node_unpublish_volume(req),
        )?;
        self.targets.retain(|t| t != target);
        Ok(())
    }

    /// Creates, stages and publishes at a fresh target; returns the target.
    fn mounted(env: &'a Env, req: CreateVolumeRequest) -> Result<(Self, PathBuf), CheckError> {
        let mut v = Self::create(env, req)?;
        v.stage()?;
        let target = v.target("pod")?;
        v.publish(&target, false)?;
        Ok((v, target))
    }

    fn expand(&self, bytes: i64, path: &Path) -> Result<Result<i64, Status>, CheckError> {
        call(
            self.env,
            "ControllerExpandVolume",
            self.env
                .clients
                .controller
                .clone()
                .controller_expand_volume(ControllerExpandVolumeRequest {
                    volume_id: self.id().to_string(),
                    capacity_range: Some(CapacityRange {
                        required_bytes: bytes,
                        limit_bytes: 0,
                    }),
                    volume_capability: Some(self.cap.clone()),
                    ..Default::default()
                }),
        )?;
        let req = NodeExpandVolumeRequest {
            volume_id: self.id().to_string(),
            volume_path: path.display().to_string(),
            capacity_range: Some(CapacityRange {
                required_bytes: bytes,
                limit_bytes: 0,
            }),
            staging_target_path: self.staging.display().to_string(),
            volume_capability: Some(self.cap.clone()),
            ..Default::default()
        };
        let out = self
            .env
            .rt
            .block_on(async {
                let mut node = self.env.clients.node.clone();
                tokio::time::timeout(RPC_TIMEOUT, node.node_expand_volume(req)).await
            })
            .map_err(|_| CheckError::Timeout {
                step: "NodeExpandVolume".into(),
            })?;
        Ok(out.map(|r| r.into_inner().capacity_bytes))
    }

    /// Unpublishes everything, unstages and deletes, reporting the first failure.
    fn teardown(&mut self) -> Result<(), CheckError> {
        for t in self.targets.clone() {
            self.unpublish(&t)?;
        }
        if self.staged {
            self.unstage()?;
        }
        let req = DeleteVolumeRequest {
            volume_id: self.id().to_string(),
            ..Default::default()
        };
        call(
            self.env,
            "DeleteVolume",
            self.env.clients.controller.clone().delete_volume(req),
        )?;
        self.volume.volume_id.clear();
        Ok(())
    }
}

impl Drop for Volume<'_> {
    fn drop(&mut self) {
        if !self.volume.volume_id.is_empty() {
            let _ = self.teardown();
        }
    }
}

fn write_file(path: &Path, data: &[u8]) -> Result<(), CheckError> {
    let mut f =
        std::fs::File::create(path).map_err(io_err(format!("creating {}", path.display())))?;
    f.write_all(data)
        .and_then(|()| f.sync_all())
        .map_err(io_err(format!("writing {}", path.display())))
}

fn read_file(path: &Path) -> Result<Vec<u8>, CheckError> {
    std::fs::read(path).map_err(io_err(format!("reading {}", path.display())))
}

/// Total bytes of the filesystem mounted at `path`.
fn fs_total(path: &Path) -> Result<u64, CheckError> {
    let st = nix::sys::statvfs::statvfs(path)
        .map_err(|e| io_err(format!("statvfs {}", path.display()))(e.into()))?;
    Ok(st.blocks() as u64 * st.fragment_size() as u64)
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// Mount points under `dir` (from /proc/self/mountinfo), deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let root = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut out: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| {
            PathBuf::from(
                m.replace("\\040", " ")
                    .replace("\\011", "\t")
                    .replace("\\134", "\\"),
            )
        })
        .filter(|m| m.starts_with(&root))
        .collect();
    out.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    out
}

/// Loop devices whose backing file lies under `dir` (`/sys/block/loop*/loop/backing_file`).
fn loops_backed_under(dir: &Path) -> Vec<String> {
    let root = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if !name.starts_with("loop") {
            continue;
        }
        if let Ok(backing) = std::fs::read_to_string(e.path().join("loop/backing_file")) {
            let backing = backing.trim_end().trim_end_matches(" (deleted)");
            if Path::new(backing).starts_with(&root) {
                out.push(format!("/dev/{name} ({backing})"));
            }
        }
    }
    out
}

fn identity_answers(env: &Env) -> Result<Outcome, CheckError> {
    let info = call(
        env,
        "GetPluginInfo",
        env.clients
            .identity
            .clone()
            .get_plugin_info(GetPluginInfoRequest {}),
    )?;
    if info.name.is_empty() || info.vendor_version.is_empty() {
        return Err(violation(format!(
            "GetPluginInfo must give name and vendor_version: {info:?}"
        )));
    }
    let probe = call(
        env,
        "Probe",
        env.clients.identity.clone().probe(ProbeRequest {}),
    )?;
    if probe.ready == Some(false) {
        return Err(violation("Probe answered ready=false on an idle driver"));
    }
    Ok(Outcome::passed_with(format!(
        "{} {}",
        info.name, info.vendor_version
    )))
}

fn capabilities(env: &Env) -> Result<Outcome, CheckError> {
    let plugin = call(
        env,
        "GetPluginCapabilities",
        env.clients
            .identity
            .clone()
            .get_plugin_capabilities(GetPluginCapabilitiesRequest {}),
    )?;
    let services: Vec<PluginService> = plugin
        .capabilities
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(PluginCapType::Service(s)) => PluginService::try_from(s.r#type).ok(),
            _ => None,
        })
        .collect();
    if !services.contains(&PluginService::ControllerService) {
        return Err(violation("GetPluginCapabilities lacks CONTROLLER_SERVICE"));
    }
    let ctl = controller_caps(env)?;
    if !ctl.contains(&CtlCap::CreateDeleteVolume) {
        return Err(violation(
            "ControllerGetCapabilities lacks CREATE_DELETE_VOLUME",
        ));
    }
    let node = node_caps(env)?;
    if !node.contains(&NodeCap::StageUnstageVolume) {
        return Err(violation(
            "NodeGetCapabilities lacks STAGE_UNSTAGE_VOLUME, which this suite drives",
        ));
    }
    let info = call(
        env,
        "NodeGetInfo",
        env.clients
            .node
            .clone()
            .node_get_info(NodeGetInfoRequest {}),
    )?;
    if info.node_id.is_empty() {
        return Err(violation("NodeGetInfo has no node_id"));
    }
    if services.contains(&PluginService::VolumeAccessibilityConstraints)
        && info
            .accessible_topology
            .as_ref()
            .is_none_or(|t| t.segments.is_empty())
    {
        return Err(violation(
            "VOLUME_ACCESSIBILITY_CONSTRAINTS is offered but NodeGetInfo has no accessible_topology",
        ));
    }
    let names = |v: Vec<String>| v.join(",");
    Ok(Outcome::passed_with(format!(
        "controller [{}], node [{}]",
        names(ctl.iter().map(|c| c.as_str_name().to_string()).collect()),
        names(node.iter().map(|c| c.as_str_name().to_string()).collect())
    )))
}

fn create_is_idempotent(env: &Env) -> Result<Outcome, CheckError> {
    let name = env.unique("idem");
    let req = create_req(&name, 64 * MIB, mount_cap("", Mode::SingleNodeWriter));
    let mut v = Volume::create(env, req.clone())?;
    let again = call(
        env,
        "repeated CreateVolume",
        env.clients.controller.clone().create_volume(req),
    )?;
    let again = again.volume.unwrap_or_default();
    if again.volume_id != v.volume.volume_id || again.capacity_bytes != v.volume.capacity_bytes {
        return Err(violation(format!(
            "a repeated CreateVolume returned another volume: {:?} then {:?}",
            v.volume, again
        )));
    }
    let bigger = create_req(
        &name,
        4 * v.volume.capacity_bytes.max(64 * MIB),
        mount_cap("", Mode::SingleNodeWriter),
    );
    let code = code_of(
        env,
        "CreateVolume with the name and another size",
        env.clients.controller.clone().create_volume(bigger),
    )?;
    if code != Code::AlreadyExists {
        return Err(violation(format!(
            "reusing a name with a larger size answered {code:?}, not ALREADY_EXISTS"
        )));
    }
    v.teardown()?;
    Ok(Outcome::passed())
}

fn delete_is_idempotent(env: &Env) -> Result<Outcome, CheckError> {
    let name = env.unique("del");
    let mut v = Volume::create(
        env,
        create_req(&name, 64 * MIB, mount_cap("", Mode::SingleNodeWriter)),
    )?;
    let id = v.id().to_string();
    v.teardown()?;
    let delete = |id: &str| DeleteVolumeRequest {
        volume_id: id.into(),
        ..Default::default()
    };
    call(
        env,
        "second DeleteVolume",
        env.clients.controller.clone().delete_volume(delete(&id)),
    )?;
    call(
        env,
        "DeleteVolume of an unknown volume",
        env.clients
            .controller
            .clone()
            .delete_volume(delete("nk-conformance-no-such-volume")),
    )?;
    Ok(Outcome::passed())
}

fn node_lifecycle_keeps_data(env: &Env) -> Result<Outcome, CheckError> {
    let name = env.unique("life");
    let mut v = Volume::create(
        env,
        create_req(&name, 64 * MIB, mount_cap("", Mode::SingleNodeWriter)),
    )?;
    v.stage()?;
    v.stage()
        .map_err(|e| violation(format!("a repeated NodeStageVolume must succeed: {e}")))?;
    let target = v.target("pod-a")?;
    v.publish(&target, false)?;
    v.publish(&target, false)
        .map_err(|e| violation(format!("a repeated NodePublishVolume must succeed: {e}")))?;
    let at_target = mounts_under(&target)
        .iter()
        .filter(|m| **m == target)
        .count();
    let at_staging = mounts_under(&v.staging)
        .iter()
        .filter(|m| **m == v.staging)
        .count();
    if at_target != 1 || at_staging > 1 {
        return Err(violation(format!(
            "repeated calls stacked mounts: {at_target} at the target, {at_staging} at the staging path"
        )));
    }
    let data = pattern(3 * MIB as usize + 17);
    write_file(&target.join("data.bin"), &data)?;
    v.unpublish(&target)?;
    v.unpublish(&target)
        .map_err(|e| violation(format!("a repeated NodeUnpublishVolume must succeed: {e}")))?;
    if target.exists() {
        return Err(violation("NodeUnpublishVolume left the target path behind"));
    }
    let again = v.target("pod-b")?;
    v.publish(&again, false)?;
    if read_file(&again.join("data.bin"))? != data {
        return Err(violation(
            "data written before unpublish differs after re-publish",
        ));
    }
    v.unpublish(&again)?;
    v.unstage()?;
    v.unstage()
        .map_err(|e| violation(format!("a repeated NodeUnstageVolume must succeed: {e}")))?;
    if !mounts_under(&v.staging).is_empty() {
        return Err(violation(
            "NodeUnstageVolume left a mount at the staging path",
        ));
    }
    v.teardown()?;
    Ok(Outcome::passed())
}

fn read_only_publish(env: &Env) -> Result<Outcome, CheckError> {
    let name = env.unique("ro");
    let mut v = Volume::create(
        env,
        create_req(&name, 64 * MIB, mount_cap("", Mode::SingleNodeWriter)),
    )?;
    v.stage()?;
    let rw = v.target("writer")?;
    v.publish(&rw, false)?;
    write_file(&rw.join("seen"), b"written read-write")?;
    v.unpublish(&rw)?;
    let ro = v.target("reader")?;
    v.publish(&ro, true)?;
    if read_file(&ro.join("seen"))? != b"written read-write" {
        return Err(violation(
            "a read-only publish does not show the volume's data",
        ));
    }
    match std::fs::File::create(ro.join("refused")) {
        Err(e) if e.raw_os_error() == Some(libc::EROFS) => {}
        other => {
            return Err(violation(format!(
                "writing through a read-only publish gave {other:?}, not EROFS"
            )))
        }
    }
    v.teardown()?;
    Ok(Outcome::passed())
}

fn size_limit_is_real(env: &Env) -> Result<Outcome, CheckError> {
    let name = env.unique("full");
    let (mut v, target) = Volume::mounted(
        env,
        create_req(&name, 64 * MIB, mount_cap("", Mode::SingleNodeWriter)),
    )?;
    let capacity = u64::try_from(v.volume.capacity_bytes).unwrap_or(0);
    let path = target.join("fill");
    let mut f = std::fs::File::create(&path).map_err(io_err("creating the fill file"))?;
    let chunk = vec![0x5au8; MIB as usize];
    let mut written: u64 = 0;
    let err = loop {
        if let Err(e) = f.write_all(&chunk).and_then(|()| f.sync_data()) {
            break e;
        }
        written += chunk.len() as u64;
        if written > capacity + 64 * MIB as u64 {
            return Err(violation(format!(
                "wrote {written} bytes into a {capacity}-byte volume without ENOSPC"
            )));
        }
    };
    drop(f);
    if err.raw_os_error() != Some(libc::ENOSPC) {
        return Err(violation(format!(
            "filling the volume failed with {err}, not ENOSPC"
        )));
    }
    v.teardown()?;
    Ok(Outcome::passed_with(format!(
        "{written} of {capacity} bytes written before ENOSPC"
    )))
}

fn block_volume(env: &Env) -> Result<Outcome, CheckError> {
    let name = env.unique("blk");
    let req = create_req(&name, 32 * MIB, block_cap());
    let mut v = match Volume::create(env, req) {
        Err(CheckError::Rpc {
            code: Code::InvalidArgument,
            message,
            ..
        }) => {
            return Ok(Outcome::Skipped(format!(
                "the driver refuses block volumes: {message}"
            )))
        }
        other => other?,
    };
    v.stage()?;
    let target = v.target("blk")?;
    v.publish(&target, false)?;
    let meta = std::fs::metadata(&target).map_err(io_err("inspecting the block target"))?;
    if !meta.file_type().is_block_device() {
        return Err(violation(format!(
            "{} is not a block device",
            target.display()
        )));
    }
    let mut dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&target)
        .map_err(io_err("opening the block device"))?;
    let size = dev
        .seek(SeekFrom::End(0))
        .map_err(io_err("sizing the device"))?;
    if i64::try_from(size).ok() != Some(v.volume.capacity_bytes) {
        return Err(violation(format!(
            "the device has {size} bytes, the volume {}",
            v.volume.capacity_bytes
        )));
    }
    let data = pattern(4096);
    dev.seek(SeekFrom::Start(MIB as u64))
        .and_then(|_| dev.write_all(&data))
        .and_then(|()| dev.sync_all())
        .map_err(io_err("writing the device"))?;
    let mut back = vec![0u8; data.len()];
    dev.seek(SeekFrom::Start(MIB as u64))
        .and_then(|_| dev.read_exact(&mut back))
        .map_err(io_err("reading the device"))?;
    drop(dev);
    if back != data {
        return Err(violation("data read back from the block device differs"));
    }
    v.teardown()?;
    Ok(Outcome::passed())
}

fn snapshot_restores_data(env: &Env) -> Result<Outcome, CheckError> {
    if !controller_caps(env)?.contains(&CtlCap::CreateDeleteSnapshot) {
        return Ok(Outcome::Skipped(
            "no CREATE_DELETE_SNAPSHOT capability".into(),
        ));
    }
    let name = env.unique("snapsrc");
    let cap = mount_cap("", Mode::SingleNodeWriter);
    let (mut src, target) = Volume::mounted(env, create_req(&name, 64 * MIB, cap.clone()))?;
    let data = pattern(5 * MIB as usize + 3);
    write_file(&target.join("keep.bin"), &data)?;
    let snap = call(
        env,
        "CreateSnapshot",
        env.clients
            .controller
            .clone()
            .create_snapshot(CreateSnapshotRequest {
                source_volume_id: src.id().to_string(),
                name: env.unique("snap"),
                ..Default::default()
            }),
    )?
    .snapshot
    .ok_or_else(|| violation("CreateSnapshot answered without a snapshot"))?;
    let snapshot_id = snap.snapshot_id.clone();
    let delete_snapshot = || {
        call(
            env,
            "DeleteSnapshot",
            env.clients
                .controller
                .clone()
                .delete_snapshot(DeleteSnapshotRequest {
                    snapshot_id: snapshot_id.clone(),
                    ..Default::default()
                }),
        )
    };
    let result = (|| {
        if !snap.ready_to_use {
            return Err(violation(
                "the snapshot is not ready_to_use (no post-processing expected)",
            ));
        }
        let mut req = create_req(&env.unique("restored"), 96 * MIB, cap.clone());
        req.volume_content_source = Some(VolumeContentSource {
            r#type: Some(SourceType::Snapshot(SnapshotSource {
                snapshot_id: snap.snapshot_id.clone(),
            })),
        });
        let (mut restored, rt) = Volume::mounted(env, req)?;
        if read_file(&rt.join("keep.bin"))? != data {
            return Err(violation(
                "the restored volume's data differs from the snapshot's source",
            ));
        }
        restored.teardown()
    })();
    let deleted = delete_snapshot();
    result?;
    deleted?;
    src.teardown()?;
    Ok(Outcome::passed())
}

/// Expands a mounted volume of `fs` from `from` to `to` MiB and checks the filesystem grew;
/// ext4 may need a restage (FAILED_PRECONDITION from NodeExpandVolume).
fn expansion(env: &Env, fs: &str, from: i64, to: i64) -> Result<Outcome, CheckError> {
    if !controller_caps(env)?.contains(&CtlCap::ExpandVolume)
        || !node_caps(env)?.contains(&NodeCap::ExpandVolume)
    {
        return Ok(Outcome::Skipped("no EXPAND_VOLUME capability".into()));
    }
    let name = env.unique(fs);
    let mut req = create_req(&name, from * MIB, mount_cap(fs, Mode::SingleNodeWriter));
    req.parameters.insert("fsType".into(), fs.into());
    let (mut v, target) = match Volume::mounted(env, req) {
        Err(CheckError::Rpc {
            code: Code::InvalidArgument,
            message,
            ..
        }) => {
            return Ok(Outcome::Skipped(format!(
                "the driver refuses {fs}: {message}"
            )))
        }
        other => other?,
    };
    write_file(&target.join("before"), b"expansion keeps data")?;
    let before = fs_total(&target)?;
    let mut note = "grown online".to_string();
    match v.expand(to * MIB, &target)? {
        Ok(_) => {}
        Err(s) if s.code() == Code::FailedPrecondition && fs == "ext4" => {
            v.unpublish(&target)?;
            v.unstage()?;
            v.stage()?;
            v.publish(&target, false)?;
            note = format!("grown at restage (online: {})", s.message());
        }
        Err(s) => {
            return Err(CheckError::Rpc {
                step: "NodeExpandVolume".into(),
                code: s.code(),
                message: s.message().into(),
            })
        }
    }
    let after = fs_total(&target)?;
    let grown = (to - from) * MIB;
    if (after as i64) - (before as i64) < grown * 3 / 4 {
        return Err(violation(format!(
            "the {fs} filesystem grew from {before} to {after} bytes after expanding by {grown}"
        )));
    }
    if read_file(&target.join("before"))? != b"expansion keeps data" {
        return Err(violation("data changed across the expansion"));
    }
    v.teardown()?;
    Ok(Outcome::passed_with(note))
}

fn xfs_expands_online(env: &Env) -> Result<Outcome, CheckError> {
    expansion(env, "xfs", 320, 448)
}

fn ext4_expands(env: &Env) -> Result<Outcome, CheckError> {
    expansion(env, "ext4", 64, 128)
}

fn error_codes(env: &Env) -> Result<Outcome, CheckError> {
    let ctl = || env.clients.controller.clone();
    let node = || env.clients.node.clone();
    let unknown = "nk-conformance-no-such-volume";
    let cap = mount_cap("", Mode::SingleNodeWriter);
    let mut v = Volume::create(env, create_req(&env.unique("codes"), 64 * MIB, cap.clone()))?;
    let target = v.target("codes")?;
    let staging = v.staging.clone();
    std::fs::create_dir_all(&staging).map_err(io_err("creating the staging directory"))?;
    let stage = |id: &str, path: &Path, cap: Option<VolumeCapability>| NodeStageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: path.display().to_string(),
        volume_capability: cap,
        ..Default::default()
    };
    let mut wrong = Vec::new();
    let mut expect = |what: &str, want: Code, got: Code| {
        if want != got {
            wrong.push(format!("{what}: {got:?}, want {want:?}"));
        }
    };
    let mut no_name = create_req("", 64 * MIB, cap.clone());
    expect(
        "CreateVolume without name",
        Code::InvalidArgument,
        code_of(env, "c", ctl().create_volume(no_name.clone()))?,
    );
    no_name.name = env.unique("nocaps");
    no_name.volume_capabilities.clear();
    expect(
        "CreateVolume without capabilities",
        Code::InvalidArgument,
        code_of(env, "c", ctl().create_volume(no_name))?,
    );
    let mut from_nothing = create_req(&env.unique("nosrc"), 64 * MIB, cap.clone());
    from_nothing.volume_content_source = Some(VolumeContentSource {
        r#type: Some(SourceType::Snapshot(SnapshotSource {
            snapshot_id: "nk-conformance-no-such-snapshot".into(),
        })),
    });
    let got = code_of(env, "c", ctl().create_volume(from_nothing))?;
    if controller_caps(env)?.contains(&CtlCap::CreateDeleteSnapshot) {
        expect("CreateVolume from an unknown snapshot", Code::NotFound, got);
    }
    let delete = DeleteVolumeRequest::default();
    expect(
        "DeleteVolume without volume_id",
        Code::InvalidArgument,
        code_of(env, "c", ctl().delete_volume(delete))?,
    );
    let validate = ValidateVolumeCapabilitiesRequest {
        volume_id: unknown.into(),
        volume_capabilities: vec![cap.clone()],
        ..Default::default()
    };
    expect(
        "ValidateVolumeCapabilities of an unknown volume",
        Code::NotFound,
        code_of(env, "c", ctl().validate_volume_capabilities(validate))?,
    );
    let expand = ControllerExpandVolumeRequest {
        volume_id: unknown.into(),
        capacity_range: Some(CapacityRange {
            required_bytes: 128 * MIB,
            limit_bytes: 0,
        }),
        ..Default::default()
    };
    if controller_caps(env)?.contains(&CtlCap::ExpandVolume) {
        expect(
            "ControllerExpandVolume of an unknown volume",
            Code::NotFound,
            code_of(env, "c", ctl().controller_expand_volume(expand))?,
        );
    }
    if controller_caps(env)?.contains(&CtlCap::CreateDeleteSnapshot) {
        let snap = CreateSnapshotRequest {
            source_volume_id: unknown.into(),
            name: env.unique("nosrc-snap"),
            ..Default::default()
        };
        expect(
            "CreateSnapshot of an unknown volume",
            Code::NotFound,
            code_of(env, "c", ctl().create_snapshot(snap))?,
        );
    }
    expect(
        "NodeStageVolume without volume_id",
        Code::InvalidArgument,
        code_of(
            env,
            "n",
            node().node_stage_volume(stage("", &staging, Some(cap.clone()))),
        )?,
    );
    expect(
        "NodeStageVolume without capability",
        Code::InvalidArgument,
        code_of(
            env,
            "n",
            node().node_stage_volume(stage(v.id(), &staging, None)),
        )?,
    );
    expect(
        "NodeStageVolume of an unknown volume",
        Code::NotFound,
        code_of(
            env,
            "n",
            node().node_stage_volume(stage(unknown, &staging, Some(cap.clone()))),
        )?,
    );
    expect(
        "NodePublishVolume before NodeStageVolume",
        Code::FailedPrecondition,
        code_of(
            env,
            "n",
            node().node_publish_volume(v.publish_req(&target, false)),
        )?,
    );
    let mut no_target = v.publish_req(&target, false);
    no_target.target_path.clear();
    expect(
        "NodePublishVolume without target_path",
        Code::InvalidArgument,
        code_of(env, "n", node().node_publish_volume(no_target))?,
    );
    let stats = NodeGetVolumeStatsRequest {
        volume_id: unknown.into(),
        volume_path: target.display().to_string(),
        staging_target_path: String::new(),
    };
    if node_caps(env)?.contains(&NodeCap::GetVolumeStats) {
        expect(
            "NodeGetVolumeStats of an unknown volume",
            Code::NotFound,
            code_of(env, "n", node().node_get_volume_stats(stats))?,
        );
    }
    let unpublish = NodeUnpublishVolumeRequest {
        volume_id: v.id().to_string(),
        target_path: String::new(),
    };
    expect(
        "NodeUnpublishVolume without target_path",
        Code::InvalidArgument,
        code_of(env, "n", node().node_unpublish_volume(unpublish))?,
    );
    v.teardown()?;
    if !wrong.is_empty() {
        return Err(violation(wrong.join("; ")));
    }
    Ok(Outcome::passed())
}

fn list_volumes_pages(env: &Env) -> Result<Outcome, CheckError> {
    if !controller_caps(env)?.contains(&CtlCap::ListVolumes) {
        return Ok(Outcome::Skipped("no LIST_VOLUMES capability".into()));
    }
    let mut made = Vec::new();
    for _ in 0..3 {
        let name = env.unique("page");
        made.push(Volume::create(
            env,
            create_req(&name, 64 * MIB, mount_cap("", Mode::SingleNodeWriter)),
        )?);
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    for _ in 0..100 {
        let page = call(
            env,
            "ListVolumes",
            env.clients
                .controller
                .clone()
                .list_volumes(ListVolumesRequest {
                    max_entries: 2,
                    starting_token: token.clone(),
                }),
        )?;
        if page.entries.len() > 2 {
            return Err(violation(format!(
                "max_entries 2 answered {} entries",
                page.entries.len()
            )));
        }
        seen.extend(
            page.entries
                .into_iter()
                .filter_map(|e| e.volume.map(|v| v.volume_id)),
        );
        token = page.next_token;
        if token.is_empty() {
            break;
        }
    }
    for v in &made {
        if !seen.iter().any(|s| s == v.id()) {
            return Err(violation(format!(
                "paging through ListVolumes never showed {}",
                v.id()
            )));
        }
    }
    let bad = ListVolumesRequest {
        max_entries: 1,
        starting_token: "nk-conformance-not-a-token".into(),
    };
    let code = code_of(
        env,
        "ListVolumes with a bad token",
        env.clients.controller.clone().list_volumes(bad),
    )?;
    if code != Code::Aborted {
        return Err(violation(format!(
            "a bad starting_token answered {code:?}, not ABORTED"
        )));
    }
    for mut v in made {
        v.teardown()?;
    }
    Ok(Outcome::passed())
}

fn nothing_left(env: &Env) -> Result<Outcome, CheckError> {
    let mounts = mounts_under(&env.kubelet_dir);
    if !mounts.is_empty() {
        return Err(violation(format!("left mounted: {mounts:?}")));
    }
    if let Some(pool) = &env.pool_dir {
        let loops = loops_backed_under(pool);
        if !loops.is_empty() {
            return Err(violation(format!("left attached: {}", loops.join(", "))));
        }
        let images: Vec<String> = ["volumes", "snapshots"]
            .iter()
            .filter_map(|d| std::fs::read_dir(pool.join(d)).ok())
            .flat_map(|rd| rd.flatten().map(|e| e.path().display().to_string()))
            .collect();
        if !images.is_empty() {
            return Err(violation(format!(
                "images of deleted volumes left: {images:?}"
            )));
        }
    }
    Ok(Outcome::passed())
}
