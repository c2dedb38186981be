//! The CRI lab, shared by suite `cri`, `nodekit-bench cri` and nodekit-cri's integration
//! tests: a node network namespace (`nk-...`) holding a local registry (Debian's
//! docker-registry on [`REGISTRY`]) with busybox-static images pushed to it, a CNI config
//! directory with the reference `bridge` + `host-local` network, and a CRI runtime started
//! inside that namespace: nodekit-cri (any binary, given by path) or Debian's containerd.
//! It knows nothing of either runtime's internals beyond their flags and config files.
//!
//! Everything it makes is named after one unique prefix (`nk-cri-PID-N`: the namespace, the
//! temp directory, the pod cgroup parent, nodekit-cri's pod namespaces), so [`Lab`]'s drop
//! finds and removes it all, even after a crash of the runtime: processes whose command line
//! names the prefix, runc containers, mounts under the directory, namespaces, cgroups.

pub mod containerd;
pub mod image;
pub mod procs;
pub mod registry;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nodekit_nsutil::{unique_name, NamedNetNs, NsError, NETNS_RUN_DIR};

use super::pod::PodTemplate;
pub use registry::{REGISTRY, TLS_REGISTRY};

/// The test image: busybox applets, `sh` as its command.
pub const IMAGE: &str = "127.0.0.1:5000/nk/busybox:1";
/// The pause image for runtimes that need one (containerd): `sleep` forever.
pub const PAUSE_IMAGE: &str = "127.0.0.1:5000/nk/pause:1";
/// A second, distinct image (its own config) for removal checks.
pub const SPARE_IMAGE: &str = "127.0.0.1:5000/nk/spare:1";
/// A reference the registry does not hold.
pub const ABSENT_IMAGE: &str = "127.0.0.1:5000/nk/absent:1";
/// Where the reference CNI plugins are.
pub const CNI_PLUGINS: &str = "/usr/lib/cni";
/// The OCI runtime both CRI runtimes use by default (containerd always).
pub const RUNC: &str = "/usr/sbin/runc";
/// The other OCI runtime nodekit-cri can drive.
pub const CRUN: &str = "/usr/bin/crun";
/// The CNI network name.
pub const NETWORK: &str = "nk-test";
/// The pods' subnet (host-local).
pub const POD_SUBNET: &str = "10.88.0.0/16";
/// How long a runtime may take to serve its socket.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// An image the lab pushes over its busybox layer.
struct TestImage {
    reference: &'static str,
    entrypoint: &'static [&'static str],
    cmd: &'static [&'static str],
    labels: &'static [(&'static str, &'static str)],
}

/// [`IMAGE`], [`PAUSE_IMAGE`] and [`SPARE_IMAGE`].
const TEST_IMAGES: &[TestImage] = &[
    TestImage {
        reference: IMAGE,
        entrypoint: &[],
        cmd: &["sh"],
        labels: &[],
    },
    TestImage {
        reference: PAUSE_IMAGE,
        entrypoint: &["/bin/sleep"],
        cmd: &["2147483647"],
        labels: &[],
    },
    TestImage {
        reference: SPARE_IMAGE,
        entrypoint: &[],
        cmd: &["sh"],
        labels: &[("nodekit.io/purpose", "spare")],
    },
];

/// The lab could not be built or a runtime not started.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// A program or file the lab needs is not installed.
    #[error("{} is missing: install it with `apt-get install {package}` (scripts/install-deps.sh)", path.display())]
    Missing {
        /// What is missing.
        path: PathBuf,
        /// The Debian package providing it.
        package: &'static str,
    },
    /// A file operation failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A namespace could not be made or entered.
    #[error(transparent)]
    Netns(#[from] NsError),
    /// A process could not be started.
    #[error("starting {what}: {source}")]
    Spawn {
        /// The program.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A process started but did not serve.
    #[error("{what} did not come up: {detail}")]
    Start {
        /// The program.
        what: &'static str,
        /// Why, with its log.
        detail: String,
    },
    /// A registry request failed.
    #[error("registry {step}: {detail}")]
    Registry {
        /// The request.
        step: String,
        /// What came back.
        detail: String,
    },
}

impl LabError {
    fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> LabError + 'a {
        move |source| LabError::Io {
            what,
            path: path.to_path_buf(),
            source,
        }
    }
}

fn require(path: &str, package: &'static str) -> Result<(), LabError> {
    if Path::new(path).exists() {
        Ok(())
    } else {
        Err(LabError::Missing {
            path: PathBuf::from(path),
            package,
        })
    }
}

