//! The DevicePlugin gRPC service of one resource. ListAndWatch sends the current list, then
//! the new list on every change, and ends when the server shuts down (so a graceful
//! shutdown never waits on a stream the kubelet keeps open).

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use nodekit_proto::deviceplugin::v1beta1 as api;
use nodekit_proto::deviceplugin::v1beta1::device_plugin_server::DevicePlugin;
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;
use tonic::{Request, Response, Status};

use super::resource::{list_response, DeviceList, ResourcePlugin};

/// The service: a resource plus the server's shutdown signal.
#[derive(Debug, Clone)]
pub struct PluginService {
    resource: Arc<ResourcePlugin>,
    shutdown: watch::Receiver<bool>,
}

impl PluginService {
    /// Serves `resource`; streams end once `shutdown` turns true.
    pub fn new(resource: Arc<ResourcePlugin>, shutdown: watch::Receiver<bool>) -> Self {
        Self { resource, shutdown }
    }
}

type ListStream = Pin<Box<dyn Stream<Item = Result<api::ListAndWatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl DevicePlugin for PluginService {
    async fn get_device_plugin_options(
        &self,
        _request: Request<api::Empty>,
    ) -> Result<Response<api::DevicePluginOptions>, Status> {
        Ok(Response::new(self.resource.options()))
    }

    type ListAndWatchStream = ListStream;

    async fn list_and_watch(
        &self,
        _request: Request<api::Empty>,
    ) -> Result<Response<Self::ListAndWatchStream>, Status> {
        let mut shutdown = self.shutdown.clone();
        let stopped = async move {
            // An error means the server is gone: stop too.
            let _ = shutdown.wait_for(|stop| *stop).await;
        };
        let stream = WatchStream::new(self.resource.subscribe())
            .map(|devices: DeviceList| Ok(list_response(&devices)))
            .take_until(stopped);
        tracing::debug!(resource = %self.resource.name(), "ListAndWatch opened");
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_preferred_allocation(
        &self,
        request: Request<api::PreferredAllocationRequest>,
    ) -> Result<Response<api::PreferredAllocationResponse>, Status> {
        let response = self.resource.preferred_allocation(request.get_ref())?;
        Ok(Response::new(response))
    }

    async fn allocate(
        &self,
        request: Request<api::AllocateRequest>,
    ) -> Result<Response<api::AllocateResponse>, Status> {
        let response = self.resource.allocate(request.get_ref()).inspect_err(|e| {
            tracing::warn!(resource = %self.resource.name(), error = %e, "Allocate refused");
        })?;
        Ok(Response::new(response))
    }

    async fn pre_start_container(
        &self,
        request: Request<api::PreStartContainerRequest>,
    ) -> Result<Response<api::PreStartContainerResponse>, Status> {
        self.resource.pre_start(request.get_ref())?;
        Ok(Response::new(api::PreStartContainerResponse {}))
    }
}
