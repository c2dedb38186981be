//! Pod sandboxes: RunPodSandbox (netns, CNI ADD, /etc files, pause, cgroup; any failure
//! rolls back everything done so far), StopPodSandbox (idempotent: containers, pause, CNI
//! DEL, netns), RemovePodSandbox, and the readiness of the node's network.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;
use nodekit_proto::cri::v1::{NamespaceMode, PodSandboxConfig, Protocol};
use serde_json::{json, Value};

use super::files;
use super::records::{CniAttachment, Pb, SandboxPhase, SandboxRecord};
use super::{now_ns, unmount, Manager};
use crate::cgroups::CgroupDriver;
use crate::cni::{self, Attachment, NetworkList};
use crate::error::CriError;
use crate::image::ImageRecord;
use crate::pause::{self, PauseArgs};
use crate::store;

/// The pod's /dev/shm mount point in its sandbox directory.
const SHM_DIR: &str = "shm";

/// Kubernetes resource quantity (`10M`, `1Gi`, `500k`, `1.5M`) to a plain number.
pub fn parse_quantity(q: &str) -> Option<u64> {
    let q = q.trim();
    let split = q.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(q.len());
    let (num, suffix) = q.split_at(split);
    let factor: f64 = match suffix {
        "" => 1.0,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        _ => return None,
    };
    let value = num.parse::<f64>().ok()? * factor;
    (value >= 0.0 && value.is_finite()).then_some(value as u64)
}

/// The capability args of a sandbox: `portMappings` (those with a host port) and
/// `bandwidth` (from the `kubernetes.io/{ingress,egress}-bandwidth` annotations).
pub fn capability_args(config: &PodSandboxConfig) -> BTreeMap<String, Value> {
    let mut args = BTreeMap::new();
    let ports: Vec<Value> = config
        .port_mappings
        .iter()
        .filter(|p| p.host_port > 0)
        .map(|p| {
            let protocol = match p.protocol() {
                Protocol::Tcp => "tcp",
                Protocol::Udp => "udp",
                Protocol::Sctp => "sctp",
            };
            json!({"hostPort": p.host_port, "containerPort": p.container_port, "protocol": protocol, "hostIP": p.host_ip})
        })
        .collect();
    if !ports.is_empty() {
        args.insert("portMappings".into(), Value::Array(ports));
    }
    let mut bw = serde_json::Map::new();
    for (dir, key) in [
        ("ingress", "kubernetes.io/ingress-bandwidth"),
        ("egress", "kubernetes.io/egress-bandwidth"),
    ] {
        if let Some(rate) = config.annotations.get(key).and_then(|q| parse_quantity(q)) {
            bw.insert(format!("{dir}Rate"), json!(rate));
            bw.insert(format!("{dir}Burst"), json!(u32::MAX));
        }
    }
    if !bw.is_empty() {
        args.insert("bandwidth".into(), Value::Object(bw));
    }
    args
}

/// The sandbox's namespace modes (network, pid, ipc), NODE meaning the host's.
pub fn namespace_modes(config: &PodSandboxConfig) -> (NamespaceMode, NamespaceMode, NamespaceMode) {
    let opts = config
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .and_then(|s| s.namespace_options.as_ref());
    match opts {
        Some(o) => (o.network(), o.pid(), o.ipc()),
        None => (NamespaceMode::Pod, NamespaceMode::Pod, NamespaceMode::Pod),
    }
}

impl Manager {
    /// Whether the node's network is configured (a valid CNI config exists).
    pub fn network_config(&self) -> Result<NetworkList, CriError> {
        Ok(cni::load_first(&self.opts.cni_conf_dir)?)
    }

    /// Whether a sandbox is ready: not stopped and its pause process alive.
    pub fn sandbox_ready(&self, rec: &SandboxRecord) -> bool {
        rec.phase == SandboxPhase::Ready && rec.pause.is_some_and(|p| p.is_alive())
    }

