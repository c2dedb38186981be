//! `nodekit-netd`, the node network daemon: registers the node in the IPAM datastore, then
//! keeps the node's routes to every other node's pods equal to what the datastore says, in a
//! level-triggered loop (kube-rs style: compute the whole desired set each pass, converge,
//! repeat), so a restart, a route deleted by hand or a departed node all converge.
//!
//! Routes (all in the main table, tagged with protocol [`RTPROT_NODEKIT`] so netd only ever
//! touches its own): each other node's block via that node's underlay address; a blackhole for
//! each own block (a pod's /32 from the plugin is more specific); a /32 (/128) via the holder
//! for every address borrowed from a block of another node. Pools that encapsulate route
//! through the VXLAN device of [`tunnel`], whose neighbour and FDB entries are reconciled
//! the same way.

pub mod nat;
pub mod tunnel;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use ipnetwork::IpNetwork;

use crate::ipam::model::{IpamState, NodeInfo, VxlanMode};
use crate::ipam::store::{transact_with, Datastore};
use crate::ipam::IpamError;
use crate::netlink::{format_mac, link_mtu, route_summary, Netlink, NetlinkError, RouteTarget};
pub use tunnel::{tunnel_peers, vxlan_mac, VXLAN_DEVICE, VXLAN_PORT, VXLAN_VNI};

/// The routing protocol number marking netd's routes (`ip route show proto 78`).
pub const RTPROT_NODEKIT: u8 = 78;

/// What netd can fail with.
#[derive(Debug, thiserror::Error)]
pub enum NetdError {
    /// The datastore failed.
    #[error(transparent)]
    Ipam(#[from] IpamError),
    /// Programming routes failed.
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    /// Programming the NAT table failed.
    #[error("natOutgoing: {0}")]
    Nat(String),
}

/// Which routes one reconcile pass changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// Routes added or corrected.
    pub set: Vec<IpNetwork>,
    /// Stale routes removed.
    pub removed: Vec<IpNetwork>,
}

/// Registers (or updates) `node` with its underlay address, underlay MTU and labels;
/// labels merge.
pub fn register(store: &dyn Datastore, node: &NodeInfo) -> Result<(), IpamError> {
    transact_with(store, |state| {
        let mut record = state.nodes().get(&node.name).cloned().unwrap_or_default();
        record.name = node.name.clone();
        record.ip = node.ip.or(record.ip);
        record.ip6 = node.ip6.or(record.ip6);
        record.labels.extend(node.labels.clone());
        record.vxlan_mac = node.vxlan_mac.clone().or(record.vxlan_mac);
        record.underlay_mtu = node.underlay_mtu.or(record.underlay_mtu);
        if state.nodes().get(&node.name) != Some(&record) {
            state.put_node(record);
        }
        Ok(())
    })
}

/// How this node reaches the others: its underlay subnet (for `CrossSubnet`) and its VXLAN
/// device, when one exists.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Underlay {
    /// The subnet of this node's `--node-ip`.
    pub subnet: Option<IpNetwork>,
    /// Index of the VXLAN device.
    pub vxlan_device: Option<u32>,
}