/// What the lab sets up before a runtime starts.
#[derive(Debug, Clone)]
pub struct LabOptions {
    /// Write the bridge conflist (else the CNI conf dir stays empty).
    pub network: bool,
    /// Start the registry and push the images.
    pub registry: bool,
    /// A plugin type appended to the conflist (a test's own plugin in the CNI bin dir).
    pub extra_plugin: Option<String>,
    /// The OCI runtime nodekit-cri drives (`--runtime`); containerd always uses runc.
    pub oci_runtime: OciRuntime,
}

impl Default for LabOptions {
    fn default() -> Self {
        Self {
            network: true,
            registry: true,
            extra_plugin: None,
            oci_runtime: OciRuntime::Runc,
        }
    }
}

/// An OCI runtime nodekit-cri can drive; the lab lists and deletes its containers with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum OciRuntime {
    /// [`RUNC`].
    #[default]
    Runc,
    /// [`CRUN`].
    Crun,
}

impl OciRuntime {
    /// Both, in the order tests and the runner try them.
    pub const ALL: [OciRuntime; 2] = [OciRuntime::Runc, OciRuntime::Crun];

    /// nodekit-cri's `--runtime` value.
    pub fn name(self) -> &'static str {
        match self {
            Self::Runc => "runc",
            Self::Crun => "crun",
        }
    }

    /// The installed binary.
    pub fn binary(self) -> &'static str {
        match self {
            Self::Runc => RUNC,
            Self::Crun => CRUN,
        }
    }
}

/// The CRI runtime the lab runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CriRuntime {
    /// A nodekit-cri binary, with the lab's flags plus `args`, logging at `log_filter`.
    Nodekit {
        /// The `nodekit-cri` executable (its helpers beside it).
        binary: PathBuf,
        /// Flags after the lab's.
        args: Vec<String>,
        /// `RUST_LOG`.
        log_filter: String,
    },
    /// Debian's containerd with the config of [`containerd::config`].
    Containerd,
}

impl CriRuntime {
    /// nodekit-cri at `binary` with the lab's flags only, logging at info.
    pub fn nodekit(binary: impl Into<PathBuf>) -> Self {
        Self::Nodekit {
            binary: binary.into(),
            args: Vec::new(),
            log_filter: "info".into(),
        }
    }
}

/// The bridge + host-local network every lab pod joins, with `extra_plugin` chained.
pub fn bridge_conflist(ipam_dir: &Path, extra_plugin: Option<&str>) -> String {
    let mut plugins = vec![serde_json::json!({
        "type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false,
        "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_SUBNET}]], "dataDir": ipam_dir},
    })];
    plugins.extend(extra_plugin.map(|t| serde_json::json!({ "type": t })));
    serde_json::json!({"cniVersion": "1.0.0", "name": NETWORK, "plugins": plugins}).to_string()
}

/// The lab; see the module docs. Drop removes everything it made.
#[derive(Debug)]
pub struct Lab {
    runtime: Option<Child>,
    registry: Option<Child>,
    tls_registry: Option<Child>,
    prefix: String,
    node: NamedNetNs,
    dir: tempfile::TempDir,
    oci_runtime: OciRuntime,
}

impl Lab {
    /// Makes the namespace and directories (`root`, `state`, `cniconf`, `cnibin` linking the
    /// reference plugins, `ipam`, `logs`), then what `opts` asks for.
    pub fn create(opts: &LabOptions) -> Result<Self, LabError> {
        require(RUNC, "runc")?;
        require(opts.oci_runtime.binary(), opts.oci_runtime.name())?;
        require(
            &format!("{CNI_PLUGINS}/bridge"),
            "containernetworking-plugins",
        )?;
        if opts.registry {
            require(registry::BINARY, "docker-registry")?;
            require("/bin/busybox", "busybox-static")?;
        }
        let prefix = unique_name("cri");
        let dir = tempfile::Builder::new()
            .prefix(&format!("{prefix}-"))
            .tempdir()
            .map_err(LabError::io(
                "creating a temp dir in",
                &std::env::temp_dir(),
            ))?;
        let node = NamedNetNs::create(&prefix)?;
        let mut lab = Self {
            runtime: None,
            registry: None,
            tls_registry: None,
            prefix,
            node,
            dir,
            oci_runtime: opts.oci_runtime,
        };
        for d in ["root", "state", "cniconf", "cnibin", "ipam", "logs"] {
            let p = lab.path(d);
            std::fs::create_dir_all(&p).map_err(LabError::io("creating", &p))?;
        }
        let plugins = Path::new(CNI_PLUGINS);
        for entry in std::fs::read_dir(plugins)
            .map_err(LabError::io("listing", plugins))?
            .flatten()
        {
            let link = lab.cni_bin_dir().join(entry.file_name());
            std::os::unix::fs::symlink(entry.path(), &link)
                .map_err(LabError::io("linking", &link))?;
        }
        if opts.network {
            lab.write_conflist(opts.extra_plugin.as_deref())?;
        }
        if opts.registry {
            lab.registry = Some(registry::start(&lab.node, lab.dir.path())?);
            lab.push_images()?;
        }
        Ok(lab)
    }