    /// The network namespace of a ready sandbox (`None` for hostNetwork pods): NOT_FOUND when
    /// unknown, FAILED_PRECONDITION when not ready. PortForward connects there.
    pub fn ready_sandbox_netns(&self, id: &str) -> Result<Option<std::path::PathBuf>, CriError> {
        let rec = self.sandbox(id)?;
        if !self.sandbox_ready(&rec) {
            return Err(CriError::WrongState {
                kind: "sandbox",
                id: rec.id,
                state: "not ready",
                why: "port forwarding needs a ready sandbox",
            });
        }
        Ok(rec.netns)
    }

    /// RunPodSandbox. Returns the new sandbox's ID; on failure nothing is left behind.
    pub async fn run_pod_sandbox(
        &self,
        config: Option<PodSandboxConfig>,
        handler: &str,
    ) -> Result<String, CriError> {
        let config = config.ok_or_else(|| CriError::invalid("config", "is required"))?;
        let meta = config
            .metadata
            .as_ref()
            .ok_or_else(|| CriError::invalid("config.metadata", "is required"))?;
        let name = format!(
            "{}_{}_{}_{}",
            CriError::non_empty(&meta.name, "config.metadata.name")?,
            CriError::non_empty(&meta.uid, "config.metadata.uid")?,
            CriError::non_empty(&meta.namespace, "config.metadata.namespace")?,
            meta.attempt
        );
        let runtime_name = self.opts.runtime.name();
        if !handler.is_empty() && handler != runtime_name {
            return Err(CriError::invalid(
                "runtime_handler",
                format!("unknown runtime handler {handler:?} (this runtime serves \"\" and {runtime_name:?})"),
            ));
        }
        let (net_mode, _, _) = namespace_modes(&config);
        let network = if net_mode == NamespaceMode::Node {
            None
        } else {
            Some(self.network_config()?)
        };
        let pause_image = match &self.opts.pause_image {
            Some(reference) => Some(self.ensure_pause_image(reference).await?),
            None => None,
        };
        let id = store::random_id()?;
        self.reserve_name(&name, &id)?;
        let _guard = self.lock_id(&id).await;
        let mut rec = SandboxRecord {
            id: id.clone(),
            name,
            config: Pb(config),
            runtime_handler: handler.to_string(),
            created_at: now_ns(),
            phase: SandboxPhase::Creating,
            netns: None,
            pause: None,
            ips: vec![],
            cni: None,
            cgroup: None,
            sandbox_container: None,
        };
        let result = self
            .set_up_sandbox(&mut rec, network, pause_image.as_ref())
            .await;
        match result {
            Ok(()) => Ok(id),
            Err(err) => {
                tracing::warn!(sandbox_id = %id, %err, "RunPodSandbox failed, rolling back");
                self.destroy_sandbox(rec).await;
                Err(err)
            }
        }
    }

