//! Builds the OCI runtime spec (`config.json`) of a container from the CRI request, the image
//! configuration and what the sandbox provides (namespaces to join, /etc files), following
//! the rules containerd's CRI plugin applies.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use nodekit_proto::cri::v1::{
    ContainerConfig, LinuxContainerResources, LinuxContainerSecurityContext, MountPropagation,
    NamespaceMode, PodSandboxConfig,
};
use oci_spec::image::Config as ImageConfig;
use oci_spec::runtime::{
    Capabilities, Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxCpuBuilder, LinuxDevice,
    LinuxDeviceBuilder, LinuxDeviceCgroup, LinuxDeviceCgroupBuilder, LinuxDeviceType,
    LinuxHugepageLimitBuilder, LinuxMemoryBuilder, LinuxNamespace, LinuxNamespaceBuilder,
    LinuxNamespaceType, LinuxResources, LinuxResourcesBuilder, Mount, MountBuilder, ProcessBuilder,
    RootBuilder, Spec, SpecBuilder, UserBuilder,
};

use super::user::ProcessUser;

/// The request cannot be turned into a runtime spec; `field` names the CRI field at fault.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// A request field holds a value the runtime cannot use.
    #[error("{field}: {reason}")]
    Invalid {
        /// The CRI field path (`config.linux.security_context.capabilities`...).
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// oci-spec rejected a value while building.
    #[error("building the runtime spec: {0}")]
    Build(#[from] oci_spec::OciSpecError),
}

fn invalid(field: &'static str, reason: impl Into<String>) -> SpecError {
    SpecError::Invalid {
        field,
        reason: reason.into(),
    }
}

/// The capabilities containerd grants a non-privileged container.
pub const DEFAULT_CAPABILITIES: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "MKNOD",
    "NET_RAW",
    "SETGID",
    "SETUID",
    "SETFCAP",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "KILL",
    "AUDIT_WRITE",
];

/// Every capability a privileged container gets (up to CAP_CHECKPOINT_RESTORE, 5.9).
const ALL_CAPABILITIES: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// Paths hidden from non-privileged containers unless the request lists its own.
pub const DEFAULT_MASKED_PATHS: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// Paths read-only for non-privileged containers unless the request lists its own.
pub const DEFAULT_READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// The sandbox's namespaces a container joins; `None` means the node's (host) namespace.
#[derive(Debug, Clone, Default)]
pub struct SandboxNamespaces {
    /// The pod network namespace (bind mount path); `None` for hostNetwork pods.
    pub network: Option<PathBuf>,
    /// The pause process's IPC namespace; `None` for hostIPC pods.
    pub ipc: Option<PathBuf>,
    /// The pause process's UTS namespace; `None` for hostNetwork pods.
    pub uts: Option<PathBuf>,
    /// The pause process's PID namespace (joined when the pod shares one); `None` for hostPID.
    pub pid: Option<PathBuf>,
}

/// The sandbox's /etc files bind-mounted into each container.
#[derive(Debug, Clone, Default)]
pub struct SandboxFiles {
    /// `/etc/hostname`.
    pub hostname: Option<PathBuf>,
    /// `/etc/hosts`.
    pub hosts: Option<PathBuf>,
    /// `/etc/resolv.conf`.
    pub resolv_conf: Option<PathBuf>,
    /// The pod's `/dev/shm` (a tmpfs of the sandbox, or the host's for host IPC pods), so
    /// containers sharing the IPC namespace share POSIX shared memory too; `None`: a tmpfs
    /// of the container's own.
    pub shm: Option<PathBuf>,
}

/// Everything the spec is built from.
#[derive(Debug)]
pub struct SpecInput<'a> {
    /// The container ID (for annotations).
    pub container_id: &'a str,
    /// The sandbox ID (for annotations).
    pub sandbox_id: &'a str,
    /// The CreateContainer request's config.
    pub config: &'a ContainerConfig,
    /// The sandbox's config (sysctls).
    pub sandbox: &'a PodSandboxConfig,
    /// The image's runtime config (entrypoint, cmd, env, workdir).
    pub image: Option<&'a ImageConfig>,
    /// The mounted root filesystem.
    pub rootfs: &'a Path,
    /// The process identity, already resolved against the image.
    pub user: &'a ProcessUser,
    /// What to join.
    pub namespaces: &'a SandboxNamespaces,
    /// The PID namespace of the target container (`NamespaceMode::Target`).
    pub target_pid_ns: Option<PathBuf>,
    /// The sandbox's /etc files.
    pub files: &'a SandboxFiles,
    /// `linux.cgroupsPath`.
    pub cgroups_path: String,
    /// The lowest oom_score_adj the runtime may set (`Some(current)` when the shim lacks
    /// CAP_SYS_RESOURCE, as containerd's `restrict_oom_score_adj`).
    pub oom_score_adj_floor: Option<i32>,
    /// Host devices resolved from `config.devices`.
    pub devices: Vec<LinuxDevice>,
}

