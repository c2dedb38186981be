//! CDI (Container Device Interface) specs for resources with `cdi: true`: one spec per
//! resource, kind = the resource name (`nodekit.io/fuse`), one CDI device per advertised
//! device ID, the shared nodes (NVIDIA's control devices) as spec-wide edits. Allocate
//! answers with the fully qualified names (`nodekit.io/fuse=fuse::0`). Specs are written
//! atomically (temp file, fsync, rename, fsync of the directory): a runtime never reads a
//! torn spec.

use std::path::{Path, PathBuf};

use nodekit_nsutil::durable;
use serde::Serialize;

use crate::discovery::{Device, DeviceNode};

/// The CDI spec version written.
pub const CDI_VERSION: &str = "0.6.0";

/// A CDI spec file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Spec {
    /// Always [`CDI_VERSION`].
    pub cdi_version: String,
    /// `vendor/class`.
    pub kind: String,
    /// One per device ID.
    pub devices: Vec<SpecDevice>,
    /// Edits applied whenever any device of the spec is used.
    #[serde(skip_serializing_if = "ContainerEdits::is_empty")]
    pub container_edits: ContainerEdits,
}

/// One CDI device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SpecDevice {
    /// The device name (the device plugin's device ID).
    pub name: String,
    /// What using it changes in the container.
    pub container_edits: ContainerEdits,
}

/// Container edits (only device nodes are used here).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerEdits {
    /// Device nodes to create in the container.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub device_nodes: Vec<SpecDeviceNode>,
}

impl ContainerEdits {
    fn is_empty(&self) -> bool {
        self.device_nodes.is_empty()
    }
}

/// A device node edit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SpecDeviceNode {
    /// Path in the container.
    pub path: String,
    /// Path on the host.
    pub host_path: String,
    /// cgroup permissions (`rw`).
    pub permissions: String,
}

/// A CDI spec could not be written.
#[derive(Debug, thiserror::Error)]
pub enum CdiError {
    /// A file operation failed.
    #[error("writing CDI spec {}: {source}", path.display())]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The spec could not be serialised.
    #[error("serialising the CDI spec for {kind}: {source}")]
    Serialise {
        /// The kind.
        kind: String,
        /// The serialiser's error.
        #[source]
        source: serde_json::Error,
    },
}

/// Checks that a resource name is usable as a CDI kind: the vendor is a domain (resource
/// names already are) and the class is letters, digits, `-` and `_`, starting with a letter
/// or digit.
pub fn check_kind(name: &str) -> Result<(), String> {
    let (_, class) = name
        .split_once('/')
        .ok_or("no `/` between vendor and class")?;
    let ok = class.starts_with(|c: char| c.is_ascii_alphanumeric())
        && class
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "the class {class:?} may hold only letters, digits, '-' and '_'"
        ))
    }
}

/// The fully qualified CDI name of device `id` of `kind`.
pub fn qualified_name(kind: &str, id: &str) -> String {
    format!("{kind}={id}")
}

/// The spec file for `kind` in `dir`: `nodekit-VENDOR-CLASS.json`.
pub fn spec_path(dir: &Path, kind: &str) -> PathBuf {
    dir.join(format!("nodekit-{}.json", kind.replace('/', "-")))
}

fn node_edit(node: &DeviceNode, permissions: &str) -> SpecDeviceNode {
    SpecDeviceNode {
        path: node.container_path.display().to_string(),
        host_path: node.host_path.display().to_string(),
        permissions: permissions.to_string(),
    }
}

/// The spec for `devices` of resource `kind`, with `shared` nodes spec-wide.
pub fn build_spec(
    kind: &str,
    devices: &[Device],
    shared: &[DeviceNode],
    permissions: &str,
) -> Spec {
    Spec {
        cdi_version: CDI_VERSION.into(),
        kind: kind.into(),
        devices: devices
            .iter()
            .map(|d| SpecDevice {
                name: d.id.clone(),
                container_edits: ContainerEdits {
                    device_nodes: d.nodes.iter().map(|n| node_edit(n, permissions)).collect(),
                },
            })
            .collect(),
        container_edits: ContainerEdits {
            device_nodes: shared.iter().map(|n| node_edit(n, permissions)).collect(),
        },
    }
}

/// Writes `spec` to its file in `dir` (created if missing), atomically. Returns the file.
pub fn write_spec(dir: &Path, spec: &Spec) -> Result<PathBuf, CdiError> {
    let path = spec_path(dir, &spec.kind);
    let json = serde_json::to_vec_pretty(spec).map_err(|source| CdiError::Serialise {
        kind: spec.kind.clone(),
        source,
    })?;
    durable::write(&path, &json).map_err(|e| CdiError::Write {
        path: e.path,
        source: e.source,
    })?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(id: &str, path: &str) -> Device {
        Device {
            id: id.into(),
            physical: id.split("::").next().unwrap().into(),
            nodes: vec![DeviceNode::same(path.into())],
            numa: None,
            healthy: true,
        }
    }

    #[test]
    fn kinds_follow_the_cdi_class_rules() {
        assert!(check_kind("nodekit.io/fuse").is_ok());
        assert!(check_kind("nvidia.com/gpu_a-1").is_ok());
        assert!(check_kind("nodekit.io/a.b").is_err());
        assert!(check_kind("nodekit.io/-a").is_err());
    }

    #[test]
    fn the_spec_is_written_atomically_with_one_device_per_id() {
        let dir = tempfile::tempdir().unwrap();
        let cdi_dir = dir.path().join("cdi");
        let devices = [
            device("fuse::0", "/dev/fuse"),
            device("fuse::1", "/dev/fuse"),
        ];
        let shared = [DeviceNode {
            host_path: "/r/dev/nvidiactl".into(),
            container_path: "/dev/nvidiactl".into(),
        }];
        let spec = build_spec("nodekit.io/fuse", &devices, &shared, "rw");
        let path = write_spec(&cdi_dir, &spec).unwrap();
        assert_eq!(path, cdi_dir.join("nodekit-nodekit.io-fuse.json"));
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(v["cdiVersion"], "0.6.0");
        assert_eq!(v["kind"], "nodekit.io/fuse");
        assert_eq!(v["devices"][1]["name"], "fuse::1");
        assert_eq!(
            v["devices"][0]["containerEdits"]["deviceNodes"][0],
            serde_json::json!({"path": "/dev/fuse", "hostPath": "/dev/fuse", "permissions": "rw"})
        );
        assert_eq!(
            v["containerEdits"]["deviceNodes"][0]["hostPath"],
            "/r/dev/nvidiactl"
        );
        // Only the spec is left: no temp file.
        assert_eq!(std::fs::read_dir(&cdi_dir).unwrap().count(), 1);
        assert_eq!(
            qualified_name("nodekit.io/fuse", "fuse::1"),
            "nodekit.io/fuse=fuse::1"
        );
        let no_shared = build_spec("nodekit.io/fuse", &devices, &[], "rw");
        let text = serde_json::to_string(&no_shared).unwrap();
        assert!(!text.contains("\"containerEdits\":{}"), "{text}");
    }
}
