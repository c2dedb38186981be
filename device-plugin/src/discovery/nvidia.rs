//! The built-in NVIDIA discovery: one device per `/dev/nvidiaN`. The driver's
//! `/proc/driver/nvidia/gpus/BUS/information` maps each minor number to its PCI bus ID and
//! GPU UUID (the device's ID when known, as NVIDIA's own plugin uses it); the NUMA node is
//! sysfs' `/sys/bus/pci/devices/BUS/numa_node` (-1 means none). Everything is read under a
//! root, so tests use a fake tree. The control devices (`nvidiactl`, `nvidia-uvm`,
//! `nvidia-uvm-tools`) go with every allocation when they exist.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::{DeviceNode, DiscoveryError, PhysicalDevice};

/// Control device nodes every GPU allocation also needs.
pub const CONTROL_DEVICES: &[&str] = &["nvidiactl", "nvidia-uvm", "nvidia-uvm-tools"];

/// What the driver says about one GPU.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct GpuInfo {
    bus_id: String,
    uuid: Option<String>,
}

/// The GPUs under `root`, ordered by minor number.
pub fn scan(root: &Path) -> Result<Vec<PhysicalDevice>, DiscoveryError> {
    let dev = root.join("dev");
    let entries = match std::fs::read_dir(&dev) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(DiscoveryError::ReadDir { path: dev, source }),
    };
    let mut minors: Vec<u32> = entries
        .filter_map(Result::ok)
        .filter_map(|e| minor_of(&e.file_name().to_string_lossy()))
        .collect();
    minors.sort_unstable();
    let gpus = driver_gpus(root);
    Ok(minors
        .into_iter()
        .map(|minor| {
            let info = gpus.get(&minor);
            PhysicalDevice {
                id: info
                    .and_then(|i| i.uuid.clone())
                    .unwrap_or_else(|| format!("nvidia{minor}")),
                nodes: vec![node(root, &format!("nvidia{minor}"))],
                numa: info.and_then(|i| numa_node(root, &i.bus_id)),
            }
        })
        .collect())
}

/// The control device nodes present under `root` now.
pub fn control_nodes(root: &Path) -> Vec<DeviceNode> {
    CONTROL_DEVICES
        .iter()
        .map(|name| node(root, name))
        .filter(DeviceNode::exists)
        .collect()
}

fn node(root: &Path, name: &str) -> DeviceNode {
    DeviceNode {
        host_path: root.join("dev").join(name),
        container_path: PathBuf::from("/dev").join(name),
    }
}

/// `nvidia12` -> 12; control devices and anything else -> None.
fn minor_of(name: &str) -> Option<u32> {
    let digits = name.strip_prefix("nvidia")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Minor number -> GPU, from the driver's proc files (empty when the driver is absent).
fn driver_gpus(root: &Path) -> BTreeMap<u32, GpuInfo> {
    let dir = root.join("proc/driver/nvidia/gpus");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return BTreeMap::new();
    };
    let mut out = BTreeMap::new();
    for entry in entries.filter_map(Result::ok) {
        let bus_id = entry.file_name().to_string_lossy().into_owned();
        let Ok(text) = std::fs::read_to_string(entry.path().join("information")) else {
            continue;
        };
        if let Some((minor, info)) = parse_information(&text, bus_id) {
            out.insert(minor, info);
        }
    }
    out
}

/// Parses an `information` file: `Key: value` lines, of which `Device Minor` is required.
fn parse_information(text: &str, bus_id: String) -> Option<(u32, GpuInfo)> {
    let mut minor = None;
    let mut info = GpuInfo { bus_id, uuid: None };
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match key.trim() {
            "Device Minor" => minor = value.parse().ok(),
            "GPU UUID" if !value.is_empty() => info.uuid = Some(value.to_string()),
            "Bus Location" if !value.is_empty() => info.bus_id = value.to_string(),
            _ => {}
        }
    }
    minor.map(|m| (m, info))
}

