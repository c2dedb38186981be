//! Serving: parse the endpoint, reconcile, then serve the services of the configured mode on
//! the unix socket until `shutdown` resolves; the socket file is removed on the way out.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use nodekit_proto::csi::v1::controller_server::ControllerServer;
use nodekit_proto::csi::v1::identity_server::IdentityServer;
use nodekit_proto::csi::v1::node_server::NodeServer;
use nodekit_proto::uds::{self, UdsError};

use crate::controller::ControllerService;
use crate::driver::Driver;
use crate::error::CsiError;
use crate::identity::IdentityService;
use crate::node::NodeService;

/// Why serving stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The endpoint is not `unix:///abs/path` (or an absolute path).
    #[error("endpoint {0:?} must be unix:///absolute/path.sock")]
    Endpoint(String),
    /// The startup reconcile failed.
    #[error("startup reconcile: {0}")]
    Reconcile(#[source] CsiError),
    /// The socket could not be bound.
    #[error(transparent)]
    Bind(#[from] UdsError),
    /// The gRPC server failed.
    #[error("serving gRPC: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// The socket path of a CSI endpoint (`unix:///p`, `unix:/p` or `/p`).
pub fn socket_path(endpoint: &str) -> Result<PathBuf, ServeError> {
    let path = nodekit_proto::uds::endpoint_path(endpoint).to_path_buf();
    if !path.is_absolute() {
        return Err(ServeError::Endpoint(endpoint.to_string()));
    }
    Ok(path)
}

/// Reconciles, then serves `driver` on `endpoint` until `shutdown` completes.
pub async fn serve(
    driver: Arc<Driver>,
    endpoint: &str,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let socket = socket_path(endpoint)?;
    let d = Arc::clone(&driver);
    tokio::task::spawn_blocking(move || d.reconcile())
        .await
        .map_err(|e| ServeError::Reconcile(e.into()))?
        .map_err(ServeError::Reconcile)?;
    let incoming = uds::bind(&socket)?;
    let mode = driver.config.mode;
    let mut router = tonic::transport::Server::builder().add_service(IdentityServer::new(
        IdentityService::new(Arc::clone(&driver)),
    ));
    if mode.controller() {
        router = router.add_service(ControllerServer::new(ControllerService::new(Arc::clone(
            &driver,
        ))));
    }
    if mode.node() {
        router = router.add_service(NodeServer::new(NodeService::new(Arc::clone(&driver))));
    }
    tracing::info!(socket = %socket.display(), ?mode, driver = %driver.config.driver_name, "serving CSI");
    let served = router
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    let _ = std::fs::remove_file(&socket);
    tracing::info!("stopped");
    Ok(served?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_name_absolute_socket_paths() {
        for ok in [
            "unix:///run/csi/csi.sock",
            "unix:/run/csi/csi.sock",
            "/run/csi/csi.sock",
        ] {
            assert_eq!(
                socket_path(ok).expect(ok),
                PathBuf::from("/run/csi/csi.sock")
            );
        }
        for bad in ["unix://relative.sock", "tcp://1.2.3.4:5", ""] {
            assert!(socket_path(bad).is_err(), "{bad}");
        }
    }
}
