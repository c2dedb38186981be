//! Several nodes, each a namespace wired to an underlay bridge that lives in its own
//! namespace (with etcd on it), one `nodekit-netd` per node: pods reach pods on other nodes,
//! and a removed node's routes and VXLAN entries disappear everywhere.

#![allow(clippy::unwrap_used)] // test harness: a failed setup step should panic

mod common;

use std::net::IpAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Etcd, Node, Pod};
use ipnetwork::IpNetwork;
use nodekit_cni::netd::{vxlan_mac, VXLAN_DEVICE};
use nodekit_cni::netlink::{link_mtu, Netlink, NetlinkError};
use nodekit_nsutil::{unique_name, NamedNetNs};
use serde_json::{json, Value};

const UNDERLAY_GW: &str = "10.99.0.254";

/// The underlay namespace with bridge `ul0` and etcd, plus N nodes with netd running.
struct Cluster {
    resync_ms: u64,
    nodes: Vec<Node>,
    netds: Vec<Child>,
    etcd: Etcd,
    underlay: NamedNetNs,
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

impl Cluster {
    fn new(n: usize) -> Self {
        Self::build(n, 200, 1500)
    }

    /// A cluster whose netds do a full pass only every `resync_ms` (changes come by watch).
    fn with_resync(n: usize, resync_ms: u64) -> Self {
        Self::build(n, resync_ms, 1500)
    }

    /// A cluster whose nodes' underlay links (`eth0`) have `underlay_mtu`.
    fn build(n: usize, resync_ms: u64, underlay_mtu: u32) -> Self {
        let underlay = NamedNetNs::create(&unique_name("ul")).unwrap();
        let rt = runtime();
        let gw: IpNetwork = format!("{UNDERLAY_GW}/24").parse().unwrap();
        underlay
            .run(|| {
                rt.block_on(async {
                    let nl = Netlink::connect()?;
                    let br = nl.ensure_bridge("ul0", 1500, [2, 0, 0, 0, 0, 1]).await?;
                    nl.ensure_address(br.header.index, "ul0", gw).await
                })
            })
            .unwrap()
            .unwrap();
        let etcd = Etcd::start_on(&underlay, UNDERLAY_GW);
        let mut nodes = Vec::new();
        for i in 1..=n {
            let node = Node::new();
            let addrs = [
                format!("10.99.0.{i}/24").parse().unwrap(),
                format!("fd99::{i}/64").parse().unwrap(),
            ];
            wire_to_underlay(&underlay, &format!("ul{i}"), &node.ns, &addrs, underlay_mtu);
            nodes.push(node);
        }
        let mut cluster = Self {
            resync_ms,
            nodes,
            netds: Vec::new(),
            etcd,
            underlay,
        };
        for i in 0..n {
            let netd = cluster.start_netd(i);
            cluster.netds.push(netd);
        }
        cluster
    }