    /// [`IMAGE`], [`PAUSE_IMAGE`] and [`SPARE_IMAGE`], all over one busybox layer.
    fn push_images(&self) -> Result<(), LabError> {
        let busybox = Path::new("/bin/busybox");
        let bytes = std::fs::read(busybox).map_err(LabError::io("reading", busybox))?;
        let layer = image::busybox_layer(&bytes).map_err(LabError::io("archiving", busybox))?;
        for image in TEST_IMAGES {
            let path = image
                .reference
                .strip_prefix(&format!("{REGISTRY}/"))
                .unwrap_or(image.reference);
            let (repo, tag) = path.rsplit_once(':').unwrap_or((path, "latest"));
            let config = image::config(&layer, image.entrypoint, image.cmd, image.labels);
            registry::push(&self.node, repo, tag, &config, &layer)?;
        }
        Ok(())
    }

    /// Serves the registry's images over HTTPS on [`registry::TLS_REGISTRY`] too (until the
    /// lab is dropped); returns the PEM file of the CA that issued its certificate.
    pub fn start_tls_registry(&mut self) -> Result<PathBuf, LabError> {
        require(registry::OPENSSL, "openssl")?;
        let (child, ca) = registry::start_tls(&self.node, self.dir.path())?;
        self.tls_registry = Some(child);
        Ok(ca)
    }

    /// A path inside the lab directory.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// The node namespace (runtime, registry and CNI bridge live there).
    pub fn node(&self) -> &NamedNetNs {
        &self.node
    }

    /// The unique prefix of everything the lab names.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The pods' cgroup parent (cgroupfs path).
    pub fn cgroup_parent(&self) -> String {
        format!("/{}", self.prefix)
    }

    /// The CNI plugin directory (links to [`CNI_PLUGINS`]; tests may add plugins).
    pub fn cni_bin_dir(&self) -> PathBuf {
        self.path("cnibin")
    }

    /// The CNI configuration directory.
    pub fn cni_conf_dir(&self) -> PathBuf {
        self.path("cniconf")
    }

    /// Writes the bridge conflist (with `extra_plugin` chained) into the conf dir.
    pub fn write_conflist(&self, extra_plugin: Option<&str>) -> Result<(), LabError> {
        let path = self.cni_conf_dir().join("10-nk.conflist");
        std::fs::write(&path, bridge_conflist(&self.path("ipam"), extra_plugin))
            .map_err(LabError::io("writing", &path))
    }

    /// Pod and container configs for this lab: logs under `logs/`, the lab's cgroup parent,
    /// [`IMAGE`].
    pub fn template(&self) -> PodTemplate {
        PodTemplate {
            namespace: NETWORK.into(),
            log_root: self.path("logs"),
            cgroup_parent: self.cgroup_parent(),
            image: IMAGE.into(),
        }
    }

    /// The OCI runtime nodekit-cri drives in this lab.
    pub fn oci_runtime(&self) -> OciRuntime {
        self.oci_runtime
    }

    /// nodekit-cri's flags for this lab (socket, root, state, CNI dirs, namespace prefix,
    /// OCI runtime).
    pub fn nodekit_args(&self) -> Vec<String> {
        let p = |rel: &str| self.path(rel).to_string_lossy().into_owned();
        vec![
            "--listen".into(),
            format!("unix://{}", p("cri.sock")),
            "--root".into(),
            p("root"),
            "--state".into(),
            p("state"),
            "--cni-bin-dir".into(),
            p("cnibin"),
            "--cni-conf-dir".into(),
            p("cniconf"),
            "--netns-prefix".into(),
            format!("{}-", self.prefix),
            "--runtime".into(),
            self.oci_runtime.name().into(),
        ]
    }

