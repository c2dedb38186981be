//! Finding a resource's devices: configured paths and glob patterns, or the built-in NVIDIA
//! discovery ([`nvidia`]); replicas; and health (a device is healthy while all its nodes
//! exist). An [`Inventory`] remembers every device it has seen, so a removed device node
//! turns its device unhealthy instead of making it vanish, and a node that appears later
//! under a pattern joins the list.

pub mod nvidia;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};

use crate::config::ResourceConfig;

/// A device node: where it is on the host and where a container sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceNode {
    /// The path on the host (under the NVIDIA discovery's root, when it has one).
    pub host_path: PathBuf,
    /// The path in the container.
    pub container_path: PathBuf,
}

impl DeviceNode {
    /// A node seen at the same path on the host and in the container.
    pub fn same(path: PathBuf) -> Self {
        Self {
            container_path: path.clone(),
            host_path: path,
        }
    }

    /// Whether the node exists on the host now.
    pub fn exists(&self) -> bool {
        std::fs::symlink_metadata(&self.host_path).is_ok()
    }
}

/// One physical device as discovery found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PhysicalDevice {
    /// Stable ID (a file name, a GPU UUID...).
    pub id: String,
    /// Its device nodes.
    pub nodes: Vec<DeviceNode>,
    /// The NUMA node it is attached to, when known.
    pub numa: Option<u32>,
}

/// One advertised device: a physical device, or one replica of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// The ID the kubelet sees (`ID`, or `ID::N` for replica N).
    pub id: String,
    /// The physical device's ID (equal to `id` without replicas).
    pub physical: String,
    /// The device nodes a container gets.
    pub nodes: Vec<DeviceNode>,
    /// The NUMA node, when known.
    pub numa: Option<u32>,
    /// Whether every node exists.
    pub healthy: bool,
}

/// Discovery failed outright (a missing device is not an error: it is unhealthy).
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// A directory could not be listed.
    #[error("cannot list {}: {source}", path.display())]
    ReadDir {
        /// The directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A glob pattern is invalid (config validation normally catches this).
    #[error("invalid device pattern {pattern:?}: {source}")]
    Pattern {
        /// The pattern.
        pattern: String,
        /// The parser's error.
        #[source]
        source: glob::PatternError,
    },
}

/// Where a resource's devices come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Paths and glob patterns.
    Paths(Vec<String>),
    /// `/dev/nvidiaN` under this root.
    Nvidia(PathBuf),
}

impl Source {
    /// The source a resource's config names.
    pub fn of(resource: &ResourceConfig) -> Self {
        match &resource.nvidia {
            Some(n) => Self::Nvidia(n.root.clone()),
            None => Self::Paths(resource.devices.clone()),
        }
    }

    /// The physical devices present now (plain paths are listed even when absent).
    pub fn scan(&self) -> Result<Vec<PhysicalDevice>, DiscoveryError> {
        match self {
            Self::Paths(patterns) => scan_paths(patterns),
            Self::Nvidia(root) => nvidia::scan(root),
        }
    }

    /// Nodes every allocation also gets when they exist (NVIDIA's control devices).
    pub fn shared_nodes(&self) -> Vec<DeviceNode> {
        match self {
            Self::Paths(_) => Vec::new(),
            Self::Nvidia(root) => nvidia::control_nodes(root),
        }
    }

    /// Directories whose entries decide the devices and their health.
    pub fn watch_dirs(&self) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = match self {
            Self::Paths(patterns) => patterns.iter().map(|p| fixed_dir(p)).collect(),
            Self::Nvidia(root) => vec![root.join("dev")],
        };
        dirs.sort();
        dirs.dedup();
        dirs
    }
}

/// The directory part of `pattern` before its first wildcard component.
fn fixed_dir(pattern: &str) -> PathBuf {
    let path = Path::new(pattern);
    let mut dir = PathBuf::new();
    let components: Vec<Component<'_>> = path.components().collect();
    for (i, c) in components.iter().enumerate() {
        let text = c.as_os_str().to_string_lossy();
        if i + 1 == components.len() || has_wildcard(&text) {
            break;
        }
        dir.push(c);
    }
    if dir.as_os_str().is_empty() {
        dir.push("/");
    }
    dir
}

fn has_wildcard(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

fn scan_paths(patterns: &[String]) -> Result<Vec<PhysicalDevice>, DiscoveryError> {
    let mut paths = Vec::new();
    for pattern in patterns {
        if !has_wildcard(pattern) {
            paths.push(PathBuf::from(pattern));
            continue;
        }
        let matches = glob::glob(pattern).map_err(|source| DiscoveryError::Pattern {
            pattern: pattern.clone(),
            source,
        })?;
        let mut found: Vec<PathBuf> = matches
            .filter_map(Result::ok)
            .filter(|p| !p.is_dir())
            .collect();
        found.sort();
        paths.extend(found);
    }
    let mut seen = BTreeSet::new();
    Ok(paths
        .into_iter()
        .filter(|p| seen.insert(p.clone()))
        .map(|p| PhysicalDevice {
            id: file_id(&p),
            nodes: vec![DeviceNode::same(p)],
            numa: None,
        })
        .collect())
}

/// A device's ID from its path: the file name.
fn file_id(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path_id(path))
}

/// A device's ID from its whole path, for file names seen twice: `/dev/a/x` -> `dev_a_x`.
fn path_id(path: &Path) -> String {
    path.to_string_lossy()
        .trim_start_matches('/')
        .replace('/', "_")
}

