//! Cross-node checks of suite `cni`, for nodekit's own plugins only: targets
//! `cni[multinode-routed]` and `cni[multinode-bridge]`, each on its own fresh
//! [`MultiNodeLab`] of three nodes sharing an etcd datastore, with `nodekit-netd` routing
//! between them. Pods are added by running `nodekit` inside a node's namespace with
//! `nodeName` `nN`; routes and reachability are observed from the outside (netlink dumps,
//! ping, TCP), never through nodekit's crates.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ipnetwork::IpNetwork;
use nodekit_nsutil::{unique_name, NetNs};
use serde_json::{json, Value};

use super::checks::{tcp_echo, CheckError};
use super::conf::ConfList;
use super::exec::{Attachment, CallError, CniRuntime, NetnsExec, DEFAULT_TIMEOUT};
use super::{nodekit_conflist, result, CniSuiteError, SUITE};
use crate::inspect::{self, RouteView};
use crate::lab::multinode::{self, MultiNodeLab, OUTSIDE_IP};
use crate::lab::PodNs;
use crate::report::{Outcome, Reporter};
use crate::suite;

/// The plugin modes that get a multi-node target.
pub const MODES: &[&str] = &["routed", "bridge"];

/// Nodes per multi-node lab.
pub const NODES: usize = 3;

/// The executables the multi-node targets need beside the plugins.
pub const EXECUTABLES: &[&str] = &["nodekit-netd", "nodekitctl"];

/// How long routes get to converge.
const CONVERGE: Duration = Duration::from_secs(10);

/// A cross-node check's entry point.
pub type ClusterCheckFn = fn(&Cluster) -> Result<Outcome, CheckError>;

/// A cross-node check with its sentence-like name.
pub type ClusterCheck = crate::suite::Check<ClusterCheckFn>;

/// The cross-node checks, in run order (removing a node comes last: it changes the lab).
pub const CHECKS: &[ClusterCheck] = &[
    ClusterCheck {
        name: "a pod on node 1 reaches pods on nodes 2 and 3 over ICMP and TCP",
        run: pods_reach_across_nodes,
    },
    ClusterCheck {
        name: "a pod on node 1 reaches pods on nodes 2 and 3 through VXLAN",
        run: pods_reach_across_nodes_through_vxlan,
    },
    ClusterCheck {
        name: "an address borrowed from another node's block is reachable, or refused where it could not be",
        run: borrowed_address_is_reachable,
    },
    ClusterCheck {
        name: "natOutgoing masquerades traffic leaving the pools",
        run: nat_outgoing_masquerades,
    },
    ClusterCheck {
        name: "removing a node removes its routes on every other node",
        run: removed_node_loses_its_routes,
    },
];

/// The prefix of a multi-node target's test names: `cni[multinode-routed]`.
pub fn group(mode: &str) -> String {
    suite::group(SUITE, &format!("multinode-{mode}"))
}

/// Every multi-node test name, in run order.
pub fn test_names() -> Vec<String> {
    MODES
        .iter()
        .flat_map(|mode| suite::names(&group(mode), CHECKS))
        .collect()
}

/// A multi-node target: the lab and how to run nodekit's plugins on each node.
#[derive(Debug)]
pub struct Cluster {
    mode: &'static str,
    bin_dir: PathBuf,
    lab: MultiNodeLab,
}

impl Cluster {
    /// The conflist for node `i` in this target's mode, with `pools` as the IPAM pools
    /// (the default pool when `None`) and the shared etcd datastore.
    fn conf(&self, i: usize, pools: Option<Value>) -> Result<ConfList, CheckError> {
        let mut list = nodekit_conflist(self.mode, self.lab.scratch());
        let plugin = &mut list["plugins"][0];
        plugin["nodeName"] = json!(multinode::node_name(i));
        plugin["ipam"]["datastore"] = multinode::etcd_datastore();
        if let Some(pools) = pools {
            plugin["ipam"]["pools"] = pools;
        }
        ConfList::from_value(list, "generated multi-node conflist")
            .map_err(|e| CheckError::Violation(format!("the generated conflist is invalid: {e}")))
    }

