//! The plugin's configuration file (YAML): which extended resources to advertise, how each
//! one's devices are found and what a container gets with them. [`load`] parses and
//! validates everything before anything is served; every error names the field
//! (`resources[1].replicas`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::template::Template;

/// Where CDI specs go unless the config says otherwise.
pub const DEFAULT_CDI_DIR: &str = "/var/run/cdi";

/// The most replicas one device may be shared as.
pub const MAX_REPLICAS: u32 = 1024;

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    /// The resources to advertise, one gRPC server each.
    pub resources: Vec<ResourceConfig>,
    /// Directory the CDI specs of resources with `cdi: true` are written to.
    #[serde(default = "default_cdi_dir")]
    pub cdi_dir: PathBuf,
}

/// One extended resource.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResourceConfig {
    /// The extended resource name (`nodekit.io/fuse`).
    pub name: String,
    /// Absolute paths or glob patterns; each match is one device. A plain path that does not
    /// exist is still a device (an unhealthy one); a pattern's devices are what it matches.
    #[serde(default)]
    pub devices: Vec<String>,
    /// The built-in NVIDIA discovery instead of `devices`.
    #[serde(default)]
    pub nvidia: Option<NvidiaConfig>,
    /// Each device is advertised this many times (time-slicing); IDs become `ID::N`.
    #[serde(default = "one")]
    pub replicas: u32,
    /// cgroup device permissions given to containers: one or more of `r`, `w`, `m`.
    #[serde(default = "rw")]
    pub permissions: String,
    /// Environment variables for containers; values are templates (`{ids}`...).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Bind mounts for every container that gets this resource.
    #[serde(default)]
    pub mounts: Vec<MountConfig>,
    /// Annotations for the container; values are templates.
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// Also answer with CDI device names and write a CDI spec for the devices.
    #[serde(default)]
    pub cdi: bool,
    /// Ask the kubelet to call PreStartContainer before each container starts.
    #[serde(default)]
    pub pre_start_required: bool,
    /// How GetPreferredAllocation chooses among replicas.
    #[serde(default)]
    pub allocation_policy: AllocationPolicy,
}

/// The NVIDIA discovery: one device per `/dev/nvidiaN`, NUMA node from sysfs.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NvidiaConfig {
    /// The root `/dev`, `/proc` and `/sys` are read under (tests point it at a fake tree);
    /// containers see the device nodes at their path relative to it.
    #[serde(default = "root")]
    pub root: PathBuf,
}

/// A bind mount handed to containers.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MountConfig {
    /// The path on the host.
    pub host_path: PathBuf,
    /// Where it appears in the container.
    pub container_path: PathBuf,
    /// Mount read-only.
    #[serde(default)]
    pub read_only: bool,
}

/// How GetPreferredAllocation chooses among replicas of physical devices.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AllocationPolicy {
    /// Use up the replicas of one physical device before taking another.
    #[default]
    Pack,
    /// Take one replica of each physical device before taking a second of any.
    Spread,
}

/// Why the configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not YAML of the expected shape (the message names the field).
    #[error("config {}: {source}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's error, with the field's path and position.
        #[source]
        source: serde_norway::Error,
    },
    /// A field has an invalid value.
    #[error("config {}: field `{field}`: {reason}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The field, e.g. `resources[0].permissions`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
}

fn default_cdi_dir() -> PathBuf {
    PathBuf::from(DEFAULT_CDI_DIR)
}

fn one() -> u32 {
    1
}

fn rw() -> String {
    "rw".into()
}

fn root() -> PathBuf {
    PathBuf::from("/")
}

/// Reads and validates the config file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&text, path)
}

/// Parses and validates config `text`; `path` is only used in messages.
pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
    let config: Config = serde_norway::from_str(text).map_err(|source| ConfigError::Parse {
        path: path.to_path_buf(),
        source,
    })?;
    config
        .validate()
        .map_err(|(field, reason)| ConfigError::Invalid {
            path: path.to_path_buf(),
            field,
            reason,
        })?;
    Ok(config)
}

