//! The embedded lab: a "node" network namespace the plugins run in (forwarding on, like a
//! Kubernetes node), a scratch directory for plugin state, and pod namespaces on demand.
//! Everything is a drop guard, so a failing or panicking run leaves no namespace or
//! directory behind. The root namespace's links, routes and sysctls are never touched.
//! [`multinode`] grows it to N nodes on an underlay with etcd and `nodekit-netd`.

pub mod multinode;

use std::path::{Path, PathBuf};

use nodekit_nsutil::{unique_name, write_sysctl, NamedNetNs, NetNs, NsError, NETNS_RUN_DIR};

/// Setting up the lab failed.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// A namespace could not be created or entered (creating one needs root).
    #[error("{0} (the conformance lab needs root: CAP_SYS_ADMIN and CAP_NET_ADMIN)")]
    Ns(#[from] NsError),
    /// A sysctl could not be written inside the node namespace.
    #[error("cannot set {key} in the node namespace {ns}: {source}")]
    Sysctl {
        /// The sysctl key.
        key: &'static str,
        /// The node namespace.
        ns: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The scratch directory could not be created.
    #[error("cannot create the lab's scratch directory: {0}")]
    Scratch(#[source] std::io::Error),
}

/// The sysctls a node needs for pod traffic to be forwarded.
const NODE_SYSCTLS: &[(&str, &str)] = &[
    ("net/ipv4/ip_forward", "1"),
    ("net/ipv6/conf/all/forwarding", "1"),
];

/// A fresh node namespace `nk-<tag>-<pid>-<n>` with forwarding enabled (removed on drop).
pub fn node_namespace(tag: &str) -> Result<NamedNetNs, LabError> {
    let node = NamedNetNs::create(&unique_name(tag))?;
    for (key, value) in NODE_SYSCTLS {
        write_sysctl(&node, key, value)?.map_err(|source| LabError::Sysctl {
            key,
            ns: node.name().to_string(),
            source,
        })?;
    }
    Ok(node)
}

/// A node namespace and a scratch directory, removed on drop.
#[derive(Debug)]
pub struct Lab {
    node: NamedNetNs,
    scratch: tempfile::TempDir,
}

impl Lab {
    /// Creates the node namespace `nk-<tag>-<pid>-<n>` with forwarding enabled, and a fresh
    /// scratch directory.
    pub fn create(tag: &str) -> Result<Self, LabError> {
        let node = node_namespace(tag)?;
        let scratch = tempfile::Builder::new()
            .prefix("nk-conformance-")
            .tempdir()
            .map_err(LabError::Scratch)?;
        Ok(Self { node, scratch })
    }

    /// The node namespace, where plugins run.
    pub fn node(&self) -> &NetNs {
        &self.node
    }

    /// The node namespace's name under `/run/netns`.
    pub fn node_name(&self) -> &str {
        self.node.name()
    }

    /// A scratch directory for plugin state (IPAM datastores), removed with the lab.
    pub fn scratch(&self) -> &Path {
        self.scratch.path()
    }

    /// A fresh, empty pod namespace (loopback up), removed on drop.
    pub fn pod(&self) -> Result<PodNs, LabError> {
        let ns = NamedNetNs::create(&unique_name("pod"))?;
        Ok(PodNs { ns })
    }
}

/// A pod's network namespace, `/run/netns/nk-pod-<pid>-<n>`; removed on drop.
#[derive(Debug)]
pub struct PodNs {
    ns: NamedNetNs,
}

impl PodNs {
    /// The path given to plugins as `CNI_NETNS`.
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_RUN_DIR).join(self.ns.name())
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        self.ns.name()
    }
}

impl std::ops::Deref for PodNs {
    type Target = NetNs;
    fn deref(&self) -> &NetNs {
        &self.ns
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lab_enables_forwarding_in_its_node_namespace_and_cleans_up() {
        let (node_path, scratch, pod_path) = {
            let lab = Lab::create("labtest").expect("lab (needs root)");
            let fwd = lab
                .node()
                .run(|| std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward"))
                .expect("enter")
                .expect("read");
            assert_eq!(fwd.trim(), "1");
            let pod = lab.pod().expect("pod");
            assert!(pod.path().exists());
            assert_ne!(
                pod.inode().expect("inode"),
                lab.node().inode().expect("inode")
            );
            (
                Path::new(NETNS_RUN_DIR).join(lab.node_name()),
                lab.scratch().to_path_buf(),
                pod.path(),
            )
        };
        assert!(!node_path.exists());
        assert!(!scratch.exists());
        assert!(!pod_path.exists());
    }
}