/// Every device a resource has advertised since it started, with current health.
#[derive(Debug, Clone)]
pub struct Inventory {
    source: Source,
    replicas: u32,
    /// Known physical devices in discovery order, keyed for lookup by first node path.
    physical: Vec<PhysicalDevice>,
    by_path: BTreeMap<PathBuf, usize>,
}

impl Inventory {
    /// Scans `source` once.
    pub fn new(source: Source, replicas: u32) -> Result<Self, DiscoveryError> {
        let mut inventory = Self {
            source,
            replicas: replicas.max(1),
            physical: Vec::new(),
            by_path: BTreeMap::new(),
        };
        inventory.rescan()?;
        Ok(inventory)
    }

    /// The source it scans.
    pub fn source(&self) -> &Source {
        &self.source
    }

    /// Scans again, adding devices not seen before (a known device keeps its ID; a new one
    /// whose file name is taken gets an ID from its whole path). Returns whether any was new.
    pub fn rescan(&mut self) -> Result<bool, DiscoveryError> {
        let mut added = false;
        for mut device in self.source.scan()? {
            let Some(key) = device.nodes.first().map(|n| n.host_path.clone()) else {
                continue;
            };
            if let Some(&i) = self.by_path.get(&key) {
                // NUMA placement may become known later (sysfs readable after a driver load).
                if self.physical[i].numa.is_none() {
                    self.physical[i].numa = device.numa;
                }
                continue;
            }
            if self.physical.iter().any(|p| p.id == device.id) {
                device.id = path_id(&key);
            }
            self.by_path.insert(key, self.physical.len());
            self.physical.push(device);
            added = true;
        }
        Ok(added)
    }

    /// The advertised devices (replicas expanded), health evaluated now.
    pub fn devices(&self) -> Vec<Device> {
        let mut out = Vec::with_capacity(self.physical.len() * self.replicas as usize);
        for p in &self.physical {
            let healthy = p.nodes.iter().all(DeviceNode::exists);
            for r in 0..self.replicas {
                let id = if self.replicas == 1 {
                    p.id.clone()
                } else {
                    format!("{}::{r}", p.id)
                };
                out.push(Device {
                    id,
                    physical: p.id.clone(),
                    nodes: p.nodes.clone(),
                    numa: p.numa,
                    healthy,
                });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(path: &Path) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, b"").unwrap();
    }

    #[test]
    fn plain_paths_are_devices_even_when_missing_and_patterns_only_match_what_exists() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        touch(&d.join("dev/lab0"));
        touch(&d.join("dev/lab1"));
        std::fs::create_dir_all(d.join("dev/labdir")).unwrap();
        let source = Source::Paths(vec![
            format!("{}/dev/lab*", d.display()),
            format!("{}/dev/missing", d.display()),
            format!("{}/dev/lab0", d.display()),
        ]);
        let inv = Inventory::new(source, 1).unwrap();
        let devices = inv.devices();
        let ids: Vec<_> = devices.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, ["lab0", "lab1", "missing"]);
        let health: Vec<_> = devices.iter().map(|d| d.healthy).collect();
        assert_eq!(health, [true, true, false]);
        assert_eq!(devices[0].nodes[0].host_path, d.join("dev/lab0"));
        assert_eq!(devices[0].nodes[0].container_path, d.join("dev/lab0"));
    }

    #[test]
    fn replicas_share_the_physical_device_and_its_health() {
        let dir = tempfile::tempdir().unwrap();
        let node = dir.path().join("fuse");
        touch(&node);
        let mut inv = Inventory::new(Source::Paths(vec![node.display().to_string()]), 3).unwrap();
        let ids: Vec<_> = inv.devices().into_iter().map(|d| d.id).collect();
        assert_eq!(ids, ["fuse::0", "fuse::1", "fuse::2"]);
        assert!(inv
            .devices()
            .iter()
            .all(|d| d.physical == "fuse" && d.healthy));
        std::fs::remove_file(&node).unwrap();
        assert!(!inv.rescan().unwrap());
        assert!(inv.devices().iter().all(|d| !d.healthy));
    }

    #[test]
    fn removed_pattern_matches_stay_unhealthy_and_new_ones_join_with_unique_ids() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        touch(&d.join("a/x"));
        let source = Source::Paths(vec![format!("{}/*/x", d.display())]);
        let mut inv = Inventory::new(source, 1).unwrap();
        std::fs::remove_file(d.join("a/x")).unwrap();
        touch(&d.join("b/x"));
        assert!(inv.rescan().unwrap());
        let devices = inv.devices();
        assert_eq!(devices.len(), 2);
        assert_eq!((devices[0].id.as_str(), devices[0].healthy), ("x", false));
        assert_eq!(devices[1].id, path_id(&d.join("b/x")));
        assert!(devices[1].healthy);
    }

    #[test]
    fn watch_dirs_are_the_fixed_parents_of_patterns() {
        let source = Source::Paths(vec![
            "/dev/fuse".into(),
            "/dev/lab*".into(),
            "/dev/dri/*/card0".into(),
            "/x*".into(),
        ]);
        assert_eq!(
            source.watch_dirs(),
            vec![
                PathBuf::from("/"),
                PathBuf::from("/dev"),
                PathBuf::from("/dev/dri")
            ]
        );
        assert_eq!(
            Source::Nvidia("/tmp/r".into()).watch_dirs(),
            vec![PathBuf::from("/tmp/r/dev")]
        );
    }
}
