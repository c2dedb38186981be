//! The Controller service: every handler checks its arguments first (with the spec's codes),
//! then claims the objects it touches (ABORTED when busy) and runs the blocking work of
//! [`crate::provision`].

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use nodekit_proto::csi::v1::controller_server::Controller;
use nodekit_proto::csi::v1::controller_service_capability::rpc::Type as RpcType;
use nodekit_proto::csi::v1::controller_service_capability::{Rpc, Type as CapType};
use nodekit_proto::csi::v1::validate_volume_capabilities_response::Confirmed;
use nodekit_proto::csi::v1::volume_content_source::{
    SnapshotSource, Type as SourceType, VolumeSource,
};
use nodekit_proto::csi::v1::*;
use tonic::{Request, Response, Status};

use crate::capability::{Access, Capability};
use crate::driver::{Driver, TOPOLOGY_KEY};
use crate::error::CsiError;
use crate::fstools::FsType;
use crate::ids::{SnapshotId, VolumeId};
use crate::paging::page;
use crate::rpc::{blocking, rpc};
use crate::state::{ContentSource, Kind, Phase, SnapshotRecord, VolumeRecord};

/// The volume context key carrying the filesystem CreateVolume made.
pub const CONTEXT_FS_TYPE: &str = "fsType";
/// The parameter naming the filesystem.
pub const PARAM_FS_TYPE: &str = "fsType";
/// Parameters with this prefix are the CO's (e.g. `--extra-create-metadata`) and accepted.
const CO_PARAM_PREFIX: &str = "csi.storage.k8s.io/";

/// The Controller service.
#[derive(Debug, Clone)]
pub struct ControllerService {
    driver: Arc<Driver>,
}

impl ControllerService {
    /// Serves the controller for `driver`.
    pub fn new(driver: Arc<Driver>) -> Self {
        Self { driver }
    }

    fn volume(&self, rec: &VolumeRecord) -> Volume {
        let mut context = HashMap::new();
        if let Some(fs) = rec.fs_type {
            context.insert(CONTEXT_FS_TYPE.to_string(), fs.name().to_string());
        }
        Volume {
            capacity_bytes: i64::try_from(rec.capacity).unwrap_or(i64::MAX),
            volume_id: rec.id.clone(),
            volume_context: context,
            content_source: rec.source.as_ref().map(source_to_proto),
            accessible_topology: vec![Topology {
                segments: self.driver.topology(),
            }],
        }
    }

    /// The controller's view of a volume's condition: its image is there at full size.
    fn condition(&self, rec: &VolumeRecord) -> VolumeCondition {
        let image = VolumeId::parse(&rec.id).map(|id| self.driver.volume_image(&id));
        let size = image
            .as_ref()
            .and_then(|p| std::fs::metadata(p).ok())
            .map(|m| m.len());
        match size {
            Some(s) if s >= rec.capacity => VolumeCondition {
                abnormal: false,
                message: "image present".into(),
            },
            Some(s) => VolumeCondition {
                abnormal: true,
                message: format!("image is {s} bytes, the volume {}", rec.capacity),
            },
            None => VolumeCondition {
                abnormal: true,
                message: "image missing from the pool".into(),
            },
        }
    }

    /// Whether a topology the CO asks for includes this node (a segment without our key
    /// does not constrain it).
    fn topology_matches(&self, t: &Topology) -> bool {
        t.segments
            .get(TOPOLOGY_KEY)
            .is_none_or(|n| *n == self.driver.config.node_id)
    }
}

fn source_to_proto(s: &ContentSource) -> VolumeContentSource {
    VolumeContentSource {
        r#type: Some(match s {
            ContentSource::Snapshot(id) => SourceType::Snapshot(SnapshotSource {
                snapshot_id: id.clone(),
            }),
            ContentSource::Volume(id) => SourceType::Volume(VolumeSource {
                volume_id: id.clone(),
            }),
        }),
    }
}

fn snapshot_proto(rec: &SnapshotRecord) -> Snapshot {
    Snapshot {
        size_bytes: i64::try_from(rec.size).unwrap_or(i64::MAX),
        snapshot_id: rec.id.clone(),
        source_volume_id: rec.source_volume_id.clone(),
        creation_time: Some(prost_types::Timestamp {
            seconds: rec.created_secs,
            nanos: rec.created_nanos,
        }),
        ready_to_use: rec.phase == Phase::Ready,
        group_snapshot_id: String::new(),
    }
}

