//! The test lab: a temp directory with state, pool and kubelet-root directories (the pool
//! optionally a fresh xfs or ext4 filesystem on a loop device), the real `nodekit-csi`
//! binary serving on a socket in it, and gRPC clients. Dropping the lab unmounts everything
//! under it and detaches every loop device backed by a file under it, even after a failed
//! assertion. Needs root.

#![allow(dead_code)] // each test binary uses a different part of the lab

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use nodekit_csi::fstools::{FsTools, FsType, SystemFsTools};
use nodekit_csi::loopdev::{KernelLoopDevices, LoopDevice, LoopDevices};
use nodekit_csi::mounter::{KernelMounter, MountOptions, Mounter};
use nodekit_proto::csi::v1::controller_client::ControllerClient;
use nodekit_proto::csi::v1::identity_client::IdentityClient;
use nodekit_proto::csi::v1::node_client::NodeClient;
use nodekit_proto::csi::v1::volume_capability::access_mode::Mode;
use nodekit_proto::csi::v1::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use nodekit_proto::csi::v1::*;
use tonic::transport::Channel;

pub const MIB: u64 = 1 << 20;

/// The filesystem under the lab's pool directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pool {
    /// A plain directory on the machine's filesystem.
    Plain,
    /// A fresh xfs (reflink) of this many MiB on a loop device.
    Xfs(u64),
    /// A fresh ext4 (no reflink) of this many MiB on a loop device.
    Ext4(u64),
}

/// A filesystem on a loop device mounted at the pool directory.
struct PoolMount {
    device: LoopDevice,
    mountpoint: PathBuf,
}

impl Drop for PoolMount {
    fn drop(&mut self) {
        // Lazily if a volume's loop device still holds an image on it: the kernel finishes
        // once that device is released.
        if KernelMounter::default().unmount(&self.mountpoint).is_err() {
            let _ = nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH);
        }
        let _ = KernelLoopDevices::default().detach(self.device);
    }
}

/// The lab directory and whatever was mounted or attached in it.
pub struct Lab {
    pool_mount: Option<PoolMount>,
    dir: tempfile::TempDir,
}

impl Lab {
    /// A lab with its pool on `pool`.
    pub fn new(pool: Pool) -> Self {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the CSI tests need root (loop devices, mounts)"
        );
        let dir = tempfile::Builder::new()
            .prefix("nk-csi-")
            .tempdir()
            .expect("tempdir");
        for sub in ["state", "pool", "kubelet", "backing"] {
            std::fs::create_dir_all(dir.path().join(sub)).expect("mkdir");
        }
        let mut lab = Self {
            pool_mount: None,
            dir,
        };
        let (fs, mib) = match pool {
            Pool::Plain => return lab,
            Pool::Xfs(m) => (FsType::Xfs, m),
            Pool::Ext4(m) => (FsType::Ext4, m),
        };
        let backing = lab.dir.path().join("backing/pool.img");
        File::create(&backing)
            .and_then(|f| f.set_len(mib * MIB))
            .expect("pool image");
        let backing = std::fs::canonicalize(&backing).expect("canon");
        SystemFsTools
            .mkfs(fs, &backing)
            .unwrap_or_else(|e| panic!("{e} (install xfsprogs and e2fsprogs)"));
        let device = KernelLoopDevices::default()
            .attach(&backing)
            .expect("attach pool");
        let mountpoint = lab.pool();
        let mount = KernelMounter::default().mount_fs(
            &device.path(),
            &mountpoint,
            fs.name(),
            &MountOptions::parse::<&str>(&[]).expect("options"),
        );
        if let Err(e) = mount {
            let _ = KernelLoopDevices::default().detach(device);
            panic!("mounting the pool: {e}");
        }
        lab.pool_mount = Some(PoolMount { device, mountpoint });
        lab
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
    pub fn state(&self) -> PathBuf {
        self.path().join("state")
    }
    pub fn pool(&self) -> PathBuf {
        self.path().join("pool")
    }
    pub fn kubelet(&self) -> PathBuf {
        self.path().join("kubelet")
    }
    pub fn socket(&self) -> PathBuf {
        self.path().join("csi.sock")
    }
    pub fn log(&self) -> PathBuf {
        self.path().join("driver.log")
    }

