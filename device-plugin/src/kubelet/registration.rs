//! The kubelet's Registration service on `kubelet.sock`. Stopping it removes the socket, so
//! stop + start is what a plugin sees of a kubelet restart.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nodekit_proto::deviceplugin::v1beta1 as api;
use nodekit_proto::deviceplugin::v1beta1::registration_server::{Registration, RegistrationServer};
use nodekit_proto::uds;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::{Request, Response, Status};

use super::{DeviceManager, ManagerError};

#[derive(Debug)]
struct RegistrationService {
    manager: DeviceManager,
}

#[tonic::async_trait]
impl Registration for RegistrationService {
    async fn register(
        &self,
        request: Request<api::RegisterRequest>,
    ) -> Result<Response<api::Empty>, Status> {
        let request = request.into_inner();
        let resource = request.resource_name.clone();
        self.manager.register(request).await.map_err(|e| {
            tracing::warn!(%resource, error = %e, "registration refused");
            Status::from(e)
        })?;
        Ok(Response::new(api::Empty {}))
    }
}

/// A running Registration server.
#[derive(Debug)]
pub struct KubeletServer {
    socket: PathBuf,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl KubeletServer {
    /// Binds `kubelet.sock` in the manager's plugin directory and serves Registration.
    pub(super) fn start(manager: DeviceManager) -> Result<Self, ManagerError> {
        let socket = manager.kubelet_socket();
        let incoming = uds::bind(&socket).map_err(ManagerError::Serve)?;
        let (stop, mut stopped) = watch::channel(false);
        let service = RegistrationServer::new(RegistrationService { manager });
        let task = tokio::spawn(async move {
            let shutdown = async move {
                let _ = stopped.wait_for(|s| *s).await;
            };
            if let Err(e) = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
            {
                tracing::error!(error = %e, "Registration server failed");
            }
        });
        Ok(Self { socket, stop, task })
    }

    /// The socket it serves.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Stops serving and removes kubelet.sock.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        if tokio::time::timeout(Duration::from_secs(2), &mut self.task)
            .await
            .is_err()
        {
            self.task.abort();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Drop for KubeletServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
