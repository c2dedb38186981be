//! The multi-node lab: an underlay namespace with bridge `ul0` at 10.99.0.254/24 running
//! etcd, N node namespaces each wired to it by a veth (`eth0` at 10.99.0.N/24, forwarding
//! on) and running one `nodekit-netd`, and an "outside" namespace at 10.99.0.200 standing for
//! the world beyond the cluster. Pods are made per node with [`MultiNodeLab::pod`] and added
//! by running the plugins inside a node's namespace.
//!
//! Everything is a drop guard: etcd and the netds are killed and every namespace removed
//! when the lab drops, also when its creation fails half-way or a check panics. The root
//! namespace is never touched.

use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use nodekit_nsutil::{unique_name, NamedNetNs, NetNs, NsError};
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVeth};
use rtnetlink::{Handle, LinkBridge, LinkMessageBuilder, LinkUnspec};
use tokio::runtime::Runtime;

use super::{node_namespace, PodNs};

/// The underlay bridge's address: etcd listens here.
pub const UNDERLAY_GW: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 254);

/// The outside namespace's address on the underlay.
pub const OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 200);

/// The etcd key prefix every lab component uses.
pub const ETCD_PREFIX: &str = "/lab";

/// The most nodes a lab can have (node addresses are `10.99.0.1` to `10.99.0.199`).
pub const MAX_NODES: usize = 199;

/// The routing protocol number of the routes `nodekit-netd` installs.
pub const NETD_ROUTE_PROTOCOL: u8 = 78;

/// The underlay's prefix length.
const UNDERLAY_PREFIX: u8 = 24;

/// Where Debian's etcd-server installs etcd.
const ETCD_BIN: &str = "/usr/bin/etcd";

/// How long etcd gets to start listening.
const ETCD_START: Duration = Duration::from_secs(20);

/// How the lab runs its daemons.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MultiNodeOptions {
    /// Each netd's full resync period (`--interval-ms`); changes reach it through its etcd
    /// watch whatever this is.
    pub netd_resync: Duration,
}

impl Default for MultiNodeOptions {
    /// What the conformance checks use: a 200 ms resync, so a missed watch event costs
    /// little.
    fn default() -> Self {
        Self {
            netd_resync: Duration::from_millis(200),
        }
    }
}

