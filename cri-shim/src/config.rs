//! The shim's settings: its command line.

use std::path::PathBuf;

use crate::cgroups::CgroupDriver;
use crate::runtime::RuntimeKind;

/// `nodekit-cri` flags.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "nodekit-cri",
    version,
    about = "CRI v1 runtime and image service"
)]
pub struct Options {
    /// Where to serve the CRI gRPC API (`unix:///path` or a plain path).
    #[arg(long, default_value = "unix:///run/nodekit/cri.sock")]
    pub listen: String,
    /// Persistent data: images, container writable layers.
    #[arg(long, default_value = "/var/lib/nodekit-cri")]
    pub root: PathBuf,
    /// Runtime state: sandbox and container records, bundles, the OCI runtime's root.
    #[arg(long, default_value = "/run/nodekit-cri")]
    pub state: PathBuf,
    /// The OCI runtime.
    #[arg(long, value_enum, default_value = "runc")]
    pub runtime: RuntimeKind,
    /// The runtime binary (default: `runc` or `crun` from PATH).
    #[arg(long)]
    pub runtime_path: Option<PathBuf>,
    /// CNI plugin directories (repeat or separate with ':').
    #[arg(long, default_value = "/opt/cni/bin", value_delimiter = ':')]
    pub cni_bin_dir: Vec<PathBuf>,
    /// CNI configuration directory; its first config (by file name) is used.
    #[arg(long, default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,
    /// Cgroup manager for container cgroups (reported by RuntimeConfig).
    #[arg(long, value_enum, default_value = "cgroupfs")]
    pub cgroup_driver: CgroupDriver,
    /// Pause image: each sandbox's namespace holder is then a container run from it by the
    /// OCI runtime (pulled when absent), as containerd does; without it, the `nodekit-pause`
    /// host process holds them.
    #[arg(long)]
    pub pause_image: Option<String>,
    /// Address of the streaming server for Exec/Attach/PortForward URLs (port 0: an
    /// ephemeral port; loopback is that of the namespace the shim runs in).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub streaming_addr: std::net::SocketAddr,
    /// Name prefix of sandbox network namespaces under /run/netns.
    #[arg(long, default_value = "cni-")]
    pub netns_prefix: String,
    /// Registries (`host[:port]`) pulled over plain HTTP besides loopback ones.
    #[arg(long)]
    pub insecure_registry: Vec<String>,
    /// Registry hosts directory, containerd's `config_path` (e.g. /etc/containerd/certs.d):
    /// `DIR/<host[:port]>/hosts.toml` (else `DIR/_default/hosts.toml`) lists mirrors tried
    /// in order before the registry itself; read at each pull.
    #[arg(long)]
    pub registry_config_dir: Option<PathBuf>,
    /// The `nodekit-pause` binary (default: next to this executable).
    #[arg(long)]
    pub pause_path: Option<PathBuf>,
    /// The `nodekit-cri-monitor` binary (default: next to this executable).
    #[arg(long)]
    pub monitor_path: Option<PathBuf>,
}

impl Options {
    /// The socket path from `--listen`.
    pub fn socket_path(&self) -> PathBuf {
        nodekit_proto::uds::endpoint_path(&self.listen).to_path_buf()
    }

    /// A helper binary: the flag's value, else `name` beside the running executable.
    pub fn sibling_binary(flag: &Option<PathBuf>, name: &str) -> PathBuf {
        flag.clone().unwrap_or_else(|| {
            std::env::current_exe()
                .ok()
                .and_then(|p| p.parent().map(|d| d.join(name)))
                .unwrap_or_else(|| PathBuf::from(name))
        })
    }
}