    /// Starts `runtime` inside the node namespace, logging to `runtime.log`; returns its
    /// socket once it accepts connections. A runtime already running is killed first.
    pub fn start_runtime(&mut self, runtime: &CriRuntime) -> Result<PathBuf, LabError> {
        self.kill_runtime();
        let log = self.path("runtime.log");
        let (mut cmd, name, socket) = match runtime {
            CriRuntime::Nodekit {
                binary,
                args,
                log_filter,
            } => {
                let mut cmd = Command::new(binary);
                cmd.args(self.nodekit_args())
                    .args(args)
                    .env("RUST_LOG", log_filter)
                    .env("NO_COLOR", "1");
                (cmd, "nodekit-cri", self.path("cri.sock"))
            }
            CriRuntime::Containerd => {
                require(containerd::BINARY, "containerd")?;
                require(containerd::SHIM_BINARY, "containerd")?;
                let dir = self.path("containerd");
                std::fs::create_dir_all(&dir).map_err(LabError::io("creating", &dir))?;
                let layout = containerd::Layout::new(&dir);
                let config = containerd::config(
                    &dir,
                    &containerd::Settings {
                        cni_bin_dir: &self.cni_bin_dir(),
                        cni_conf_dir: &self.cni_conf_dir(),
                        runc: Path::new(RUNC),
                        sandbox_image: PAUSE_IMAGE,
                        insecure_registry: REGISTRY,
                    },
                );
                std::fs::write(&layout.config, config)
                    .map_err(LabError::io("writing", &layout.config))?;
                let mut cmd = Command::new(containerd::BINARY);
                cmd.arg("--config").arg(&layout.config);
                (cmd, "containerd", layout.socket)
            }
        };
        let _ = std::fs::remove_file(&socket);
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(LabError::io("opening", &log))?;
        cmd.stdout(Stdio::null()).stderr(log_file);
        self.node.apply_to_command(&mut cmd);
        let mut child = cmd
            .spawn()
            .map_err(|source| LabError::Spawn { what: name, source })?;
        let deadline = Instant::now() + START_TIMEOUT;
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            let exited = child.try_wait().ok().flatten();
            if exited.is_some() || Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                let why = exited.map_or("no socket after 30 s".to_string(), |s| {
                    format!("exited with {s}")
                });
                return Err(LabError::Start {
                    what: name,
                    detail: format!("{why}: {}", self.runtime_log_tail(30)),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.runtime = Some(child);
        Ok(socket)
    }

    /// Kills the runtime like a crash would (SIGKILL), leaving pods and containers running.
    pub fn kill_runtime(&mut self) {
        if let Some(mut child) = self.runtime.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The running runtime daemon's PID.
    pub fn runtime_pid(&self) -> Option<i32> {
        self.runtime
            .as_ref()
            .and_then(|c| i32::try_from(c.id()).ok())
    }

    /// The runtime log (every runtime started in this lab appends to it).
    pub fn runtime_log(&self) -> String {
        std::fs::read_to_string(self.path("runtime.log")).unwrap_or_default()
    }

    /// The last `lines` lines of the runtime log.
    pub fn runtime_log_tail(&self, lines: usize) -> String {
        crate::suite::tail(&self.runtime_log(), lines)
    }

    /// The runtime's per-container helpers of this lab: nodekit-cri's monitors, containerd's
    /// shims.
    pub fn helper_processes(&self) -> Vec<procs::Proc> {
        procs::mentioning(&self.needle())
            .into_iter()
            .filter(|p| {
                matches!(
                    p.program(),
                    "nodekit-cri-monitor" | "containerd-shim-runc-v2"
                )
            })
            .collect()
    }

    /// What every command line of the lab's processes contains.
    fn needle(&self) -> String {
        format!("{}-", self.prefix)
    }

    /// Pod network namespaces under `/run/netns` that nodekit-cri made for this lab.
    pub fn leftover_netns(&self) -> Vec<String> {
        let needle = self.needle();
        std::fs::read_dir(NETNS_RUN_DIR)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with(&needle))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The OCI runtime binaries of the lab's runtimes with their state roots.
    fn runtime_roots(&self) -> [(&'static str, PathBuf); 2] {
        [
            (self.oci_runtime.binary(), self.path("state/runtime")),
            (
                RUNC,
                containerd::Layout::new(&self.path("containerd")).runc_root,
            ),
        ]
    }

    /// `BINARY --root ROOT ARGS`.
    fn oci_command(binary: &str, root: &Path, args: &[&str]) -> Command {
        let mut cmd = Command::new(binary);
        cmd.arg("--root").arg(root).args(args);
        cmd
    }

    /// Containers the OCI runtimes still know in the lab's state roots.
    pub fn leftover_runtime_containers(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (binary, root) in self.runtime_roots().iter().filter(|(_, r)| r.is_dir()) {
            if let Ok(o) = Self::oci_command(binary, root, &["list", "-q"]).output() {
                out.extend(String::from_utf8_lossy(&o.stdout).lines().map(String::from));
            }
        }
        out
    }

    /// The host PID of the init process of nodekit-cri's container (or sandbox container)
    /// `id`, as its OCI runtime's `state` reports it.
    pub fn container_pid(&self, id: &str) -> Option<i32> {
        let out = Self::oci_command(
            self.oci_runtime.binary(),
            &self.path("state/runtime"),
            &["state", id],
        )
        .output()
        .ok()?;
        let state: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        state["pid"].as_i64().and_then(|p| i32::try_from(p).ok())
    }

    /// Mount points under the lab directory, deepest first.
    pub fn leftover_mounts(&self) -> Vec<String> {
        let dir = self.dir.path().to_string_lossy().into_owned();
        let mut mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
            .filter(|m| m.starts_with(&dir))
            .collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        mounts
    }

    /// Every directory of the lab's cgroup tree, in every hierarchy (v1) or the unified one.
    fn cgroup_dirs(&self) -> Vec<PathBuf> {
        let rel = self.prefix.as_str();
        let root = Path::new("/sys/fs/cgroup");
        let mut tops = vec![root.join(rel)];
        tops.extend(
            std::fs::read_dir(root)
                .into_iter()
                .flatten()
                .flatten()
                .map(|h| h.path().join(rel)),
        );
        let mut out = Vec::new();
        let mut stack: Vec<PathBuf> = tops.into_iter().filter(|d| d.is_dir()).collect();
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(e.path());
                }
            }
            out.push(d);
        }
        out
    }

    /// Processes in the lab's cgroup tree (pods' pause processes and containers).
    pub fn cgroup_pids(&self) -> Vec<i32> {
        let mut pids: Vec<i32> = self
            .cgroup_dirs()
            .iter()
            .filter_map(|d| std::fs::read_to_string(d.join("cgroup.procs")).ok())
            .flat_map(|s| {
                s.lines()
                    .filter_map(|l| l.parse::<i32>().ok())
                    .collect::<Vec<_>>()
            })
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.kill_runtime();
        for (binary, root) in self.runtime_roots() {
            let ids = Self::oci_command(binary, &root, &["list", "-q"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            for id in ids.lines() {
                let _ = Self::oci_command(binary, &root, &["delete", "--force", id]).output();
            }
        }
        for pid in self.cgroup_pids() {
            procs::kill(pid);
        }
        for p in procs::mentioning(&self.needle()) {
            procs::kill(p.pid);
            if p.program() == "containerd-shim-runc-v2" {
                if let Some(socket) = containerd::shim_socket(&p.cmdline) {
                    let _ = std::fs::remove_file(socket);
                }
            }
        }
        for mut r in [self.registry.take(), self.tls_registry.take()]
            .into_iter()
            .flatten()
        {
            let _ = r.kill();
            let _ = r.wait();
        }
        for m in self.leftover_mounts() {
            let _ = nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH);
        }
        for ns in self.leftover_netns() {
            let path = Path::new(NETNS_RUN_DIR).join(ns);
            let _ = nix::mount::umount2(&path, nix::mount::MntFlags::MNT_DETACH);
            let _ = std::fs::remove_file(&path);
        }
        // Killed processes take a moment to leave their cgroups; deepest first.
        let deadline = Instant::now() + Duration::from_secs(2);
        while !self.cgroup_pids().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut dirs = self.cgroup_dirs();
        dirs.sort_by_key(|d| std::cmp::Reverse(d.as_os_str().len()));
        for d in dirs {
            let _ = std::fs::remove_dir(d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_conflist_is_bridge_plus_host_local_with_the_extra_plugin_chained() {
        let conf: serde_json::Value =
            serde_json::from_str(&bridge_conflist(Path::new("/tmp/ipam"), Some("nk-fail")))
                .expect("json");
        assert_eq!(conf["name"], NETWORK);
        assert_eq!(conf["plugins"][0]["type"], "bridge");
        assert_eq!(conf["plugins"][0]["ipam"]["dataDir"], "/tmp/ipam");
        assert_eq!(conf["plugins"][1]["type"], "nk-fail");
        let plain: serde_json::Value =
            serde_json::from_str(&bridge_conflist(Path::new("/i"), None)).expect("json");
        assert_eq!(plain["plugins"].as_array().map(Vec::len), Some(1));
    }
}