/// The routes node `me` should have, by destination.
pub fn desired_routes(
    state: &IpamState,
    me: &str,
    underlay: &Underlay,
) -> BTreeMap<IpNetwork, RouteTarget> {
    let ip_of = |node: &str, family_v4: bool| state.nodes().get(node)?.address(family_v4);
    let target = |pool: &str, ip: IpAddr| {
        let mode = state
            .pools()
            .get(pool)
            .map(|p| p.vxlan_mode)
            .unwrap_or_default();
        let encapsulate = match mode {
            VxlanMode::Never => false,
            VxlanMode::Always => true,
            VxlanMode::CrossSubnet => !underlay.subnet.is_some_and(|s| s.contains(ip)),
        };
        match (encapsulate, underlay.vxlan_device) {
            (true, Some(device)) => RouteTarget::Tunnel {
                gateway: ip,
                device,
            },
            _ => RouteTarget::Via(ip),
        }
    };
    let mut routes = BTreeMap::new();
    for block in state.blocks().values() {
        let v4 = block.cidr.is_ipv4();
        match block.affinity.as_deref() {
            Some(owner) if owner == me => {
                routes.insert(block.cidr, RouteTarget::Blackhole);
            }
            Some(owner) => {
                if let Some(ip) = ip_of(owner, v4) {
                    routes.insert(block.cidr, target(&block.pool, ip));
                }
            }
            None => {}
        }
        for (ordinal, handle_id) in &block.allocations {
            let Some(holder) = state.handles().get(handle_id).map(|h| h.node.as_str()) else {
                continue;
            };
            if Some(holder) == block.affinity.as_deref() || holder == me {
                continue;
            }
            if let Some(ip) = ip_of(holder, v4) {
                routes.insert(
                    IpNetwork::from(block.address(*ordinal)),
                    target(&block.pool, ip),
                );
            }
        }
    }
    routes
}

/// One pass: makes the kernel's protocol-78 routes equal to `desired`.
pub async fn reconcile(
    nl: &Netlink,
    desired: &BTreeMap<IpNetwork, RouteTarget>,
) -> Result<Reconciled, NetlinkError> {
    let mut actual = BTreeMap::new();
    for route in nl.routes().await? {
        if let Some((dst, target, proto)) = route_summary(&route) {
            if proto == RTPROT_NODEKIT {
                actual.insert(dst, (target, route));
            }
        }
    }
    let mut done = Reconciled::default();
    for (dst, target) in desired {
        if actual.get(dst).map(|(t, _)| t) != Some(target) {
            nl.replace_route(*dst, *target, RTPROT_NODEKIT).await?;
            done.set.push(*dst);
        }
    }
    for (dst, (_, route)) in actual {
        if !desired.contains_key(&dst) {
            nl.delete_route(route).await?;
            done.removed.push(dst);
        }
    }
    Ok(done)
}

/// Registers the node (with the MTU of the link carrying its address), then reconciles
/// routes, VXLAN peers and NAT at every datastore change and at least every `interval`,
/// forever (one pass when `once`). The state is read whole at the start, every `interval`
/// (which also repairs kernel state changed behind netd's back) and whenever the store
/// cannot say what changed; in between, the changes the store reports (an etcd watch) are
/// applied to it. Errors of a pass are logged and retried on the next one.
pub fn run(
    store: &dyn Datastore,
    node: &NodeInfo,
    interval: Duration,
    once: bool,
) -> Result<(), NetdError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(NetlinkError::Socket)?;
    let nl = runtime.block_on(async { Netlink::connect() })?;
    let underlay_link = match node.ip {
        Some(ip) => runtime.block_on(nl.link_with_address(ip))?,
        None => None,
    };
    let node = NodeInfo {
        vxlan_mac: Some(format_mac(&vxlan_mac(&node.name))),
        underlay_mtu: underlay_link.as_ref().and_then(|(link, _)| link_mtu(link)),
        ..node.clone()
    };
    register(store, &node)?;
    let mut daemon = Daemon {
        runtime,
        nl,
        underlay: Underlay {
            subnet: underlay_link.map(|(_, net)| net),
            vxlan_device: None,
        },
        node,
        nat_applied: None,
    };
    let mut state: Option<IpamState> = None;
    let mut read_at = Instant::now();
    for pass_number in 0u64.. {
        if state.is_none() || read_at.elapsed() >= interval {
            read_at = Instant::now();
            state = match store.read() {
                Ok(read) => Some(read),
                Err(err) if once => return Err(err.into()),
                Err(err) => {
                    tracing::warn!(%err, "reading the datastore failed; retrying");
                    None
                }
            };
        }
        if let Some(state) = &state {
            match daemon.pass(state, pass_number) {
                Ok(()) => {}
                Err(err) if once => return Err(err),
                Err(err) => tracing::warn!(%err, "reconcile failed; retrying"),
            }
        }
        if once {
            return Ok(());
        }
        match store.changes(interval.saturating_sub(read_at.elapsed())) {
            Ok(Some(changes)) => {
                if let Some(state) = &mut state {
                    state.apply(changes);
                }
            }
            Ok(None) => state = None,
            Err(err) => {
                tracing::warn!(%err, "watching the datastore failed");
                state = None;
                std::thread::sleep(interval);
            }
        }
    }
    Ok(())
}

