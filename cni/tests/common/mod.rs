//! Test harness: a node namespace per test with the plugins run inside it exactly as a
//! runtime runs them (env + stdin), pod namespaces, and helpers to look inside. Everything is
//! removed on drop, pass or fail.
#![allow(dead_code, missing_docs, clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nodekit_nsutil::{unique_name, write_sysctl, NamedNetNs, NetNs};
use serde_json::{json, Value};

/// Where the built binaries are (CNI_PATH for our plugins).
pub fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_nodekit"))
        .parent()
        .expect("binary dir")
        .to_path_buf()
}

/// Debian's reference plugins.
pub const REFERENCE_DIR: &str = "/usr/lib/cni";

pub fn require_reference() {
    assert!(
        Path::new(REFERENCE_DIR).join("bridge").exists(),
        "the reference plugins are missing: apt-get install containernetworking-plugins"
    );
}

pub fn require_ping() {
    assert!(
        Path::new("/usr/bin/ping").exists() || Path::new("/bin/ping").exists(),
        "ping is missing: apt-get install iputils-ping"
    );
}

/// A node: its namespace, a datastore dir, and the CNI_PATH to use.
pub struct Node {
    pub ns: NamedNetNs,
    pub dir: tempfile::TempDir,
    pub cni_path: String,
}

/// What one plugin run printed.
#[derive(Debug)]
pub struct Run {
    pub ok: bool,
    pub out: Value,
    pub stderr: String,
}

impl Run {
    pub fn code(&self) -> u64 {
        self.out["code"].as_u64().unwrap_or(0)
    }
    pub fn msg(&self) -> String {
        self.out["msg"].as_str().unwrap_or_default().to_string()
    }
    pub fn ips(&self) -> Vec<String> {
        self.out["ips"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|ip| ip["address"].as_str().unwrap_or_default().to_string())
                    .collect()
            })
            .unwrap_or_default()
    }
    pub fn ip(&self) -> String {
        self.ips()[0]
            .split('/')
            .next()
            .unwrap_or_default()
            .to_string()
    }
    #[track_caller]
    pub fn expect_ok(self) -> Self {
        assert!(self.ok, "plugin failed: {} / {}", self.out, self.stderr);
        self
    }
}

impl Node {
    pub fn new() -> Self {
        let ns = NamedNetNs::create(&unique_name("node")).expect("create node netns (needs root)");
        write_sysctl(&ns, "net/ipv4/ip_forward", "1")
            .unwrap()
            .unwrap();
        write_sysctl(&ns, "net/ipv6/conf/all/forwarding", "1")
            .unwrap()
            .unwrap();
        Self {
            ns,
            dir: tempfile::tempdir().expect("tempdir"),
            cni_path: format!("{}:{REFERENCE_DIR}", bin_dir().display()),
        }
    }

    pub fn store_path(&self) -> PathBuf {
        self.dir.path().join("ipam")
    }

    /// Our plugin's config in `mode` with the given pools.
    pub fn conf(&self, version: &str, mode: &str, pools: Value) -> Value {
        json!({
            "cniVersion": version,
            "name": "nk-test",
            "type": "nodekit",
            "mode": mode,
            "bridge": "nkt0",
            "mtu": 1500,
            "nodeName": "n1",
            "ipam": {
                "type": "nodekit-ipam",
                "datastore": {"type": "file", "path": self.store_path()},
                "pools": pools,
            }
        })
    }

