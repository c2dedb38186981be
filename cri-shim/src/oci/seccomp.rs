//! Seccomp for containers: the CRI profile (`RuntimeDefault`, `Unconfined`, `Localhost`, or
//! the deprecated `seccomp_profile_path`) turned into the OCI `linux.seccomp` runc applies.
//!
//! `RuntimeDefault` is a deny list: every syscall is allowed except those Docker's and
//! containerd's default profiles refuse, each answered with EPERM unless the container holds
//! the capability that makes it legitimate (as their profiles do). It covers every ABI of the
//! machine (x86_64, x86 and x32; aarch64 and arm), so a 32-bit entry point cannot bypass it.

use std::path::Path;

use nodekit_proto::cri::v1::security_profile::ProfileType;
use nodekit_proto::cri::v1::LinuxContainerSecurityContext;
use oci_spec::runtime::{
    Arch, Capabilities, Capability, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArgBuilder,
    LinuxSeccompBuilder, LinuxSeccompOperator, LinuxSyscall, LinuxSyscallBuilder,
};

use super::spec::SpecError;

const FIELD: &str = "config.linux.security_context.seccomp";
const EPERM: u32 = 1;
const ENOSYS: u32 = 38;

/// Syscalls refused unless the container holds the capability (Docker's default profile).
const GATED: &[(Capability, &[&str])] = &[
    (
        Capability::SysAdmin,
        &[
            "bpf",
            "fanotify_init",
            "fsconfig",
            "fsmount",
            "fsopen",
            "fspick",
            "lookup_dcookie",
            "mount",
            "mount_setattr",
            "move_mount",
            "name_to_handle_at",
            "open_tree",
            "perf_event_open",
            "quotactl",
            "quotactl_fd",
            "setdomainname",
            "sethostname",
            "setns",
            "syslog",
            "umount",
            "umount2",
            "unshare",
        ],
    ),
    (Capability::SysBoot, &["reboot"]),
    (
        Capability::SysModule,
        &["delete_module", "init_module", "finit_module"],
    ),
    (Capability::SysPacct, &["acct"]),
    (
        Capability::SysPtrace,
        &[
            "kcmp",
            "pidfd_getfd",
            "process_madvise",
            "process_vm_readv",
            "process_vm_writev",
            "ptrace",
        ],
    ),
    (Capability::SysRawio, &["iopl", "ioperm"]),
    (
        Capability::SysTime,
        &["settimeofday", "stime", "clock_settime", "clock_adjtime"],
    ),
    (Capability::SysTtyConfig, &["vhangup"]),
    (
        Capability::SysNice,
        &["get_mempolicy", "mbind", "set_mempolicy", "move_pages"],
    ),
    (Capability::DacReadSearch, &["open_by_handle_at"]),
];

/// Syscalls no container gets: the kernel keyring and other state that is not namespaced,
/// obsolete or unsafe interfaces.
const ALWAYS_DENIED: &[&str] = &[
    "add_key",
    "keyctl",
    "request_key",
    "create_module",
    "get_kernel_syms",
    "query_module",
    "nfsservctl",
    "kexec_load",
    "kexec_file_load",
    "swapon",
    "swapoff",
    "sysfs",
    "_sysctl",
    "uselib",
    "userfaultfd",
    "ustat",
    "vm86",
    "vm86old",
];

/// Namespace-creating `clone` flags, refused without CAP_SYS_ADMIN like `unshare`.
const CLONE_NAMESPACE_FLAGS: &[u64] = &[
    0x0002_0000, // CLONE_NEWNS
    0x0200_0000, // CLONE_NEWCGROUP
    0x0400_0000, // CLONE_NEWUTS
    0x0800_0000, // CLONE_NEWIPC
    0x1000_0000, // CLONE_NEWUSER
    0x2000_0000, // CLONE_NEWPID
    0x4000_0000, // CLONE_NEWNET
];

/// The OCI seccomp section for a container with capabilities `caps`: `None` when it runs
/// unconfined (privileged, `Unconfined`, or nothing asked for).
pub fn profile(
    sc: Option<&LinuxContainerSecurityContext>,
    privileged: bool,
    caps: &Capabilities,
) -> Result<Option<LinuxSeccomp>, SpecError> {
    let Some(sc) = sc.filter(|_| !privileged) else {
        return Ok(None);
    };
    match &sc.seccomp {
        Some(p) => match p.profile_type() {
            ProfileType::Unconfined => Ok(None),
            ProfileType::RuntimeDefault => runtime_default(caps).map(Some),
            ProfileType::Localhost => localhost(&p.localhost_ref).map(Some),
        },
        #[allow(deprecated)]
        None => match sc.seccomp_profile_path.as_str() {
            "" | "unconfined" => Ok(None),
            "runtime/default" | "docker/default" => runtime_default(caps).map(Some),
            other => match other.strip_prefix("localhost/") {
                Some(path) => localhost(path).map(Some),
                None => Err(SpecError::Invalid {
                    field: "config.linux.security_context.seccomp_profile_path",
                    reason: format!("unknown profile {other:?}"),
                }),
            },
        },
    }
}