/// Accepts `fsType` and the CO's own keys; anything else is a typo to report.
fn check_parameters(
    params: &HashMap<String, String>,
) -> Result<BTreeMap<String, String>, CsiError> {
    for key in params.keys() {
        if key != PARAM_FS_TYPE && !key.starts_with(CO_PARAM_PREFIX) {
            return Err(CsiError::InvalidArgument(format!(
                "unknown parameter {key:?}: nodekit-csi takes {PARAM_FS_TYPE:?}"
            )));
        }
    }
    Ok(params.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
}

/// (required, limit) from a capacity range, refusing negative values.
fn range(r: Option<&CapacityRange>) -> Result<(u64, u64), CsiError> {
    let Some(r) = r else { return Ok((0, 0)) };
    let non_negative = |v: i64, field: &str| {
        u64::try_from(v).map_err(|_| {
            CsiError::InvalidArgument(format!("capacity_range.{field} must not be negative"))
        })
    };
    Ok((
        non_negative(r.required_bytes, "required_bytes")?,
        non_negative(r.limit_bytes, "limit_bytes")?,
    ))
}

/// The filesystem a CreateVolume asks for (`None`: raw block), from the `fsType`
/// parameter and the capabilities, which must agree.
fn requested_fs(
    params: &HashMap<String, String>,
    caps: &[Capability],
) -> Result<Option<FsType>, CsiError> {
    let param = FsType::parse(params.get(PARAM_FS_TYPE).map_or("", String::as_str))?;
    let blocks = caps.iter().filter(|c| c.access == Access::Block).count();
    if blocks == caps.len() {
        if param.is_some() {
            return Err(CsiError::InvalidArgument(
                "fsType was given for a block-only volume".into(),
            ));
        }
        return Ok(None);
    }
    if blocks > 0 {
        return Err(CsiError::InvalidArgument(
            "volume_capabilities mix block and mount access".into(),
        ));
    }
    let mut chosen = param;
    for cap in caps {
        if let Access::Mount {
            fs_type: Some(fs), ..
        } = cap.access
        {
            match chosen {
                Some(c) if c != fs => {
                    return Err(CsiError::InvalidArgument(format!(
                        "conflicting filesystems requested: {c} and {fs}"
                    )))
                }
                _ => chosen = Some(fs),
            }
        }
    }
    Ok(Some(chosen.unwrap_or(FsType::DEFAULT)))
}

fn content_source(src: Option<&VolumeContentSource>) -> Result<Option<ContentSource>, CsiError> {
    let Some(src) = src else { return Ok(None) };
    match &src.r#type {
        Some(SourceType::Snapshot(s)) if !s.snapshot_id.is_empty() => {
            Ok(Some(ContentSource::Snapshot(s.snapshot_id.clone())))
        }
        Some(SourceType::Volume(v)) if !v.volume_id.is_empty() => {
            Ok(Some(ContentSource::Volume(v.volume_id.clone())))
        }
        _ => Err(CsiError::InvalidArgument(
            "volume_content_source needs a snapshot_id or a volume_id".into(),
        )),
    }
}