type Invalid = (String, String);

impl Config {
    fn validate(&self) -> Result<(), Invalid> {
        if self.resources.is_empty() {
            return Err(("resources".into(), "must list at least one resource".into()));
        }
        if !self.cdi_dir.is_absolute() {
            return Err(("cdiDir".into(), "must be an absolute path".into()));
        }
        let mut names = BTreeSet::new();
        let mut sockets = BTreeSet::new();
        for (i, resource) in self.resources.iter().enumerate() {
            let at = |field: &str| format!("resources[{i}].{field}");
            resource
                .validate()
                .map_err(|(field, reason)| (at(&field), reason))?;
            if !names.insert(resource.name.as_str()) {
                return Err((at("name"), format!("{:?} is listed twice", resource.name)));
            }
            let socket = crate::plugin::socket_name(&resource.name);
            if !sockets.insert(socket.clone()) {
                return Err((
                    at("name"),
                    format!("its socket name {socket} is taken by another resource"),
                ));
            }
        }
        Ok(())
    }
}

impl ResourceConfig {
    /// Validates one resource; field names are relative to it.
    fn validate(&self) -> Result<(), Invalid> {
        let bad = |field: &str, reason: String| Err((field.to_string(), reason));
        if let Err(reason) = check_resource_name(&self.name) {
            return bad("name", format!("{:?}: {reason}", self.name));
        }
        match (&self.nvidia, self.devices.is_empty()) {
            (Some(_), false) => {
                return bad(
                    "devices",
                    "give either `devices` or `nvidia`, not both".into(),
                )
            }
            (None, true) => {
                return bad(
                    "devices",
                    "must list at least one path or pattern (or use `nvidia`)".into(),
                )
            }
            _ => {}
        }
        for (j, pattern) in self.devices.iter().enumerate() {
            if !Path::new(pattern).is_absolute() {
                return bad(
                    &format!("devices[{j}]"),
                    format!("{pattern:?} is not an absolute path"),
                );
            }
            if let Err(e) = glob::Pattern::new(pattern) {
                return bad(
                    &format!("devices[{j}]"),
                    format!("{pattern:?} is not a valid pattern: {e}"),
                );
            }
        }
        if let Some(nvidia) = &self.nvidia {
            if !nvidia.root.is_absolute() {
                return bad("nvidia.root", "must be an absolute path".into());
            }
        }
        if self.replicas == 0 || self.replicas > MAX_REPLICAS {
            return bad(
                "replicas",
                format!("{} is outside 1..={MAX_REPLICAS}", self.replicas),
            );
        }
        if let Err(reason) = check_permissions(&self.permissions) {
            return bad("permissions", format!("{:?}: {reason}", self.permissions));
        }
        for (key, value) in &self.env {
            if !is_env_name(key) {
                return bad(
                    &format!("env.{key}"),
                    "is not a valid environment variable name".into(),
                );
            }
            if let Err(e) = Template::parse(value) {
                return bad(&format!("env.{key}"), e.to_string());
            }
        }
        for (key, value) in &self.annotations {
            if key.is_empty() {
                return bad("annotations", "an annotation key is empty".into());
            }
            if let Err(e) = Template::parse(value) {
                return bad(&format!("annotations.{key}"), e.to_string());
            }
        }
        for (j, mount) in self.mounts.iter().enumerate() {
            if !mount.host_path.is_absolute() {
                return bad(
                    &format!("mounts[{j}].hostPath"),
                    "must be an absolute path".into(),
                );
            }
            if !mount.container_path.is_absolute() {
                return bad(
                    &format!("mounts[{j}].containerPath"),
                    "must be an absolute path".into(),
                );
            }
        }
        if self.cdi {
            if let Err(reason) = crate::cdi::check_kind(&self.name) {
                return bad(
                    "cdi",
                    format!("the name {:?} is not a CDI kind: {reason}", self.name),
                );
            }
        }
        Ok(())
    }