    /// Runs `plugin` with CNI_COMMAND=`command` inside the node namespace, for the
    /// attachment `(container ID, netns, ifname)`.
    pub fn run(
        &self,
        plugin: &str,
        command: &str,
        conf: &Value,
        (container, netns, ifname): (&str, Option<&str>, &str),
        extra_env: &[(&str, &str)],
    ) -> Run {
        let binary = self
            .cni_path
            .split(':')
            .map(|d| Path::new(d).join(plugin))
            .find(|p| p.exists())
            .unwrap_or_else(|| panic!("plugin {plugin} not found in {}", self.cni_path));
        let mut cmd = Command::new(binary);
        cmd.env_clear()
            .env("CNI_COMMAND", command)
            .env("CNI_PATH", &self.cni_path)
            .env("CNI_IFNAME", ifname)
            .env("CNI_CONTAINERID", container)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(netns) = netns {
            cmd.env("CNI_NETNS", netns);
        }
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        self.ns.apply_to_command(&mut cmd);
        let mut child = cmd.spawn().expect("spawn plugin");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(conf.to_string().as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        Run {
            ok: out.status.success(),
            out: if text.trim().is_empty() {
                Value::Null
            } else {
                serde_json::from_str(&text).unwrap_or(Value::String(text))
            },
            stderr: String::from_utf8_lossy(&out.stderr).to_string(),
        }
    }

    pub fn add(&self, conf: &Value, container: &str, pod: &Pod) -> Run {
        self.run(
            "nodekit",
            "ADD",
            conf,
            (container, Some(pod.path()), "eth0"),
            &[],
        )
    }

    pub fn del(&self, conf: &Value, container: &str, pod: Option<&Pod>) -> Run {
        self.run(
            "nodekit",
            "DEL",
            conf,
            (container, pod.map(Pod::path), "eth0"),
            &[],
        )
    }

    /// Names of the links in the node namespace.
    pub fn links(&self) -> BTreeSet<String> {
        links_in(&self.ns)
    }

    /// Routes of the node namespace, as text lines (from /proc/net/route and ipv6_route).
    pub fn ipv4_routes(&self) -> Vec<String> {
        self.ns
            .run(|| std::fs::read_to_string("/proc/thread-self/net/route").unwrap_or_default())
            .unwrap()
            .lines()
            .skip(1)
            .map(str::to_string)
            .collect()
    }

    /// Count of addresses held in the IPAM store.
    pub fn allocated(&self) -> usize {
        let store = nodekit_cni::ipam::file_store::FileStore::open(self.store_path()).unwrap();
        let state = nodekit_cni::ipam::store::Datastore::read(&store).unwrap();
        let in_blocks: usize = state.blocks().values().map(|b| b.allocations.len()).sum();
        let in_handles: usize = state.handles().values().map(|h| h.addresses.len()).sum();
        assert_eq!(
            in_blocks, in_handles,
            "blocks and handles disagree: {state:?}"
        );
        in_blocks
    }
}

/// A pod sandbox namespace.
pub struct Pod {
    pub ns: NamedNetNs,
    path: String,
}

impl Pod {
    pub fn new() -> Self {
        let ns = NamedNetNs::create(&unique_name("pod")).expect("create pod netns");
        let path = ns.path().display().to_string();
        Self { ns, path }
    }
    pub fn path(&self) -> &str {
        &self.path
    }
    pub fn links(&self) -> BTreeSet<String> {
        links_in(&self.ns)
    }
    /// `ping -c1` from this pod; true when answered.
    pub fn ping(&self, target: &str) -> bool {
        require_ping();
        let mut cmd = Command::new("ping");
        cmd.args(["-c1", "-W2", target])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        self.ns.apply_to_command(&mut cmd);
        cmd.status().map(|s| s.success()).unwrap_or(false)
    }
    /// A TCP round trip from this pod to `server` pod at `ip` (real sockets in each netns).
    pub fn tcp_to(&self, server: &Pod, ip: &str) -> bool {
        let addr: std::net::IpAddr = ip.parse().unwrap();
        let listener = server
            .ns
            .run(move || std::net::TcpListener::bind((addr, 0)))
            .unwrap()
            .expect("listen in server pod");
        let port = listener.local_addr().unwrap().port();
        let accept = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().ok()?;
            s.write_all(b"pong").ok()
        });
        let connected = self
            .ns
            .run(move || {
                let mut s = std::net::TcpStream::connect_timeout(
                    &(addr, port).into(),
                    std::time::Duration::from_secs(3),
                )?;
                let mut buf = [0u8; 4];
                std::io::Read::read_exact(&mut s, &mut buf)?;
                Ok::<_, std::io::Error>(buf == *b"pong")
            })
            .unwrap();
        let connected = connected.unwrap_or(false);
        if connected {
            let _ = accept.join();
        }
        connected
    }
}