    async fn set_up_sandbox(
        &self,
        rec: &mut SandboxRecord,
        network: Option<NetworkList>,
        pause_image: Option<&ImageRecord>,
    ) -> Result<(), CriError> {
        let dir = self.sandbox_dir(&rec.id);
        self.save_sandbox(rec)?;
        let config = rec.config.0.clone();
        let meta = config.metadata.clone().unwrap_or_default();
        let (_, pid_mode, ipc_mode) = namespace_modes(&config);

        if let Some(network) = &network {
            let ns_name = format!("{}{}", self.opts.netns_prefix, &rec.id[..16]);
            let ns = nodekit_nsutil::NamedNetNs::create(&ns_name)?;
            rec.netns = Some(ns.path().to_path_buf());
            super::lock(&self.netns).insert(rec.id.clone(), ns);
            rec.cni = Some(CniAttachment {
                network: network.to_value(),
                result: None,
            });
            self.save_sandbox(rec)?;
        }

        let host_network = rec.netns.is_none();
        let hostname = if host_network {
            nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default()
        } else if config.hostname.is_empty() {
            meta.name.clone()
        } else {
            config.hostname.clone()
        };
        let write = |file: &str, text: String| -> Result<(), CriError> {
            Ok(store::write_atomic(&dir.join(file), text.as_bytes())?)
        };
        write("hostname", format!("{hostname}\n"))?;
        write(
            "resolv.conf",
            files::resolv_conf(config.dns_config.as_ref(), Path::new("/etc/resolv.conf")),
        )?;
        if ipc_mode != NamespaceMode::Node {
            files::mount_shm(&dir.join(SHM_DIR))?;
        }
        let pod_hostname = (!host_network).then_some(hostname.clone());

        let parent = config
            .linux
            .as_ref()
            .map(|l| l.cgroup_parent.as_str())
            .unwrap_or_default();
        let cgroups_path = self.opts.cgroup_driver.cgroups_path(parent, &rec.id);
        let att = self.attachment(rec);
        let add = async {
            match &network {
                Some(network) => self.cni.add(network, &att).await.map(Some),
                None => Ok(None),
            }
        };
        let holder = match pause_image {
            None => {
                // CNI ADD and nodekit-pause need only the netns, so they start together; the
                // pause process is recorded even when ADD fails, for the rollback to kill.
                let args = PauseArgs {
                    netns: rec.netns.clone(),
                    hostname: pod_hostname,
                    new_ipc: ipc_mode != NamespaceMode::Node,
                    new_pid: pid_mode != NamespaceMode::Node,
                    inner: false,
                };
                let (added, paused) = tokio::join!(add, pause::spawn(&self.pause_binary, &args));
                rec.pause = paused.as_ref().ok().copied();
                self.record_network(rec, added?, &hostname)?;
                paused?
            }
            Some(image) => {
                self.record_network(rec, add.await?, &hostname)?;
                self.start_sandbox_container(
                    rec,
                    image,
                    pod_hostname.as_deref(),
                    cgroups_path.clone(),
                )
                .await?
            }
        };
        rec.pause = Some(holder);
        let cgroup = (self.opts.cgroup_driver == CgroupDriver::Cgroupfs)
            .then(|| self.opts.cgroup_driver.fs_path(&cgroups_path));
        rec.cgroup = cgroup.clone();
        // Recorded before the pause process enters it, so a rollback removes it.
        self.save_sandbox(rec)?;
        // The runtime put a sandbox container in its cgroup already.
        if let Some(cgroup) = cgroup.filter(|_| rec.sandbox_container.is_none()) {
            self.cgroups.enter(&cgroup, holder.pid as u32)?;
        }
        rec.phase = SandboxPhase::Ready;
        self.save_sandbox(rec)
    }

    /// Records what CNI ADD returned (none for hostNetwork pods) and writes the pod's
    /// `/etc/hosts`, which names its addresses (the node's file for hostNetwork pods).
    fn record_network(
        &self,
        rec: &mut SandboxRecord,
        added: Option<Value>,
        hostname: &str,
    ) -> Result<(), CriError> {
        let hosts = match added {
            Some(result) => {
                rec.ips = cni::pod_ips(&result)
                    .iter()
                    .map(|ip| ip.to_string())
                    .collect();
                if let Some(c) = rec.cni.as_mut() {
                    c.result = Some(result);
                }
                files::hosts(hostname, &rec.ips)
            }
            None => std::fs::read_to_string("/etc/hosts").unwrap_or_default(),
        };
        self.save_sandbox(rec)?;
        Ok(store::write_atomic(
            &self.sandbox_dir(&rec.id).join("hosts"),
            hosts.as_bytes(),
        )?)
    }

    fn attachment(&self, rec: &SandboxRecord) -> Attachment {
        let meta = rec.config.0.metadata.clone().unwrap_or_default();
        Attachment {
            container_id: rec.id.clone(),
            netns: rec.netns.clone().unwrap_or_default(),
            ifname: "eth0".into(),
            args: vec![
                ("IgnoreUnknown".into(), "1".into()),
                ("K8S_POD_NAMESPACE".into(), meta.namespace),
                ("K8S_POD_NAME".into(), meta.name),
                ("K8S_POD_INFRA_CONTAINER_ID".into(), rec.id.clone()),
                ("K8S_POD_UID".into(), meta.uid),
            ],
            capability_args: capability_args(&rec.config.0),
        }
    }