/// The process argv by the Kubernetes rules: `command` replaces the image's Entrypoint (and
/// then the image's Cmd is ignored); `args` alone replaces Cmd and keeps the Entrypoint.
pub fn process_args(config: &ContainerConfig, image: Option<&ImageConfig>) -> Vec<String> {
    let mut command = config.command.clone();
    let mut args = config.args.clone();
    if command.is_empty() {
        if args.is_empty() {
            args = image.and_then(|i| i.cmd().clone()).unwrap_or_default();
        }
        let entrypoint = image
            .and_then(|i| i.entrypoint().clone())
            .unwrap_or_default();
        if !(entrypoint.len() == 1 && entrypoint[0].is_empty()) {
            command = entrypoint;
        }
    }
    command.extend(args);
    command
}

/// The environment: the image's, overridden key by key by the request's.
pub fn process_env(config: &ContainerConfig, image: Option<&ImageConfig>) -> Vec<String> {
    let mut env: Vec<String> = image.and_then(|i| i.env().clone()).unwrap_or_default();
    for kv in &config.envs {
        let prefix = format!("{}=", kv.key);
        let entry = format!("{}={}", kv.key, kv.value);
        match env
            .iter_mut()
            .find(|e| e.starts_with(&prefix) || **e == kv.key)
        {
            Some(slot) => *slot = entry,
            None => env.push(entry),
        }
    }
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.insert(
            0,
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
        );
    }
    env
}

/// The oom_score_adj a process may really be given: lowering below the shim's own value
/// needs CAP_SYS_RESOURCE, so without it requests are raised to `floor` (containerd's
/// `restrict_oom_score_adj`); values are kept within the kernel's [-1000, 1000].
pub fn clamp_oom_score_adj(requested: i64, floor: Option<i32>) -> i32 {
    let value = requested.clamp(-1000, 1000) as i32;
    floor.map_or(value, |f| value.max(f))
}

fn parse_capability(name: &str) -> Result<Capability, SpecError> {
    let upper = name.to_ascii_uppercase();
    let bare = upper.strip_prefix("CAP_").unwrap_or(&upper);
    Capability::from_str(bare).map_err(|_| {
        invalid(
            "config.linux.security_context.capabilities",
            format!("unknown capability {name:?}"),
        )
    })
}

fn capability_set(
    sc: Option<&LinuxContainerSecurityContext>,
    privileged: bool,
) -> Result<(Capabilities, Capabilities), SpecError> {
    let names = if privileged {
        ALL_CAPABILITIES
    } else {
        DEFAULT_CAPABILITIES
    };
    let mut set: Capabilities = names
        .iter()
        .map(|n| parse_capability(n))
        .collect::<Result<_, _>>()?;
    let mut ambient = Capabilities::new();
    if let Some(caps) = sc.and_then(|s| s.capabilities.as_ref()) {
        if !privileged {
            for add in &caps.add_capabilities {
                if add.eq_ignore_ascii_case("ALL") {
                    set.extend(
                        ALL_CAPABILITIES
                            .iter()
                            .filter_map(|n| parse_capability(n).ok()),
                    );
                } else {
                    set.insert(parse_capability(add)?);
                }
            }
        }
        for drop in &caps.drop_capabilities {
            if drop.eq_ignore_ascii_case("ALL") {
                set.clear();
            } else {
                set.remove(&parse_capability(drop)?);
            }
        }
        for add in &caps.add_ambient_capabilities {
            let cap = parse_capability(add)?;
            set.insert(cap);
            ambient.insert(cap);
        }
    }
    Ok((set, ambient))
}

fn mount(dest: &str, typ: &str, source: &str, options: &[&str]) -> Result<Mount, SpecError> {
    Ok(MountBuilder::default()
        .destination(dest)
        .typ(typ)
        .source(source)
        .options(options.iter().map(|o| o.to_string()).collect::<Vec<_>>())
        .build()?)
}

