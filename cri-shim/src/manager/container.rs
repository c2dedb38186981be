//! Containers: CreateContainer (overlay rootfs, user, spec, runtime create through the
//! monitor; rolled back on failure), Start, Stop (stop signal, timeout, SIGKILL; idempotent),
//! Remove (idempotent), status from the monitor's exit record, ExecSync, log reopening and
//! resource updates.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::mount::{mount, MsFlags};
use nix::sys::signal::Signal;
use nodekit_proto::cri::v1::{
    ContainerConfig, ContainerState, LinuxContainerResources, NamespaceMode, PodSandboxConfig,
};

use super::records::{ContainerPhase, ContainerRecord, Pb, SandboxPhase};
use super::{lock, mount_err, now_ns, unmount, Manager};
use crate::error::CriError;
use crate::monitor::{ExitRecord, StdioArgs};
use crate::oci::spec::{self, SandboxFiles, SpecInput};
use crate::oci::user;
use crate::process::ProcessRef;
use crate::runtime::{CreateParams, ExecOutput, RuntimeError};
use crate::store::{self, StoreError};

/// How long a container may take to die after SIGKILL before StopContainer reports failure.
const KILL_GRACE: Duration = Duration::from_secs(10);

/// The CRI state of a container record.
pub fn state_of(rec: &ContainerRecord) -> ContainerState {
    match (rec.exit.is_some(), rec.phase) {
        (true, _) | (_, ContainerPhase::Exited) => ContainerState::ContainerExited,
        (_, ContainerPhase::Created) => ContainerState::ContainerCreated,
        (_, ContainerPhase::Running) => ContainerState::ContainerRunning,
        (_, ContainerPhase::Creating) => ContainerState::ContainerUnknown,
    }
}

/// The CRI exit reason: OOMKilled, Completed, Error, or StartError.
pub fn exit_reason(rec: &ContainerRecord) -> &'static str {
    match (&rec.exit, &rec.start_error) {
        (Some(e), _) if e.oom_killed => "OOMKilled",
        (Some(e), _) if e.exit_code == 0 => "Completed",
        (Some(_), _) => "Error",
        (None, Some(_)) => "StartError",
        (None, None) => "",
    }
}

pub(super) fn mkdirs(path: &Path) -> Result<(), CriError> {
    std::fs::create_dir_all(path).map_err(|source| {
        StoreError::Io {
            path: path.to_path_buf(),
            source,
        }
        .into()
    })
}

/// Mounts `image`'s layers as an overlayfs at `root/rootfs` (writable layer `root/upper`);
/// returns the rootfs path. Undone by [`unmount_rootfs`].
pub(super) fn mount_rootfs(
    root: &Path,
    image: &crate::image::ImageRecord,
    images: &crate::image::ImageStore,
) -> Result<PathBuf, CriError> {
    let (upper, work, rootfs) = (root.join("upper"), root.join("work"), root.join("rootfs"));
    for d in [&upper, &work, &rootfs] {
        mkdirs(d)?;
    }
    let mut lowers: Vec<PathBuf> = image
        .chain_ids
        .iter()
        .rev()
        .map(|c| images.layer_dir(c))
        .collect();
    if lowers.is_empty() {
        let empty = root.join("empty");
        mkdirs(&empty)?;
        lowers.push(empty);
    }
    let lower = lowers
        .iter()
        .map(|p| p.to_string_lossy())
        .collect::<Vec<_>>()
        .join(":");
    let data = format!(
        "lowerdir={lower},upperdir={},workdir={}",
        upper.display(),
        work.display()
    );
    mount(
        Some("overlay"),
        &rootfs,
        Some("overlay"),
        MsFlags::empty(),
        Some(data.as_str()),
    )
    .map_err(mount_err("mounting overlay rootfs on", &rootfs))?;
    Ok(rootfs)
}

/// Unmounts the rootfs [`mount_rootfs`] made under `root`; not mounted is success.
pub(super) fn unmount_rootfs(root: &Path) -> Result<(), CriError> {
    unmount(&root.join("rootfs"))
}

