//! The Node service: argument checks with the spec's codes (paths resolved and confined by
//! [`crate::paths`]), then the volume's in-flight claim, then the blocking work of
//! [`crate::stage`].

use std::sync::Arc;

use nodekit_proto::csi::v1::node_server::Node;
use nodekit_proto::csi::v1::node_service_capability::rpc::Type as RpcType;
use nodekit_proto::csi::v1::node_service_capability::{Rpc, Type as CapType};
use nodekit_proto::csi::v1::volume_usage::Unit;
use nodekit_proto::csi::v1::*;
use tonic::{Request, Response, Status};

use crate::capability::Capability;
use crate::controller::CONTEXT_FS_TYPE;
use crate::driver::Driver;
use crate::error::CsiError;
use crate::fstools::FsType;
use crate::ids::VolumeId;
use crate::rpc::{blocking, rpc};

/// The Node service.
#[derive(Debug, Clone)]
pub struct NodeService {
    driver: Arc<Driver>,
}

impl NodeService {
    /// Serves the node for `driver`.
    pub fn new(driver: Arc<Driver>) -> Self {
        Self { driver }
    }

    /// A required path field, resolved and confined.
    fn path(&self, field: &'static str, raw: &str) -> Result<std::path::PathBuf, CsiError> {
        if raw.is_empty() {
            return Err(CsiError::missing(field));
        }
        Ok(self.driver.paths.resolve(field, raw)?)
    }
}

/// A volume ID the node acts on: required, and NOT_FOUND when it is not one of ours.
fn volume_id(raw: &str) -> Result<VolumeId, CsiError> {
    if raw.is_empty() {
        return Err(CsiError::missing("volume_id"));
    }
    VolumeId::parse(raw).ok_or_else(|| CsiError::NotFound(format!("volume {raw:?} does not exist")))
}