    /// Kills the pause process and waits (briefly) until it is gone.
    async fn kill_pause(&self, rec: &SandboxRecord) {
        if let Some(p) = rec.pause {
            p.signal(Signal::SIGKILL);
            for _ in 0..200 {
                if !p.is_alive() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }

    /// Removes the sandbox's network namespace (ours or, after a restart, by path).
    fn remove_netns(&self, rec: &SandboxRecord) -> Result<(), CriError> {
        if super::lock(&self.netns).remove(&rec.id).is_some() {
            return Ok(());
        }
        if let Some(path) = &rec.netns {
            let _ = nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH);
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(store::StoreError::Io {
                        path: path.clone(),
                        source: e,
                    }
                    .into())
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Stops containers, pause and network; converges (each step skips what is already
    /// undone) and records progress so a retry resumes where a failure stopped it.
    async fn stop_sandbox_locked(&self, mut rec: SandboxRecord) -> Result<(), CriError> {
        for c in self
            .containers()
            .into_iter()
            .filter(|c| c.sandbox_id == rec.id)
        {
            let _g = self.lock_id(&c.id).await;
            self.stop_container_locked(c, 0).await?;
        }
        self.kill_pause(&rec).await;
        self.remove_sandbox_container(&rec).await?;
        unmount(&self.sandbox_dir(&rec.id).join(SHM_DIR))?;
        if let Some(att) = rec.cni.clone() {
            let network = NetworkList::from_value(&att.network)?;
            self.cni
                .del(&network, &self.attachment(&rec), att.result.as_ref())
                .await?;
            rec.cni = None;
            self.save_sandbox(&rec)?;
        }
        self.remove_netns(&rec)?;
        rec.netns = None;
        if rec.phase != SandboxPhase::Creating {
            rec.phase = SandboxPhase::NotReady;
        }
        self.save_sandbox(&rec)
    }

    /// StopPodSandbox: NOT_FOUND for an unknown ID, success when already stopped.
    pub async fn stop_pod_sandbox(&self, id: &str) -> Result<(), CriError> {
        let rec = self.sandbox(id)?;
        let _g = self.lock_id(id).await;
        let rec = self.sandbox(&rec.id)?;
        self.stop_sandbox_locked(rec).await
    }

    /// RemovePodSandbox: stops it if needed, removes its containers and everything it
    /// owned; an unknown ID is success.
    pub async fn remove_pod_sandbox(&self, id: &str) -> Result<(), CriError> {
        let Ok(rec) = self.sandbox(id) else {
            return Ok(());
        };
        let guard = self.lock_id(id).await;
        let Ok(rec) = self.sandbox(&rec.id) else {
            return Ok(());
        };
        self.stop_sandbox_locked(rec.clone()).await?;
        for c in self
            .containers()
            .into_iter()
            .filter(|c| c.sandbox_id == rec.id)
        {
            self.remove_container(&c.id).await?;
        }
        if let Some(cg) = &rec.cgroup {
            self.cgroups.remove(cg)?;
        }
        store::remove_dir_all(&self.sandbox_dir(&rec.id))?;
        super::lock(&self.sandboxes).remove(&rec.id);
        drop(guard);
        self.release(&rec.name, &rec.id);
        Ok(())
    }

    /// Best-effort teardown of a sandbox that failed to come up (or was half created by a
    /// crashed process): pause (and the sandbox container), CNI DEL, netns, cgroup, files,
    /// record, name.
    pub(super) async fn destroy_sandbox(&self, rec: SandboxRecord) {
        self.kill_pause(&rec).await;
        if let Err(err) = self.remove_sandbox_container(&rec).await {
            tracing::error!(sandbox_id = %rec.id, %err, "removing the sandbox container during rollback failed");
        }
        if let Some(att) = &rec.cni {
            match NetworkList::from_value(&att.network) {
                Ok(network) => {
                    if let Err(err) = self
                        .cni
                        .del(&network, &self.attachment(&rec), att.result.as_ref())
                        .await
                    {
                        tracing::error!(sandbox_id = %rec.id, %err, "CNI DEL during rollback failed");
                    }
                }
                Err(err) => {
                    tracing::error!(sandbox_id = %rec.id, %err, "stored CNI config unreadable")
                }
            }
        }
        if let Err(err) = self.remove_netns(&rec) {
            tracing::error!(sandbox_id = %rec.id, %err, "removing netns during rollback failed");
        }
        if let Some(cg) = &rec.cgroup {
            let _ = self.cgroups.remove(cg);
        }
        if let Err(err) = unmount(&self.sandbox_dir(&rec.id).join(SHM_DIR)) {
            tracing::error!(sandbox_id = %rec.id, %err, "unmounting /dev/shm during rollback failed");
        }
        let _ = store::remove_dir_all(&self.sandbox_dir(&rec.id));
        super::lock(&self.sandboxes).remove(&rec.id);
        self.release(&rec.name, &rec.id);
    }

    /// The /dev/shm a container of `rec` binds: the host's for host IPC pods, else the
    /// pod's tmpfs (`None` for a sandbox made before pods had one: the container gets its
    /// own).
    pub(super) fn sandbox_shm(&self, rec: &SandboxRecord) -> Option<PathBuf> {
        let (_, _, ipc_mode) = namespace_modes(&rec.config.0);
        if ipc_mode == NamespaceMode::Node {
            return Some(PathBuf::from("/dev/shm"));
        }
        Some(self.sandbox_dir(&rec.id).join(SHM_DIR)).filter(|p| p.is_dir())
    }

    /// The namespaces a container of `rec` joins (see [`crate::oci::spec::SandboxNamespaces`]).
    pub(super) fn sandbox_namespaces(
        &self,
        rec: &SandboxRecord,
    ) -> crate::oci::spec::SandboxNamespaces {
        let (_, pid_mode, ipc_mode) = namespace_modes(&rec.config.0);
        let proc_ns = |kind: &str| {
            rec.pause
                .map(|p| PathBuf::from(format!("/proc/{}/ns/{kind}", p.pid)))
        };
        crate::oci::spec::SandboxNamespaces {
            network: rec.netns.clone(),
            ipc: if ipc_mode == NamespaceMode::Node {
                None
            } else {
                proc_ns("ipc")
            },
            uts: if rec.netns.is_none() {
                None
            } else {
                proc_ns("uts")
            },
            pid: if pid_mode == NamespaceMode::Node {
                None
            } else {
                proc_ns("pid")
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nodekit_proto::cri::v1::PortMapping;

    #[test]
    fn quantities_parse_with_decimal_and_binary_suffixes() {
        assert_eq!(parse_quantity("10M"), Some(10_000_000));
        assert_eq!(parse_quantity("1Mi"), Some(1 << 20));
        assert_eq!(parse_quantity("1.5k"), Some(1500));
        assert_eq!(parse_quantity("7"), Some(7));
        assert_eq!(parse_quantity("3X"), None);
        assert_eq!(parse_quantity("-1M"), None);
    }

    #[test]
    fn capability_args_carry_host_ports_and_bandwidth() {
        let config = PodSandboxConfig {
            port_mappings: vec![
                PortMapping {
                    protocol: Protocol::Udp as i32,
                    container_port: 53,
                    host_port: 5353,
                    host_ip: "".into(),
                },
                PortMapping {
                    protocol: Protocol::Tcp as i32,
                    container_port: 80,
                    host_port: 0,
                    host_ip: "".into(),
                },
            ],
            annotations: [(
                "kubernetes.io/ingress-bandwidth".to_string(),
                "1M".to_string(),
            )]
            .into(),
            ..Default::default()
        };
        let args = capability_args(&config);
        assert_eq!(
            args["portMappings"],
            json!([{"hostPort": 5353, "containerPort": 53, "protocol": "udp", "hostIP": ""}])
        );
        assert_eq!(
            args["bandwidth"],
            json!({"ingressRate": 1_000_000, "ingressBurst": u32::MAX})
        );
        assert!(capability_args(&PodSandboxConfig::default()).is_empty());
    }
}
