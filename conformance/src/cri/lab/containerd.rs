//! Debian's containerd (1.6, with its CRI plugin) as the lab's other runtime: a config that
//! keeps everything it owns inside the lab directory (root, state, the socket, runc's root,
//! pod network namespaces) and uses the lab's CNI config, runc and registry.

use std::path::Path;

/// The containerd executable.
pub const BINARY: &str = "/usr/bin/containerd";
/// The shim containerd starts per pod.
pub const SHIM_BINARY: &str = "/usr/bin/containerd-shim-runc-v2";
/// The containerd namespace the CRI plugin uses.
pub const CRI_NAMESPACE: &str = "k8s.io";

/// Where containerd keeps its files, all under one directory of the lab.
#[derive(Debug, Clone)]
pub struct Layout {
    /// `config.toml`.
    pub config: std::path::PathBuf,
    /// The gRPC socket (the CRI endpoint).
    pub socket: std::path::PathBuf,
    /// runc's `--root` for containers of [`CRI_NAMESPACE`].
    pub runc_root: std::path::PathBuf,
}

impl Layout {
    /// The layout under `dir`.
    pub fn new(dir: &Path) -> Self {
        Self {
            config: dir.join("config.toml"),
            socket: dir.join("containerd.sock"),
            runc_root: dir.join("runc").join(CRI_NAMESPACE),
        }
    }
}

/// A TOML basic string (JSON string escapes are valid TOML ones).
fn toml_str(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

/// What goes into the config besides the directory.
#[derive(Debug, Clone)]
pub struct Settings<'a> {
    /// CNI plugin directory.
    pub cni_bin_dir: &'a Path,
    /// CNI configuration directory (its first config is used).
    pub cni_conf_dir: &'a Path,
    /// The OCI runtime binary.
    pub runc: &'a Path,
    /// The pause image every sandbox runs.
    pub sandbox_image: &'a str,
    /// A registry (`host:port`) reached over plain HTTP.
    pub insecure_registry: &'a str,
}

/// The config.toml for containerd rooted at `dir`. `restrict_oom_score_adj` because the
/// lab's root may lack CAP_SYS_RESOURCE; network namespaces under the state directory so
/// none appears in `/run/netns`; the runc root in the lab so leftovers are found there.
pub fn config(dir: &Path, s: &Settings<'_>) -> String {
    let p = |rel: &str| toml_str(&dir.join(rel).to_string_lossy());
    let cri = r#"plugins."io.containerd.grpc.v1.cri""#;
    format!(
        r#"version = 2
root = {root}
state = {state}
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = {socket}

[ttrpc]
  address = {ttrpc}

[plugins."io.containerd.internal.v1.opt"]
  path = {opt}

[{cri}]
  sandbox_image = {sandbox}
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  disable_apparmor = true

[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"

[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[{cri}.containerd.runtimes.runc.options]
  BinaryName = {runc}
  Root = {runc_root}
  SystemdCgroup = false

[{cri}.cni]
  bin_dir = {cni_bin}
  conf_dir = {cni_conf}
  max_conf_num = 1

[{cri}.registry.mirrors.{registry}]
  endpoint = [{endpoint}]
"#,
        root = p("root"),
        state = p("state"),
        socket = p("containerd.sock"),
        ttrpc = p("containerd.sock.ttrpc"),
        opt = p("opt"),
        sandbox = toml_str(s.sandbox_image),
        runc = toml_str(&s.runc.to_string_lossy()),
        runc_root = p("runc"),
        cni_bin = toml_str(&s.cni_bin_dir.to_string_lossy()),
        cni_conf = toml_str(&s.cni_conf_dir.to_string_lossy()),
        registry = toml_str(s.insecure_registry),
        endpoint = toml_str(&format!("http://{}", s.insecure_registry)),
    )
}

/// The socket a `containerd-shim-runc-v2` serves on, from its command line (`-namespace NS
/// -id ID -address ADDR`): containerd 1.6 puts it at `/run/containerd/s/<sha256(ADDR/NS/ID)>`
/// whatever its state directory, so the lab removes it itself after killing the shim.
pub fn shim_socket(cmdline: &[String]) -> Option<std::path::PathBuf> {
    let flag = |name: &str| {
        cmdline
            .iter()
            .position(|a| a == name)
            .and_then(|i| cmdline.get(i + 1))
    };
    let key = Path::new(flag("-address")?)
        .join(flag("-namespace")?)
        .join(flag("-id")?);
    let digest = super::image::digest(key.to_string_lossy().as_bytes());
    Some(Path::new("/run/containerd/s").join(digest.trim_start_matches("sha256:")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_keeps_containerd_inside_its_directory() {
        let dir = Path::new("/tmp/lab/containerd");
        let text = config(
            dir,
            &Settings {
                cni_bin_dir: Path::new("/tmp/lab/cnibin"),
                cni_conf_dir: Path::new("/tmp/lab/cniconf"),
                runc: Path::new("/usr/sbin/runc"),
                sandbox_image: "127.0.0.1:5000/nk/pause:1",
                insecure_registry: "127.0.0.1:5000",
            },
        );
        for wanted in [
            r#"root = "/tmp/lab/containerd/root""#,
            r#"address = "/tmp/lab/containerd/containerd.sock""#,
            r#"Root = "/tmp/lab/containerd/runc""#,
            r#"sandbox_image = "127.0.0.1:5000/nk/pause:1""#,
            r#"registry.mirrors."127.0.0.1:5000"]"#,
            r#"endpoint = ["http://127.0.0.1:5000"]"#,
            "restrict_oom_score_adj = true",
            "netns_mounts_under_state_dir = true",
        ] {
            assert!(text.contains(wanted), "{wanted} in\n{text}");
        }
        assert_eq!(
            Layout::new(dir).runc_root,
            Path::new("/tmp/lab/containerd/runc/k8s.io")
        );
    }

    #[test]
    fn shim_sockets_follow_containerds_naming() {
        let args: Vec<String> = [
            SHIM_BINARY,
            "-namespace",
            "k8s.io",
            "-id",
            "abc",
            "-address",
            "/tmp/c.sock",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let want = super::super::image::digest(b"/tmp/c.sock/k8s.io/abc");
        assert_eq!(
            shim_socket(&args),
            Some(Path::new("/run/containerd/s").join(want.trim_start_matches("sha256:")))
        );
        assert_eq!(shim_socket(&args[..3]), None);
    }
}
