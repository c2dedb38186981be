//! The sandbox container's runtime spec (`--pause-image`): the container spec builder
//! ([`super::spec::build`]) over a request for the image's own command with no capabilities,
//! no new privileges and a read-only rootfs, then given the pod's own IPC and UTS namespaces
//! (which the pod's containers join) and the pod's hostname.

use std::path::{Path, PathBuf};

use nodekit_proto::cri::v1::{
    Capability as CriCapabilities, ContainerConfig, ContainerMetadata, LinuxContainerConfig,
    LinuxContainerResources, LinuxContainerSecurityContext, NamespaceMode, NamespaceOption,
    PodSandboxConfig,
};
use oci_spec::image::Config as ImageConfig;
use oci_spec::runtime::{LinuxNamespaceBuilder, LinuxNamespaceType, Spec};

use super::spec::{self, SandboxFiles, SandboxNamespaces, SpecError, SpecInput};
use super::user::ProcessUser;

/// The oom_score_adj of the sandbox container (containerd's and the kubelet's for pause).
const SANDBOX_OOM_SCORE_ADJ: i64 = -998;

/// Everything the sandbox container's spec is built from.
#[derive(Debug)]
pub struct SandboxSpecInput<'a> {
    /// The sandbox ID (also the container's ID).
    pub sandbox_id: &'a str,
    /// The RunPodSandbox config (namespace modes, sysctls).
    pub sandbox: &'a PodSandboxConfig,
    /// The request from [`pause_request`].
    pub request: &'a ContainerConfig,
    /// The pause image's config (entrypoint, cmd, env).
    pub image: Option<&'a ImageConfig>,
    /// The mounted root filesystem.
    pub rootfs: &'a Path,
    /// The process identity, resolved against the image.
    pub user: &'a ProcessUser,
    /// The pod network namespace to join; `None` for hostNetwork pods.
    pub network: Option<PathBuf>,
    /// The pod's hostname, set in its own UTS namespace; `None` keeps the node's UTS
    /// namespace (hostNetwork pods).
    pub hostname: Option<&'a str>,
    /// The pod's /dev/shm to bind (see [`SandboxFiles::shm`]).
    pub shm: Option<PathBuf>,
    /// `linux.cgroupsPath`: the sandbox's cgroup under its parent.
    pub cgroups_path: String,
    /// See [`SpecInput::oom_score_adj_floor`].
    pub oom_score_adj_floor: Option<i32>,
}

/// The CRI container request the sandbox container stands for: the image's command, the
/// pod's user, PID mode and seccomp profile, every capability dropped, no new privileges,
/// read-only rootfs.
pub fn pause_request(sandbox: &PodSandboxConfig) -> ContainerConfig {
    let sc = sandbox
        .linux
        .as_ref()
        .and_then(|l| l.security_context.clone())
        .unwrap_or_default();
    let host_pid = sc
        .namespace_options
        .as_ref()
        .is_some_and(|o| o.pid() == NamespaceMode::Node);
    let pid = if host_pid {
        NamespaceMode::Node
    } else {
        NamespaceMode::Container
    };
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: "POD".into(),
            attempt: 0,
        }),
        linux: Some(LinuxContainerConfig {
            resources: Some(LinuxContainerResources {
                oom_score_adj: SANDBOX_OOM_SCORE_ADJ,
                ..Default::default()
            }),
            security_context: Some(LinuxContainerSecurityContext {
                capabilities: Some(CriCapabilities {
                    drop_capabilities: vec!["ALL".into()],
                    ..Default::default()
                }),
                namespace_options: Some(NamespaceOption {
                    pid: pid as i32,
                    ..Default::default()
                }),
                run_as_user: sc.run_as_user,
                run_as_group: sc.run_as_group,
                supplemental_groups: sc.supplemental_groups,
                seccomp: sc.seccomp,
                readonly_rootfs: true,
                no_new_privs: true,
                ..Default::default()
            }),
        }),
        ..Default::default()
    }
}