    fn start_netd(&self, i: usize) -> Child {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_nodekit-netd"));
        cmd.args(["--node-name", &format!("n{}", i + 1)])
            .args(["--node-ip", &format!("10.99.0.{}", i + 1)])
            .args(["--node-ip", &format!("fd99::{}", i + 1)])
            .args(["--etcd-endpoints", self.etcd.url(), "--prefix", "/lab"])
            .args(["--interval-ms", &self.resync_ms.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        self.nodes[i].ns.apply_to_command(&mut cmd);
        cmd.spawn().expect("start nodekit-netd")
    }

    fn conf(&self, i: usize, mode: &str) -> Value {
        let mut conf = self.nodes[i].conf(
            "1.1.0",
            mode,
            json!([{"name": "default", "cidr": "10.244.0.0/16", "blockSize": 26}]),
        );
        conf["nodeName"] = json!(format!("n{}", i + 1));
        conf["ipam"]["datastore"] =
            json!({"type": "etcd", "endpoints": [self.etcd.url()], "prefix": "/lab"});
        conf
    }

    /// Node `i`'s routed-mode config with one pool that always encapsulates.
    fn vxlan_conf(&self, i: usize) -> Value {
        let mut conf = self.conf(i, "routed");
        conf["ipam"]["pools"] =
            json!([{"name": "overlay", "cidr": "10.82.0.0/16", "vxlanMode": "Always"}]);
        conf
    }

    /// `nodekitctl` against the lab's etcd, run in the underlay namespace.
    fn ctl(&self, args: &[&str]) -> String {
        let etcd = [
            "--datastore",
            "etcd",
            "--etcd-endpoints",
            self.etcd.url(),
            "--prefix",
            "/lab",
        ];
        let full: Vec<&str> = etcd.iter().chain(args).copied().collect();
        common::nodekitctl(Some(&self.underlay), &full)
    }

    /// IPv4 routes of node `i` with protocol 78, as (destination, gateway) text.
    fn netd_routes(&self, i: usize) -> Vec<String> {
        let rt = runtime();
        let routes = self.nodes[i]
            .ns
            .run(|| rt.block_on(async { Netlink::connect()?.routes().await }))
            .unwrap()
            .unwrap();
        routes
            .iter()
            .filter_map(nodekit_cni::netlink::route_summary)
            .filter(|(_, _, proto)| *proto == nodekit_cni::netd::RTPROT_NODEKIT)
            .map(|(dst, target, _)| format!("{dst} {target:?}"))
            .collect()
    }
}

impl Cluster {
    /// Runs `f` with a netlink connection and the VXLAN device's index (if any) in node `i`.
    fn on_vxlan<T: Send>(
        &self,
        i: usize,
        f: impl AsyncFnOnce(&Netlink, Option<u32>) -> Result<T, NetlinkError> + Send,
    ) -> T {
        let rt = runtime();
        self.nodes[i]
            .ns
            .run(|| {
                rt.block_on(async {
                    let nl = Netlink::connect()?;
                    let device = nl.link(VXLAN_DEVICE).await?.map(|l| l.header.index);
                    f(&nl, device).await
                })
            })
            .unwrap()
            .unwrap()
    }

    /// The remotes of node `i`'s VXLAN FDB entries and the IPs of its permanent neighbour
    /// entries there, sorted.
    fn tunnel_entries(&self, i: usize) -> (Vec<IpAddr>, Vec<IpAddr>) {
        self.on_vxlan(i, async |nl, device| {
            let Some(device) = device else {
                return Ok((vec![], vec![]));
            };
            let mut fdb: Vec<IpAddr> = nl.fdb_entries(device).await?.iter().map(|e| e.1).collect();
            let mut neighbours: Vec<IpAddr> = nl
                .permanent_neighbours(device)
                .await?
                .iter()
                .map(|e| e.0)
                .collect();
            fdb.sort();
            neighbours.sort();
            Ok((fdb, neighbours))
        })
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for netd in &mut self.netds {
            let _ = netd.kill();
            let _ = netd.wait();
        }
    }
}

fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{what} did not happen within 10 s");
}

fn cross_node_pods_reach_each_other(mode: &str) {
    let cluster = Cluster::new(3);
    let pods: Vec<Pod> = (0..3).map(|_| Pod::new()).collect();
    let ips: Vec<String> = (0..3)
        .map(|i| {
            cluster.nodes[i]
                .add(&cluster.conf(i, mode), &format!("pod{i}"), &pods[i])
                .expect_ok()
                .ip()
        })
        .collect();
    let distinct: std::collections::BTreeSet<IpAddr> =
        ips.iter().map(|ip| ip.parse().unwrap()).collect();
    assert_eq!(distinct.len(), 3);
    for target in [1, 2] {
        let ip = ips[target].clone();
        eventually(
            &format!("pod on n1 reaching {ip} on n{}", target + 1),
            || pods[0].ping(&ip),
        );
    }
    eventually("tcp n3 -> n2", || pods[2].tcp_to(&pods[1], &ips[1]));
    let on_n1 = cluster.netd_routes(0);
    assert!(on_n1.iter().any(|r| r.contains("Blackhole")), "{on_n1:?}");
    assert!(on_n1.iter().any(|r| r.contains("10.99.0.3")), "{on_n1:?}");
}

#[test]
fn routed_pods_on_three_nodes_reach_each_other() {
    cross_node_pods_reach_each_other("routed");
}

#[test]
fn bridged_pods_on_three_nodes_reach_each_other() {
    cross_node_pods_reach_each_other("bridge");
}

#[test]
fn netd_restores_a_deleted_route_and_drops_a_removed_nodes_routes() {
    let cluster = Cluster::new(2);
    let pods: Vec<Pod> = (0..2).map(|_| Pod::new()).collect();
    for (i, pod) in pods.iter().enumerate() {
        cluster.nodes[i]
            .add(&cluster.conf(i, "routed"), &format!("pod{i}"), pod)
            .expect_ok();
    }
    let via_n2 = |c: &Cluster| c.netd_routes(0).iter().any(|r| r.contains("10.99.0.2"));
    eventually("n1 routing n2's block", || via_n2(&cluster));
    // Delete it by hand: the next pass puts it back.
    let rt = runtime();
    cluster.nodes[0]
        .ns
        .run(|| {
            rt.block_on(async {
                let nl = Netlink::connect()?;
                for route in nl.routes().await? {
                    if nodekit_cni::netlink::route_summary(&route)
                        .is_some_and(|(_, _, p)| p == nodekit_cni::netd::RTPROT_NODEKIT)
                    {
                        nl.delete_route(route).await?;
                    }
                }
                Ok::<_, nodekit_cni::netlink::NetlinkError>(())
            })
        })
        .unwrap()
        .unwrap();
    eventually("the deleted route coming back", || via_n2(&cluster));
    // Remove n2 from the datastore: n1 drops its routes to it.
    cluster.ctl(&["node", "remove", "n2"]);
    eventually("n1 dropping routes to n2", || !via_n2(&cluster));
}

/// A namespace standing for "outside the cluster", on the underlay at 10.99.0.200.
fn outside(cluster: &Cluster) -> NamedNetNs {
    let ns = NamedNetNs::create(&unique_name("out")).unwrap();
    wire_to_underlay(
        &cluster.underlay,
        "ulout",
        &ns,
        &["10.99.0.200/24".parse().unwrap()],
        1500,
    );
    ns
}

/// A veth of `mtu` from the underlay bridge (`port`) to `eth0` in `ns`, with `addrs` on
/// it, up.
fn wire_to_underlay(
    underlay: &NamedNetNs,
    port: &str,
    ns: &NamedNetNs,
    addrs: &[IpNetwork],
    mtu: u32,
) {
    let rt = runtime();
    underlay
        .run(|| {
            rt.block_on(async {
                let nl = Netlink::connect()?;
                nl.create_veth(port, "eth0", ns, mtu, None).await?;
                let link = nl.link(port).await?.unwrap();
                let br = nl.link("ul0").await?.unwrap();
                nl.attach_to_bridge(link.header.index, port, br.header.index, false)
                    .await
            })
        })
        .unwrap()
        .unwrap();
    ns.run(|| {
        rt.block_on(async {
            let nl = Netlink::connect()?;
            let eth0 = nl.link("eth0").await?.unwrap();
            for addr in addrs {
                nl.ensure_address(eth0.header.index, "eth0", *addr).await?;
            }
            nl.set_up(eth0.header.index, "eth0").await
        })
    })
    .unwrap()
    .unwrap();
}

/// The source address `server` sees when `client` connects to it at `ip`.
fn seen_source(client: &NamedNetNs, server: &NamedNetNs, ip: &str) -> Option<IpAddr> {
    let addr: IpAddr = ip.parse().unwrap();
    let listener = server
        .run(move || std::net::TcpListener::bind((addr, 0)))
        .unwrap()
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let connected = client
        .run(move || {
            std::net::TcpStream::connect_timeout(&(addr, port).into(), Duration::from_secs(2))
        })
        .unwrap();
    connected.ok()?;
    let (_, peer) = listener.accept().ok()?;
    Some(peer.ip())
}

#[test]
fn nat_outgoing_masquerades_traffic_leaving_the_pools_only() {
    let cluster = Cluster::new(2);
    let world = outside(&cluster);
    let mut conf = cluster.conf(0, "routed");
    conf["ipam"]["pools"][0]["natOutgoing"] = json!(true);
    let pod = Pod::new();
    let ip = cluster.nodes[0].add(&conf, "nat", &pod).expect_ok().ip();
    let peer = Pod::new();
    let peer_ip = cluster.nodes[1]
        .add(&cluster.conf(1, "routed"), "peer", &peer)
        .expect_ok()
        .ip();
    eventually("the pod's traffic to the outside being masqueraded", || {
        seen_source(&pod.ns, &world, "10.99.0.200") == Some("10.99.0.1".parse().unwrap())
    });
    let own: IpAddr = ip.parse().unwrap();
    eventually("traffic between pools keeping the pod's address", || {
        seen_source(&pod.ns, &peer.ns, &peer_ip) == Some(own)
    });
    // Turning it off removes the masquerade: the outside then sees the pod address (and, with
    // no route back, the connection fails).
    cluster.ctl(&[
        "ipam",
        "pool",
        "add",
        "default",
        "10.244.0.0/16",
        "--block-size",
        "26",
    ]);
    eventually("masquerade removed", || {
        seen_source(&pod.ns, &world, "10.99.0.200") != Some("10.99.0.1".parse().unwrap())
    });
}

#[test]
fn an_address_borrowed_from_another_nodes_block_is_reachable() {
    let cluster = Cluster::new(2);
    let one_block = json!([{"name": "tiny", "cidr": "10.81.0.0/29", "blockSize": 29}]);
    let conf = |i: usize| {
        let mut conf = cluster.conf(i, "routed");
        conf["ipam"]["pools"] = one_block.clone();
        conf
    };
    let (a, b) = (Pod::new(), Pod::new());
    let ip_a = cluster.nodes[0].add(&conf(0), "owner", &a).expect_ok().ip();
    let ip_b = cluster.nodes[1]
        .add(&conf(1), "borrower", &b)
        .expect_ok()
        .ip();
    assert!(
        ip_b.starts_with("10.81.0."),
        "n2 borrowed from n1's only block: {ip_b}"
    );
    eventually("n1 routing the borrowed address to n2", || {
        cluster
            .netd_routes(0)
            .iter()
            .any(|r| r.starts_with(&format!("{ip_b}/32")))
    });
    eventually("the owner's pod reaching the borrower's pod", || {
        a.ping(&ip_b)
    });
    assert!(b.tcp_to(&a, &ip_a));
}

#[test]
fn pods_reach_each_other_through_vxlan_when_the_pool_asks_for_it() {
    let cluster = Cluster::new(2);
    let conf = |i: usize| cluster.vxlan_conf(i);
    let (a, b) = (Pod::new(), Pod::new());
    let added = cluster.nodes[0].add(&conf(0), "a", &a).expect_ok();
    assert_eq!(
        added.out["interfaces"][1]["mtu"], 1450,
        "pods lose the VXLAN overhead"
    );
    assert_eq!(added.out["routes"][0]["mtu"], 1450);
    let ip_b = cluster.nodes[1].add(&conf(1), "b", &b).expect_ok().ip();
    eventually("n1 routing n2's block through the tunnel", || {
        cluster.netd_routes(0).iter().any(|r| r.contains("Tunnel"))
    });
    eventually("a pod on n1 reaching a pod on n2 over VXLAN", || {
        a.ping(&ip_b)
    });
    assert!(cluster.nodes[0].links().contains("nk.vxlan"));
}

#[test]
fn ipv6_blocks_route_via_the_nodes_ipv6_addresses() {
    let cluster = Cluster::new(2);
    let conf = |i: usize| {
        let mut conf = cluster.conf(i, "routed");
        conf["ipam"]["pools"] = json!([
            {"name": "v4", "cidr": "10.83.0.0/16"},
            {"name": "v6", "cidr": "fd00:83::/64"}
        ]);
        conf
    };
    let (a, b) = (Pod::new(), Pod::new());
    cluster.nodes[0].add(&conf(0), "a", &a).expect_ok();
    let added = cluster.nodes[1].add(&conf(1), "b", &b).expect_ok();
    let v6 = added.ips()[1].split('/').next().unwrap().to_string();
    eventually("a pod on n1 reaching n2's pod over IPv6", || a.ping(&v6));
}

#[test]
fn a_new_block_reaches_the_other_nodes_through_the_watch_not_the_resync() {
    let cluster = Cluster::with_resync(2, 60_000);
    std::thread::sleep(Duration::from_millis(300)); // both netds did their first pass
    let pod = Pod::new();
    cluster.nodes[1]
        .add(&cluster.conf(1, "routed"), "late", &pod)
        .expect_ok();
    let claimed = Instant::now();
    let deadline = claimed + Duration::from_secs(5);
    while !cluster
        .netd_routes(0)
        .iter()
        .any(|r| r.contains("10.99.0.2"))
    {
        assert!(
            Instant::now() < deadline,
            "no route 5 s after the claim (resync is 60 s)"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!(
        "route on n1 {} ms after n2 claimed its block",
        claimed.elapsed().as_millis()
    );
}

#[test]
fn vxlan_entries_of_a_removed_node_go_and_a_deleted_one_comes_back() {
    // A 1 s resync: a hand-deleted entry stays gone long enough to be seen gone.
    let cluster = Cluster::with_resync(3, 1000);
    let pods: Vec<Pod> = (0..3).map(|_| Pod::new()).collect();
    for (i, pod) in pods.iter().enumerate() {
        cluster.nodes[i]
            .add(&cluster.vxlan_conf(i), &format!("pod{i}"), pod)
            .expect_ok();
    }
    let (n2, n3): (IpAddr, IpAddr) = ("10.99.0.2".parse().unwrap(), "10.99.0.3".parse().unwrap());
    eventually("n1 having FDB and neighbour entries for n2 and n3", || {
        cluster.tunnel_entries(0) == (vec![n2, n3], vec![n2, n3])
    });
    cluster.on_vxlan(0, async |nl, device| {
        let device = device.expect("nk.vxlan on n1");
        nl.delete_fdb(device, vxlan_mac("n3"), n3).await?;
        nl.delete_neighbour(device, n3).await
    });
    assert_eq!(
        cluster.tunnel_entries(0),
        (vec![n2], vec![n2]),
        "deleted by hand"
    );
    eventually("the deleted entries coming back", || {
        cluster.tunnel_entries(0) == (vec![n2, n3], vec![n2, n3])
    });
    cluster.ctl(&["node", "remove", "n3"]);
    eventually("n1 dropping n3's entries and keeping n2's", || {
        cluster.tunnel_entries(0) == (vec![n2], vec![n2])
    });
    eventually("n2 dropping n3's entries", || {
        cluster.tunnel_entries(1)
            == (
                vec!["10.99.0.1".parse().unwrap()],
                vec!["10.99.0.1".parse().unwrap()],
            )
    });
}

#[test]
fn the_vxlan_device_and_pod_routes_take_the_underlay_mtu_less_50() {
    let cluster = Cluster::build(2, 200, 1400);
    cluster.ctl(&[
        "ipam",
        "pool",
        "add",
        "overlay",
        "10.82.0.0/16",
        "--vxlan-mode",
        "always",
    ]);
    let vxlan_mtu = |i: usize| {
        cluster.on_vxlan(i, async |nl, _| {
            Ok(nl.link(VXLAN_DEVICE).await?.as_ref().and_then(link_mtu))
        })
    };
    // The device exists once netd registered the node (with its MTU) and saw the pool.
    eventually("nk.vxlan on n1 sized 1400 - 50", || {
        vxlan_mtu(0) == Some(1350)
    });
    let pod = Pod::new();
    let added = cluster.nodes[0]
        .add(&cluster.vxlan_conf(0), "a", &pod)
        .expect_ok();
    assert_eq!(added.out["routes"][0]["mtu"], 1350, "{}", added.out);
    assert_eq!(added.out["interfaces"][1]["mtu"], 1350, "{}", added.out);
    let peer = Pod::new();
    let ip = cluster.nodes[1]
        .add(&cluster.vxlan_conf(1), "b", &peer)
        .expect_ok()
        .ip();
    eventually("a pod on n1 reaching a pod on n2 over VXLAN", || {
        pod.ping(&ip)
    });
}

#[test]
fn a_removed_node_leaves_through_the_watch_not_the_resync() {
    let cluster = Cluster::with_resync(2, 60_000);
    let pods: Vec<Pod> = (0..2).map(|_| Pod::new()).collect();
    for (i, pod) in pods.iter().enumerate() {
        cluster.nodes[i]
            .add(&cluster.conf(i, "routed"), &format!("pod{i}"), pod)
            .expect_ok();
    }
    let via_n2 = |c: &Cluster| c.netd_routes(0).iter().any(|r| r.contains("10.99.0.2"));
    eventually("n1 routing n2's block", || via_n2(&cluster));
    // The removal deletes n2's block, handle and node keys: n1 learns it from the watch's
    // delete events (the resync is a minute away).
    cluster.ctl(&["node", "remove", "n2"]);
    eventually("n1 dropping routes to n2", || !via_n2(&cluster));
}