/// The NUMA node of PCI device `bus_id`, or None when sysfs says -1 or does not say.
fn numa_node(root: &Path, bus_id: &str) -> Option<u32> {
    let path = root
        .join("sys/bus/pci/devices")
        .join(bus_id.to_ascii_lowercase())
        .join("numa_node");
    let text = std::fs::read_to_string(path).ok()?;
    let n: i64 = text.trim().parse().ok()?;
    u32::try_from(n).ok()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Writes a fake driver tree: `gpus` is (minor, bus ID, NUMA node) per GPU.
    pub(crate) fn fake_tree(root: &Path, gpus: &[(u32, &str, i32)], control: &[&str]) {
        let dev = root.join("dev");
        std::fs::create_dir_all(&dev).unwrap();
        for (minor, bus, numa) in gpus {
            std::fs::write(dev.join(format!("nvidia{minor}")), b"").unwrap();
            let proc_dir = root.join("proc/driver/nvidia/gpus").join(bus);
            std::fs::create_dir_all(&proc_dir).unwrap();
            std::fs::write(
                proc_dir.join("information"),
                format!(
                    "Model: \t\t Fake GPU\nIRQ:   \t\t 42\nGPU UUID: \t GPU-{minor:08}-fake\nBus Location: \t {bus}\nDevice Minor: \t {minor}\n"
                ),
            )
            .unwrap();
            let sys = root.join("sys/bus/pci/devices").join(bus);
            std::fs::create_dir_all(&sys).unwrap();
            std::fs::write(sys.join("numa_node"), format!("{numa}\n")).unwrap();
        }
        for name in control {
            std::fs::write(dev.join(name), b"").unwrap();
        }
    }

    #[test]
    fn gpus_are_found_with_uuid_and_numa_node_and_control_devices_when_present() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fake_tree(
            root,
            &[
                (10, "0000:b1:00.0", 1),
                (0, "0000:3b:00.0", 0),
                (1, "0000:3c:00.0", -1),
            ],
            &["nvidiactl", "nvidia-uvm"],
        );
        std::fs::write(root.join("dev/nvidia-modeset"), b"").unwrap();
        let gpus = scan(root).unwrap();
        let summary: Vec<_> = gpus
            .iter()
            .map(|g| (g.id.as_str(), g.numa, g.nodes[0].container_path.clone()))
            .collect();
        assert_eq!(
            summary,
            vec![
                ("GPU-00000000-fake", Some(0), PathBuf::from("/dev/nvidia0")),
                ("GPU-00000001-fake", None, PathBuf::from("/dev/nvidia1")),
                ("GPU-00000010-fake", Some(1), PathBuf::from("/dev/nvidia10")),
            ]
        );
        assert_eq!(gpus[0].nodes[0].host_path, root.join("dev/nvidia0"));
        let control: Vec<_> = control_nodes(root)
            .into_iter()
            .map(|n| n.container_path)
            .collect();
        assert_eq!(
            control,
            [
                PathBuf::from("/dev/nvidiactl"),
                PathBuf::from("/dev/nvidia-uvm")
            ]
        );
    }

    #[test]
    fn without_the_driver_proc_files_gpus_are_named_by_minor_without_numa() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("dev")).unwrap();
        std::fs::write(dir.path().join("dev/nvidia3"), b"").unwrap();
        std::fs::write(dir.path().join("dev/nvidiactl"), b"").unwrap();
        let gpus = scan(dir.path()).unwrap();
        assert_eq!(gpus.len(), 1);
        assert_eq!((gpus[0].id.as_str(), gpus[0].numa), ("nvidia3", None));
        assert!(scan(&dir.path().join("absent")).unwrap().is_empty());
    }

    #[test]
    fn minor_numbers_come_only_from_nvidia_digits() {
        assert_eq!(minor_of("nvidia0"), Some(0));
        assert_eq!(minor_of("nvidia127"), Some(127));
        assert_eq!(minor_of("nvidiactl"), None);
        assert_eq!(minor_of("nvidia-uvm"), None);
        assert_eq!(minor_of("nvidia"), None);
    }
}