    /// A staging path for `volume` under the kubelet root (created, as kubelet does).
    pub fn staging(&self, volume: &str) -> PathBuf {
        let p = self
            .kubelet()
            .join("plugins/kubernetes.io/csi/csi.nodekit.io")
            .join(volume)
            .join("globalmount");
        std::fs::create_dir_all(&p).expect("mkdir staging");
        p
    }

    /// A target path for `pod` (its parent created, as kubelet does).
    pub fn target(&self, pod: &str) -> PathBuf {
        let parent = self
            .kubelet()
            .join("pods")
            .join(pod)
            .join("volumes/kubernetes.io~csi/pv");
        std::fs::create_dir_all(&parent).expect("mkdir target parent");
        parent.join("mount")
    }

    /// Starts the driver with the lab's directories and `extra` flags.
    pub fn start(&self, extra: &[&str]) -> DriverProcess {
        DriverProcess::spawn(self, &self.state(), extra)
    }

    /// Starts the driver with its state in `state` instead of the lab's state directory.
    pub fn start_with_state(&self, state: &Path, extra: &[&str]) -> DriverProcess {
        DriverProcess::spawn(self, state, extra)
    }

    /// Mounts under the lab, deepest first.
    pub fn mounts(&self) -> Vec<PathBuf> {
        let root = std::fs::canonicalize(self.path()).expect("canon");
        let pool = self
            .pool_mount
            .as_ref()
            .map(|p| std::fs::canonicalize(&p.mountpoint).unwrap_or_default());
        let mut out: Vec<PathBuf> = KernelMounter::default()
            .mounts()
            .expect("mountinfo")
            .into_iter()
            .map(|m| m.mount_point)
            .filter(|m| m.starts_with(&root) && Some(m) != pool.as_ref())
            .collect();
        out.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        out
    }

    /// Loop devices backed by files under the lab, except the pool's own device.
    pub fn loops(&self) -> Vec<LoopDevice> {
        let root = std::fs::canonicalize(self.path()).expect("canon");
        let pool_dev = self.pool_mount.as_ref().map(|p| p.device);
        KernelLoopDevices::default()
            .list()
            .expect("loop list")
            .into_iter()
            .filter(|a| a.backing.starts_with(&root) && Some(a.device) != pool_dev)
            .map(|a| a.device)
            .collect()
    }

    /// Asserts nothing of the driver's is left: no mounts, no loop devices.
    pub fn assert_clean(&self) {
        assert_eq!(self.mounts(), Vec::<PathBuf>::new(), "leftover mounts");
        assert_eq!(
            self.loops(),
            Vec::<LoopDevice>::new(),
            "leftover loop devices"
        );
    }

    /// Images in the pool's volumes directory.
    pub fn volume_images(&self) -> Vec<PathBuf> {
        images(&self.pool().join("volumes"))
    }

    /// Images in the pool's snapshots directory.
    pub fn snapshot_images(&self) -> Vec<PathBuf> {
        images(&self.pool().join("snapshots"))
    }
}

fn images(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    out.sort();
    out
}

impl Drop for Lab {
    fn drop(&mut self) {
        let mounter = KernelMounter::default();
        for m in self.mounts() {
            if mounter.unmount(&m).is_err() {
                let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
            }
        }
        for d in self.loops() {
            let _ = KernelLoopDevices::default().detach(d);
        }
        self.pool_mount.take();
    }
}

