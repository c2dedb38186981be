//! The runtime's state and logic behind the gRPC services: sandboxes, containers, images.
//!
//! Records live in memory and on disk (`STATE/sandboxes/ID/sandbox.json`,
//! `STATE/containers/ID/container.json`); every change is written before it is acted on, so a
//! restarted shim finds what exists and rolls back what was half created. Each sandbox and
//! container ID has its own async lock; the record maps are only held for lookups.

pub mod container;
pub mod files;
pub mod records;
pub mod sandbox;
pub mod sandbox_container;
pub mod stats;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nodekit_nsutil::mountns::HiddenMount;
use nodekit_nsutil::NamedNetNs;
use tokio::sync::OwnedMutexGuard;

use crate::cgroups::{CgroupDriver, Hierarchies};
use crate::cni::CniExec;
use crate::config::Options;
use crate::error::CriError;
use crate::image::pull::PullOptions;
use crate::image::ImageStore;
use crate::runtime::{resolve_binary, OciRuntime, RuntimeKind};
use crate::store::{self, StoreError};
use records::{ContainerRecord, SandboxRecord};

/// Nanoseconds since the epoch, the CRI's time unit.
pub fn now_ns() -> i64 {
    chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0)
}

/// The shim.
#[derive(Debug)]
pub struct Manager {
    opts: Options,
    runtime: OciRuntime,
    cni: CniExec,
    images: ImageStore,
    pull_opts: PullOptions,
    cgroups: Hierarchies,
    pause_binary: PathBuf,
    sandboxes: Mutex<BTreeMap<String, SandboxRecord>>,
    containers: Mutex<BTreeMap<String, ContainerRecord>>,
    /// Namespaces created by this process (dropping one removes it); after a restart,
    /// namespaces are removed by path instead.
    netns: Mutex<HashMap<String, NamedNetNs>>,
    names: Mutex<HashMap<String, String>>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    cpu_samples: Mutex<HashMap<String, (i64, u64)>>,
}

fn mount_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(nix::Error) -> CriError + 'a {
    move |source| CriError::Mount {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Unmounts `path` (detaching it if busy); nothing mounted there, or no `path`, is success.
fn unmount(path: &Path) -> Result<(), CriError> {
    match nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => Ok(()),
        Err(e) => Err(mount_err("unmounting", path)(e)),
    }
}