/// The runtime's default profile for a container holding `caps`.
pub fn runtime_default(caps: &Capabilities) -> Result<LinuxSeccomp, SpecError> {
    let deny = |names: Vec<&str>, errno: u32| {
        LinuxSyscallBuilder::default()
            .names(names.into_iter().map(String::from).collect::<Vec<_>>())
            .action(LinuxSeccompAction::ScmpActErrno)
            .errno_ret(errno)
            .build()
    };
    let mut denied: Vec<&str> = ALWAYS_DENIED.to_vec();
    for (cap, names) in GATED {
        if !caps.contains(cap) {
            denied.extend_from_slice(names);
        }
    }
    let mut syscalls: Vec<LinuxSyscall> = vec![deny(denied, EPERM)?];
    if !caps.contains(&Capability::SysAdmin) {
        // clone3 hides its flags in memory a filter cannot read: ENOSYS makes libc fall
        // back to clone, whose flags are checked.
        syscalls.push(deny(vec!["clone3"], ENOSYS)?);
        for flag in CLONE_NAMESPACE_FLAGS {
            let arg = LinuxSeccompArgBuilder::default()
                .index(0usize)
                .value(*flag)
                .value_two(*flag)
                .op(LinuxSeccompOperator::ScmpCmpMaskedEq)
                .build()?;
            let mut rule = deny(vec!["clone"], EPERM)?;
            rule.set_args(Some(vec![arg]));
            syscalls.push(rule);
        }
    }
    Ok(LinuxSeccompBuilder::default()
        .default_action(LinuxSeccompAction::ScmpActAllow)
        .architectures(native_abis())
        .syscalls(syscalls)
        .build()?)
}

/// Every ABI a process of this machine can enter the kernel through.
fn native_abis() -> Vec<Arch> {
    if cfg!(target_arch = "aarch64") {
        vec![Arch::ScmpArchAarch64, Arch::ScmpArchArm]
    } else {
        vec![Arch::ScmpArchX86_64, Arch::ScmpArchX86, Arch::ScmpArchX32]
    }
}

/// A profile file on the node (OCI `LinuxSeccomp` JSON, as containerd reads it).
fn localhost(path: &str) -> Result<LinuxSeccomp, SpecError> {
    let invalid = |reason: String| SpecError::Invalid {
        field: FIELD,
        reason,
    };
    if !Path::new(path).is_absolute() {
        return Err(invalid(format!(
            "localhost_ref {path:?} is not an absolute path"
        )));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| invalid(format!("cannot read profile {path}: {e}")))?;
    serde_json::from_str(&text).map_err(|e| invalid(format!("profile {path}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nodekit_proto::cri::v1::SecurityProfile;

    fn context(profile_type: ProfileType, localhost_ref: &str) -> LinuxContainerSecurityContext {
        LinuxContainerSecurityContext {
            seccomp: Some(SecurityProfile {
                profile_type: profile_type as i32,
                localhost_ref: localhost_ref.into(),
            }),
            ..Default::default()
        }
    }

    fn denied(p: &LinuxSeccomp) -> Vec<String> {
        p.syscalls()
            .iter()
            .flatten()
            .filter(|s| s.args().is_none())
            .flat_map(|s| s.names().clone())
            .collect()
    }

    #[test]
    fn runtime_default_denies_what_the_capabilities_do_not_allow() {
        let none = Capabilities::new();
        let p = profile(
            Some(&context(ProfileType::RuntimeDefault, "")),
            false,
            &none,
        )
        .unwrap()
        .unwrap();
        assert_eq!(p.default_action(), LinuxSeccompAction::ScmpActAllow);
        let d = denied(&p);
        for name in ["unshare", "mount", "ptrace", "keyctl", "clone3", "reboot"] {
            assert!(d.contains(&name.to_string()), "{name} denied: {d:?}");
        }
        let clone_rules = p
            .syscalls()
            .iter()
            .flatten()
            .filter(|s| s.names() == &["clone"])
            .count();
        assert_eq!(clone_rules, CLONE_NAMESPACE_FLAGS.len());

        let admin: Capabilities = [Capability::SysAdmin, Capability::SysPtrace].into();
        let d = denied(&runtime_default(&admin).unwrap());
        assert!(!d.contains(&"unshare".to_string()) && !d.contains(&"ptrace".to_string()));
        assert!(!d.contains(&"clone3".to_string()));
        assert!(d.contains(&"keyctl".to_string()) && d.contains(&"reboot".to_string()));
    }

    #[test]
    fn unconfined_privileged_and_unset_run_without_a_filter() {
        let caps = Capabilities::new();
        let rd = context(ProfileType::RuntimeDefault, "");
        assert_eq!(profile(Some(&rd), true, &caps).unwrap(), None);
        let unconfined = context(ProfileType::Unconfined, "");
        assert_eq!(profile(Some(&unconfined), false, &caps).unwrap(), None);
        let unset = LinuxContainerSecurityContext::default();
        assert_eq!(profile(Some(&unset), false, &caps).unwrap(), None);
        assert_eq!(profile(None, false, &caps).unwrap(), None);
        #[allow(deprecated)]
        let legacy = LinuxContainerSecurityContext {
            seccomp_profile_path: "runtime/default".into(),
            ..Default::default()
        };
        assert!(profile(Some(&legacy), false, &caps).unwrap().is_some());
    }

    #[test]
    fn localhost_profiles_are_read_and_bad_ones_name_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("deny-mkdir.json");
        std::fs::write(
            &file,
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/fixtures/seccomp-deny-mkdir.json"
            )),
        )
        .unwrap();
        let caps = Capabilities::new();
        let ctx = context(ProfileType::Localhost, file.to_str().unwrap());
        let p = profile(Some(&ctx), false, &caps).unwrap().unwrap();
        assert_eq!(denied(&p), ["mkdir", "mkdirat"]);

        for bad in ["relative.json", "/nonexistent/profile.json"] {
            let err = profile(Some(&context(ProfileType::Localhost, bad)), false, &caps)
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(FIELD) && err.contains(bad), "{err}");
        }
        std::fs::write(&file, "{not json").unwrap();
        let err = profile(Some(&ctx), false, &caps).unwrap_err().to_string();
        assert!(err.contains("deny-mkdir.json"), "{err}");
    }
}