/// The `nodekit-csi` binary, serving on the lab's socket; SIGTERMed on drop.
pub struct DriverProcess {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl DriverProcess {
    fn spawn(lab: &Lab, state: &Path, extra: &[&str]) -> Self {
        let log = File::options()
            .create(true)
            .append(true)
            .open(lab.log())
            .expect("log");
        let endpoint = format!("unix://{}", lab.socket().display());
        let child = Command::new(env!("CARGO_BIN_EXE_nodekit-csi"))
            .args(["--endpoint", &endpoint, "--node-id", "lab-node"])
            .arg("--state-dir")
            .arg(state)
            .arg("--pool-dir")
            .arg(lab.pool())
            .arg("--kubelet-root")
            .arg(lab.kubelet())
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn nodekit-csi");
        let mut driver = Self {
            child,
            socket: lab.socket(),
            log: lab.log(),
        };
        driver.wait_ready();
        driver
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("nodekit-csi exited early ({status}): {}", self.log_text());
            }
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "nodekit-csi did not listen within 20 s: {}",
            self.log_text()
        );
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.child.id()).expect("pid"))
    }

    /// Connects the three clients.
    pub async fn clients(&self) -> Clients {
        let channel = nodekit_proto::uds::connect(&self.socket)
            .await
            .expect("connect");
        Clients {
            identity: IdentityClient::new(channel.clone()),
            controller: ControllerClient::new(channel.clone()),
            node: NodeClient::new(channel),
        }
    }

    /// SIGTERM and wait; returns whether it exited cleanly and removed its socket.
    pub fn stop(mut self) -> bool {
        let _ = kill(self.pid(), Signal::SIGTERM);
        let status = wait_timeout(&mut self.child, Duration::from_secs(10));
        status.is_some_and(|s| s.success()) && !self.socket.exists()
    }

    /// SIGKILL (a crash) and wait.
    pub fn crash(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_timeout(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

impl Drop for DriverProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = kill(self.pid(), Signal::SIGTERM);
            if wait_timeout(&mut self.child, Duration::from_secs(10)).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }
}

/// gRPC clients of the three services (cheap to clone: one shared channel).
#[derive(Clone)]
pub struct Clients {
    pub identity: IdentityClient<Channel>,
    pub controller: ControllerClient<Channel>,
    pub node: NodeClient<Channel>,
}

/// Calls that must succeed; a failure panics naming the call and the status.
impl Clients {
    pub async fn create(&mut self, name: &str, bytes: u64, cap: VolumeCapability) -> Volume {
        self.controller
            .create_volume(create_req(name, bytes, cap))
            .await
            .unwrap_or_else(|s| panic!("CreateVolume {name}: {s}"))
            .into_inner()
            .volume
            .unwrap_or_else(|| panic!("CreateVolume {name}: no volume"))
    }

    pub async fn stage(&mut self, volume: &Volume, staging: &Path, cap: VolumeCapability) {
        self.node
            .node_stage_volume(stage_req(volume, staging, cap))
            .await
            .unwrap_or_else(|s| panic!("NodeStageVolume {}: {s}", volume.volume_id));
    }

    pub async fn publish(
        &mut self,
        volume: &Volume,
        staging: &Path,
        target: &Path,
        cap: VolumeCapability,
        readonly: bool,
    ) {
        self.node
            .node_publish_volume(publish_req(volume, staging, target, cap, readonly))
            .await
            .unwrap_or_else(|s| panic!("NodePublishVolume {}: {s}", volume.volume_id));
    }

    pub async fn unpublish(&mut self, volume_id: &str, target: &Path) {
        self.node
            .node_unpublish_volume(unpublish_req(volume_id, target))
            .await
            .unwrap_or_else(|s| panic!("NodeUnpublishVolume {volume_id}: {s}"));
    }

    pub async fn unstage(&mut self, volume_id: &str, staging: &Path) {
        self.node
            .node_unstage_volume(unstage_req(volume_id, staging))
            .await
            .unwrap_or_else(|s| panic!("NodeUnstageVolume {volume_id}: {s}"));
    }