fn usage(unit: Unit, total: u64, available: Option<u64>, used: Option<u64>) -> VolumeUsage {
    let v = |x: u64| i64::try_from(x).unwrap_or(i64::MAX);
    VolumeUsage {
        available: available.map_or(0, v),
        total: v(total),
        used: used.map_or(0, v),
        unit: unit as i32,
    }
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        req: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        let req = req.into_inner();
        rpc("NodeStageVolume", async {
            if req.volume_id.is_empty() {
                return Err(CsiError::missing("volume_id"));
            }
            let staging = self.path("staging_target_path", &req.staging_target_path)?;
            let cap = Capability::parse("volume_capability", req.volume_capability.as_ref())?;
            let fs_hint = FsType::parse(
                req.volume_context
                    .get(CONTEXT_FS_TYPE)
                    .map_or("", String::as_str),
            )?;
            let id = volume_id(&req.volume_id)?;
            let claim = self.driver.claim(&[id.as_str()])?;
            blocking(&self.driver, move |d| {
                let _claim = claim;
                d.stage(&id, &staging, &cap, fs_hint)
            })
            .await?;
            Ok(NodeStageVolumeResponse {})
        })
        .await
    }

    async fn node_unstage_volume(
        &self,
        req: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        let req = req.into_inner();
        rpc("NodeUnstageVolume", async {
            if req.volume_id.is_empty() {
                return Err(CsiError::missing("volume_id"));
            }
            let staging = self.path("staging_target_path", &req.staging_target_path)?;
            let id = volume_id(&req.volume_id)?;
            let claim = self.driver.claim(&[id.as_str()])?;
            blocking(&self.driver, move |d| {
                let _claim = claim;
                d.unstage(&id, &staging)
            })
            .await?;
            Ok(NodeUnstageVolumeResponse {})
        })
        .await
    }

    async fn node_publish_volume(
        &self,
        req: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let req = req.into_inner();
        rpc("NodePublishVolume", async {
            if req.volume_id.is_empty() {
                return Err(CsiError::missing("volume_id"));
            }
            let target = self.path("target_path", &req.target_path)?;
            let cap = Capability::parse("volume_capability", req.volume_capability.as_ref())?;
            if req.staging_target_path.is_empty() {
                return Err(CsiError::FailedPrecondition(
                    "staging_target_path is required: this driver stages volumes (STAGE_UNSTAGE_VOLUME)".into(),
                ));
            }
            let staging = self.path("staging_target_path", &req.staging_target_path)?;
            let id = volume_id(&req.volume_id)?;
            let readonly = req.readonly;
            let claim = self.driver.claim(&[id.as_str()])?;
            blocking(&self.driver, move |d| {
                let _claim = claim;
                if !d.volume_image(&id).exists() {
                    return Err(CsiError::NotFound(format!("volume {id} does not exist")));
                }
                d.publish(&id, &staging, &target, &cap, readonly)
            })
            .await?;
            Ok(NodePublishVolumeResponse {})
        })
        .await
    }

    async fn node_unpublish_volume(
        &self,
        req: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let req = req.into_inner();
        rpc("NodeUnpublishVolume", async {
            if req.volume_id.is_empty() {
                return Err(CsiError::missing("volume_id"));
            }
            let target = self.path("target_path", &req.target_path)?;
            // An unknown volume's target is still unmounted and removed.
            let id = VolumeId::parse(&req.volume_id);
            let claim = match &id {
                Some(id) => Some(self.driver.claim(&[id.as_str()])?),
                None => None,
            };
            blocking(&self.driver, move |d| {
                let _claim = claim;
                d.unpublish(id.as_ref(), &target)
            })
            .await?;
            Ok(NodeUnpublishVolumeResponse {})
        })
        .await
    }

    async fn node_get_volume_stats(
        &self,
        req: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        let req = req.into_inner();
        rpc("NodeGetVolumeStats", async {
            if req.volume_id.is_empty() {
                return Err(CsiError::missing("volume_id"));
            }
            let path = self.path("volume_path", &req.volume_path)?;
            let id = volume_id(&req.volume_id)?;
            let (condition, u) = blocking(&self.driver, move |d| {
                let record = d.record_for_path(&id, &path)?;
                d.stats(&record, &path)
            })
            .await?;
            let volume_condition = Some(VolumeCondition {
                abnormal: condition.abnormal,
                message: condition.message,
            });
            let Some(u) = u else {
                return Ok(NodeGetVolumeStatsResponse {
                    usage: Vec::new(),
                    volume_condition,
                });
            };
            let mut out = vec![usage(Unit::Bytes, u.total, u.available, u.used)];
            if let Some((total, free, used)) = u.inodes {
                out.push(usage(Unit::Inodes, total, Some(free), Some(used)));
            }
            Ok(NodeGetVolumeStatsResponse {
                usage: out,
                volume_condition,
            })
        })
        .await
    }

    async fn node_expand_volume(
        &self,
        req: Request<NodeExpandVolumeRequest>,
    ) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        let req = req.into_inner();
        rpc("NodeExpandVolume", async {
            if req.volume_id.is_empty() {
                return Err(CsiError::missing("volume_id"));
            }
            let path = self.path("volume_path", &req.volume_path)?;
            if req.volume_capability.is_some() {
                Capability::parse("volume_capability", req.volume_capability.as_ref())?;
            }
            let required = match &req.capacity_range {
                Some(r) => u64::try_from(r.required_bytes).map_err(|_| {
                    CsiError::InvalidArgument(
                        "capacity_range.required_bytes must not be negative".into(),
                    )
                })?,
                None => 0,
            };
            let id = volume_id(&req.volume_id)?;
            let claim = self.driver.claim(&[id.as_str()])?;
            let capacity = blocking(&self.driver, move |d| {
                let _claim = claim;
                let record = d.record_for_path(&id, &path)?;
                d.expand_node(&id, &record, required)
            })
            .await?;
            Ok(NodeExpandVolumeResponse {
                capacity_bytes: i64::try_from(capacity).unwrap_or(i64::MAX),
            })
        })
        .await
    }

    async fn node_get_capabilities(
        &self,
        _req: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        let capabilities = [
            RpcType::StageUnstageVolume,
            RpcType::GetVolumeStats,
            RpcType::ExpandVolume,
            RpcType::SingleNodeMultiWriter,
            RpcType::VolumeCondition,
        ]
        .into_iter()
        .map(|t| NodeServiceCapability {
            r#type: Some(CapType::Rpc(Rpc { r#type: t as i32 })),
        })
        .collect();
        Ok(Response::new(NodeGetCapabilitiesResponse { capabilities }))
    }

    async fn node_get_info(
        &self,
        _req: Request<NodeGetInfoRequest>,
    ) -> Result<Response<NodeGetInfoResponse>, Status> {
        Ok(Response::new(NodeGetInfoResponse {
            node_id: self.driver.config.node_id.clone(),
            max_volumes_per_node: self.driver.config.max_volumes_per_node,
            accessible_topology: Some(Topology {
                segments: self.driver.topology(),
            }),
        }))
    }
}