/// What netd keeps between passes.
struct Daemon {
    runtime: tokio::runtime::Runtime,
    nl: Netlink,
    underlay: Underlay,
    node: NodeInfo,
    nat_applied: Option<nat::NatPlan>,
}

impl Daemon {
    /// Converges NAT, the VXLAN device and its peers, and the routes to `state`.
    fn pass(&mut self, state: &IpamState, pass_number: u64) -> Result<(), NetdError> {
        // The NAT tables are rewritten when the plan changes, and every 20 passes anyway in
        // case someone flushed them.
        let plan = nat::nat_plan(state);
        if self.nat_applied.as_ref() != Some(&plan) || pass_number.is_multiple_of(20) {
            nat::apply(&plan).map_err(NetdError::Nat)?;
            self.nat_applied = Some(plan);
        }
        let (nl, node, underlay) = (&self.nl, &self.node, &mut self.underlay);
        let (routes, peers) = self.runtime.block_on(async {
            underlay.vxlan_device = tunnel::ensure_tunnel(nl, state, node).await?;
            let desired = desired_routes(state, &node.name, underlay);
            // A device left from pools that no longer encapsulate is emptied too.
            let device = match underlay.vxlan_device {
                Some(device) => Some(device),
                None => nl.link(VXLAN_DEVICE).await?.map(|l| l.header.index),
            };
            let peers = match device {
                Some(device) => {
                    let peers = tunnel_peers(state, &desired);
                    tunnel::reconcile_peers(nl, device, &peers).await?
                }
                None => tunnel::PeersReconciled::default(),
            };
            let routes = reconcile(nl, &desired).await?;
            Ok::<_, NetdError>((routes, peers))
        })?;
        if !(routes.set.is_empty() && routes.removed.is_empty()) {
            tracing::info!(set = ?routes.set, removed = ?routes.removed, "routes converged");
        }
        if !(peers.set.is_empty() && peers.removed.is_empty()) {
            tracing::info!(set = ?peers.set, removed = ?peers.removed, "vxlan peers converged");
        }
        Ok(())
    }
}