fn unimplemented<T>(what: &str) -> Result<Response<T>, Status> {
    Err(Status::unimplemented(format!(
        "{what} is not offered by nodekit-csi"
    )))
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(
        &self,
        req: Request<CreateVolumeRequest>,
    ) -> Result<Response<CreateVolumeResponse>, Status> {
        let req = req.into_inner();
        rpc("CreateVolume", async {
            if req.name.is_empty() {
                return Err(CsiError::missing("name"));
            }
            if req.volume_capabilities.is_empty() {
                return Err(CsiError::missing("volume_capabilities"));
            }
            let caps = req
                .volume_capabilities
                .iter()
                .map(|c| Capability::parse("volume_capabilities", Some(c)))
                .collect::<Result<Vec<_>, _>>()?;
            let parameters = check_parameters(&req.parameters)?;
            let fs_type = requested_fs(&req.parameters, &caps)?;
            let (required, limit) = range(req.capacity_range.as_ref())?;
            let source = content_source(req.volume_content_source.as_ref())?;
            if let Some(topo) = &req.accessibility_requirements {
                if !topo.requisite.is_empty() && !topo.requisite.iter().any(|t| self.topology_matches(t)) {
                    return Err(CsiError::ResourceExhausted(format!(
                        "this driver provisions only on node {:?}, which the requisite topology excludes",
                        self.driver.config.node_id
                    )));
                }
            }
            let spec = crate::provision::VolumeSpec {
                name: req.name.clone(),
                required,
                limit,
                fs_type,
                parameters,
                source,
            };
            let id = VolumeId::for_name(&spec.name);
            let mut keys = vec![id.to_string()];
            if let Some(ContentSource::Snapshot(s) | ContentSource::Volume(s)) = &spec.source {
                keys.push(s.clone());
            }
            let key_refs: Vec<&str> = keys.iter().map(String::as_str).collect();
            let claim = self.driver.claim(&key_refs)?;
            let rec = blocking(&self.driver, move |d| {
                let _claim = claim;
                d.create_volume(&spec)
            })
            .await?;
            Ok(CreateVolumeResponse {
                volume: Some(self.volume(&rec)),
            })
        })
        .await
    }

    async fn delete_volume(
        &self,
        req: Request<DeleteVolumeRequest>,
    ) -> Result<Response<DeleteVolumeResponse>, Status> {
        let req = req.into_inner();
        rpc("DeleteVolume", async {
            if req.volume_id.is_empty() {
                return Err(CsiError::missing("volume_id"));
            }
            // Not an ID this driver makes: there is nothing to delete.
            let Some(id) = VolumeId::parse(&req.volume_id) else {
                return Ok(DeleteVolumeResponse {});
            };
            let claim = self.driver.claim(&[id.as_str()])?;
            blocking(&self.driver, move |d| {
                let _claim = claim;
                d.delete_volume(&id)
            })
            .await?;
            Ok(DeleteVolumeResponse {})
        })
        .await
    }

    async fn controller_publish_volume(
        &self,
        _req: Request<ControllerPublishVolumeRequest>,
    ) -> Result<Response<ControllerPublishVolumeResponse>, Status> {
        unimplemented("ControllerPublishVolume")
    }

    async fn controller_unpublish_volume(
        &self,
        _req: Request<ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<ControllerUnpublishVolumeResponse>, Status> {
        unimplemented("ControllerUnpublishVolume")
    }

    async fn validate_volume_capabilities(
        &self,
        req: Request<ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<ValidateVolumeCapabilitiesResponse>, Status> {
        let req = req.into_inner();
        rpc("ValidateVolumeCapabilities", async {
            if req.volume_id.is_empty() {
                return Err(CsiError::missing("volume_id"));
            }
            if req.volume_capabilities.is_empty() {
                return Err(CsiError::missing("volume_capabilities"));
            }
            for c in &req.volume_capabilities {
                if c.access_type.is_none() || c.access_mode.is_none() {
                    return Err(CsiError::InvalidArgument(
                        "each volume capability needs access_type and access_mode".into(),
                    ));
                }
            }
            let (_, rec) = self.driver.ready_volume(&req.volume_id)?;
            let unconfirmed = |message: String| ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message,
            };
            for c in &req.volume_capabilities {
                let cap = match Capability::parse("volume_capabilities", Some(c)) {
                    Ok(cap) => cap,
                    Err(e) => return Ok(unconfirmed(e.to_string())),
                };
                if let (
                    Access::Mount {
                        fs_type: Some(asked),
                        ..
                    },
                    Some(has),
                ) = (&cap.access, rec.fs_type)
                {
                    if *asked != has {
                        return Ok(unconfirmed(format!("the volume holds {has}, not {asked}")));
                    }
                }
            }
            let params = check_parameters(&req.parameters);
            if !req.parameters.is_empty() && params.as_ref().ok() != Some(&rec.parameters) {
                return Ok(unconfirmed("parameters differ from the volume's".into()));
            }
            Ok(ValidateVolumeCapabilitiesResponse {
                confirmed: Some(Confirmed {
                    volume_context: req.volume_context.clone(),
                    volume_capabilities: req.volume_capabilities.clone(),
                    parameters: req.parameters.clone(),
                    mutable_parameters: HashMap::new(),
                }),
                message: String::new(),
            })
        })
        .await
    }

    async fn list_volumes(
        &self,
        req: Request<ListVolumesRequest>,
    ) -> Result<Response<ListVolumesResponse>, Status> {
        let req = req.into_inner();
        rpc("ListVolumes", async {
            let all: Vec<VolumeRecord> = self
                .driver
                .store
                .list::<VolumeRecord>(Kind::Volumes)?
                .into_iter()
                .filter(|v| v.phase == Phase::Ready)
                .collect();
            let (items, next_token) = page(
                all,
                |v| v.id.as_str(),
                &req.starting_token,
                req.max_entries,
                |t| VolumeId::parse(t).is_some(),
            )?;
            Ok(ListVolumesResponse {
                entries: items
                    .iter()
                    .map(|v| list_volumes_response::Entry {
                        volume: Some(self.volume(v)),
                        status: Some(list_volumes_response::VolumeStatus {
                            published_node_ids: Vec::new(),
                            volume_condition: Some(self.condition(v)),
                        }),
                    })
                    .collect(),
                next_token,
            })
        })
        .await
    }

    async fn get_capacity(
        &self,
        req: Request<GetCapacityRequest>,
    ) -> Result<Response<GetCapacityResponse>, Status> {
        let req = req.into_inner();
        rpc("GetCapacity", async {
            let caps = req
                .volume_capabilities
                .iter()
                .map(|c| Capability::parse("volume_capabilities", Some(c)))
                .collect::<Result<Vec<_>, _>>()?;
            check_parameters(&req.parameters)?;
            let fs = if caps.is_empty() {
                FsType::parse(req.parameters.get(PARAM_FS_TYPE).map_or("", String::as_str))?
                    .or(Some(FsType::DEFAULT))
            } else {
                requested_fs(&req.parameters, &caps)?
            };
            let min = fs.map_or(4096, FsType::min_size);
            let elsewhere = req
                .accessible_topology
                .as_ref()
                .is_some_and(|t| !self.topology_matches(t));
            let available = if elsewhere {
                0
            } else {
                let driver = Arc::clone(&self.driver);
                blocking(&driver, |d| d.capacity()).await?.available
            };
            let available = i64::try_from(available).unwrap_or(i64::MAX);
            Ok(GetCapacityResponse {
                available_capacity: available,
                maximum_volume_size: Some(available),
                minimum_volume_size: Some(i64::try_from(min).unwrap_or(i64::MAX)),
            })
        })
        .await
    }

    async fn controller_get_capabilities(
        &self,
        _req: Request<ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<ControllerGetCapabilitiesResponse>, Status> {
        let capabilities = [
            RpcType::CreateDeleteVolume,
            RpcType::ListVolumes,
            RpcType::GetCapacity,
            RpcType::CreateDeleteSnapshot,
            RpcType::ListSnapshots,
            RpcType::CloneVolume,
            RpcType::ExpandVolume,
            RpcType::GetVolume,
            RpcType::VolumeCondition,
            RpcType::SingleNodeMultiWriter,
            RpcType::GetSnapshot,
        ]
        .into_iter()
        .map(|t| ControllerServiceCapability {
            r#type: Some(CapType::Rpc(Rpc { r#type: t as i32 })),
        })
        .collect();
        Ok(Response::new(ControllerGetCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn create_snapshot(
        &self,
        req: Request<CreateSnapshotRequest>,
    ) -> Result<Response<CreateSnapshotResponse>, Status> {
        let req = req.into_inner();
        rpc("CreateSnapshot", async {
            if req.source_volume_id.is_empty() {
                return Err(CsiError::missing("source_volume_id"));
            }
            if req.name.is_empty() {
                return Err(CsiError::missing("name"));
            }
            check_parameters(&req.parameters)?;
            let id = SnapshotId::for_name(&req.name);
            let claim = self.driver.claim(&[id.as_str(), &req.source_volume_id])?;
            let (name, source) = (req.name.clone(), req.source_volume_id.clone());
            let (rec, _) = blocking(&self.driver, move |d| {
                let _claim = claim;
                d.create_snapshot(&name, &source)
            })
            .await?;
            Ok(CreateSnapshotResponse {
                snapshot: Some(snapshot_proto(&rec)),
            })
        })
        .await
    }

    async fn delete_snapshot(
        &self,
        req: Request<DeleteSnapshotRequest>,
    ) -> Result<Response<DeleteSnapshotResponse>, Status> {
        let req = req.into_inner();
        rpc("DeleteSnapshot", async {
            if req.snapshot_id.is_empty() {
                return Err(CsiError::missing("snapshot_id"));
            }
            let Some(id) = SnapshotId::parse(&req.snapshot_id) else {
                return Ok(DeleteSnapshotResponse {});
            };
            let claim = self.driver.claim(&[id.as_str()])?;
            blocking(&self.driver, move |d| {
                let _claim = claim;
                d.delete_snapshot(&id)
            })
            .await?;
            Ok(DeleteSnapshotResponse {})
        })
        .await
    }

    async fn list_snapshots(
        &self,
        req: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        let req = req.into_inner();
        rpc("ListSnapshots", async {
            let all: Vec<SnapshotRecord> = self
                .driver
                .store
                .list::<SnapshotRecord>(Kind::Snapshots)?
                .into_iter()
                .filter(|s| s.phase == Phase::Ready)
                .filter(|s| req.snapshot_id.is_empty() || s.id == req.snapshot_id)
                .filter(|s| {
                    req.source_volume_id.is_empty() || s.source_volume_id == req.source_volume_id
                })
                .collect();
            let (items, next_token) = page(
                all,
                |s| s.id.as_str(),
                &req.starting_token,
                req.max_entries,
                |t| SnapshotId::parse(t).is_some(),
            )?;
            Ok(ListSnapshotsResponse {
                entries: items
                    .iter()
                    .map(|s| list_snapshots_response::Entry {
                        snapshot: Some(snapshot_proto(s)),
                    })
                    .collect(),
                next_token,
            })
        })
        .await
    }

    async fn get_snapshot(
        &self,
        req: Request<GetSnapshotRequest>,
    ) -> Result<Response<GetSnapshotResponse>, Status> {
        let req = req.into_inner();
        rpc("GetSnapshot", async {
            if req.snapshot_id.is_empty() {
                return Err(CsiError::missing("snapshot_id"));
            }
            let (_, rec) = self.driver.ready_snapshot(&req.snapshot_id)?;
            Ok(GetSnapshotResponse {
                snapshot: Some(snapshot_proto(&rec)),
            })
        })
        .await
    }

    async fn controller_expand_volume(
        &self,
        req: Request<ControllerExpandVolumeRequest>,
    ) -> Result<Response<ControllerExpandVolumeResponse>, Status> {
        let req = req.into_inner();
        rpc("ControllerExpandVolume", async {
            if req.volume_id.is_empty() {
                return Err(CsiError::missing("volume_id"));
            }
            let range_req = req
                .capacity_range
                .as_ref()
                .ok_or_else(|| CsiError::missing("capacity_range"))?;
            let (required, limit) = range(Some(range_req))?;
            if req.volume_capability.is_some() {
                Capability::parse("volume_capability", req.volume_capability.as_ref())?;
            }
            let (id, rec) = self.driver.ready_volume(&req.volume_id)?;
            let claim = self.driver.claim(&[id.as_str()])?;
            let capacity = blocking(&self.driver, move |d| {
                let _claim = claim;
                d.expand_volume(&id, rec, required, limit)
            })
            .await?;
            Ok(ControllerExpandVolumeResponse {
                capacity_bytes: i64::try_from(capacity).unwrap_or(i64::MAX),
                node_expansion_required: true,
            })
        })
        .await
    }

    async fn controller_get_volume(
        &self,
        req: Request<ControllerGetVolumeRequest>,
    ) -> Result<Response<ControllerGetVolumeResponse>, Status> {
        let req = req.into_inner();
        rpc("ControllerGetVolume", async {
            if req.volume_id.is_empty() {
                return Err(CsiError::missing("volume_id"));
            }
            let (_, rec) = self.driver.ready_volume(&req.volume_id)?;
            Ok(ControllerGetVolumeResponse {
                volume: Some(self.volume(&rec)),
                status: Some(controller_get_volume_response::VolumeStatus {
                    published_node_ids: Vec::new(),
                    volume_condition: Some(self.condition(&rec)),
                }),
            })
        })
        .await
    }

    async fn controller_modify_volume(
        &self,
        _req: Request<ControllerModifyVolumeRequest>,
    ) -> Result<Response<ControllerModifyVolumeResponse>, Status> {
        unimplemented("ControllerModifyVolume")
    }
}

#[cfg(test)]
mod tests {
    use nodekit_proto::csi::v1::volume_capability::access_mode::Mode;

    use super::*;

    fn mount_cap(fs: Option<FsType>) -> Capability {
        Capability {
            access: Access::Mount {
                fs_type: fs,
                mount_flags: Vec::new(),
            },
            mode: Mode::SingleNodeWriter,
        }
    }

    #[test]
    fn the_filesystem_comes_from_parameters_or_capabilities_and_must_agree() {
        let none = HashMap::new();
        let xfs_param = HashMap::from([(PARAM_FS_TYPE.to_string(), "xfs".to_string())]);
        assert_eq!(
            requested_fs(&none, &[mount_cap(None)]).expect("default"),
            Some(FsType::Ext4)
        );
        assert_eq!(
            requested_fs(&xfs_param, &[mount_cap(None)]).expect("param"),
            Some(FsType::Xfs)
        );
        assert_eq!(
            requested_fs(&none, &[mount_cap(Some(FsType::Xfs))]).expect("cap"),
            Some(FsType::Xfs)
        );
        let block = Capability {
            access: Access::Block,
            mode: Mode::SingleNodeWriter,
        };
        assert_eq!(
            requested_fs(&none, std::slice::from_ref(&block)).expect("block"),
            None
        );
        let invalid =
            |r: Result<Option<FsType>, CsiError>| matches!(r, Err(CsiError::InvalidArgument(_)));
        assert!(invalid(requested_fs(
            &xfs_param,
            &[mount_cap(Some(FsType::Ext4))]
        )));
        assert!(invalid(requested_fs(
            &none,
            &[block.clone(), mount_cap(None)]
        )));
        assert!(invalid(requested_fs(&xfs_param, &[block])));
    }

    #[tokio::test]
    async fn a_call_on_a_volume_with_an_operation_in_flight_is_aborted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let driver = Arc::new(
            Driver::new(crate::driver::Config {
                driver_name: "t".into(),
                node_id: "n".into(),
                state_dir: dir.path().join("state"),
                pool_dir: dir.path().join("pool"),
                mode: crate::driver::Mode::All,
                kubelet_root: dir.path().join("kubelet"),
                allow_any_path: false,
                max_capacity: None,
                max_volumes_per_node: 0,
            })
            .expect("driver"),
        );
        let service = ControllerService::new(Arc::clone(&driver));
        let id = VolumeId::for_name("busy");
        let held = driver.claim(&[id.as_str()]).expect("claim");
        let req = CreateVolumeRequest {
            name: "busy".into(),
            volume_capabilities: vec![VolumeCapability {
                access_mode: Some(volume_capability::AccessMode {
                    mode: Mode::SingleNodeWriter as i32,
                }),
                access_type: Some(volume_capability::AccessType::Block(
                    volume_capability::BlockVolume {},
                )),
            }],
            ..Default::default()
        };
        let status = service
            .create_volume(Request::new(req.clone()))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Aborted, "{status:?}");
        let delete = DeleteVolumeRequest {
            volume_id: id.to_string(),
            ..Default::default()
        };
        let status = service
            .delete_volume(Request::new(delete))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Aborted);
        drop(held);
        assert!(
            driver.claim(&[id.as_str()]).is_ok(),
            "released with the guard"
        );
    }

    #[test]
    fn unknown_parameters_and_negative_sizes_are_invalid() {
        let ok = HashMap::from([
            ("fsType".to_string(), "xfs".to_string()),
            (
                "csi.storage.k8s.io/pvc/name".to_string(),
                "data".to_string(),
            ),
        ]);
        assert_eq!(check_parameters(&ok).expect("ok").len(), 2);
        let typo = HashMap::from([("fstype".to_string(), "xfs".to_string())]);
        assert!(matches!(
            check_parameters(&typo),
            Err(CsiError::InvalidArgument(_))
        ));
        let neg = CapacityRange {
            required_bytes: -1,
            limit_bytes: 0,
        };
        assert!(matches!(
            range(Some(&neg)),
            Err(CsiError::InvalidArgument(_))
        ));
        assert_eq!(range(None).expect("unset"), (0, 0));
    }
}