/// Gives a deleted container's monitor up to 2 s to record the exit and leave, then kills
/// it, so nothing writes into the container's directories once they are removed.
pub(super) async fn finish_monitor(monitor: Option<ProcessRef>) {
    if let Some(m) = monitor {
        for _ in 0..100 {
            if !m.is_alive() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        m.signal(Signal::SIGKILL);
    }
}

/// Writes `spec` as the bundle's `config.json` (atomically).
pub(super) fn write_bundle(bundle: &Path, spec: &oci_spec::runtime::Spec) -> Result<(), CriError> {
    Ok(store::write_json(&bundle.join("config.json"), spec)?)
}

impl Manager {
    fn exit_file(&self, id: &str) -> PathBuf {
        self.container_state_dir(id).join("exit.json")
    }

    /// The socket on which the container's monitor serves attach sessions.
    pub fn attach_socket(&self, id: &str) -> PathBuf {
        self.container_state_dir(id)
            .join(crate::attach_socket::SOCKET_NAME)
    }

    fn bundle(&self, id: &str) -> PathBuf {
        self.container_state_dir(id).join("bundle")
    }

    /// The record with the monitor's exit record folded in; a container whose monitor and
    /// init both vanished without one is recorded as exited with code 255.
    pub(super) fn refresh(&self, mut rec: ContainerRecord) -> ContainerRecord {
        if rec.exit.is_some()
            || !matches!(rec.phase, ContainerPhase::Created | ContainerPhase::Running)
        {
            return rec;
        }
        let exit_file = self.exit_file(&rec.id);
        let mut exit = store::read_json::<ExitRecord>(&exit_file).ok().flatten();
        let monitor_gone = rec.monitor.is_none_or(|m| !m.is_alive());
        if exit.is_none() && monitor_gone {
            // The monitor may have written the file between the two checks.
            exit = store::read_json::<ExitRecord>(&exit_file).ok().flatten();
            if exit.is_none() && crate::process::ProcessRef::of(rec.pid).is_none() {
                let lost = ExitRecord {
                    exit_code: 255,
                    signal: None,
                    finished_at: now_ns(),
                    oom_killed: false,
                };
                let _ = store::write_json(&exit_file, &lost);
                exit = Some(lost);
            }
        }
        if let Some(exit) = exit {
            rec.exit = Some(exit);
            rec.phase = ContainerPhase::Exited;
            lock(&self.containers).insert(rec.id.clone(), rec.clone());
        }
        rec
    }

    /// The container `id` (refreshed), or NOT_FOUND.
    pub fn container(&self, id: &str) -> Result<ContainerRecord, CriError> {
        let rec = lock(&self.containers)
            .get(id)
            .cloned()
            .ok_or_else(|| CriError::NotFound {
                kind: "container",
                id: id.to_string(),
            })?;
        Ok(self.refresh(rec))
    }

    /// CreateContainer. On failure nothing of the container is left.
    pub async fn create_container(
        &self,
        sandbox_id: &str,
        config: Option<ContainerConfig>,
        sandbox_config: Option<PodSandboxConfig>,
    ) -> Result<String, CriError> {
        CriError::non_empty(sandbox_id, "pod_sandbox_id")?;
        let config = config.ok_or_else(|| CriError::invalid("config", "is required"))?;
        let meta = config
            .metadata
            .clone()
            .ok_or_else(|| CriError::invalid("config.metadata", "is required"))?;
        CriError::non_empty(&meta.name, "config.metadata.name")?;
        let image_name = config
            .image
            .as_ref()
            .map(|i| i.image.clone())
            .unwrap_or_default();
        CriError::non_empty(&image_name, "config.image.image")?;
        let sandbox = self.sandbox(sandbox_id)?;
        if !self.sandbox_ready(&sandbox) {
            return Err(CriError::WrongState {
                kind: "sandbox",
                id: sandbox.id,
                state: "not ready",
                why: "cannot create containers in it",
            });
        }
        let image = self
            .images
            .get(&image_name)
            .ok_or_else(|| CriError::NotFound {
                kind: "image",
                id: image_name.clone(),
            })?;
        let sb_meta = sandbox.config.0.metadata.clone().unwrap_or_default();
        let name = format!(
            "{}_{}_{}_{}_{}",
            meta.name, sb_meta.name, sb_meta.namespace, sb_meta.uid, meta.attempt
        );
        let id = store::random_id()?;
        self.reserve_name(&name, &id)?;
        let _g = self.lock_id(&id).await;
        let log_dir = sandbox_config
            .as_ref()
            .map_or(sandbox.config.0.log_directory.clone(), |s| {
                s.log_directory.clone()
            });
        let parent = sandbox
            .config
            .0
            .linux
            .as_ref()
            .map(|l| l.cgroup_parent.clone())
            .unwrap_or_default();
        let mut rec = ContainerRecord {
            id: id.clone(),
            name,
            sandbox_id: sandbox.id.clone(),
            config: Pb(config),
            image_id: image.id.clone(),
            chain_ids: image.chain_ids.clone(),
            created_at: now_ns(),
            started_at: 0,
            phase: ContainerPhase::Creating,
            pid: 0,
            monitor: None,
            log_path: None,
            cgroups_path: self.opts.cgroup_driver.cgroups_path(&parent, &id),
            user: (0, 0, vec![]),
            start_error: None,
            exit: None,
            stop_signal: image
                .config
                .config()
                .as_ref()
                .and_then(|c| c.stop_signal().clone())
                .unwrap_or_else(|| "SIGTERM".into()),
        };
        // The log path is the request's, relative to the pod's log directory.
        rec.log_path = (!log_dir.is_empty() && !rec.config.0.log_path.is_empty())
            .then(|| Path::new(&log_dir).join(&rec.config.0.log_path));
        let result = self.set_up_container(&mut rec, &sandbox, &image).await;
        match result {
            Ok(()) => Ok(id),
            Err(err) => {
                tracing::warn!(container_id = %id, %err, "CreateContainer failed, rolling back");
                if let Err(e) = self.destroy_container(&rec).await {
                    tracing::error!(container_id = %id, err = %e, "rollback incomplete");
                }
                Err(err)
            }
        }
    }

    async fn set_up_container(
        &self,
        rec: &mut ContainerRecord,
        sandbox: &super::records::SandboxRecord,
        image: &crate::image::ImageRecord,
    ) -> Result<(), CriError> {
        self.save_container(rec)?;
        mkdirs(&self.bundle(&rec.id))?;
        let rootfs = mount_rootfs(&self.container_root_dir(&rec.id), image, &self.images)?;

        let config = rec.config.0.clone();
        let sc = config
            .linux
            .as_ref()
            .and_then(|l| l.security_context.as_ref());
        let image_cfg = image.config.config().clone();
        let image_user = image_cfg
            .as_ref()
            .and_then(|c| c.user().clone())
            .unwrap_or_default();
        let user = user::resolve(&rootfs, sc, &image_user)?;
        rec.user = (user.uid, user.gid, user.additional_gids.clone());
        for m in &config.mounts {
            let src = Path::new(&m.host_path);
            if !m.host_path.is_empty() && !src.exists() {
                mkdirs(src)?;
            }
        }
        let devices = config
            .devices
            .iter()
            .map(|d| spec::host_device(&d.host_path, &d.container_path))
            .collect::<Result<Vec<_>, _>>()?;
        let target_pid_ns = sc
            .and_then(|s| s.namespace_options.as_ref())
            .filter(|o| o.pid() == NamespaceMode::Target)
            .and_then(|o| lock(&self.containers).get(&o.target_id).map(|t| t.pid))
            .filter(|pid| *pid > 0)
            .map(|pid| PathBuf::from(format!("/proc/{pid}/ns/pid")));
        let sb_dir = self.sandbox_dir(&sandbox.id);
        let files = SandboxFiles {
            hostname: Some(sb_dir.join("hostname")),
            hosts: Some(sb_dir.join("hosts")),
            resolv_conf: Some(sb_dir.join("resolv.conf")),
            shm: self.sandbox_shm(sandbox),
        };
        let spec = spec::build(&SpecInput {
            container_id: &rec.id,
            sandbox_id: &sandbox.id,
            config: &config,
            sandbox: &sandbox.config.0,
            image: image_cfg.as_ref(),
            rootfs: &rootfs,
            user: &user,
            namespaces: &self.sandbox_namespaces(sandbox),
            target_pid_ns,
            files: &files,
            cgroups_path: rec.cgroups_path.clone(),
            oom_score_adj_floor: oom_score_adj_floor(),
            devices,
        })?;
        let bundle = self.bundle(&rec.id);
        write_bundle(&bundle, &spec)?;
        if let Some(parent) = rec.log_path.as_ref().and_then(|p| p.parent()) {
            mkdirs(parent)?;
        }
        let memory_cgroup = self
            .cgroups
            .memory_dir(&self.opts.cgroup_driver.fs_path(&rec.cgroups_path));
        let (pid, monitor_pid) = self
            .runtime
            .create(&CreateParams {
                id: &rec.id,
                bundle: &bundle,
                log_path: rec.log_path.as_deref(),
                exit_file: &self.exit_file(&rec.id),
                memory_cgroup: memory_cgroup.as_deref(),
                attach_socket: Some(&self.attach_socket(&rec.id)),
                stdio: StdioArgs {
                    stdin: config.stdin,
                    stdin_once: config.stdin_once,
                    tty: config.tty,
                },
            })
            .await?;
        rec.pid = pid;
        rec.monitor = ProcessRef::of(monitor_pid as i32);
        rec.phase = ContainerPhase::Created;
        self.save_container(rec)
    }

    /// StartContainer. A process that cannot start leaves the container exited with reason
    /// StartError and no runtime state.
    pub async fn start_container(&self, id: &str) -> Result<(), CriError> {
        self.container(id)?;
        let _g = self.lock_id(id).await;
        let mut rec = self.container(id)?;
        if state_of(&rec) != ContainerState::ContainerCreated {
            return Err(CriError::WrongState {
                kind: "container",
                id: id.to_string(),
                state: state_name(state_of(&rec)),
                why: "only a created container can be started",
            });
        }
        let sandbox = self.sandbox(&rec.sandbox_id)?;
        if sandbox.phase != SandboxPhase::Ready {
            return Err(CriError::WrongState {
                kind: "sandbox",
                id: sandbox.id,
                state: "not ready",
                why: "cannot start its containers",
            });
        }
        // Taken before `start`: a process that exits at once must not look finished before it
        // started.
        let started_at = now_ns();
        match self.runtime.start(id).await {
            Ok(()) => {
                rec.started_at = started_at;
                rec.phase = ContainerPhase::Running;
                self.save_container(&rec)
            }
            Err(err) => {
                let _ = self.runtime.delete(id).await;
                rec.phase = ContainerPhase::Exited;
                rec.start_error = Some(err.to_string());
                rec.exit = Some(ExitRecord {
                    exit_code: 128,
                    signal: None,
                    finished_at: now_ns(),
                    oom_killed: false,
                });
                self.save_container(&rec)?;
                Err(err.into())
            }
        }
    }

    async fn wait_exit(&self, id: &str, limit: Duration) -> Option<ContainerRecord> {
        let deadline = Instant::now() + limit;
        loop {
            let rec = self.container(id).ok()?;
            if state_of(&rec) == ContainerState::ContainerExited {
                return Some(rec);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops a container (the caller holds its lock): the stop signal, up to `timeout`
    /// seconds, then SIGKILL to every process. Already exited is success.
    pub(super) async fn stop_container_locked(
        &self,
        rec: ContainerRecord,
        timeout: i64,
    ) -> Result<(), CriError> {
        let rec = self.refresh(rec);
        if matches!(
            state_of(&rec),
            ContainerState::ContainerExited | ContainerState::ContainerUnknown
        ) {
            return Ok(());
        }
        if timeout > 0 && rec.phase == ContainerPhase::Running {
            self.runtime.kill(&rec.id, &rec.stop_signal, false).await?;
            if self
                .wait_exit(&rec.id, Duration::from_secs(timeout as u64))
                .await
                .is_some()
            {
                return Ok(());
            }
        }
        self.runtime.kill(&rec.id, "KILL", true).await?;
        if self.wait_exit(&rec.id, KILL_GRACE).await.is_none() {
            return Err(RuntimeError::Failed {
                verb: "kill",
                id: rec.id.clone(),
                message: format!("still running {KILL_GRACE:?} after SIGKILL"),
            }
            .into());
        }
        Ok(())
    }

    /// StopContainer: NOT_FOUND for unknown IDs, success when already stopped.
    pub async fn stop_container(&self, id: &str, timeout: i64) -> Result<(), CriError> {
        self.container(id)?;
        let _g = self.lock_id(id).await;
        let rec = self.container(id)?;
        self.stop_container_locked(rec, timeout).await
    }

    /// RemoveContainer: kills it if running and removes everything; unknown IDs succeed.
    pub async fn remove_container(&self, id: &str) -> Result<(), CriError> {
        if self.container(id).is_err() {
            return Ok(());
        }
        let guard = self.lock_id(id).await;
        let Ok(rec) = self.container(id) else {
            return Ok(());
        };
        self.stop_container_locked(rec.clone(), 0).await?;
        self.destroy_container(&rec).await?;
        drop(guard);
        Ok(())
    }

    /// Removes the container's runtime state, rootfs mount, directories, record and name.
    pub(super) async fn destroy_container(&self, rec: &ContainerRecord) -> Result<(), CriError> {
        self.runtime.delete(&rec.id).await?;
        finish_monitor(rec.monitor).await;
        unmount_rootfs(&self.container_root_dir(&rec.id))?;
        store::remove_dir_all(&self.container_root_dir(&rec.id))?;
        store::remove_dir_all(&self.container_state_dir(&rec.id))?;
        lock(&self.containers).remove(&rec.id);
        lock(&self.cpu_samples).remove(&rec.id);
        self.release(&rec.name, &rec.id);
        Ok(())
    }

    /// ExecSync: runs `cmd` in the running container, killed after `timeout` seconds
    /// (0: no limit).
    pub async fn exec_sync(
        &self,
        id: &str,
        cmd: &[String],
        timeout: i64,
    ) -> Result<ExecOutput, CriError> {
        if cmd.is_empty() {
            return Err(CriError::invalid("cmd", "must not be empty"));
        }
        self.running_container(id, "exec needs a running container")?;
        let pid_file = self.exec_pid_file(id)?;
        let limit = (timeout > 0).then(|| Duration::from_secs(timeout as u64));
        Ok(self.runtime.exec(id, cmd, limit, &pid_file).await?)
    }

    /// The container `id` if it is running: NOT_FOUND when unknown, FAILED_PRECONDITION
    /// (saying `why` it must run) otherwise.
    pub fn running_container(
        &self,
        id: &str,
        why: &'static str,
    ) -> Result<ContainerRecord, CriError> {
        let rec = self.container(id)?;
        if state_of(&rec) != ContainerState::ContainerRunning {
            return Err(CriError::WrongState {
                kind: "container",
                id: id.to_string(),
                state: state_name(state_of(&rec)),
                why,
            });
        }
        Ok(rec)
    }

    /// A fresh PID file path for one exec in the container `id`.
    pub fn exec_pid_file(&self, id: &str) -> Result<PathBuf, CriError> {
        Ok(self
            .container_state_dir(id)
            .join(format!("exec-{}.pid", &store::random_id()?[..12])))
    }

    /// ReopenContainerLog: asks the monitor to reopen the log file (after rotation).
    pub async fn reopen_container_log(&self, id: &str) -> Result<(), CriError> {
        let rec = self.container(id)?;
        match (state_of(&rec), rec.monitor) {
            (ContainerState::ContainerRunning, Some(m)) if m.is_alive() => {
                m.signal(Signal::SIGUSR1);
                Ok(())
            }
            (state, _) => Err(CriError::WrongState {
                kind: "container",
                id: id.to_string(),
                state: state_name(state),
                why: "only a running container's log can be reopened",
            }),
        }
    }

    /// UpdateContainerResources: applies cgroup resources through the runtime and records
    /// them in the container's config.
    pub async fn update_container_resources(
        &self,
        id: &str,
        resources: Option<LinuxContainerResources>,
    ) -> Result<(), CriError> {
        let Some(resources) = resources else {
            return Err(CriError::invalid("linux", "is required"));
        };
        self.container(id)?;
        let _g = self.lock_id(id).await;
        let mut rec = self.container(id)?;
        if state_of(&rec) == ContainerState::ContainerExited {
            return Err(CriError::WrongState {
                kind: "container",
                id: id.to_string(),
                state: "exited",
                why: "resources of an exited container cannot change",
            });
        }
        let oci = spec::resources(Some(&resources), Vec::new())?;
        let file = self.container_state_dir(id).join("resources.json");
        store::write_json(&file, &oci)?;
        self.runtime.update(id, &file).await?;
        if let Some(linux) = rec.config.0.linux.as_mut() {
            linux.resources = Some(resources);
        }
        self.save_container(&rec)
    }

    /// Chain IDs of layers that existing containers and sandbox containers run on (kept when
    /// images are removed).
    pub fn layers_in_use(&self) -> std::collections::HashSet<String> {
        let mut in_use: std::collections::HashSet<String> = lock(&self.containers)
            .values()
            .flat_map(|c| c.chain_ids.clone())
            .collect();
        in_use.extend(
            lock(&self.sandboxes)
                .values()
                .filter_map(|s| s.sandbox_container.as_ref())
                .flat_map(|p| p.chain_ids.clone()),
        );
        in_use
    }
}

/// The lowest oom_score_adj containers may get: the shim's own when it lacks
/// CAP_SYS_RESOURCE (lowering needs it), no floor otherwise.
pub(super) fn oom_score_adj_floor() -> Option<i32> {
    const CAP_SYS_RESOURCE: u32 = 24;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    if cap_eff & (1 << CAP_SYS_RESOURCE) != 0 {
        return None;
    }
    std::fs::read_to_string("/proc/self/oom_score_adj")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .or(Some(0))
}

/// The lower-case name of a CRI container state, for messages.
pub fn state_name(state: ContainerState) -> &'static str {
    match state {
        ContainerState::ContainerCreated => "created",
        ContainerState::ContainerRunning => "running",
        ContainerState::ContainerExited => "exited",
        ContainerState::ContainerUnknown => "unknown",
    }
}