    /// The runtime that runs the plugins inside node `i`'s namespace. Every pool of every
    /// check lives in the one shared datastore, so ADDs name their pools (`IP_POOLS`).
    fn runtime(&self, i: usize, pools: Option<Value>) -> Result<CniRuntime, CheckError> {
        let node = NetNs::open(self.lab.node(i).path())?;
        let conf = self.conf(i, pools)?;
        let names: Vec<String> = conf
            .plugins
            .first()
            .and_then(|p| p.get("ipam"))
            .and_then(|ipam| ipam["pools"].as_array())
            .map(|pools| {
                pools
                    .iter()
                    .filter_map(|p| p["name"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let rt = CniRuntime::new(
            Box::new(NetnsExec::new(node, DEFAULT_TIMEOUT)),
            self.bin_dir.clone(),
            conf,
        );
        Ok(rt.with_cni_args(format!("IP_POOLS={}", names.join(","))))
    }

    /// A pod on node `i`, added; DELeted and removed on drop.
    fn pod(&self, i: usize, pools: Option<Value>) -> Result<NodePod, CheckError> {
        let rt = self.runtime(i, pools)?;
        let ns = self.lab.pod()?;
        let att = Attachment {
            container_id: unique_name("ctr"),
            netns: ns.path(),
            ifname: "eth0".into(),
        };
        let mut pod = NodePod {
            node: i,
            rt,
            att,
            cached: None,
            ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            ns,
        };
        let added = pod
            .rt
            .add(&pod.att)
            .map_err(call_err(format!("ADD of a pod on node {i}")));
        // Cache even a failed ADD's absence: the drop DELs either way.
        let added = added?;
        let view = result::read(&added, &pod.att.netns, &pod.att.ifname);
        pod.cached = Some(added);
        pod.ip = view.primary_ip().ok_or_else(|| {
            CheckError::Violation(format!("the ADD on node {i} assigned no address"))
        })?;
        Ok(pod)
    }

    /// The IPv4 routes of node `i` installed by nodekit-netd.
    fn netd_routes(&self, i: usize) -> Result<Vec<RouteView>, CheckError> {
        Ok(inspect::routes(self.lab.node(i))?
            .into_iter()
            .filter(|r| r.protocol == multinode::NETD_ROUTE_PROTOCOL)
            .collect())
    }
}

fn call_err(step: String) -> impl FnOnce(CallError) -> CheckError {
    move |source| CheckError::Call {
        step,
        source: Box::new(source),
    }
}

/// An attachment on one node, in its own pod namespace; DELeted on drop (before the
/// namespace goes).
struct NodePod {
    node: usize,
    rt: CniRuntime,
    att: Attachment,
    cached: Option<Value>,
    ip: IpAddr,
    ns: PodNs,
}

impl Drop for NodePod {
    fn drop(&mut self) {
        if let Err(e) = self.rt.del(&self.att, self.cached.as_ref()) {
            tracing::warn!(container_id = %self.att.container_id, node = self.node, ?e, "cleanup DEL failed");
        }
    }
}

/// Polls `probe` until it answers `Ok`, for up to [`CONVERGE`]; the last error otherwise.
fn eventually<T>(mut probe: impl FnMut() -> Result<T, String>) -> Result<T, CheckError> {
    let deadline = Instant::now() + CONVERGE;
    loop {
        match probe() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => {
                return Err(CheckError::Violation(format!("{e} (after {CONVERGE:?})")))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// One `ping -c1 -W1` from `from` to `ip`.
fn ping(from: &NetNs, ip: IpAddr) -> Result<(), String> {
    let mut cmd = std::process::Command::new("ping");
    cmd.args(["-c1", "-W1", &ip.to_string()]);
    from.apply_to_command(&mut cmd);
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run ping (apt-get install iputils-ping): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        let stdout = String::from_utf8_lossy(&out.stdout);
        let summary = stdout
            .lines()
            .find(|l| l.contains("packet loss"))
            .unwrap_or(stdout.trim());
        Err(format!(
            "ping {ip} from {}: {summary}",
            from.path().display()
        ))
    }
}

fn pods_reach_across_nodes(c: &Cluster) -> Result<Outcome, CheckError> {
    reach_across_nodes(c, None)
}

fn pods_reach_across_nodes_through_vxlan(c: &Cluster) -> Result<Outcome, CheckError> {
    let pools = json!([{"name": "overlay", "cidr": "10.84.0.0/16", "vxlanMode": "Always"}]);
    reach_across_nodes(c, Some(pools))
}

/// One pod per node from `pools`; the pod on node 1 pings and TCPs the others.
fn reach_across_nodes(c: &Cluster, pools: Option<Value>) -> Result<Outcome, CheckError> {
    let pods = (1..=NODES)
        .map(|i| c.pod(i, pools.clone()))
        .collect::<Result<Vec<_>, _>>()?;
    let mut seen = std::collections::BTreeSet::new();
    if !pods.iter().all(|p| seen.insert(p.ip)) {
        let ips: Vec<String> = pods.iter().map(|p| p.ip.to_string()).collect();
        return Err(CheckError::Violation(format!(
            "pods on different nodes got the same address: {}",
            ips.join(", ")
        )));
    }
    let from = &pods[0];
    for to in &pods[1..] {
        eventually(|| ping(&from.ns, to.ip))?;
        eventually(|| tcp_echo(&from.ns, &to.ns, to.ip))?;
    }
    Ok(Outcome::passed_with(format!(
        "{} on n1 -> {} on n2, {} on n3",
        pods[0].ip, pods[1].ip, pods[2].ip
    )))
}

fn borrowed_address_is_reachable(c: &Cluster) -> Result<Outcome, CheckError> {
    let tiny: IpNetwork = "10.81.0.0/29"
        .parse()
        .map_err(|e| CheckError::Violation(format!("bad test pool: {e}")))?;
    let pools = json!([{"name": "tiny", "cidr": tiny.to_string(), "blockSize": 29}]);
    let owner = c.pod(1, Some(pools.clone()))?;
    if c.mode == "bridge" {
        // Bridge wiring puts the block prefix on pods, so the IPAM must not lend n1's block
        // to n2: the ADD fails with the exhaustion code instead of making an unreachable pod.
        return match c.pod(2, Some(pools)) {
            Err(CheckError::Call { source, .. }) if source.code() == Some(100) => Ok(
                Outcome::passed_with("bridge mode refused to borrow (code 100)".to_string()),
            ),
            Err(other) => Err(other),
            Ok(pod) => Err(CheckError::Violation(format!(
                "bridge mode lent {} from node 1's block to node 2",
                pod.ip
            ))),
        };
    }
    let borrower = c.pod(2, Some(pools))?;
    if !tiny.contains(borrower.ip) {
        return Err(CheckError::Violation(format!(
            "the pod on node 2 got {} outside the one-block pool {tiny}",
            borrower.ip
        )));
    }
    eventually(|| ping(&owner.ns, borrower.ip))?;
    eventually(|| ping(&borrower.ns, owner.ip))?;
    Ok(Outcome::passed_with(format!(
        "{} on n2 borrowed from n1's block (n1's pod {})",
        borrower.ip, owner.ip
    )))
}

fn nat_outgoing_masquerades(c: &Cluster) -> Result<Outcome, CheckError> {
    let Some(outside) = c.lab.outside() else {
        return Err(CheckError::Violation(
            "the lab has no outside namespace".into(),
        ));
    };
    let pools = json!([{
        "name": "nat", "cidr": "10.82.0.0/16", "blockSize": 26, "natOutgoing": true
    }]);
    let pod = c.pod(1, Some(pools))?;
    let node_ip = IpAddr::V4(multinode::node_ip(1));
    let seen = eventually(|| {
        let seen = tcp_echo(&pod.ns, outside, IpAddr::V4(OUTSIDE_IP))?;
        if seen == node_ip {
            Ok(seen)
        } else {
            Err(format!(
                "the outside saw the pod's connection from {seen}, not node 1's {node_ip}"
            ))
        }
    })?;
    Ok(Outcome::passed_with(format!(
        "{} -> {OUTSIDE_IP} seen from {seen}",
        pod.ip
    )))
}

fn removed_node_loses_its_routes(c: &Cluster) -> Result<Outcome, CheckError> {
    let gone = IpAddr::V4(multinode::node_ip(NODES));
    let others: Vec<usize> = (1..NODES).collect();
    let _pods = [c.pod(1, None)?, c.pod(NODES, None)?];
    let via_gone = |i: usize| -> Result<Vec<String>, String> {
        Ok(c.netd_routes(i)
            .map_err(|e| e.to_string())?
            .iter()
            .filter(|r| r.gateway == Some(gone))
            .map(|r| r.dst.to_string())
            .collect())
    };
    for &i in &others {
        eventually(|| match via_gone(i)? {
            v if v.is_empty() => Err(format!("node {i} has no route via {gone} to remove")),
            _ => Ok(()),
        })?;
    }
    let name = multinode::node_name(NODES);
    let out = c
        .lab
        .nodekitctl(&["node", "remove", &name])
        .map_err(|source| CheckError::Io {
            step: "run nodekitctl node remove".into(),
            source,
        })?;
    if !out.status.success() {
        return Err(CheckError::Violation(format!(
            "nodekitctl node remove {name} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    for &i in &others {
        eventually(|| match via_gone(i)? {
            v if v.is_empty() => Ok(()),
            v => Err(format!(
                "node {i} still routes {} via {gone} (protocol {})",
                v.join(", "),
                multinode::NETD_ROUTE_PROTOCOL
            )),
        })?;
    }
    Ok(Outcome::passed_with(format!(
        "routes via {gone} gone from nodes {others:?}"
    )))
}

/// Runs the selected multi-node tests, each target on its own fresh lab (none is built for
/// a target with nothing selected).
pub fn run(
    bin_dir: &Path,
    selected: &dyn Fn(&str) -> bool,
    reporter: &mut Reporter,
) -> Result<(), CniSuiteError> {
    for &mode in MODES {
        let group = group(mode);
        let checks = suite::select(&group, CHECKS, selected);
        if checks.is_empty() {
            continue;
        }
        let lab = MultiNodeLab::create(NODES, bin_dir)?;
        reporter.note(&format!(
            "== {group}: {NODES} nodes on underlay netns {}, etcd at {}, nodekit-netd from {}",
            lab.underlay().name(),
            multinode::etcd_url(),
            bin_dir.display()
        ));
        let cluster = Cluster {
            mode,
            bin_dir: bin_dir.to_path_buf(),
            lab,
        };
        suite::run_tests(reporter, SUITE, &group, checks, |c| (c.run)(&cluster));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multinode_names_carry_their_target_and_are_unique() {
        let names = test_names();
        assert_eq!(names.len(), MODES.len() * CHECKS.len());
        assert!(names[0].starts_with("cni[multinode-routed] "));
        assert!(names
            .last()
            .is_some_and(|n| n.starts_with("cni[multinode-bridge] ")));
        let unique: std::collections::HashSet<_> = names.iter().collect();
        assert_eq!(unique.len(), names.len());
    }
}