/// Builds the sandbox container's spec: new mount, IPC (unless hostIPC), UTS (unless
/// hostNetwork) and PID (unless hostPID) namespaces, the pod netns by path.
pub fn build(input: &SandboxSpecInput<'_>) -> Result<Spec, SpecError> {
    let host_ipc = input
        .sandbox
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .and_then(|s| s.namespace_options.as_ref())
        .is_some_and(|o| o.ipc() == NamespaceMode::Node);
    let mut spec = spec::build(&SpecInput {
        container_id: input.sandbox_id,
        sandbox_id: input.sandbox_id,
        config: input.request,
        sandbox: input.sandbox,
        image: input.image,
        rootfs: input.rootfs,
        user: input.user,
        namespaces: &SandboxNamespaces {
            network: input.network.clone(),
            ..Default::default()
        },
        target_pid_ns: None,
        files: &SandboxFiles {
            shm: input.shm.clone(),
            ..Default::default()
        },
        cgroups_path: input.cgroups_path.clone(),
        oom_score_adj_floor: input.oom_score_adj_floor,
        devices: Vec::new(),
    })?;
    let mut own = Vec::new();
    if !host_ipc {
        own.push(LinuxNamespaceType::Ipc);
    }
    if input.hostname.is_some() {
        own.push(LinuxNamespaceType::Uts);
    }
    if let Some(linux) = spec.linux_mut().as_mut() {
        let mut namespaces = linux.namespaces().clone().unwrap_or_default();
        for typ in own {
            namespaces.push(LinuxNamespaceBuilder::default().typ(typ).build()?);
        }
        linux.set_namespaces(Some(namespaces));
    }
    if let Some(annotations) = spec.annotations_mut().as_mut() {
        annotations.insert("io.kubernetes.cri.container-type".into(), "sandbox".into());
    }
    spec.set_hostname(input.hostname.map(str::to_string));
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nodekit_proto::cri::v1::security_profile::ProfileType;
    use nodekit_proto::cri::v1::{
        Int64Value, LinuxPodSandboxConfig, LinuxSandboxSecurityContext, SecurityProfile,
    };
    use oci_spec::image::ConfigBuilder;

    fn sandbox(ipc: NamespaceMode, pid: NamespaceMode) -> PodSandboxConfig {
        PodSandboxConfig {
            linux: Some(LinuxPodSandboxConfig {
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(NamespaceOption {
                        ipc: ipc as i32,
                        pid: pid as i32,
                        ..Default::default()
                    }),
                    run_as_user: Some(Int64Value { value: 65535 }),
                    seccomp: Some(SecurityProfile {
                        profile_type: ProfileType::RuntimeDefault as i32,
                        localhost_ref: String::new(),
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn spec_for(sb: &PodSandboxConfig, network: Option<&str>, hostname: Option<&str>) -> Spec {
        let image = ConfigBuilder::default()
            .entrypoint(vec!["/pause".to_string()])
            .build()
            .unwrap();
        let request = pause_request(sb);
        build(&SandboxSpecInput {
            sandbox_id: "sid",
            sandbox: sb,
            request: &request,
            image: Some(&image),
            rootfs: Path::new("/rootfs"),
            user: &ProcessUser {
                uid: 65535,
                gid: 65535,
                additional_gids: vec![],
            },
            network: network.map(PathBuf::from),
            hostname,
            shm: Some("/state/sid/shm".into()),
            cgroups_path: "/kubepods/sid".into(),
            oom_score_adj_floor: None,
        })
        .unwrap()
    }

    fn namespaces(spec: &Spec) -> Vec<(String, Option<PathBuf>)> {
        let linux = spec.linux().as_ref().unwrap();
        let mut out: Vec<_> = linux
            .namespaces()
            .as_ref()
            .unwrap()
            .iter()
            .map(|n| (n.typ().to_string(), n.path().clone()))
            .collect();
        out.sort();
        out
    }

    #[test]
    fn pod_sandbox_gets_its_own_namespaces_the_netns_and_nothing_more() {
        let sb = sandbox(NamespaceMode::Pod, NamespaceMode::Pod);
        let spec = spec_for(&sb, Some("/run/netns/cni-x"), Some("web"));
        assert_eq!(
            namespaces(&spec),
            vec![
                ("ipc".to_string(), None),
                ("mnt".to_string(), None),
                ("net".to_string(), Some(PathBuf::from("/run/netns/cni-x"))),
                ("pid".to_string(), None),
                ("uts".to_string(), None),
            ]
        );
        assert_eq!(spec.hostname().as_deref(), Some("web"));
        assert!(spec.root().as_ref().unwrap().readonly().unwrap());
        let process = spec.process().as_ref().unwrap();
        assert_eq!(process.args().as_ref().unwrap(), &["/pause"]);
        assert_eq!(process.no_new_privileges(), Some(true));
        assert_eq!(process.oom_score_adj(), Some(-998));
        let caps = process.capabilities().as_ref().unwrap();
        assert!(caps.bounding().as_ref().unwrap().is_empty());
        assert!(caps.effective().as_ref().unwrap().is_empty());
        assert!(caps.inheritable().as_ref().unwrap().is_empty());
        let linux = spec.linux().as_ref().unwrap();
        assert!(
            linux.seccomp().is_some(),
            "the pod's RuntimeDefault profile"
        );
        assert_eq!(
            linux.cgroups_path().as_deref(),
            Some(Path::new("/kubepods/sid"))
        );
        assert_eq!(
            spec.annotations().as_ref().unwrap()["io.kubernetes.cri.container-type"],
            "sandbox"
        );
        let shm = spec
            .mounts()
            .as_ref()
            .unwrap()
            .iter()
            .find(|m| m.destination() == Path::new("/dev/shm"))
            .unwrap();
        assert_eq!(shm.source().as_deref(), Some(Path::new("/state/sid/shm")));
        let req = pause_request(&sb);
        let sc = req.linux.unwrap().security_context.unwrap();
        assert_eq!(sc.run_as_user.map(|u| u.value), Some(65535));
    }

    #[test]
    fn host_namespaces_are_left_to_the_node() {
        let sb = sandbox(NamespaceMode::Node, NamespaceMode::Node);
        let spec = spec_for(&sb, None, None);
        assert_eq!(namespaces(&spec), vec![("mnt".to_string(), None)]);
        assert_eq!(spec.hostname(), &None);
    }
}
