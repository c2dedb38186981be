//! The Identity service: name, capabilities, readiness.

use std::sync::Arc;

use nodekit_proto::csi::v1::identity_server::Identity;
use nodekit_proto::csi::v1::plugin_capability::{
    service, volume_expansion, Service, Type, VolumeExpansion,
};
use nodekit_proto::csi::v1::{
    GetPluginCapabilitiesRequest, GetPluginCapabilitiesResponse, GetPluginInfoRequest,
    GetPluginInfoResponse, PluginCapability, ProbeRequest, ProbeResponse,
};
use tonic::{Request, Response, Status};

use crate::driver::Driver;

/// The Identity service.
#[derive(Debug, Clone)]
pub struct IdentityService {
    driver: Arc<Driver>,
}

impl IdentityService {
    /// Serves identity for `driver`.
    pub fn new(driver: Arc<Driver>) -> Self {
        Self { driver }
    }
}

fn capability(t: Type) -> PluginCapability {
    PluginCapability { r#type: Some(t) }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _req: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse {
            name: self.driver.config.driver_name.clone(),
            vendor_version: env!("CARGO_PKG_VERSION").to_string(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _req: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        let mut caps = Vec::new();
        if self.driver.config.mode.controller() {
            caps.push(capability(Type::Service(Service {
                r#type: service::Type::ControllerService as i32,
            })));
        }
        caps.push(capability(Type::Service(Service {
            r#type: service::Type::VolumeAccessibilityConstraints as i32,
        })));
        caps.push(capability(Type::VolumeExpansion(VolumeExpansion {
            r#type: volume_expansion::Type::Online as i32,
        })));
        Ok(Response::new(GetPluginCapabilitiesResponse {
            capabilities: caps,
        }))
    }

    async fn probe(&self, _req: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        let pool = self.driver.config.pool_dir.is_dir();
        let state = self.driver.config.state_dir.is_dir();
        if !(pool && state) {
            return Err(Status::failed_precondition(format!(
                "pool dir {} or state dir {} is gone",
                self.driver.config.pool_dir.display(),
                self.driver.config.state_dir.display()
            )));
        }
        Ok(Response::new(ProbeResponse { ready: Some(true) }))
    }
}