/// The underlay address family check used by callers validating `--node-ip`.
pub fn is_usable_node_ip(ip: IpAddr) -> bool {
    !(ip.is_unspecified() || ip.is_loopback() || ip.is_multicast())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipam::allocator::{self, Overrides};
    use crate::ipam::model::{Handle, Pool};

    fn handle(id: &str, node: &str) -> Handle {
        Handle {
            id: id.into(),
            network: "n".into(),
            container_id: id.into(),
            ifname: "eth0".into(),
            node: node.into(),
            netns: String::new(),
            addresses: vec![],
            pod: None,
        }
    }

    #[test]
    fn routes_point_at_owners_blackhole_own_blocks_and_follow_borrowed_addresses() {
        let mut state = IpamState::default();
        let pool = Pool::new("p", "10.0.0.0/28".parse().unwrap(), Some(29)).unwrap();
        allocator::ensure_pool(&mut state, pool, Overrides::ALL).unwrap();
        for (name, ip) in [("a", "192.0.2.1"), ("b", "192.0.2.2"), ("c", "192.0.2.3")] {
            state.put_node(NodeInfo {
                name: name.into(),
                ip: Some(ip.parse().unwrap()),
                ip6: None,
                labels: Default::default(),
                vxlan_mac: Some(format_mac(&vxlan_mac(name))),
                underlay_mtu: None,
            });
        }
        allocator::assign(&mut state, handle("a1", "a"), &allocator::Choice::default()).unwrap();
        for i in 0..5 {
            allocator::assign(
                &mut state,
                handle(&format!("b{i}"), "b"),
                &allocator::Choice::default(),
            )
            .unwrap();
        }
        // Both blocks are claimed; c borrows from a's block.
        let borrowed =
            allocator::assign(&mut state, handle("c1", "c"), &allocator::Choice::default())
                .unwrap()[0]
                .address;
        let direct = Underlay::default();
        let on_a = desired_routes(&state, "a", &direct);
        assert_eq!(
            on_a[&"10.0.0.0/29".parse().unwrap()],
            RouteTarget::Blackhole
        );
        assert_eq!(
            on_a[&"10.0.0.8/29".parse().unwrap()],
            RouteTarget::Via("192.0.2.2".parse().unwrap())
        );
        let host = IpNetwork::from(borrowed.ip());
        assert_eq!(on_a[&host], RouteTarget::Via("192.0.2.3".parse().unwrap()));
        let on_c = desired_routes(&state, "c", &direct);
        assert!(
            !on_c.contains_key(&host),
            "the holder routes its pod itself"
        );
        assert_eq!(on_c.len(), 2);
        allocator::remove_node(&mut state, "b");
        assert!(!desired_routes(&state, "a", &direct).contains_key(&"10.0.0.8/29".parse().unwrap()));
    }

    #[test]
    fn vxlan_modes_choose_tunnel_or_direct_and_name_their_peers() {
        let mut state = IpamState::default();
        for (name, cidr, mode) in [
            ("always", "10.1.0.0/24", VxlanMode::Always),
            ("cross", "10.2.0.0/24", VxlanMode::CrossSubnet),
        ] {
            let mut pool = Pool::new(name, cidr.parse().unwrap(), Some(26)).unwrap();
            pool.vxlan_mode = mode;
            allocator::ensure_pool(&mut state, pool, Overrides::ALL).unwrap();
        }
        for (name, ip) in [
            ("a", "192.0.2.1"),
            ("near", "192.0.2.2"),
            ("far", "198.51.100.3"),
        ] {
            state.put_node(NodeInfo {
                name: name.into(),
                ip: Some(ip.parse().unwrap()),
                ip6: None,
                labels: Default::default(),
                vxlan_mac: Some(format_mac(&vxlan_mac(name))),
                underlay_mtu: None,
            });
        }
        for (node, pool) in [("near", "always"), ("near", "cross"), ("far", "cross")] {
            let h = handle(&format!("{node}-{pool}"), node);
            let only = [pool.to_string()];
            let choice = allocator::Choice {
                pools: Some(&only),
                ..Default::default()
            };
            allocator::assign(&mut state, h, &choice).unwrap();
        }
        let underlay = Underlay {
            subnet: Some("192.0.2.0/24".parse().unwrap()),
            vxlan_device: Some(7),
        };
        let routes = desired_routes(&state, "a", &underlay);
        let tunnel = |ip: &str| RouteTarget::Tunnel {
            gateway: ip.parse().unwrap(),
            device: 7,
        };
        assert_eq!(routes[&"10.1.0.0/26".parse().unwrap()], tunnel("192.0.2.2"));
        assert_eq!(
            routes[&"10.2.0.0/26".parse().unwrap()],
            RouteTarget::Via("192.0.2.2".parse().unwrap()),
            "same subnet: direct"
        );
        assert_eq!(
            routes[&"10.2.0.64/26".parse().unwrap()],
            tunnel("198.51.100.3")
        );
        let peers = tunnel_peers(&state, &routes);
        assert_eq!(peers.len(), 2);
        assert_eq!(peers[0].1, vxlan_mac("near"));
        // Without a VXLAN device (none created yet), routes fall back to direct.
        let bare = desired_routes(&state, "a", &Underlay::default());
        assert!(bare
            .values()
            .all(|t| !matches!(t, RouteTarget::Tunnel { .. })));
    }
}