fn links_in(ns: &NetNs) -> BTreeSet<String> {
    ns.run(|| {
        std::fs::read_to_string("/proc/thread-self/net/dev")
            .unwrap_or_default()
            .lines()
            .skip(2)
            .filter_map(|l| l.split(':').next().map(|n| n.trim().to_string()))
            .collect()
    })
    .unwrap()
}

/// A real etcd (Debian's etcd-server) serving `IP:2379` inside a namespace, with its own data
/// dir; killed and removed on drop. It can be stopped and restarted on the same data.
pub struct Etcd {
    child: Option<std::process::Child>,
    ip: String,
    url: String,
    data: tempfile::TempDir,
}

impl Etcd {
    /// The client URL of an etcd on loopback, as seen from inside its namespace.
    pub const URL: &'static str = "http://127.0.0.1:2379";

    /// etcd on 127.0.0.1 of `ns`.
    pub fn start(ns: &NetNs) -> Self {
        Self::start_on(ns, "127.0.0.1")
    }

    /// etcd listening on `ip` (an address of `ns`).
    pub fn start_on(ns: &NetNs, ip: &str) -> Self {
        assert!(
            Path::new("/usr/bin/etcd").exists(),
            "etcd is missing: apt-get install etcd-server"
        );
        let mut etcd = Self {
            child: None,
            ip: ip.to_string(),
            url: format!("http://{ip}:2379"),
            data: tempfile::tempdir().unwrap(),
        };
        etcd.restart(ns);
        etcd
    }

    /// Starts etcd again on its data (after [`Etcd::stop`]) and waits until it listens.
    pub fn restart(&mut self, ns: &NetNs) {
        let peer = format!("http://{}:2380", self.ip);
        let mut cmd = Command::new("/usr/bin/etcd");
        cmd.args(["--name", "nk", "--data-dir"])
            .arg(self.data.path())
            .args([
                "--listen-client-urls",
                &self.url,
                "--advertise-client-urls",
                &self.url,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args([
                "--initial-cluster",
                &format!("nk={peer}"),
                "--log-level",
                "error",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        ns.apply_to_command(&mut cmd);
        self.child = Some(cmd.spawn().expect("start etcd"));
        let addr: std::net::SocketAddr = format!("{}:2379", self.ip).parse().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::time::Instant::now() < deadline {
            let up = ns
                .run(|| {
                    std::net::TcpStream::connect_timeout(
                        &addr,
                        std::time::Duration::from_millis(200),
                    )
                    .is_ok()
                })
                .unwrap();
            if up {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("etcd did not start listening on {addr} within 20 s");
    }

    /// Kills etcd (SIGKILL), keeping its data.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The client URL.
    pub fn url(&self) -> &str {
        &self.url
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs the built `nodekitctl` with `args` (inside `ns` when given), asserts it succeeded and
/// returns what it printed.
pub fn nodekitctl(ns: Option<&NetNs>, args: &[&str]) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nodekitctl"));
    cmd.args(args);
    if let Some(ns) = ns {
        ns.apply_to_command(&mut cmd);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "nodekitctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

impl Node {
    /// `nodekitctl --path <this node's file store> ARGS`.
    pub fn ctl(&self, args: &[&str]) -> String {
        let path = self.store_path().display().to_string();
        let full: Vec<&str> = ["--path", path.as_str()]
            .into_iter()
            .chain(args.iter().copied())
            .collect();
        nodekitctl(None, &full)
    }
}
