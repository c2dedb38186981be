//! The plugin process: one gRPC server per resource on `DIR/nodekit-<resource>.sock`,
//! registered with the kubelet at `DIR/kubelet.sock` (retried with exponential backoff),
//! and an inotify watch on `DIR`: when `kubelet.sock` is created again (a kubelet restart)
//! every resource registers again; when one of our sockets is removed (the kubelet clears
//! the directory on start) that server is restarted on a fresh socket and registers again.
//! SIGHUP re-reads the config (a bad one is logged and the running config kept); SIGTERM and
//! SIGINT stop the servers and remove the sockets.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nodekit_proto::deviceplugin::v1beta1 as api;
use nodekit_proto::deviceplugin::v1beta1::device_plugin_server::DevicePluginServer;
use nodekit_proto::deviceplugin::v1beta1::registration_client::RegistrationClient;
use nodekit_proto::uds::{self, UdsError};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::resource::{ResourceError, ResourcePlugin};
use super::service::PluginService;
use super::{socket_name, API_VERSION, KUBELET_SOCKET};
use crate::config::{self, Config, ConfigError};
use crate::watch::{Change, ChangeKind, DirWatcher, WatchError};

/// First delay between registration attempts; doubled up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Longest delay between registration attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long one registration attempt (connect + Register) may take.
pub const REGISTER_TIMEOUT: Duration = Duration::from_secs(5);

/// What the daemon runs with.
#[derive(Debug, Clone)]
pub struct Options {
    /// The YAML config file.
    pub config: PathBuf,
    /// The kubelet's device plugin directory.
    pub plugin_dir: PathBuf,
}

/// Why the daemon could not start or keep running.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The config is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A resource could not be set up.
    #[error(transparent)]
    Resource(#[from] ResourceError),
    /// A socket could not be bound.
    #[error("resource {resource}: {source}")]
    Bind {
        /// The resource.
        resource: String,
        /// The failure.
        #[source]
        source: UdsError,
    },
    /// The plugin directory could not be made or watched.
    #[error("device plugin directory {}: {source}", dir.display())]
    PluginDir {
        /// The directory.
        dir: PathBuf,
        /// The failure.
        #[source]
        source: std::io::Error,
    },
    /// The plugin directory watch failed.
    #[error(transparent)]
    Watch(#[from] WatchError),
    /// A signal handler could not be installed.
    #[error("installing signal handlers: {0}")]
    Signal(#[source] std::io::Error),
}

/// One registration attempt failed.
#[derive(Debug, thiserror::Error)]
enum RegisterError {
    #[error(transparent)]
    Connect(#[from] UdsError),
    #[error("the kubelet refused: {0}")]
    Refused(#[from] tonic::Status),
    #[error("no answer within {REGISTER_TIMEOUT:?}")]
    Timeout,
}

/// A resource being served.
#[derive(Debug)]
struct Served {
    resource: Arc<ResourcePlugin>,
    socket: PathBuf,
    stop: watch::Sender<bool>,
    server: JoinHandle<()>,
    health: JoinHandle<()>,
    registration: Option<JoinHandle<()>>,
}

impl Served {
    /// Binds the resource's socket and starts its server and health watch.
    fn start(resource: Arc<ResourcePlugin>, dir: &Path) -> Result<Self, DaemonError> {
        let socket = dir.join(socket_name(resource.name()));
        let (stop, server) = serve(&resource, &socket)?;
        let health = tokio::spawn({
            let resource = resource.clone();
            async move {
                let name = resource.name().to_string();
                if let Err(e) = resource.watch_health().await {
                    tracing::error!(resource = %name, error = %e, "health watch stopped");
                }
            }
        });
        Ok(Self {
            resource,
            socket,
            stop,
            server,
            health,
            registration: None,
        })
    }

    /// Replaces the server with a new one on a fresh socket (the old file is gone).
    async fn restart_server(&mut self) -> Result<(), DaemonError> {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(2), &mut self.server).await;
        let (stop, server) = serve(&self.resource, &self.socket)?;
        self.stop = stop;
        self.server = server;
        Ok(())
    }

    /// (Re)starts registration with the kubelet in the background.
    fn register(&mut self, dir: &Path) {
        if let Some(old) = self.registration.take() {
            old.abort();
        }
        let request = api::RegisterRequest {
            version: API_VERSION.into(),
            endpoint: socket_name(self.resource.name()),
            resource_name: self.resource.name().into(),
            options: Some(self.resource.options()),
        };
        self.registration = Some(tokio::spawn(register_with_retry(
            dir.join(KUBELET_SOCKET),
            request,
        )));
    }

    /// Stops everything and removes the socket.
    async fn stop(mut self) {
        if let Some(r) = self.registration.take() {
            r.abort();
        }
        self.health.abort();
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(2), &mut self.server).await;
        self.server.abort();
        match std::fs::remove_file(&self.socket) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(socket = %self.socket.display(), error = %e, "cannot remove socket")
            }
        }
    }
}

/// Binds `socket` and spawns the gRPC server for `resource`; returns its stop switch.
fn serve(
    resource: &Arc<ResourcePlugin>,
    socket: &Path,
) -> Result<(watch::Sender<bool>, JoinHandle<()>), DaemonError> {
    let incoming = uds::bind(socket).map_err(|source| DaemonError::Bind {
        resource: resource.name().to_string(),
        source,
    })?;
    let (stop, stopped) = watch::channel(false);
    let service = DevicePluginServer::new(PluginService::new(resource.clone(), stopped.clone()));
    let name = resource.name().to_string();
    let server = tokio::spawn(async move {
        let mut stopped = stopped;
        let shutdown = async move {
            let _ = stopped.wait_for(|s| *s).await;
        };
        let result = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await;
        if let Err(e) = result {
            tracing::error!(resource = %name, error = %e, "gRPC server failed");
        }
    });
    tracing::info!(resource = %resource.name(), socket = %socket.display(), "serving");
    Ok((stop, server))
}

