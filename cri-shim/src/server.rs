//! Wiring: open the manager, bind the CRI socket, serve both services until SIGTERM/SIGINT.

use std::path::Path;

use nodekit_proto::cri::v1::image_service_server::ImageServiceServer;
use nodekit_proto::cri::v1::runtime_service_server::RuntimeServiceServer;
use tokio::signal::unix::{signal, SignalKind};

use crate::cgroups::CgroupDriver;
use crate::config::Options;
use crate::manager::Manager;
use crate::service::{ImageSvc, RuntimeSvc};
use crate::streaming::{StreamingError, StreamingServer};

/// Why the shim could not start or stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Opening state or recovering failed.
    #[error("starting: {0}")]
    Start(#[from] crate::error::CriError),
    /// The socket could not be bound.
    #[error(transparent)]
    Bind(#[from] nodekit_proto::uds::UdsError),
    /// The gRPC server failed.
    #[error("serving: {0}")]
    Serve(#[from] tonic::transport::Error),
    /// The streaming server could not be started.
    #[error(transparent)]
    Streaming(#[from] StreamingError),
    /// Installing signal handlers failed.
    #[error("signal handler: {0}")]
    Signal(#[from] std::io::Error),
    /// `--cgroup-driver systemd` on a machine whose init is not systemd.
    #[error("--cgroup-driver systemd needs systemd as init ({SYSTEMD_RUN_DIR} is missing): use --cgroup-driver cgroupfs here")]
    NoSystemd,
}

/// Exists while systemd runs as init (`sd_booted(3)`).
const SYSTEMD_RUN_DIR: &str = "/run/systemd/system";

/// Runs the shim until SIGTERM or SIGINT. Sandboxes and containers keep running.
pub async fn run(opts: Options) -> Result<(), ServeError> {
    if opts.cgroup_driver == CgroupDriver::Systemd && !Path::new(SYSTEMD_RUN_DIR).is_dir() {
        return Err(ServeError::NoSystemd);
    }
    let socket = opts.socket_path();
    let streaming_addr = opts.streaming_addr;
    let manager = Manager::open(opts).await?;
    let streaming = StreamingServer::start(streaming_addr, manager.clone()).await?;
    let incoming = nodekit_proto::uds::bind(&socket)?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tracing::info!(socket = %socket.display(), "serving CRI");
    tonic::transport::Server::builder()
        .add_service(RuntimeServiceServer::new(RuntimeSvc(
            manager.clone(),
            streaming,
        )))
        .add_service(ImageServiceServer::new(ImageSvc(manager)))
        .serve_with_incoming_shutdown(incoming, async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        })
        .await?;
    Ok(())
}
