//! What the shim persists about each sandbox and container (one JSON file each, written
//! atomically). CRI configs are kept as protobuf bytes (hex) so nothing of the request is lost.

use std::path::PathBuf;

use nodekit_proto::cri::v1::{ContainerConfig, PodSandboxConfig};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::monitor::ExitRecord;
use crate::process::ProcessRef;

/// A protobuf message stored as a hex string of its encoding.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Pb<T>(pub T);

impl<T: prost::Message> Serialize for Pb<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let hex: String = self
            .0
            .encode_to_vec()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        s.serialize_str(&hex)
    }
}

impl<'de, T: prost::Message + Default> Deserialize<'de> for Pb<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let hex = String::deserialize(d)?;
        let bytes = (0..hex.len())
            .step_by(2)
            .map(|i| {
                hex.get(i..i + 2)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
            })
            .collect::<Option<Vec<u8>>>()
            .ok_or_else(|| D::Error::custom("invalid hex"))?;
        T::decode(bytes.as_slice())
            .map(Pb)
            .map_err(D::Error::custom)
    }
}

/// Where a sandbox is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SandboxPhase {
    /// RunPodSandbox is in progress (a restart finding this rolls it back).
    Creating,
    /// Network and pause are up.
    Ready,
    /// Stopped: pause killed, network torn down.
    NotReady,
}

/// The CNI attachment of a sandbox: the configuration ADD ran with and its result, so DEL
/// runs with the same ones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CniAttachment {
    /// The network configuration list.
    pub network: serde_json::Value,
    /// The ADD result, once ADD succeeded.
    pub result: Option<serde_json::Value>,
}

/// One sandbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SandboxRecord {
    /// The ID.
    pub id: String,
    /// The reserved name (`name_uid_namespace_attempt`).
    pub name: String,
    /// The RunPodSandbox config.
    pub config: Pb<PodSandboxConfig>,
    /// The runtime handler asked for.
    pub runtime_handler: String,
    /// Creation time, ns since the epoch.
    pub created_at: i64,
    /// Life cycle phase.
    pub phase: SandboxPhase,
    /// The network namespace bind mount (none for hostNetwork, or once stopped).
    pub netns: Option<PathBuf>,
    /// The namespace holder process.
    pub pause: Option<ProcessRef>,
    /// Pod IPs, primary first.
    pub ips: Vec<String>,
    /// The CNI attachment while the network is set up.
    pub cni: Option<CniAttachment>,
    /// The cgroup (relative to each hierarchy) holding the pause process.
    pub cgroup: Option<PathBuf>,
    /// With `--pause-image`: the sandbox container holding the namespaces instead of
    /// `nodekit-pause` (runtime ID = sandbox ID). Absent in older shims' records.
    #[serde(default)]
    pub sandbox_container: Option<SandboxContainer>,
}

/// A sandbox container: its image (layers kept from garbage collection) and monitor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SandboxContainer {
    /// The pause image's ID.
    pub image_id: String,
    /// Its layer stack (chain IDs, bottom first).
    pub chain_ids: Vec<String>,
    /// The monitor that created it, once created.
    pub monitor: Option<ProcessRef>,
}

/// Where a container is in its life, as far as the shim drove it (an exit record written by
/// the monitor overrides Created/Running).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ContainerPhase {
    /// CreateContainer is in progress (a restart finding this rolls it back).
    Creating,
    /// Created by the runtime, not started.
    Created,
    /// Started.
    Running,
    /// Exited (or failed to start).
    Exited,
}

/// One container.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContainerRecord {
    /// The ID.
    pub id: String,
    /// The reserved name.
    pub name: String,
    /// Its sandbox.
    pub sandbox_id: String,
    /// The CreateContainer config.
    pub config: Pb<ContainerConfig>,
    /// The image ID it runs.
    pub image_id: String,
    /// The image's layer stack (chain IDs, bottom first), kept from garbage collection.
    pub chain_ids: Vec<String>,
    /// Creation time, ns.
    pub created_at: i64,
    /// Start time, ns (0 before StartContainer).
    pub started_at: i64,
    /// Life cycle phase.
    pub phase: ContainerPhase,
    /// The init process's host PID once created.
    pub pid: i32,
    /// The monitor process.
    pub monitor: Option<ProcessRef>,
    /// The CRI log file.
    pub log_path: Option<PathBuf>,
    /// `linux.cgroupsPath` given to the runtime.
    pub cgroups_path: String,
    /// The process user (uid, gid, supplementary groups).
    pub user: (u32, u32, Vec<u32>),
    /// Why the container is exited without an exit record (StartError), if so.
    pub start_error: Option<String>,
    /// The exit, once known.
    pub exit: Option<ExitRecord>,
    /// The image's stop signal (`SIGTERM` when it names none).
    pub stop_signal: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use nodekit_proto::cri::v1::PodSandboxMetadata;

    #[test]
    fn protobuf_fields_round_trip_through_json() {
        let cfg = PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: "p".into(),
                uid: "u".into(),
                namespace: "n".into(),
                attempt: 3,
            }),
            hostname: "h".into(),
            ..Default::default()
        };
        let json = serde_json::to_string(&Pb(cfg.clone())).unwrap();
        let back: Pb<PodSandboxConfig> = serde_json::from_str(&json).unwrap();
        assert_eq!(back.0, cfg);
        assert!(serde_json::from_str::<Pb<PodSandboxConfig>>("\"zz\"").is_err());
    }
}