    /// The env templates, parsed (validated at load, so parsing cannot fail here).
    pub fn env_templates(&self) -> Vec<(String, Template)> {
        parsed(&self.env)
    }

    /// The annotation templates, parsed.
    pub fn annotation_templates(&self) -> Vec<(String, Template)> {
        parsed(&self.annotations)
    }
}

fn parsed(map: &BTreeMap<String, String>) -> Vec<(String, Template)> {
    map.iter()
        .filter_map(|(k, v)| Template::parse(v).ok().map(|t| (k.clone(), t)))
        .collect()
}

/// Checks an extended resource name: `DOMAIN/NAME`, the domain a DNS subdomain outside
/// `kubernetes.io`, the name a Kubernetes qualified-name segment.
pub fn check_resource_name(name: &str) -> Result<(), String> {
    let (domain, short) = name
        .split_once('/')
        .ok_or("must be DOMAIN/NAME, e.g. nodekit.io/fuse")?;
    if domain.is_empty() || domain.len() > 253 {
        return Err("the domain must be 1 to 253 characters".into());
    }
    for label in domain.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(format!(
                "domain label {label:?} is not a DNS label (lowercase letters, digits, '-')"
            ));
        }
    }
    if domain == "kubernetes.io" || domain.ends_with(".kubernetes.io") {
        return Err("the kubernetes.io domain is reserved".into());
    }
    let ok = !short.is_empty()
        && short.len() <= 63
        && short
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && short.starts_with(|c: char| c.is_ascii_alphanumeric())
        && short.ends_with(|c: char| c.is_ascii_alphanumeric());
    if !ok {
        return Err(format!(
            "the name {short:?} must be 1 to 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
        ));
    }
    Ok(())
}

fn check_permissions(p: &str) -> Result<(), String> {
    if p.is_empty() {
        return Err("must not be empty".into());
    }
    let mut seen = BTreeSet::new();
    for c in p.chars() {
        if !matches!(c, 'r' | 'w' | 'm') {
            return Err(format!("{c:?} is not one of r, w, m"));
        }
        if !seen.insert(c) {
            return Err(format!("{c:?} is given twice"));
        }
    }
    Ok(())
}