fn default_mounts(privileged: bool) -> Result<Vec<Mount>, SpecError> {
    let sys_mode = if privileged { "rw" } else { "ro" };
    Ok(vec![
        mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"])?,
        mount(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        )?,
        mount(
            "/dev/pts",
            "devpts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        )?,
        mount(
            "/dev/mqueue",
            "mqueue",
            "mqueue",
            &["nosuid", "noexec", "nodev"],
        )?,
        mount(
            "/sys",
            "sysfs",
            "sysfs",
            &["nosuid", "noexec", "nodev", sys_mode],
        )?,
        mount(
            "/sys/fs/cgroup",
            "cgroup",
            "cgroup",
            &["nosuid", "noexec", "nodev", "relatime", sys_mode],
        )?,
        mount(
            "/dev/shm",
            "tmpfs",
            "shm",
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        )?,
    ])
}

/// Mounts of the request (binds with their propagation), the sandbox /etc files, and the
/// defaults none of them cover, parents before children. Also returns the rootfs propagation
/// the binds need.
fn all_mounts(
    input: &SpecInput<'_>,
    privileged: bool,
) -> Result<(Vec<Mount>, Option<String>), SpecError> {
    let readonly_rootfs = security_context(input.config).is_some_and(|s| s.readonly_rootfs);
    let mut requested = Vec::new();
    let mut rootfs_propagation = None;
    for m in &input.config.mounts {
        if m.container_path.is_empty() || m.host_path.is_empty() {
            return Err(invalid(
                "config.mounts",
                "container_path and host_path are required",
            ));
        }
        let propagation = match m.propagation() {
            MountPropagation::PropagationPrivate => "rprivate",
            MountPropagation::PropagationHostToContainer => {
                rootfs_propagation.get_or_insert("rslave");
                "rslave"
            }
            MountPropagation::PropagationBidirectional => {
                rootfs_propagation = Some("rshared");
                "rshared"
            }
        };
        let mode = if m.readonly { "ro" } else { "rw" };
        requested.push(mount(
            &m.container_path,
            "bind",
            &m.host_path,
            &["rbind", propagation, mode],
        )?);
    }
    let mut taken: HashSet<PathBuf> = requested.iter().map(|m| m.destination().clone()).collect();
    let etc_mode = if readonly_rootfs { "ro" } else { "rw" };
    let mut sandbox_binds = Vec::new();
    for (dest, src, options) in [
        (
            "/etc/hostname",
            &input.files.hostname,
            &["rbind", "rprivate", etc_mode][..],
        ),
        (
            "/etc/hosts",
            &input.files.hosts,
            &["rbind", "rprivate", etc_mode],
        ),
        (
            "/etc/resolv.conf",
            &input.files.resolv_conf,
            &["rbind", "rprivate", etc_mode],
        ),
        (
            "/dev/shm",
            &input.files.shm,
            &["rbind", "rprivate", "rw", "nosuid", "nodev", "noexec"],
        ),
    ] {
        if let Some(src) = src.as_ref().filter(|_| taken.insert(PathBuf::from(dest))) {
            sandbox_binds.push(mount(dest, "bind", &src.to_string_lossy(), options)?);
        }
    }
    let mut mounts: Vec<Mount> = default_mounts(privileged)?
        .into_iter()
        .filter(|m| !taken.contains(m.destination()))
        .collect();
    mounts.extend(sandbox_binds);
    requested.sort_by_key(|m| m.destination().components().count());
    mounts.extend(requested);
    Ok((mounts, rootfs_propagation.map(str::to_string)))
}

fn security_context(config: &ContainerConfig) -> Option<&LinuxContainerSecurityContext> {
    config.linux.as_ref()?.security_context.as_ref()
}

fn namespaces(input: &SpecInput<'_>) -> Result<Vec<LinuxNamespace>, SpecError> {
    let ns = |typ, path: Option<&PathBuf>| -> Result<LinuxNamespace, SpecError> {
        let b = LinuxNamespaceBuilder::default().typ(typ);
        Ok(match path {
            Some(p) => b.path(p.clone()).build()?,
            None => b.build()?,
        })
    };
    let opts = security_context(input.config).and_then(|s| s.namespace_options.as_ref());
    let mut out = vec![ns(LinuxNamespaceType::Mount, None)?];
    if let Some(p) = &input.namespaces.network {
        out.push(ns(LinuxNamespaceType::Network, Some(p))?);
    }
    if let Some(p) = &input.namespaces.uts {
        out.push(ns(LinuxNamespaceType::Uts, Some(p))?);
    }
    if let Some(p) = &input.namespaces.ipc {
        out.push(ns(LinuxNamespaceType::Ipc, Some(p))?);
    }
    match opts.map_or(NamespaceMode::Container, |o| o.pid()) {
        NamespaceMode::Container => out.push(ns(LinuxNamespaceType::Pid, None)?),
        NamespaceMode::Pod => match &input.namespaces.pid {
            Some(p) => out.push(ns(LinuxNamespaceType::Pid, Some(p))?),
            None => out.push(ns(LinuxNamespaceType::Pid, None)?),
        },
        NamespaceMode::Node => {}
        NamespaceMode::Target => match &input.target_pid_ns {
            Some(p) => out.push(ns(LinuxNamespaceType::Pid, Some(p))?),
            None => {
                return Err(invalid(
                    "config.linux.security_context.namespace_options.target_id",
                    "target container is not running",
                ))
            }
        },
    }
    Ok(out)
}

/// The OCI cgroup resources for CRI `r` plus `devices` rules (also used by
/// UpdateContainerResources).
pub fn resources(
    r: Option<&LinuxContainerResources>,
    devices: Vec<LinuxDeviceCgroup>,
) -> Result<LinuxResources, SpecError> {
    let mut b = LinuxResourcesBuilder::default().devices(devices);
    let Some(r) = r else {
        return Ok(b.build()?);
    };
    let mut mem = LinuxMemoryBuilder::default();
    if r.memory_limit_in_bytes > 0 {
        mem = mem.limit(r.memory_limit_in_bytes);
    }
    if r.memory_swap_limit_in_bytes > 0 {
        mem = mem.swap(r.memory_swap_limit_in_bytes);
    }
    let mut cpu = LinuxCpuBuilder::default();
    if r.cpu_shares > 0 {
        cpu = cpu.shares(r.cpu_shares as u64);
    }
    if r.cpu_quota > 0 {
        cpu = cpu.quota(r.cpu_quota);
    }
    if r.cpu_period > 0 {
        cpu = cpu.period(r.cpu_period as u64);
    }
    if !r.cpuset_cpus.is_empty() {
        cpu = cpu.cpus(r.cpuset_cpus.clone());
    }
    if !r.cpuset_mems.is_empty() {
        cpu = cpu.mems(r.cpuset_mems.clone());
    }
    b = b.memory(mem.build()?).cpu(cpu.build()?);
    if !r.hugepage_limits.is_empty() {
        let limits = r
            .hugepage_limits
            .iter()
            .map(|h| {
                LinuxHugepageLimitBuilder::default()
                    .page_size(h.page_size.clone())
                    .limit(h.limit as i64)
                    .build()
            })
            .collect::<Result<Vec<_>, _>>()?;
        b = b.hugepage_limits(limits);
    }
    if !r.unified.is_empty() {
        b = b.unified(r.unified.clone().into_iter().collect::<HashMap<_, _>>());
    }
    Ok(b.build()?)
}

fn device_rules(
    privileged: bool,
    devices: &[LinuxDevice],
    perms: &[String],
) -> Result<Vec<LinuxDeviceCgroup>, SpecError> {
    let mut rules = vec![LinuxDeviceCgroupBuilder::default()
        .allow(privileged)
        .access("rwm")
        .build()?];
    for (dev, access) in devices.iter().zip(perms) {
        rules.push(
            LinuxDeviceCgroupBuilder::default()
                .allow(true)
                .typ(dev.typ())
                .major(dev.major())
                .minor(dev.minor())
                .access(access.clone())
                .build()?,
        );
    }
    Ok(rules)
}

/// Builds the container's runtime spec.
pub fn build(input: &SpecInput<'_>) -> Result<Spec, SpecError> {
    let sc = security_context(input.config);
    let privileged = sc.is_some_and(|s| s.privileged);
    let args = process_args(input.config, input.image);
    if args.is_empty() {
        return Err(invalid(
            "config.command",
            "no command specified (neither the request nor the image has one)",
        ));
    }
    let cwd = Some(input.config.working_dir.clone())
        .filter(|w| !w.is_empty())
        .or_else(|| input.image.and_then(|i| i.working_dir().clone()))
        .filter(|w| !w.is_empty())
        .unwrap_or_else(|| "/".to_string());
    if !cwd.starts_with('/') {
        return Err(invalid(
            "config.working_dir",
            format!("{cwd:?} is not absolute"),
        ));
    }
    let (caps, ambient) = capability_set(sc, privileged)?;
    let seccomp = super::seccomp::profile(sc, privileged, &caps)?;
    let mut user = UserBuilder::default()
        .uid(input.user.uid)
        .gid(input.user.gid);
    if !input.user.additional_gids.is_empty() {
        user = user.additional_gids(input.user.additional_gids.clone());
    }
    let mut process = ProcessBuilder::default()
        .terminal(input.config.tty)
        .args(args)
        .env(process_env(input.config, input.image))
        .cwd(cwd)
        .user(user.build()?)
        .capabilities(
            LinuxCapabilitiesBuilder::default()
                .bounding(caps.clone())
                .effective(caps.clone())
                .permitted(caps)
                // oci-spec's default inheritable set would make capset fail once the
                // bounding set lacks one of its caps; containerd leaves it empty too.
                .inheritable(Capabilities::new())
                .ambient(ambient)
                .build()?,
        )
        .no_new_privileges(sc.is_some_and(|s| s.no_new_privs));
    let res = input
        .config
        .linux
        .as_ref()
        .and_then(|l| l.resources.as_ref());
    if let Some(r) = res.filter(|r| r.oom_score_adj != 0) {
        process = process.oom_score_adj(clamp_oom_score_adj(
            r.oom_score_adj,
            input.oom_score_adj_floor,
        ));
    }

    let perms: Vec<String> = input
        .config
        .devices
        .iter()
        .map(|d| {
            if d.permissions.is_empty() {
                "rwm".to_string()
            } else {
                d.permissions.clone()
            }
        })
        .collect();
    let (mounts, rootfs_propagation) = all_mounts(input, privileged)?;
    let mut linux = LinuxBuilder::default()
        .namespaces(namespaces(input)?)
        .cgroups_path(PathBuf::from(&input.cgroups_path))
        .resources(resources(
            res,
            device_rules(privileged, &input.devices, &perms)?,
        )?)
        .devices(input.devices.clone());
    if privileged {
        linux = linux.masked_paths(Vec::new()).readonly_paths(Vec::new());
    } else {
        let listed = |given: &[String], default: &[&str]| -> Vec<String> {
            if given.is_empty() {
                default.iter().map(|s| s.to_string()).collect()
            } else {
                given.to_vec()
            }
        };
        linux = linux
            .masked_paths(listed(
                sc.map(|s| s.masked_paths.as_slice()).unwrap_or_default(),
                DEFAULT_MASKED_PATHS,
            ))
            .readonly_paths(listed(
                sc.map(|s| s.readonly_paths.as_slice()).unwrap_or_default(),
                DEFAULT_READONLY_PATHS,
            ));
    }
    if let Some(p) = rootfs_propagation {
        linux = linux.rootfs_propagation(p);
    }
    if let Some(filter) = seccomp {
        linux = linux.seccomp(filter);
    }
    let sysctls = input.sandbox.linux.as_ref().map(|l| &l.sysctls);
    if let Some(s) = sysctls.filter(|s| !s.is_empty()) {
        linux = linux.sysctl(s.clone().into_iter().collect::<HashMap<_, _>>());
    }
    let annotations: HashMap<String, String> = [
        ("io.kubernetes.cri.container-type", "container"),
        (
            "io.kubernetes.cri.container-name",
            input
                .config
                .metadata
                .as_ref()
                .map_or("", |m| m.name.as_str()),
        ),
        ("io.kubernetes.cri.sandbox-id", input.sandbox_id),
        ("io.kubernetes.cri.container-id", input.container_id),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let mut spec = SpecBuilder::default()
        .version("1.0.2")
        .root(
            RootBuilder::default()
                .path(input.rootfs)
                .readonly(sc.is_some_and(|s| s.readonly_rootfs))
                .build()?,
        )
        .process(process.build()?)
        .mounts(mounts)
        .annotations(annotations)
        .linux(linux.build()?)
        .build()?;
    // The builder starts from oci-spec's demo defaults; the UTS namespace is the sandbox's,
    // whose hostname the pause process set.
    spec.set_hostname(None);
    Ok(spec)
}

/// Resolves a requested device (`config.devices`) to the host device node it names.
pub fn host_device(host_path: &str, container_path: &str) -> Result<LinuxDevice, SpecError> {
    use nix::sys::stat::{major, minor, stat, SFlag};
    let st = stat(host_path).map_err(|e| invalid("config.devices", format!("{host_path}: {e}")))?;
    let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
    let typ = match kind {
        SFlag::S_IFCHR => LinuxDeviceType::C,
        SFlag::S_IFBLK => LinuxDeviceType::B,
        _ => {
            return Err(invalid(
                "config.devices",
                format!("{host_path} is not a device node"),
            ))
        }
    };
    Ok(LinuxDeviceBuilder::default()
        .path(if container_path.is_empty() {
            host_path
        } else {
            container_path
        })
        .typ(typ)
        .major(major(st.st_rdev) as i64)
        .minor(minor(st.st_rdev) as i64)
        .file_mode(st.st_mode & 0o7777)
        .uid(st.st_uid)
        .gid(st.st_gid)
        .build()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nodekit_proto::cri::v1::{
        Capability as CriCaps, KeyValue, LinuxContainerConfig, LinuxPodSandboxConfig,
        Mount as CriMount, NamespaceOption,
    };
    use oci_spec::image::ConfigBuilder;

    fn image(entrypoint: &[&str], cmd: &[&str]) -> ImageConfig {
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        ConfigBuilder::default()
            .entrypoint(v(entrypoint))
            .cmd(v(cmd))
            .env(vec!["PATH=/bin".to_string(), "A=image".to_string()])
            .working_dir("/srv")
            .build()
            .unwrap()
    }

    fn config(command: &[&str], args: &[&str]) -> ContainerConfig {
        ContainerConfig {
            command: command.iter().map(|s| s.to_string()).collect(),
            args: args.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn kubernetes_command_and_args_rules() {
        let img = image(&["/entry"], &["default"]);
        let args = |c: &[&str], a: &[&str]| process_args(&config(c, a), Some(&img));
        assert_eq!(args(&[], &[]), ["/entry", "default"]);
        assert_eq!(args(&[], &["x"]), ["/entry", "x"]);
        assert_eq!(args(&["/cmd"], &[]), ["/cmd"]);
        assert_eq!(args(&["/cmd"], &["y"]), ["/cmd", "y"]);
        let no_entry = image(&[""], &["sh"]);
        assert_eq!(process_args(&config(&[], &[]), Some(&no_entry)), ["sh"]);
        assert!(process_args(&config(&[], &[]), None).is_empty());
    }

    #[test]
    fn request_env_overrides_image_env_by_key() {
        let mut c = config(&[], &[]);
        c.envs = vec![
            KeyValue {
                key: "A".into(),
                value: "req".into(),
            },
            KeyValue {
                key: "B".into(),
                value: "1".into(),
            },
        ];
        assert_eq!(
            process_env(&c, Some(&image(&[], &[]))),
            ["PATH=/bin", "A=req", "B=1"]
        );
        assert!(process_env(&config(&[], &[]), None)[0].starts_with("PATH=/usr/local"));
    }

    #[test]
    fn oom_score_adj_is_clamped_to_what_the_shim_may_set() {
        assert_eq!(clamp_oom_score_adj(-998, Some(0)), 0);
        assert_eq!(clamp_oom_score_adj(-998, None), -998);
        assert_eq!(clamp_oom_score_adj(5000, Some(0)), 1000);
        assert_eq!(clamp_oom_score_adj(500, Some(-100)), 500);
    }

    struct Fixture {
        ns: SandboxNamespaces,
        files: SandboxFiles,
        sandbox: PodSandboxConfig,
        user: ProcessUser,
    }

    fn fixture() -> Fixture {
        Fixture {
            ns: SandboxNamespaces {
                network: Some("/run/netns/nk-x".into()),
                ipc: Some("/proc/42/ns/ipc".into()),
                uts: Some("/proc/42/ns/uts".into()),
                pid: Some("/proc/42/ns/pid".into()),
            },
            files: SandboxFiles {
                hostname: Some("/state/sb/hostname".into()),
                hosts: Some("/state/sb/hosts".into()),
                resolv_conf: None,
                shm: Some("/state/sb/shm".into()),
            },
            sandbox: PodSandboxConfig {
                linux: Some(LinuxPodSandboxConfig {
                    sysctls: [(
                        "net.ipv4.ip_unprivileged_port_start".to_string(),
                        "0".to_string(),
                    )]
                    .into(),
                    ..Default::default()
                }),
                ..Default::default()
            },
            user: ProcessUser {
                uid: 1000,
                gid: 1000,
                additional_gids: vec![5],
            },
        }
    }

    fn input<'a>(f: &'a Fixture, c: &'a ContainerConfig, img: &'a ImageConfig) -> SpecInput<'a> {
        SpecInput {
            container_id: "cid",
            sandbox_id: "sid",
            config: c,
            sandbox: &f.sandbox,
            image: Some(img),
            rootfs: Path::new("/rootfs"),
            user: &f.user,
            namespaces: &f.ns,
            target_pid_ns: None,
            files: &f.files,
            cgroups_path: "/kubepods/pod1/cid".into(),
            oom_score_adj_floor: Some(0),
            devices: vec![],
        }
    }

    fn ns_of(spec: &Spec) -> Vec<(String, Option<PathBuf>)> {
        spec.linux()
            .as_ref()
            .unwrap()
            .namespaces()
            .as_ref()
            .unwrap()
            .iter()
            .map(|n| (n.typ().to_string(), n.path().clone()))
            .collect()
    }

    #[test]
    fn terminal_follows_the_tty_request() {
        let f = fixture();
        let img = image(&[], &["sh"]);
        let mut c = config(&[], &[]);
        let terminal = |c: &ContainerConfig| {
            build(&input(&f, c, &img))
                .unwrap()
                .process()
                .as_ref()
                .unwrap()
                .terminal()
        };
        assert_eq!(terminal(&c), Some(false));
        c.tty = true;
        assert_eq!(terminal(&c), Some(true));
    }

    #[test]
    fn spec_joins_sandbox_namespaces_and_sets_identity_cgroup_and_files() {
        let f = fixture();
        let img = image(&[], &["sleep", "1"]);
        let mut c = config(&[], &[]);
        c.linux = Some(LinuxContainerConfig {
            resources: Some(LinuxContainerResources {
                memory_limit_in_bytes: 64 << 20,
                cpu_shares: 512,
                oom_score_adj: -998,
                ..Default::default()
            }),
            security_context: Some(LinuxContainerSecurityContext {
                capabilities: Some(CriCaps {
                    add_capabilities: vec!["NET_ADMIN".into()],
                    drop_capabilities: vec!["CAP_KILL".into()],
                    ..Default::default()
                }),
                readonly_rootfs: true,
                ..Default::default()
            }),
        });
        let spec = build(&input(&f, &c, &img)).unwrap();
        let ns = ns_of(&spec);
        assert!(
            ns.contains(&("net".into(), Some("/run/netns/nk-x".into()))),
            "{ns:?}"
        );
        assert!(ns.contains(&("ipc".into(), Some("/proc/42/ns/ipc".into()))));
        assert!(
            ns.contains(&("pid".into(), None)),
            "own pid namespace by default: {ns:?}"
        );
        let p = spec.process().as_ref().unwrap();
        assert_eq!(p.args().as_ref().unwrap(), &["sleep", "1"]);
        assert_eq!(p.cwd(), Path::new("/srv"));
        assert_eq!((p.user().uid(), p.user().gid()), (1000, 1000));
        assert_eq!(p.oom_score_adj(), Some(0), "clamped");
        let caps = p
            .capabilities()
            .as_ref()
            .unwrap()
            .bounding()
            .as_ref()
            .unwrap();
        assert!(caps.contains(&Capability::NetAdmin) && !caps.contains(&Capability::Kill));
        assert!(spec.root().as_ref().unwrap().readonly().unwrap());
        let linux = spec.linux().as_ref().unwrap();
        assert_eq!(
            linux.cgroups_path().as_deref(),
            Some(Path::new("/kubepods/pod1/cid"))
        );
        let res = linux.resources().as_ref().unwrap();
        assert_eq!(res.memory().as_ref().unwrap().limit(), Some(64 << 20));
        assert_eq!(res.cpu().as_ref().unwrap().shares(), Some(512));
        assert!(linux
            .masked_paths()
            .as_ref()
            .unwrap()
            .contains(&"/proc/kcore".to_string()));
        assert_eq!(
            linux.sysctl().as_ref().unwrap()["net.ipv4.ip_unprivileged_port_start"],
            "0"
        );
        let hosts = spec
            .mounts()
            .as_ref()
            .unwrap()
            .iter()
            .find(|m| m.destination() == Path::new("/etc/hosts"))
            .unwrap();
        assert!(
            hosts
                .options()
                .as_ref()
                .unwrap()
                .contains(&"ro".to_string()),
            "ro with readonly rootfs"
        );
        let json = serde_json::to_value(&spec).unwrap();
        assert!(json.get("hostname").is_none(), "the pod's hostname is kept");
        assert_eq!(json["linux"]["namespaces"][0]["type"], "mount");
    }

    #[test]
    fn request_mounts_replace_defaults_and_set_propagation() {
        let f = fixture();
        let img = image(&[], &["sh"]);
        let mut c = config(&[], &[]);
        c.mounts = vec![
            CriMount {
                container_path: "/data/sub".into(),
                host_path: "/srv/sub".into(),
                ..Default::default()
            },
            CriMount {
                container_path: "/data".into(),
                host_path: "/srv".into(),
                readonly: true,
                propagation: MountPropagation::PropagationHostToContainer as i32,
                ..Default::default()
            },
            CriMount {
                container_path: "/dev/shm".into(),
                host_path: "/run/shm".into(),
                ..Default::default()
            },
        ];
        let spec = build(&input(&f, &c, &img)).unwrap();
        let mounts = spec.mounts().as_ref().unwrap();
        let dests: Vec<_> = mounts
            .iter()
            .map(|m| m.destination().to_string_lossy().to_string())
            .collect();
        assert_eq!(dests.iter().filter(|d| *d == "/dev/shm").count(), 1);
        let data = dests.iter().position(|d| d == "/data").unwrap();
        let sub = dests.iter().position(|d| d == "/data/sub").unwrap();
        assert!(data < sub, "parents first: {dests:?}");
        assert_eq!(
            mounts[data].options().as_ref().unwrap(),
            &["rbind", "rslave", "ro"]
        );
        assert_eq!(
            spec.linux()
                .as_ref()
                .unwrap()
                .rootfs_propagation()
                .as_deref(),
            Some("rslave")
        );
    }

    #[test]
    fn dev_shm_is_the_pods_unless_the_request_mounts_one() {
        let mut f = fixture();
        let img = image(&[], &["sh"]);
        let shm_of = |f: &Fixture, c: &ContainerConfig| {
            let spec = build(&input(f, c, &img)).unwrap();
            let shm: Vec<_> = spec
                .mounts()
                .as_ref()
                .unwrap()
                .iter()
                .filter(|m| m.destination() == Path::new("/dev/shm"))
                .map(|m| (m.typ().clone().unwrap(), m.source().clone().unwrap()))
                .collect();
            assert_eq!(shm.len(), 1, "{shm:?}");
            shm[0].clone()
        };
        let mut c = config(&[], &[]);
        assert_eq!(shm_of(&f, &c), ("bind".into(), "/state/sb/shm".into()));
        c.mounts = vec![CriMount {
            container_path: "/dev/shm".into(),
            host_path: "/run/shm".into(),
            ..Default::default()
        }];
        assert_eq!(shm_of(&f, &c), ("bind".into(), "/run/shm".into()));
        f.files.shm = None;
        assert_eq!(
            shm_of(&f, &config(&[], &[])),
            ("tmpfs".into(), "shm".into())
        );
    }

    #[test]
    fn pod_and_host_pid_modes_and_bad_input_name_the_field() {
        let f = fixture();
        let img = image(&[], &["sh"]);
        let mut c = config(&[], &[]);
        let with_pid = |mode: NamespaceMode| {
            Some(LinuxContainerConfig {
                resources: None,
                security_context: Some(LinuxContainerSecurityContext {
                    namespace_options: Some(NamespaceOption {
                        pid: mode as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
            })
        };
        c.linux = with_pid(NamespaceMode::Pod);
        assert!(ns_of(&build(&input(&f, &c, &img)).unwrap())
            .contains(&("pid".into(), Some("/proc/42/ns/pid".into()))));
        c.linux = with_pid(NamespaceMode::Node);
        assert!(!ns_of(&build(&input(&f, &c, &img)).unwrap())
            .iter()
            .any(|(t, _)| t == "pid"));
        c.linux = with_pid(NamespaceMode::Target);
        let err = build(&input(&f, &c, &img)).unwrap_err();
        assert!(err.to_string().contains("target_id"), "{err}");

        let empty = image(&[], &[]);
        let err = build(&input(&f, &config(&[], &[]), &empty)).unwrap_err();
        assert!(err.to_string().starts_with("config.command"), "{err}");
        let mut bad_cap = config(&["sh"], &[]);
        bad_cap.linux = Some(LinuxContainerConfig {
            resources: None,
            security_context: Some(LinuxContainerSecurityContext {
                capabilities: Some(CriCaps {
                    add_capabilities: vec!["FLY".into()],
                    ..Default::default()
                }),
                ..Default::default()
            }),
        });
        let err = build(&input(&f, &bad_cap, &img)).unwrap_err();
        assert!(
            err.to_string().contains("capabilities") && err.to_string().contains("FLY"),
            "{err}"
        );
    }

    #[test]
    fn privileged_gets_all_capabilities_rw_sys_and_no_masks() {
        let f = fixture();
        let img = image(&[], &["sh"]);
        let mut c = config(&[], &[]);
        c.linux = Some(LinuxContainerConfig {
            resources: None,
            security_context: Some(LinuxContainerSecurityContext {
                privileged: true,
                ..Default::default()
            }),
        });
        let spec = build(&input(&f, &c, &img)).unwrap();
        let caps = spec
            .process()
            .as_ref()
            .unwrap()
            .capabilities()
            .as_ref()
            .unwrap()
            .bounding()
            .as_ref()
            .unwrap()
            .clone();
        assert!(caps.contains(&Capability::SysAdmin));
        let linux = spec.linux().as_ref().unwrap();
        assert!(linux.masked_paths().as_ref().unwrap().is_empty());
        assert!(linux
            .resources()
            .as_ref()
            .unwrap()
            .devices()
            .as_ref()
            .unwrap()[0]
            .allow());
        let sys = spec
            .mounts()
            .as_ref()
            .unwrap()
            .iter()
            .find(|m| m.destination() == Path::new("/sys"))
            .unwrap();
        assert!(sys.options().as_ref().unwrap().contains(&"rw".to_string()));
    }

    #[test]
    fn host_device_resolves_dev_null() {
        let d = host_device("/dev/null", "/dev/mynull").unwrap();
        assert_eq!((d.typ(), d.major(), d.minor()), (LinuxDeviceType::C, 1, 3));
        assert_eq!(d.path(), Path::new("/dev/mynull"));
        assert!(host_device("/etc/hostname", "").is_err());
    }
}