/// What the runtime must not see: crun refuses hybrid cgroup hosts, so its processes start
/// without the unified mount and treat the host as plain cgroup v1 (runc copes with both).
fn hidden_mounts(kind: RuntimeKind, cgroups: &Hierarchies) -> Vec<HiddenMount> {
    let Some(unified) = cgroups
        .hybrid_unified()
        .filter(|_| kind == RuntimeKind::Crun)
    else {
        return Vec::new();
    };
    match HiddenMount::find(unified) {
        Ok(found) => found.into_iter().collect(),
        Err(e) => {
            tracing::warn!(mount = %unified.display(), error = %e, "cannot read mountinfo; crun will see the hybrid setup");
            Vec::new()
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Manager {
    /// Opens the state and image directories, reloads every record and rolls back
    /// operations a previous process left half done.
    pub async fn open(opts: Options) -> Result<Arc<Self>, CriError> {
        for dir in [
            opts.state.join("sandboxes"),
            opts.state.join("containers"),
            opts.state.join("runtime"),
            opts.root.join("containers"),
            opts.root.join("sandboxes"),
        ] {
            std::fs::create_dir_all(&dir).map_err(|source| StoreError::Io { path: dir, source })?;
        }
        let runtime_binary = resolve_binary(opts.runtime_path.as_deref(), opts.runtime.name())
            .or_else(|| opts.runtime_path.clone())
            .unwrap_or_else(|| PathBuf::from(opts.runtime.name()));
        let cgroups = Hierarchies::detect()?;
        let runtime = OciRuntime::new(
            runtime_binary,
            opts.state.join("runtime"),
            Options::sibling_binary(&opts.monitor_path, "nodekit-cri-monitor"),
            hidden_mounts(opts.runtime, &cgroups),
            opts.cgroup_driver == CgroupDriver::Systemd,
        );
        let manager = Arc::new(Self {
            cni: CniExec::new(opts.cni_bin_dir.clone()),
            images: ImageStore::open(opts.root.join("images"))?,
            pull_opts: PullOptions {
                insecure_registries: opts.insecure_registry.clone(),
                registry_config_dir: opts.registry_config_dir.clone(),
            },
            cgroups,
            pause_binary: Options::sibling_binary(&opts.pause_path, "nodekit-pause"),
            runtime,
            opts,
            sandboxes: Mutex::default(),
            containers: Mutex::default(),
            netns: Mutex::default(),
            names: Mutex::default(),
            locks: Mutex::default(),
            cpu_samples: Mutex::default(),
        });
        manager.recover().await?;
        Ok(manager)
    }

    /// The settings the shim runs with.
    pub fn options(&self) -> &Options {
        &self.opts
    }

    /// The image store.
    pub fn images(&self) -> &ImageStore {
        &self.images
    }

    /// The OCI runtime driver.
    pub fn runtime(&self) -> &OciRuntime {
        &self.runtime
    }

    /// Registry settings for pulls.
    pub fn pull_options(&self) -> &PullOptions {
        &self.pull_opts
    }

    async fn recover(&self) -> Result<(), CriError> {
        for rec in load_all::<SandboxRecord>(&self.opts.state.join("sandboxes"), "sandbox.json")? {
            self.reserve_name(&rec.name, &rec.id)?;
            lock(&self.sandboxes).insert(rec.id.clone(), rec);
        }
        for rec in
            load_all::<ContainerRecord>(&self.opts.state.join("containers"), "container.json")?
        {
            self.reserve_name(&rec.name, &rec.id)?;
            lock(&self.containers).insert(rec.id.clone(), rec);
        }
        let half_created: Vec<ContainerRecord> = lock(&self.containers)
            .values()
            .filter(|c| c.phase == records::ContainerPhase::Creating)
            .cloned()
            .collect();
        for c in half_created {
            tracing::warn!(container_id = %c.id, "rolling back a half-created container");
            self.destroy_container(&c).await?;
        }
        let half_run: Vec<SandboxRecord> = lock(&self.sandboxes)
            .values()
            .filter(|s| s.phase == records::SandboxPhase::Creating)
            .cloned()
            .collect();
        for s in half_run {
            tracing::warn!(sandbox_id = %s.id, "rolling back a half-created sandbox");
            self.destroy_sandbox(s).await;
        }
        Ok(())
    }

    /// The async lock of one sandbox or container ID.
    async fn lock_id(&self, id: &str) -> OwnedMutexGuard<()> {
        let m = lock(&self.locks).entry(id.to_string()).or_default().clone();
        m.lock_owned().await
    }

    fn reserve_name(&self, name: &str, id: &str) -> Result<(), CriError> {
        let mut names = lock(&self.names);
        match names.get(name) {
            Some(holder) if holder != id => Err(CriError::NameReserved {
                kind: "name",
                name: name.to_string(),
                id: holder.clone(),
            }),
            _ => {
                names.insert(name.to_string(), id.to_string());
                Ok(())
            }
        }
    }

    fn release(&self, name: &str, id: &str) {
        let mut names = lock(&self.names);
        if names.get(name).map(String::as_str) == Some(id) {
            names.remove(name);
        }
        lock(&self.locks).remove(id);
    }

    fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.opts.state.join("sandboxes").join(id)
    }

    fn container_state_dir(&self, id: &str) -> PathBuf {
        self.opts.state.join("containers").join(id)
    }

    fn container_root_dir(&self, id: &str) -> PathBuf {
        self.opts.root.join("containers").join(id)
    }

    fn save_sandbox(&self, rec: &SandboxRecord) -> Result<(), CriError> {
        store::write_json(&self.sandbox_dir(&rec.id).join("sandbox.json"), rec)?;
        lock(&self.sandboxes).insert(rec.id.clone(), rec.clone());
        Ok(())
    }

    fn save_container(&self, rec: &ContainerRecord) -> Result<(), CriError> {
        store::write_json(
            &self.container_state_dir(&rec.id).join("container.json"),
            rec,
        )?;
        lock(&self.containers).insert(rec.id.clone(), rec.clone());
        Ok(())
    }

    /// The sandbox `id`, or NOT_FOUND.
    pub fn sandbox(&self, id: &str) -> Result<SandboxRecord, CriError> {
        lock(&self.sandboxes)
            .get(id)
            .cloned()
            .ok_or_else(|| CriError::NotFound {
                kind: "sandbox",
                id: id.to_string(),
            })
    }

    /// Every sandbox.
    pub fn sandboxes(&self) -> Vec<SandboxRecord> {
        lock(&self.sandboxes).values().cloned().collect()
    }

    /// Every container, exit records refreshed.
    pub fn containers(&self) -> Vec<ContainerRecord> {
        let all: Vec<ContainerRecord> = lock(&self.containers).values().cloned().collect();
        all.into_iter().map(|c| self.refresh(c)).collect()
    }
}

fn load_all<T: serde::de::DeserializeOwned>(dir: &Path, file: &str) -> Result<Vec<T>, CriError> {
    let mut out = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|source| StoreError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    for entry in entries.flatten() {
        match store::read_json::<T>(&entry.path().join(file)) {
            Ok(Some(rec)) => out.push(rec),
            Ok(None) => {}
            Err(err) => tracing::error!(%err, "skipping unreadable record"),
        }
    }
    Ok(out)
}