fn is_env_name(name: &str) -> bool {
    name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
cdiDir: /tmp/cdi
resources:
  - name: nodekit.io/fuse
    devices: ["/dev/fuse"]
    replicas: 4
    permissions: rw
    env: {FUSE_VISIBLE: "{ids}"}
    mounts: [{hostPath: /etc/x, containerPath: /etc/x, readOnly: true}]
    annotations: {nodekit.io/devices: "{paths}"}
    cdi: true
    preStartRequired: true
    allocationPolicy: spread
  - name: nvidia.com/gpu
    nvidia: {root: /tmp/fake}
"#;

    fn err(text: &str) -> String {
        parse(text, Path::new("c.yaml")).unwrap_err().to_string()
    }

    #[test]
    fn the_example_config_parses_with_every_field() {
        let c = parse(FULL, Path::new("c.yaml")).unwrap();
        assert_eq!(c.cdi_dir, Path::new("/tmp/cdi"));
        let fuse = &c.resources[0];
        assert_eq!(fuse.replicas, 4);
        assert_eq!(fuse.env["FUSE_VISIBLE"], "{ids}");
        assert_eq!(
            fuse.mounts,
            vec![MountConfig {
                host_path: "/etc/x".into(),
                container_path: "/etc/x".into(),
                read_only: true
            }]
        );
        assert!(fuse.cdi && fuse.pre_start_required);
        assert_eq!(fuse.allocation_policy, AllocationPolicy::Spread);
        let gpu = &c.resources[1];
        assert_eq!(gpu.nvidia.as_ref().unwrap().root, Path::new("/tmp/fake"));
        assert_eq!(gpu.replicas, 1);
        assert_eq!(gpu.permissions, "rw");
        assert_eq!(gpu.allocation_policy, AllocationPolicy::Pack);
        let minimal = parse(
            "resources: [{name: a.io/b, devices: [/dev/null]}]",
            Path::new("m"),
        )
        .unwrap();
        assert_eq!(minimal.cdi_dir, Path::new(DEFAULT_CDI_DIR));
    }

    #[test]
    fn type_errors_and_unknown_fields_name_the_field() {
        let e = err("resources: [{name: a.io/b, devices: [/dev/null], replicas: many}]");
        assert!(e.contains("resources[0].replicas"), "{e}");
        let e = err("resources: [{name: a.io/b, devices: [/dev/null], replica: 2}]");
        assert!(e.contains("replica"), "{e}");
        assert!(e.contains("unknown field"), "{e}");
        let e = err("resources: [{name: a.io/b, devices: [/dev/null], allocationPolicy: fill}]");
        assert!(e.contains("resources[0].allocationPolicy"), "{e}");
        let e = err("resources: [{devices: [/dev/null]}]");
        assert!(e.contains("name"), "{e}");
    }

    #[test]
    fn invalid_values_name_the_field() {
        let cases = [
            ("resources: []", "field `resources`"),
            (
                "resources: [{name: fuse, devices: [/dev/fuse]}]",
                "`resources[0].name`",
            ),
            (
                "resources: [{name: kubernetes.io/x, devices: [/dev/fuse]}]",
                "`resources[0].name`",
            ),
            (
                "resources: [{name: a.io/b, devices: [/dev/null]}, {name: a.io/b, devices: [/dev/zero]}]",
                "`resources[1].name`",
            ),
            ("resources: [{name: a.io/b}]", "`resources[0].devices`"),
            (
                "resources: [{name: a.io/b, devices: [dev/null]}]",
                "`resources[0].devices[0]`",
            ),
            (
                "resources: [{name: a.io/b, devices: [\"/dev/[a\"]}]",
                "`resources[0].devices[0]`",
            ),
            (
                "resources: [{name: a.io/b, devices: [/dev/null], nvidia: {}}]",
                "`resources[0].devices`",
            ),
            (
                "resources: [{name: a.io/b, devices: [/dev/null], replicas: 0}]",
                "`resources[0].replicas`",
            ),
            (
                "resources: [{name: a.io/b, devices: [/dev/null], permissions: rx}]",
                "`resources[0].permissions`",
            ),
            (
                "resources: [{name: a.io/b, devices: [/dev/null], env: {A: \"{idz}\"}}]",
                "`resources[0].env.A`",
            ),
            (
                "resources: [{name: a.io/b, devices: [/dev/null], env: {1A: x}}]",
                "`resources[0].env.1A`",
            ),
            (
                "resources: [{name: a.io/b, devices: [/dev/null], mounts: [{hostPath: x, containerPath: /x}]}]",
                "`resources[0].mounts[0].hostPath`",
            ),
            (
                "resources: [{name: a.io/b.c, devices: [/dev/null], cdi: true}]",
                "`resources[0].cdi`",
            ),
            (
                "resources: [{name: a.io/b_c, devices: [/dev/null]}, {name: a.io/b-c, devices: [/dev/zero]}]",
                "`resources[1].name`",
            ),
            (
                "cdiDir: rel\nresources: [{name: a.io/b, devices: [/dev/null]}]",
                "`cdiDir`",
            ),
        ];
        for (text, field) in cases {
            let e = err(text);
            assert!(e.contains(field), "{text}: {e}");
            assert!(e.starts_with("config c.yaml: "), "{e}");
        }
    }

    #[test]
    fn a_missing_file_is_a_read_error_naming_it() {
        let e = load(Path::new("/nonexistent/dp.yaml")).unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }));
        assert!(e.to_string().contains("/nonexistent/dp.yaml"), "{e}");
    }
}