/// Setting up the multi-node lab failed.
#[derive(Debug, thiserror::Error)]
pub enum MultiNodeError {
    /// A namespace could not be created or entered (needs root).
    #[error("{0} (the multi-node lab needs root: CAP_SYS_ADMIN and CAP_NET_ADMIN)")]
    Ns(#[from] NsError),
    /// A node namespace could not be set up.
    #[error(transparent)]
    Node(#[from] super::LabError),
    /// A tokio runtime or netlink socket could not be created.
    #[error("cannot open a netlink socket in {ns}: {source}")]
    Socket {
        /// The namespace.
        ns: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A netlink request failed.
    #[error("{op} {target}: {source}")]
    Netlink {
        /// What was being done.
        op: &'static str,
        /// The object it was done to.
        target: String,
        /// rtnetlink's error (carries the errno).
        #[source]
        source: rtnetlink::Error,
    },
    /// A link that was just created is not there.
    #[error("link {0} not found right after creating it")]
    Vanished(String),
    /// A process (etcd, nodekit-netd) could not be started.
    #[error("cannot start {what} ({}): {source}", path.display())]
    Spawn {
        /// Which process.
        what: &'static str,
        /// Its executable.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// etcd is not installed.
    #[error("etcd is missing at {ETCD_BIN}: apt-get install etcd-server")]
    NoEtcd,
    /// etcd did not come up.
    #[error("etcd did not start listening on {0} within {ETCD_START:?}")]
    EtcdNotListening(SocketAddr),
    /// A scratch directory could not be created.
    #[error("cannot create the lab's scratch directory: {0}")]
    Scratch(#[source] std::io::Error),
}

fn netlink_err(op: &'static str, target: &str) -> impl FnOnce(rtnetlink::Error) -> MultiNodeError {
    let target = target.to_string();
    move |source| MultiNodeError::Netlink { op, target, source }
}

/// N nodes on an underlay with etcd and one `nodekit-netd` each, plus an outside namespace.
/// Nodes are numbered from 1, as their names `n1`, `n2`... and addresses `10.99.0.1`...
#[derive(Debug)]
pub struct MultiNodeLab {
    // Processes first: they are killed in `Drop::drop`, before any field is dropped.
    netds: Vec<Child>,
    etcd: Option<Child>,
    outside: Option<NamedNetNs>,
    nodes: Vec<NamedNetNs>,
    underlay: NamedNetNs,
    etcd_data: tempfile::TempDir,
    scratch: tempfile::TempDir,
    bin_dir: PathBuf,
}

impl MultiNodeLab {
    /// Builds a lab of `n` nodes (at most [`MAX_NODES`]), running `nodekit-netd` from `bin_dir`, with
    /// the default [`MultiNodeOptions`]. Returns once etcd listens; the netds converge on
    /// their own (poll for routes).
    pub fn create(n: usize, bin_dir: &Path) -> Result<Self, MultiNodeError> {
        Self::create_with(n, bin_dir, &MultiNodeOptions::default())
    }

    /// [`MultiNodeLab::create`] with the daemons run as `options` say.
    pub fn create_with(
        n: usize,
        bin_dir: &Path,
        options: &MultiNodeOptions,
    ) -> Result<Self, MultiNodeError> {
        if !Path::new(ETCD_BIN).is_file() {
            return Err(MultiNodeError::NoEtcd);
        }
        let tmp = |prefix: &str| {
            tempfile::Builder::new()
                .prefix(prefix)
                .tempdir()
                .map_err(MultiNodeError::Scratch)
        };
        // The guard exists from the first namespace on: any later failure drops it, which
        // kills what was started and removes what was created.
        let mut lab = Self {
            netds: Vec::new(),
            etcd: None,
            outside: None,
            nodes: Vec::new(),
            underlay: NamedNetNs::create(&unique_name("ul"))?,
            etcd_data: tmp("nk-etcd-")?,
            scratch: tmp("nk-conformance-")?,
            bin_dir: bin_dir.to_path_buf(),
        };
        let (rt, ul) = netlink_in(&lab.underlay)?;
        let bridge = rt.block_on(ensure_underlay_bridge(&ul))?;
        lab.start_etcd()?;
        for i in 1..=n {
            lab.nodes.push(node_namespace("node")?);
            let node = &lab.nodes[i - 1];
            rt.block_on(wire_to_underlay(&ul, bridge, &format!("ul{i}"), node))?;
            configure_eth0(node, node_ip(i))?;
        }
        let outside = lab.outside.insert(NamedNetNs::create(&unique_name("out"))?);
        rt.block_on(wire_to_underlay(&ul, bridge, "ulout", outside))?;
        configure_eth0(outside, OUTSIDE_IP)?;
        for i in 1..=n {
            lab.start_netd(i, options.netd_resync)?;
        }
        Ok(lab)
    }

    fn start_etcd(&mut self) -> Result<(), MultiNodeError> {
        let url = etcd_url();
        let peer = format!("http://{UNDERLAY_GW}:2380");
        let mut cmd = Command::new(ETCD_BIN);
        cmd.args(["--name", "nk", "--data-dir"])
            .arg(self.etcd_data.path())
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
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
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        self.underlay.apply_to_command(&mut cmd);
        self.etcd = Some(cmd.spawn().map_err(|source| MultiNodeError::Spawn {
            what: "etcd",
            path: ETCD_BIN.into(),
            source,
        })?);
        let addr = SocketAddr::from((UNDERLAY_GW, 2379));
        let deadline = Instant::now() + ETCD_START;
        while Instant::now() < deadline {
            let up = self.underlay.run(move || {
                std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            })?;
            if up {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(MultiNodeError::EtcdNotListening(addr))
    }

    fn start_netd(&mut self, i: usize, resync: Duration) -> Result<(), MultiNodeError> {
        let path = self.bin_dir.join("nodekit-netd");
        let mut cmd = Command::new(&path);
        cmd.args(["--node-name", &node_name(i)])
            .args(["--node-ip", &node_ip(i).to_string()])
            .args(["--etcd-endpoints", &etcd_url(), "--prefix", ETCD_PREFIX])
            .args(["--interval-ms", &resync.as_millis().to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        self.nodes[i - 1].apply_to_command(&mut cmd);
        let child = cmd.spawn().map_err(|source| MultiNodeError::Spawn {
            what: "nodekit-netd",
            path,
            source,
        })?;
        self.netds.push(child);
        Ok(())
    }

    /// How many nodes the lab has.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the lab has no nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Node `i` (from 1)'s namespace, where its plugins run.
    ///
    /// # Panics
    /// If there is no node `i`.
    pub fn node(&self, i: usize) -> &NamedNetNs {
        &self.nodes[i - 1]
    }

    /// The underlay namespace (etcd runs there; run `nodekitctl` there).
    pub fn underlay(&self) -> &NamedNetNs {
        &self.underlay
    }

    /// The outside namespace, at [`OUTSIDE_IP`].
    pub fn outside(&self) -> Option<&NamedNetNs> {
        self.outside.as_ref()
    }

    /// The process ID of node `i` (from 1)'s `nodekit-netd`.
    ///
    /// # Panics
    /// If there is no node `i`.
    pub fn netd_pid(&self, i: usize) -> u32 {
        self.netds[i - 1].id()
    }

    /// The process ID of etcd.
    pub fn etcd_pid(&self) -> Option<u32> {
        self.etcd.as_ref().map(Child::id)
    }

    /// A scratch directory removed with the lab.
    pub fn scratch(&self) -> &Path {
        self.scratch.path()
    }

    /// A fresh, empty pod namespace (loopback up), removed on drop.
    pub fn pod(&self) -> Result<PodNs, NsError> {
        Ok(PodNs {
            ns: NamedNetNs::create(&unique_name("pod"))?,
        })
    }

    /// Runs `nodekitctl --datastore etcd ... ARGS` inside the underlay namespace.
    pub fn nodekitctl(&self, args: &[&str]) -> std::io::Result<Output> {
        let mut cmd = Command::new(self.bin_dir.join("nodekitctl"));
        cmd.args(["--datastore", "etcd", "--etcd-endpoints", &etcd_url()])
            .args(["--prefix", ETCD_PREFIX])
            .args(args)
            .stdin(Stdio::null());
        self.underlay.apply_to_command(&mut cmd);
        cmd.output()
    }
}

impl Drop for MultiNodeLab {
    fn drop(&mut self) {
        for child in self.netds.iter_mut().chain(self.etcd.as_mut()) {
            let _ = child.kill();
            let _ = child.wait();
        }
        // The namespaces, directories and veths (which die with their namespaces) go as the
        // fields drop.
    }
}

/// Node `i`'s name in the datastore: `n1`, `n2`...
pub fn node_name(i: usize) -> String {
    format!("n{i}")
}

/// Node `i`'s underlay address: `10.99.0.i`.
pub fn node_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 99, 0, i.min(MAX_NODES) as u8)
}

/// etcd's client URL, reachable from every namespace of the lab.
pub fn etcd_url() -> String {
    format!("http://{UNDERLAY_GW}:2379")
}

/// The `ipam.datastore` of a nodekit network config that uses the lab's etcd.
pub fn etcd_datastore() -> serde_json::Value {
    serde_json::json!({"type": "etcd", "endpoints": [etcd_url()], "prefix": ETCD_PREFIX})
}

/// A single-threaded runtime and a netlink connection opened inside `ns`.
fn netlink_in(ns: &NetNs) -> Result<(Runtime, Handle), MultiNodeError> {
    let socket = |source| MultiNodeError::Socket {
        ns: ns.path().display().to_string(),
        source,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(socket)?;
    let runtime = rt.handle().clone();
    let (conn, handle, _) = ns
        .run(move || {
            let _entered = runtime.enter();
            rtnetlink::new_connection()
        })?
        .map_err(socket)?;
    rt.spawn(conn);
    Ok((rt, handle))
}

async fn link_index(nl: &Handle, name: &str) -> Result<u32, MultiNodeError> {
    nl.link()
        .get()
        .match_name(name.to_string())
        .execute()
        .try_next()
        .await
        .map_err(netlink_err("get link", name))?
        .map(|l| l.header.index)
        .ok_or_else(|| MultiNodeError::Vanished(name.to_string()))
}

async fn add_address(
    nl: &Handle,
    index: u32,
    name: &str,
    ip: Ipv4Addr,
) -> Result<(), MultiNodeError> {
    let mut req = nl.address().add(index, ip.into(), UNDERLAY_PREFIX);
    // No DAD: usable at once.
    req.message_mut().attributes.push(AddressAttribute::Flags(
        rtnetlink::packet_route::address::AddressFlags::Nodad,
    ));
    req.execute()
        .await
        .map_err(netlink_err("add address", &format!("{ip} on {name}")))
}

/// Creates bridge `ul0` (up) with the underlay gateway address; returns its index.
async fn ensure_underlay_bridge(nl: &Handle) -> Result<u32, MultiNodeError> {
    nl.link()
        .add(LinkBridge::new("ul0").up().build())
        .execute()
        .await
        .map_err(netlink_err("create bridge", "ul0"))?;
    let index = link_index(nl, "ul0").await?;
    add_address(nl, index, "ul0", UNDERLAY_GW).await?;
    Ok(index)
}

/// Creates the veth `port` on the underlay, its peer born as `eth0` inside `ns`, and
/// enslaves `port` to the bridge (up).
async fn wire_to_underlay(
    nl: &Handle,
    bridge: u32,
    port: &str,
    ns: &NetNs,
) -> Result<(), MultiNodeError> {
    let peer = LinkMessageBuilder::<LinkUnspec>::new()
        .name("eth0".to_string())
        .setns_by_fd(ns.as_fd().as_raw_fd())
        .build();
    let veth = LinkMessageBuilder::<LinkUnspec>::new_with_info_kind(InfoKind::Veth)
        .name(port.to_string())
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
        .build();
    nl.link()
        .add(veth)
        .execute()
        .await
        .map_err(netlink_err("create veth", port))?;
    let index = link_index(nl, port).await?;
    nl.link()
        .set(
            LinkUnspec::new_with_index(index)
                .controller(bridge)
                .up()
                .build(),
        )
        .execute()
        .await
        .map_err(netlink_err("enslave", port))
}

/// Gives `eth0` of `ns` the address `ip`/24 and brings it up.
fn configure_eth0(ns: &NetNs, ip: Ipv4Addr) -> Result<(), MultiNodeError> {
    let (rt, nl) = netlink_in(ns)?;
    rt.block_on(async {
        let index = link_index(&nl, "eth0").await?;
        add_address(&nl, index, "eth0", ip).await?;
        nl.link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(netlink_err("set up", "eth0"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_are_numbered_from_one_on_the_underlay() {
        assert_eq!(node_name(2), "n2");
        assert_eq!(node_ip(3), Ipv4Addr::new(10, 99, 0, 3));
        assert_eq!(etcd_url(), "http://10.99.0.254:2379");
    }
}