    pub async fn delete(&mut self, volume_id: &str) {
        self.controller
            .delete_volume(delete_req(volume_id))
            .await
            .unwrap_or_else(|s| panic!("DeleteVolume {volume_id}: {s}"));
    }
}

pub fn mount_cap(fs: &str, mode: Mode) -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode { mode: mode as i32 }),
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: fs.into(),
            mount_flags: Vec::new(),
            volume_mount_group: String::new(),
        })),
    }
}

pub fn block_cap(mode: Mode) -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode { mode: mode as i32 }),
        access_type: Some(AccessType::Block(BlockVolume {})),
    }
}

pub fn create_req(name: &str, bytes: u64, cap: VolumeCapability) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(CapacityRange {
            required_bytes: i64::try_from(bytes).expect("size"),
            limit_bytes: 0,
        }),
        volume_capabilities: vec![cap],
        ..Default::default()
    }
}

pub fn stage_req(volume: &Volume, staging: &Path, cap: VolumeCapability) -> NodeStageVolumeRequest {
    NodeStageVolumeRequest {
        volume_id: volume.volume_id.clone(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(cap),
        volume_context: volume.volume_context.clone(),
        ..Default::default()
    }
}

pub fn publish_req(
    volume: &Volume,
    staging: &Path,
    target: &Path,
    cap: VolumeCapability,
    readonly: bool,
) -> NodePublishVolumeRequest {
    NodePublishVolumeRequest {
        volume_id: volume.volume_id.clone(),
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: Some(cap),
        readonly,
        volume_context: volume.volume_context.clone(),
        ..Default::default()
    }
}

pub fn unpublish_req(volume_id: &str, target: &Path) -> NodeUnpublishVolumeRequest {
    NodeUnpublishVolumeRequest {
        volume_id: volume_id.into(),
        target_path: target.display().to_string(),
    }
}

pub fn unstage_req(volume_id: &str, staging: &Path) -> NodeUnstageVolumeRequest {
    NodeUnstageVolumeRequest {
        volume_id: volume_id.into(),
        staging_target_path: staging.display().to_string(),
    }
}

pub fn delete_req(volume_id: &str) -> DeleteVolumeRequest {
    DeleteVolumeRequest {
        volume_id: volume_id.into(),
        secrets: HashMap::new(),
    }
}

/// Creates and stages volumes `par-0`..`par-<n-1>` of `bytes` each, all at once: per
/// volume, its ID and staging path, or the status of the call that failed.
pub async fn create_and_stage_in_parallel(
    c: &Clients,
    lab: &Lab,
    n: usize,
    bytes: u64,
    cap: &VolumeCapability,
) -> Vec<Result<(String, PathBuf), tonic::Status>> {
    let mut tasks = Vec::new();
    for i in 0..n {
        let mut c = c.clone();
        let cap = cap.clone();
        let name = format!("par-{i}");
        let staging = lab.staging(&name);
        tasks.push(tokio::spawn(async move {
            let vol = c
                .controller
                .create_volume(create_req(&name, bytes, cap.clone()))
                .await?
                .into_inner()
                .volume
                .ok_or_else(|| {
                    tonic::Status::internal(format!("CreateVolume {name}: no volume"))
                })?;
            c.node
                .node_stage_volume(stage_req(&vol, &staging, cap))
                .await?;
            Ok((vol.volume_id, staging))
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("task"));
    }
    out
}

/// The gRPC code of a call's result (`Ok` for success).
pub fn code<T>(r: Result<tonic::Response<T>, tonic::Status>) -> tonic::Code {
    match r {
        Ok(_) => tonic::Code::Ok,
        Err(s) => s.code(),
    }
}

/// Total and available bytes of the filesystem at `path`.
pub fn fs_size(path: &Path) -> (u64, u64) {
    let st = nix::sys::statvfs::statvfs(path).expect("statvfs");
    let f = st.fragment_size() as u64;
    (st.blocks() as u64 * f, st.blocks_available() as u64 * f)
}
