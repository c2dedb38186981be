//! The driver's shared core: configuration, the pool and state directories, the in-flight
//! set and the kernel-facing traits. The gRPC services hold an `Arc<Driver>` and run its
//! blocking operations (`provision`, `stage`) on tokio's blocking pool.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::CsiError;
use crate::fstools::{FsTools, SystemFsTools};
use crate::ids::{SnapshotId, VolumeId};
use crate::inflight::{InFlight, InFlightGuard};
use crate::loopdev::{KernelLoopDevices, LoopDevices};
use crate::mounter::{KernelMounter, Mounter};
use crate::paths::PathPolicy;
use crate::state::{StateError, StateStore};

/// The topology key volumes and nodes carry: a volume is reachable only on its node.
pub const TOPOLOGY_KEY: &str = "topology.nodekit.io/node";
/// The driver name unless `--driver-name` says otherwise.
pub const DEFAULT_DRIVER_NAME: &str = "csi.nodekit.io";
/// The kubelet root unless `--kubelet-root` says otherwise.
pub const DEFAULT_KUBELET_ROOT: &str = "/var/lib/kubelet";
/// Where the kernel names the current boot: node records carry it (see `state`).
pub const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

/// Which services this process serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Identity + Controller.
    Controller,
    /// Identity + Node.
    Node,
    /// Identity + Controller + Node (the node DaemonSet's default: volumes are local).
    All,
}

impl Mode {
    /// Whether the controller service runs.
    pub fn controller(self) -> bool {
        matches!(self, Self::Controller | Self::All)
    }

    /// Whether the node service runs.
    pub fn node(self) -> bool {
        matches!(self, Self::Node | Self::All)
    }
}

/// What the driver is told at start.
#[derive(Debug, Clone)]
pub struct Config {
    /// The CSI driver name (`csi.nodekit.io`).
    pub driver_name: String,
    /// This node's ID (and topology value).
    pub node_id: String,
    /// Where state files live.
    pub state_dir: PathBuf,
    /// Where volume and snapshot images live.
    pub pool_dir: PathBuf,
    /// Services to serve.
    pub mode: Mode,
    /// Staging and target paths must lie under this.
    pub kubelet_root: PathBuf,
    /// Accept staging/target paths anywhere (still absolute, no `..`).
    pub allow_any_path: bool,
    /// The most bytes all volumes together may be provisioned with; `None`: the pool's size.
    pub max_capacity: Option<u64>,
    /// NodeGetInfo's max_volumes_per_node (0: no limit).
    pub max_volumes_per_node: i64,
}

/// Why the driver could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The node ID is empty or too long.
    #[error("--node-id must be 1 to 128 bytes, got {0:?}")]
    NodeId(String),
    /// A directory could not be prepared.
    #[error("preparing {path}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The state directory could not be opened.
    #[error(transparent)]
    State(#[from] StateError),
    /// The boot ID could not be read.
    #[error("reading {BOOT_ID}")]
    BootId(#[source] std::io::Error),
}

/// The driver core shared by the services.
pub struct Driver {
    /// Configuration.
    pub config: Config,
    /// Records.
    pub store: StateStore,
    /// Loop devices.
    pub loops: Arc<dyn LoopDevices>,
    /// Mounts.
    pub mounter: Arc<dyn Mounter>,
    /// mkfs and growing.
    pub fs: Arc<dyn FsTools>,
    /// The path rule.
    pub paths: PathPolicy,
    /// This boot's ID: node records written in another boot are stale.
    pub boot_id: String,
    inflight: Arc<InFlight>,
    volumes_dir: PathBuf,
    snapshots_dir: PathBuf,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Driver {
    /// A driver on the real kernel and tools.
    pub fn new(config: Config) -> Result<Self, StartError> {
        Self::with_backends(
            config,
            Arc::new(KernelLoopDevices::default()),
            Arc::new(KernelMounter::default()),
            Arc::new(SystemFsTools),
        )
    }

    /// A driver on the given backends (tests pass recording fakes).
    pub fn with_backends(
        mut config: Config,
        loops: Arc<dyn LoopDevices>,
        mounter: Arc<dyn Mounter>,
        fs: Arc<dyn FsTools>,
    ) -> Result<Self, StartError> {
        if config.node_id.is_empty() || config.node_id.len() > 128 {
            return Err(StartError::NodeId(config.node_id));
        }
        let mkdir = |p: &Path| {
            std::fs::create_dir_all(p).map_err(|source| StartError::Dir {
                path: p.to_path_buf(),
                source,
            })
        };
        mkdir(&config.pool_dir)?;
        // Loop devices report canonical backing paths: keep the pool canonical to match.
        config.pool_dir =
            std::fs::canonicalize(&config.pool_dir).map_err(|source| StartError::Dir {
                path: config.pool_dir.clone(),
                source,
            })?;
        let volumes_dir = config.pool_dir.join("volumes");
        let snapshots_dir = config.pool_dir.join("snapshots");
        mkdir(&volumes_dir)?;
        mkdir(&snapshots_dir)?;
        let store = StateStore::open(&config.state_dir)?;
        let paths = PathPolicy::new(&config.kubelet_root, config.allow_any_path);
        let boot_id = std::fs::read_to_string(BOOT_ID)
            .map_err(StartError::BootId)?
            .trim()
            .to_string();
        Ok(Self {
            config,
            store,
            loops,
            mounter,
            fs,
            paths,
            boot_id,
            inflight: Arc::new(InFlight::default()),
            volumes_dir,
            snapshots_dir,
        })
    }

    /// The image file of volume `id`.
    pub fn volume_image(&self, id: &VolumeId) -> PathBuf {
        self.volumes_dir.join(format!("{id}.img"))
    }

    /// The image file of snapshot `id`.
    pub fn snapshot_image(&self, id: &SnapshotId) -> PathBuf {
        self.snapshots_dir.join(format!("{id}.img"))
    }

    /// The pool's subdirectories holding images.
    pub fn image_dirs(&self) -> [&Path; 2] {
        [&self.volumes_dir, &self.snapshots_dir]
    }

    /// Claims the objects named by `keys` for one operation; ABORTED when one is busy.
    pub fn claim(&self, keys: &[&str]) -> Result<InFlightGuard, CsiError> {
        self.inflight.try_claim(keys).ok_or_else(|| {
            CsiError::Aborted(format!(
                "an operation on {} is already in progress",
                keys.join(" / ")
            ))
        })
    }

    /// The topology segment of this node.
    pub fn topology(&self) -> std::collections::HashMap<String, String> {
        std::collections::HashMap::from([(TOPOLOGY_KEY.to_string(), self.config.node_id.clone())])
    }
}