async fn register_once(kubelet: &Path, request: api::RegisterRequest) -> Result<(), RegisterError> {
    let attempt = async {
        let channel = uds::connect(kubelet).await?;
        RegistrationClient::new(channel).register(request).await?;
        Ok(())
    };
    tokio::time::timeout(REGISTER_TIMEOUT, attempt)
        .await
        .map_err(|_| RegisterError::Timeout)?
}

/// Registers until the kubelet accepts, backing off from [`FIRST_BACKOFF`] to [`MAX_BACKOFF`].
async fn register_with_retry(kubelet: PathBuf, request: api::RegisterRequest) {
    let mut delay = FIRST_BACKOFF;
    loop {
        match register_once(&kubelet, request.clone()).await {
            Ok(()) => {
                tracing::info!(resource = %request.resource_name, endpoint = %request.endpoint, "registered with the kubelet");
                return;
            }
            Err(e) => {
                tracing::warn!(resource = %request.resource_name, error = %e, retry_in = ?delay, "registration failed");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// Every resource of one config, served.
#[derive(Debug)]
struct Running {
    dir: PathBuf,
    served: Vec<Served>,
}

/// Discovers every resource of `config` (no socket is touched yet).
fn prepare(config: &Config) -> Result<Vec<Arc<ResourcePlugin>>, DaemonError> {
    config
        .resources
        .iter()
        .map(|r| Ok(ResourcePlugin::new(r.clone(), config.cdi_dir.clone())?))
        .collect()
}

impl Running {
    /// Serves `resources` and registers each; on a failure nothing is left bound.
    async fn start(resources: Vec<Arc<ResourcePlugin>>, dir: &Path) -> Result<Self, DaemonError> {
        let mut running = Self {
            dir: dir.to_path_buf(),
            served: Vec::new(),
        };
        for resource in resources {
            match Served::start(resource, dir) {
                Ok(served) => running.served.push(served),
                Err(e) => {
                    running.stop().await;
                    return Err(e);
                }
            }
        }
        for served in &mut running.served {
            served.register(dir);
        }
        Ok(running)
    }

    /// Reacts to changes in the plugin directory.
    async fn on_changes(&mut self, changes: &[Change]) -> Result<(), DaemonError> {
        let kubelet = self.dir.join(KUBELET_SOCKET);
        let kubelet_back = changes
            .iter()
            .any(|c| c.path == kubelet && c.kind == ChangeKind::Created);
        if kubelet_back {
            tracing::info!("kubelet.sock created: registering again");
        }
        for served in &mut self.served {
            let removed = changes
                .iter()
                .any(|c| c.path == served.socket && c.kind == ChangeKind::Removed);
            let restart = removed && std::fs::symlink_metadata(&served.socket).is_err();
            if restart {
                tracing::info!(socket = %served.socket.display(), "our socket was removed: restarting the server");
                served.restart_server().await?;
            }
            if restart || kubelet_back {
                served.register(&self.dir);
            }
        }
        Ok(())
    }

    async fn stop(&mut self) {
        for served in self.served.drain(..) {
            served.stop().await;
        }
    }
}

/// Runs the plugin until SIGTERM or SIGINT. A bad config is an error before any socket
/// exists; on return every socket is removed.
pub async fn run(options: &Options) -> Result<(), DaemonError> {
    let sig = |kind| signal(kind).map_err(DaemonError::Signal);
    let mut term = sig(SignalKind::terminate())?;
    let mut int = sig(SignalKind::interrupt())?;
    let mut hup = sig(SignalKind::hangup())?;

    let config = config::load(&options.config)?;
    let dir = &options.plugin_dir;
    std::fs::create_dir_all(dir).map_err(|source| DaemonError::PluginDir {
        dir: dir.clone(),
        source,
    })?;
    let mut watcher = DirWatcher::new(vec![dir.clone()])?;
    let mut running = Running::start(prepare(&config)?, dir).await?;

    let outcome = loop {
        tokio::select! {
            _ = term.recv() => break Ok(()),
            _ = int.recv() => break Ok(()),
            _ = hup.recv() => {
                if let Err(e) = reload(options, &mut running).await {
                    break Err(e);
                }
            }
            changes = watcher.next() => {
                let result = match changes {
                    Ok(changes) => running.on_changes(&changes).await,
                    Err(e) => Err(e.into()),
                };
                if let Err(e) = result {
                    break Err(e);
                }
            }
        }
    };
    running.stop().await;
    tracing::info!("stopped; sockets removed");
    outcome
}

/// SIGHUP: a config that fails to load or discover is logged and the running one kept.
async fn reload(options: &Options, running: &mut Running) -> Result<(), DaemonError> {
    let resources = match config::load(&options.config)
        .map_err(DaemonError::from)
        .and_then(|c| prepare(&c))
    {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "SIGHUP: keeping the running config");
            return Ok(());
        }
    };
    tracing::info!(resources = resources.len(), "SIGHUP: config reloaded");
    running.stop().await;
    *running = Running::start(resources, &options.plugin_dir).await?;
    Ok(())
}
